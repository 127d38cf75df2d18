"""``latkit train``: fit the hybrid latency model on a results directory."""

from __future__ import annotations

import click

from toolkit.cli.options import (
    dataset_selection,
    output_dir_option,
    results_selection_options,
    setup_logging,
    verbose_option,
)


@click.command("train")
@results_selection_options()
@output_dir_option(
    "Model directory to write (what --checkpoint takes in the other commands).",
    "--checkpoint-path",
    "--checkpoint_path",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="Where trees and decode net train (auto: cuda if visible).",
)
@click.option(
    "--batch-size",
    "--batch_size",
    "batch_size",
    type=click.IntRange(min=1),
    default=None,
    help="Minibatch (samples) of the decode net. Default: auto = max(16, n_train/100), about "
    "100 optimizer steps per epoch, so that 100k samples train in well under a minute and "
    "small sets still converge; give 64 for the original fixed size (slow on large sets).",
)
@click.option(
    "--num-epochs",
    "--num_epochs",
    "num_epochs",
    type=click.IntRange(min=1),
    default=50,
    show_default=True,
    help="Decode-net epochs (the trees stop early on their own).",
)
@click.option(
    "--lr",
    type=float,
    default=1e-2,
    show_default=True,
    help="Peak learning rate of the decode net (Adam, cosine decay to 5 %). The "
    "original's 1e-3 under-fits this small normalised net in 50 epochs on "
    "1k-sample sets; 1e-2 converges on 1k and 100k samples alike.",
)
@click.option(
    "--seed",
    type=int,
    default=3407,
    show_default=True,
    help="Seed of split, trees and decode net (same seed: same model on the CPU).",
)
@click.option(
    "--split",
    type=click.Choice(["sample", "config"]),
    default="sample",
    show_default=True,
    help="Validation split: random samples, or whole (tier, top_k, blocks) "
    "configurations held out.",
)
@click.option(
    "--val-fraction",
    "--val_fraction",
    "val_fraction",
    type=click.FloatRange(0, 1, max_open=True),
    default=0.2,
    show_default=True,
    help="Share of samples held out for validation.",
)
@click.option(
    "--max-samples",
    "--max_samples",
    "max_samples",
    type=click.IntRange(min=1),
    default=None,
    help="Use at most this many samples (seeded draw).",
)
@verbose_option
def train_command(
    results_dir: str,
    use_all_datasets: bool,
    dataset_names: str | None,
    outlier_ms: float,
    outlier_rel: float | None,
    output_dir: str,
    device: str,
    batch_size: int | None,
    num_epochs: int,
    lr: float,
    seed: int,
    split: str,
    val_fraction: float,
    max_samples: int | None,
    verbose: bool,
) -> None:
    """Train the latency model (XGBoost prefill + positional decode net) and save it.

    Example: latkit train --results-dir results/core_exp_h100 --use-all-datasets
    --output-dir checkpoints/latency_estimator
    """
    from toolkit.training import train_model

    setup_logging(verbose)
    names, use_all = dataset_selection(use_all_datasets, dataset_names)
    train_model(
        results_dir,
        output_dir,
        dataset_names=names,
        use_all_datasets=use_all,
        outlier_ms=outlier_ms,
        outlier_rel=outlier_rel,
        device=device,
        batch_size=batch_size,
        num_epochs=num_epochs,
        lr=lr,
        seed=seed,
        split=split,
        val_fraction=val_fraction,
        max_samples=max_samples,
    )
