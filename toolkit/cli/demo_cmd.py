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
    "--data",
    type=click.Choice(["small", "tiny"]),
    default="small",
    show_default=True,
    help="Bundled sweep: 'small' (compute-bound CPU model, the default) or 'tiny' "
    "(overhead-bound, trains faster).",
)
@click.option(
    "--results-dir",
    "--results_dir",
    "results_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Results to use instead of the bundled sweep chosen by --data.",
)
@click.option(
    "--target-results-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Results of another machine to recalibrate to (default: the bundled sweep's "
    "2-thread twin).",
)
@click.option("--num-epochs", "--num_epochs", "num_epochs", type=int, default=50, show_default=True)
def demo_command(
    work_dir: Path,
    data: str,
    results_dir: Path | None,
    target_results_dir: Path | None,
    num_epochs: int,
) -> None:
    """Train, evaluate (with baselines), score never-profiled configurations (sparse grid),
    plot, export, predict and recalibrate on bundled CPU measurements, then print a
    summary with every path.

    Takes under a minute on 2 CPU cores (the small sweep; the install takes longer).
    """
    setup_logging()
    summary = run_demo(
        work_dir,
        results_dir=results_dir,
        target_results_dir=target_results_dir,
        num_epochs=num_epochs,
        data=data,
    )
    click.echo(summary.text())
