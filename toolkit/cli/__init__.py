"""The ``latkit`` command line: a click group whose commands are thin wrappers.

Each command lives in its own module, parses its options, calls one importable
function and prints. Errors a user can fix (``LatkitError``, bad files, bad flags) end
in one line on stderr and exit status 2, never a traceback: click's own usage errors
(unknown option, missing or invalid value, unknown command) too, which click would print
as four lines (usage, hint, blank, error).
"""

from __future__ import annotations

import importlib
from typing import Any

import click

from toolkit import __version__
from toolkit.errors import LatkitError

#: Command name -> the module that defines it (as ``<name>_command``), in the order of the
#: typical flow. A command's module is imported only when that command runs (or ``--help``
#: lists them all): ``latkit profile`` then never pays for xgboost, polars or matplotlib,
#: and ``latkit --version`` starts in a fraction of a second instead of ~3 s.
COMMAND_MODULES: dict[str, str] = {
    "profile": "toolkit.cli.profile_cmd",
    "inspect": "toolkit.cli.inspect_cmd",
    "train": "toolkit.cli.train_cmd",
    "evaluate": "toolkit.cli.evaluate_cmd",
    "plot": "toolkit.cli.plot_cmd",
    "export": "toolkit.cli.export_cmd",
    "predict": "toolkit.cli.predict_cmd",
    "recalibrate": "toolkit.cli.recalibrate_cmd",
    "demo": "toolkit.cli.demo_cmd",
}


class _LatkitGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMAND_MODULES)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module_name = COMMAND_MODULES.get(cmd_name)
        if module_name is None:
            return None
        command = getattr(importlib.import_module(module_name), f"{cmd_name}_command")
        assert isinstance(command, click.Command) and command.name == cmd_name
        return command

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        # The group's own options (``latkit --bogus``) are parsed here. Messages name the
        # program "latkit" also under `python -c`, `python -m` or a test runner.
        try:
            return super().make_context(self.name, args, parent, **extra)
        except click.UsageError as exc:
            raise _one_line(exc) from None

    def invoke(self, ctx: click.Context) -> Any:
        # A command's options are parsed, and the command runs, inside the group's invoke.
        try:
            return super().invoke(ctx)
        except LatkitError as exc:
            raise _UserError(str(exc)) from None
        except click.UsageError as exc:
            raise _one_line(exc) from None


class _UserError(click.ClickException):
    """Shown as one line, ``Error: <message>``, on stderr; exit status 2."""

    exit_code = 2

    def format_message(self) -> str:
        return " ".join(self.message.split("\n"))


def _one_line(exc: click.UsageError) -> click.ClickException:
    """A click usage error as one line that names the command's --help."""
    if isinstance(exc, click.exceptions.NoArgsIsHelpError):
        return exc  # bare ``latkit``: the help text is the answer
    message = exc.format_message()
    if exc.ctx is not None:
        message += f" (see '{exc.ctx.command_path} --help')"
    return _UserError(message)


@click.group("latkit", cls=_LatkitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="latkit")
def main() -> None:
    """latkit: predict the latency of adaptive VLM inference (tier, top_k, active blocks).

    Typical flow: ``profile`` (or bring core-experiment results), ``inspect``, ``train``,
    ``evaluate``, ``plot``, ``export``, ``predict``. ``latkit demo`` runs all of it on the
    bundled dataset.
    """
