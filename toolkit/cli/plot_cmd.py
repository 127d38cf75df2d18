"""``latkit plot``: figures comparing a trained model's predictions with measurements."""

from __future__ import annotations

import logging

import click

from toolkit.cli.options import (
    checkpoint_option,
    dataset_selection,
    held_out_option,
    output_dir_option,
    results_selection_options,
    setup_logging,
    unused_option,
    verbose_option,
)


@click.command("plot")
@checkpoint_option()
@results_selection_options()
@output_dir_option("Directory for the PNG figures (created if missing).")
@click.option(
    "--max-samples",
    "--max_samples",
    "max_samples",
    type=click.IntRange(min=1),
    default=10000,
    show_default=True,
    help="Plot a seeded random subset of at most this many samples.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the subset.")
@held_out_option("Drop the samples of the checkpoint's training split before plotting.")
@unused_option("--batch-size", "--batch_size", "batch_size", type=int)
@unused_option("--device")
@verbose_option
def plot_command(
    checkpoint: str,
    results_dir: str,
    use_all_datasets: bool,
    dataset_names: str | None,
    outlier_ms: float,
    outlier_rel: float | None,
    output_dir: str,
    max_samples: int,
    seed: int,
    held_out_only: bool,
    batch_size: int | None,
    device: str | None,
    verbose: bool,
) -> None:
    """Write scatter, error, decode-curve, calibration (coverage of the bounds) and
    never-profiled-configuration figures (PNG, headless) into --output-dir.

    Example: latkit plot --checkpoint checkpoints/latency_estimator
    --results-dir results/core_exp_h100 --output-dir visualizations/latency_estimator
    """
    del batch_size, device
    setup_logging(verbose)
    if not verbose:
        # reports.plots logs every figure it writes; the list printed below is the answer.
        logging.getLogger("reports.plots").setLevel(logging.WARNING)
    from reports.plots import run_plots

    names, use_all = dataset_selection(use_all_datasets, dataset_names)
    paths = run_plots(
        checkpoint,
        results_dir,
        output_dir,
        dataset_names=names,
        use_all_datasets=use_all,
        outlier_ms=outlier_ms,
        outlier_rel=outlier_rel,
        max_samples=max_samples,
        seed=seed,
        held_out_only=held_out_only,
    )
    click.echo(f"Wrote {len(paths)} figures to {output_dir}:")
    for path in paths:
        click.echo(f"  {path.name}")
