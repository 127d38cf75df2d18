"""The ``latkit`` group: every command resolves, a command imports only what it needs, and a
usage error is one line on stderr."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from toolkit.cli import COMMAND_MODULES, main

HEAVY = ("xgboost", "polars", "matplotlib", "sklearn", "onnxruntime", "torch", "transformers")
#: Every command the group lists, whatever they are (a new command is covered by itself).
COMMANDS = main.list_commands(click.Context(main))


def test_every_command_resolves_and_is_listed() -> None:
    ctx = click.Context(main)
    assert sorted(COMMAND_MODULES) == COMMANDS
    for name in COMMANDS:
        command = main.get_command(ctx, name)
        assert isinstance(command, click.Command) and command.name == name
        assert command.help, name  # --help has something to say
    assert main.get_command(ctx, "nosuch") is None
    listing = CliRunner().invoke(main, ["--help"])
    assert listing.exit_code == 0
    assert all(f"  {name} " in listing.output for name in COMMANDS)


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


@pytest.mark.parametrize(
    "args",
    [("--version",), ("--help",), *((name, "--help") for name in COMMANDS)],
    ids=" ".join,
)
def test_help_imports_none_of_the_heavy_libraries(args: tuple[str, ...]) -> None:
    # `latkit --help` loads every command's module (for their one-line help): each must be
    # light at import time, and its --help needs none of the libraries the command runs.
    assert not _modules_after(*args) & set(HEAVY)


def test_recalibrate_method_choices_are_the_library_methods() -> None:
    from toolkit.cli.recalibrate_cmd import METHOD_CHOICES
    from toolkit.recalibrate import METHODS

    assert METHOD_CHOICES == METHODS


def _one_line_error(args: list[str]) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, (args, result.output)
    assert result.stdout == "", args
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), (args, result.stderr)
    return lines[0]


@pytest.mark.parametrize("name", COMMANDS)
def test_an_unknown_option_is_one_line_on_stderr(name: str) -> None:
    line = _one_line_error([name, "--no-such-option"])
    assert "--no-such-option" in line and f"latkit {name} --help" in line


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--no-such-option"], "No such option"),
        (["no-such-command"], "No such command"),
        (["train"], "Missing option '--results-dir'"),
        (["train", "--results-dir", "r", "--output-dir", "o", "--num-epochs", "0"], "0"),
        (["predict", "--checkpoint", "c", "--bound", "p99"], "p99"),
        (["export", "--checkpoint"], "requires an argument"),
        (
            [
                *("recalibrate", "--checkpoint", "c", "--results-dir", "r"),
                *("--output-dir", "o", "--samples", "0"),
            ],
            "--samples",
        ),
    ],
)
def test_usage_errors_are_one_line_on_stderr(args: list[str], says: str) -> None:
    assert says in _one_line_error(args)


def test_errors_of_latkit_itself_are_one_line_too(tmp_path: Path) -> None:
    line = _one_line_error(["inspect", "--results-dir", str(tmp_path / "missing")])
    assert str(tmp_path / "missing") in line


def test_plot_lists_each_figure_once(small_trained: tuple[Any, Path, Path], tmp_path: Path) -> None:
    _, checkpoint, results = small_trained
    out = tmp_path / "figures"
    args = ["plot", "--checkpoint", str(checkpoint), "--results-dir", str(results)]
    result = CliRunner().invoke(main, [*args, "--output-dir", str(out), "--max-samples", "200"])
    assert result.exit_code == 0, result.output
    figures = sorted(path.name for path in out.glob("*.png"))
    assert len(figures) >= 10
    for name in figures:
        assert result.stdout.count(name) == 1, name
        assert name not in result.stderr, name
