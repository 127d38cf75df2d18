"""``latkit recalibrate``: move a trained model to another machine with a few samples."""

from __future__ import annotations

from pathlib import Path

import click

from toolkit.cli.options import (
    checkpoint_option,
    output_dir_option,
    parse_dataset_names,
    results_selection_options,
    setup_logging,
)

#: ``toolkit.recalibrate.METHODS``, spelled here so that ``--help`` does not import the
#: recalibration code (torch, xgboost); tests/test_cli.py checks that the two agree.
METHOD_CHOICES: tuple[str, ...] = ("affine",)


@click.command("recalibrate")
@checkpoint_option("Source model artifact (trained on another machine).")
@results_selection_options()
@click.option(
    "--samples",
    "n_samples",
    type=click.IntRange(min=1),
    default=25,
    show_default=True,
    help="Calibration samples drawn evenly over the knob grid of the target results; more "
    "than the target's usable samples is an error.",
)
@click.option(
    "--method",
    type=click.Choice(METHOD_CHOICES),
    default="affine",
    show_default=True,
    help="affine: per-stage target = a x source + b (prefill, and each decode pass).",
)
@output_dir_option(
    "Where the recalibrated artifact goes (usable by every --checkpoint).", path_type=Path
)
@click.option(
    "--curve",
    is_flag=True,
    help="Also measure the error for N in 10, 25, 50, 100 and --samples against a model "
    "trained on the target itself, all scored on the same held-out target samples; the row "
    "N = --samples is the saved model. Writes recalibration_curve.png and .json into "
    "--output-dir.",
)
@click.option("--seed", type=int, default=3407, show_default=True)
def recalibrate_command(
    checkpoint: str,
    results_dir: str,
    use_all_datasets: bool,
    dataset_names: str | None,
    outlier_ms: float,
    outlier_rel: float | None,
    n_samples: int,
    method: str,
    output_dir: Path,
    curve: bool,
    seed: int,
) -> None:
    """Recalibrate a model to the machine that measured --results-dir.

    Fits per-stage affine maps on --samples calibration samples, saves the recalibrated
    artifact, and reports its error on the rest of the target results.
    """
    from toolkit.recalibrate import DEFAULT_CURVE_NS, run_recalibration

    setup_logging()
    report = run_recalibration(
        checkpoint,
        results_dir,
        output_dir,
        n_samples=n_samples,
        method=method,
        dataset_names=parse_dataset_names(dataset_names),
        outlier_ms=outlier_ms,
        outlier_rel=outlier_rel,
        curve_ns=DEFAULT_CURVE_NS if curve else (),
        seed=seed,
    )
    click.echo(report)
