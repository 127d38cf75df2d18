"""The ``latkit`` group: every command resolves, and a command imports only what it needs."""

from __future__ import annotations

import json
import subprocess
import sys

import click
from click.testing import CliRunner

from toolkit.cli import COMMAND_MODULES, main

HEAVY = ("xgboost", "polars", "matplotlib", "sklearn", "onnxruntime", "torch", "transformers")


def test_every_command_resolves_and_is_listed() -> None:
    ctx = click.Context(main)
    assert main.list_commands(ctx) == sorted(COMMAND_MODULES)
    for name in COMMAND_MODULES:
        command = main.get_command(ctx, name)
        assert isinstance(command, click.Command) and command.name == name
        assert command.help, name  # --help has something to say
    assert main.get_command(ctx, "nosuch") is None
    listing = CliRunner().invoke(main, ["--help"])
    assert listing.exit_code == 0
    assert all(f"  {name} " in listing.output for name in COMMAND_MODULES)


def _modules_after(*args: str) -> set[str]:
    """Top-level modules imported by ``latkit ARGS`` in a fresh interpreter."""
    code = (
        "import json, sys\n"
        "from toolkit.cli import main\n"
        "try:\n"
        f"    main({list(args)!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


def test_commands_import_only_what_they_run() -> None:
    assert not _modules_after("--version") & set(HEAVY)
    # --help of one command needs none of the libraries that command would run.
    assert not _modules_after("profile", "--help") & set(HEAVY)
    assert not _modules_after("train", "--help") & set(HEAVY)
