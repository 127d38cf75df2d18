"""The ``latkit`` command line: a click group whose commands are thin wrappers.

Each command lives in its own module, parses its options, calls one importable
function and prints. Errors a user can fix (``LatkitError``, bad files, bad flags) end
in one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

from typing import Any

import click

from toolkit import __version__
from toolkit.errors import LatkitError


class _LatkitGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LatkitError as exc:
            raise _UserError(str(exc)) from None


class _UserError(click.ClickException):
    exit_code = 2


@click.group(cls=_LatkitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="latkit")
def main() -> None:
    """latkit: predict the latency of adaptive VLM inference (tier, top_k, active blocks).

    Typical flow: ``profile`` (or bring core-experiment results), ``inspect``, ``train``,
    ``evaluate``, ``plot``, ``export``, ``predict``. ``latkit demo`` runs all of it on the
    bundled dataset.
    """


def _register() -> None:
    # One import per command module; each module defines one click command. Listed in the
    # order of the typical flow (click sorts --help itself).
    from toolkit.cli.demo_cmd import demo_command
    from toolkit.cli.evaluate_cmd import evaluate_command
    from toolkit.cli.export_cmd import export_command
    from toolkit.cli.inspect_cmd import inspect_command
    from toolkit.cli.plot_cmd import plot_command
    from toolkit.cli.predict_cmd import predict_command
    from toolkit.cli.profile_cmd import profile_command
    from toolkit.cli.recalibrate_cmd import recalibrate_command
    from toolkit.cli.train_cmd import train_command

    for command in (
        profile_command,
        inspect_command,
        train_command,
        evaluate_command,
        plot_command,
        export_command,
        predict_command,
        recalibrate_command,
        demo_command,
    ):
        main.add_command(command)


_register()
