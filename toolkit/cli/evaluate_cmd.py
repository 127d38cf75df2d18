"""``latkit evaluate``: score a trained model on profiled samples (and, optionally, baselines)."""

from __future__ import annotations

import click

from toolkit.cli.options import (
    checkpoint_option,
    dataset_selection,
    held_out_option,
    results_selection_options,
    setup_logging,
    unused_option,
    verbose_option,
)

#: ``--single-network-epochs`` (``evaluate --baselines`` and ``report``).
single_network_epochs_option = click.option(
    "--single-network-epochs",
    "--single_network_epochs",
    "single_network_epochs",
    type=click.IntRange(min=1),
    default=50,
    show_default=True,
    help="Epochs of the original single-network baseline (the original used 50).",
)


@click.command("evaluate")
@checkpoint_option()
@results_selection_options()
@click.option(
    "--output-file",
    "--output_file",
    "output_file",
    default="evaluation_results.json",
    show_default=True,
    type=click.Path(dir_okay=False, path_type=str),
    help="Where to write the evaluation JSON.",
)
@click.option(
    "--baselines",
    is_flag=True,
    default=False,
    help="Also fit the lookup-table, linear, original single-network and trees-only prefill "
    "(latkit 0.2) baselines on the checkpoint's training data and score them on the same "
    "samples (accuracy, bias, profiled vs never-profiled configurations).",
)
@click.option(
    "--train-results-dir",
    "--train_results_dir",
    "train_results_dir",
    default=None,
    type=click.Path(file_okay=False, path_type=str),
    help="Training results for the baselines, for a checkpoint without training_data.parquet.",
)
@held_out_option(
    "Drop the samples of the checkpoint's training split before scoring (for "
    "evaluating on the directory the model was trained from)."
)
@single_network_epochs_option
@click.option(
    "--seed",
    type=int,
    default=3407,
    show_default=True,
    help="Seed of the single-network and trees-only baselines.",
)
@click.option(
    "--device",
    default="cpu",
    show_default=True,
    help="Device of the single-network and trees-only baselines (cpu or cuda).",
)
@unused_option("--batch-size", "--batch_size", "batch_size", type=int)
@click.option(
    "--max-configs",
    "--max_configs",
    "max_configs",
    type=click.IntRange(min=1),
    default=30,
    show_default=True,
    help="Rows of the printed per-configuration table (the JSON has all).",
)
@verbose_option
def evaluate_command(
    checkpoint: str,
    results_dir: str,
    use_all_datasets: bool,
    dataset_names: str | None,
    outlier_ms: float,
    outlier_rel: float | None,
    output_file: str,
    baselines: bool,
    train_results_dir: str | None,
    held_out_only: bool,
    single_network_epochs: int,
    seed: int,
    device: str,
    batch_size: int | None,
    max_configs: int,
    verbose: bool,
) -> None:
    """Score a trained model: MAE/RMSE/MAPE/R², bias, coverage of the bounds, per-configuration
    errors (profiled or never profiled), baselines side by side.

    Example: latkit evaluate --checkpoint checkpoints/latency_estimator
    --results-dir results/core_exp_h100 --use-all-datasets --baselines
    """
    del batch_size
    setup_logging(verbose)
    # Imported here so `latkit --help` stays fast (torch, xgboost).
    from reports.evaluation import run_evaluation
    from reports.text import format_report

    names, use_all = dataset_selection(use_all_datasets, dataset_names)
    result = run_evaluation(
        checkpoint,
        results_dir,
        dataset_names=names,
        use_all_datasets=use_all,
        outlier_ms=outlier_ms,
        outlier_rel=outlier_rel,
        output_file=output_file,
        baselines=baselines,
        train_results_dir=train_results_dir,
        held_out_only=held_out_only,
        single_network_epochs=single_network_epochs,
        seed=seed,
        device=device,
    )
    click.echo(format_report(result, max_configs=max_configs))
    click.echo(f"\nEvaluation results written to {output_file}")
