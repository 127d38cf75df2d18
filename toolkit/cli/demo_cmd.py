"""``latkit demo``: the whole pipeline on the bundled measured dataset."""

from __future__ import annotations

from pathlib import Path

import click

from toolkit.cli.options import setup_logging
from toolkit.demo import run_demo


@click.command("demo")
@click.option(
    "--work-dir",
    "--work_dir",
    "work_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("latkit-demo"),
    show_default=True,
    help="Where models, evaluations, figures and exported predictors go.",
)
@click.option(
    "--results-dir",
    "--results_dir",
    "results_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Results to use instead of the bundled data/core_exp_tiny_cpu.",
)
@click.option(
    "--target-results-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Results of another machine to recalibrate to (default: the bundled 2-thread sweep).",
)
@click.option("--num-epochs", "--num_epochs", "num_epochs", type=int, default=50, show_default=True)
def demo_command(
    work_dir: Path, results_dir: Path | None, target_results_dir: Path | None, num_epochs: int
) -> None:
    """Train, evaluate (with baselines), plot, export, predict and recalibrate on the
    bundled CPU measurements, then print a summary with every path.

    Takes a few minutes on 2 CPU cores.
    """
    setup_logging()
    summary = run_demo(
        work_dir,
        results_dir=results_dir,
        target_results_dir=target_results_dir,
        num_epochs=num_epochs,
    )
    click.echo(summary.text())
