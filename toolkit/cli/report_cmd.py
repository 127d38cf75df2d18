"""``latkit report``: one self-contained HTML page of a model's evaluation."""

from __future__ import annotations

import click

from toolkit.cli.evaluate_cmd import single_network_epochs_option
from toolkit.cli.options import (
    checkpoint_option,
    dataset_selection,
    held_out_option,
    results_selection_options,
    setup_logging,
    verbose_option,
)


@click.command("report")
@checkpoint_option()
@results_selection_options()
@click.option(
    "--output-file",
    "--output_file",
    "output_file",
    default="report.html",
    show_default=True,
    type=click.Path(dir_okay=False, path_type=str),
    help="Where to write the HTML page.",
)
@click.option(
    "--baselines/--no-baselines",
    default=True,
    show_default=True,
    help="Fit the lookup-table, linear, original single-network and trees-only prefill "
    "baselines on the checkpoint's training data and show them beside the model.",
)
@held_out_option(
    "Drop the samples of the checkpoint's training split before scoring (for a report on "
    "the directory the model was trained from)."
)
@click.option(
    "--recalibration-curve",
    "--recalibration_curve",
    "recalibration_curve",
    default=None,
    type=click.Path(dir_okay=False, path_type=str),
    help="recalibration_curve.json written by `latkit recalibrate --curve` (default: the "
    "checkpoint's own, when it is a recalibrated model with one).",
)
@click.option(
    "--json-file",
    "--json_file",
    "json_file",
    default=None,
    type=click.Path(dir_okay=False, path_type=str),
    help="Also write the evaluation JSON the page shows (as `latkit evaluate --output-file`).",
)
@single_network_epochs_option
@click.option(
    "--max-samples",
    "--max_samples",
    "max_samples",
    type=click.IntRange(min=1),
    default=10000,
    show_default=True,
    help="The figures draw a seeded random subset of at most this many samples (the numbers "
    "use every sample).",
)
@verbose_option
def report_command(
    checkpoint: str,
    results_dir: str,
    use_all_datasets: bool,
    dataset_names: str | None,
    outlier_ms: float,
    outlier_rel: float | None,
    output_file: str,
    baselines: bool,
    held_out_only: bool,
    recalibration_curve: str | None,
    json_file: str | None,
    single_network_epochs: int,
    max_samples: int,
    verbose: bool,
) -> None:
    """Write one self-contained HTML page: model card, headline against the baselines and
    the noise floor, profiled vs never-profiled configurations, calibration of the bounds,
    long answers, every configuration, every figure of `latkit plot`, warnings.

    Example: latkit report --checkpoint checkpoints/latency_estimator
    --results-dir results/core_exp_h100 --held-out-only --output-file report.html
    """
    setup_logging(verbose)
    from reports.html import run_report

    names, use_all = dataset_selection(use_all_datasets, dataset_names)
    written = run_report(
        checkpoint,
        results_dir,
        output_file,
        dataset_names=names,
        use_all_datasets=use_all,
        outlier_ms=outlier_ms,
        outlier_rel=outlier_rel,
        held_out_only=held_out_only,
        baselines=baselines,
        recalibration_curve=recalibration_curve,
        json_file=json_file,
        max_samples=max_samples,
        single_network_epochs=single_network_epochs,
    )
    for warning in written.evaluation.get("warnings", []):
        click.echo(f"⚠ {warning['message']}", err=True)
    click.echo(f"Report written to {written.path} ({written.n_bytes / 1024:.0f} KB)")
