"""Training: splits, and ``train_model`` (what ``latkit train`` runs).

``train_model`` loads a results directory, splits it (by sample or by configuration),
fits a :class:`HybridLatencyModel` (trees with early stopping on the validation split, then
the decode net, keeping its best epoch by validation loss), logs as the original
``train_latency_estimator.py`` did, and saves the artifact directory atomically.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl

from toolkit.errors import LatkitError
from toolkit.models.hybrid import EpochLog, HybridLatencyModel, auto_batch_size, resolve_device
from toolkit.models.prefill import capacity_summary

log = logging.getLogger(__name__)

SplitHow = Literal["sample", "config"]
CONFIG_KEYS: tuple[str, ...] = ("tier", "top_k", "num_active_blocks")


def split_samples(
    samples: pl.DataFrame,
    how: str = "sample",
    val_fraction: float = 0.2,
    seed: int = 3407,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Seeded (train, validation) split of a samples frame.

    ``how="sample"``: a random ``val_fraction`` of the samples. ``how="config"``: whole
    (tier, top_k, num_active_blocks) configurations are held out — a random subset of the
    configurations whose samples add up to about ``val_fraction`` of the data — so the
    validation score measures configurations the model never saw. Row order is kept.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise LatkitError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    n = samples.height
    if val_fraction == 0.0 or n == 0:
        return samples, samples.head(0)
    rng = np.random.default_rng(seed)
    if how == "sample":
        if n < 2:
            raise LatkitError(f"cannot split {n} sample(s) into training and validation sets")
        n_val = min(n - 1, max(1, round(n * val_fraction)))
        mask = np.zeros(n, dtype=bool)
        mask[rng.permutation(n)[:n_val]] = True
    elif how == "config":
        missing = [c for c in CONFIG_KEYS if c not in samples.columns]
        if missing:
            raise LatkitError(f"--split config needs columns {', '.join(missing)}")
        counts = (
            samples.group_by(CONFIG_KEYS).len().sort(list(CONFIG_KEYS))
        )  # sorted: the draw depends only on the seed, not on row order
        if counts.height < 2:
            raise LatkitError(
                f"--split config needs at least 2 configurations, the data has {counts.height}"
            )
        order = rng.permutation(counts.height)
        sizes = counts["len"].to_numpy()[order]
        # Take configurations in random order until the held-out share reaches the target;
        # always at least one held out and at least one kept.
        cumulative = np.cumsum(sizes)
        n_pick = int(np.searchsorted(cumulative, val_fraction * n, side="left")) + 1
        n_pick = min(max(n_pick, 1), counts.height - 1)
        held = (
            counts[order[:n_pick].tolist()]
            .select(CONFIG_KEYS)
            .with_columns(pl.lit(True).alias("_val"))
        )
        mask = (
            samples.select(CONFIG_KEYS)
            .join(held, on=list(CONFIG_KEYS), how="left", maintain_order="left")["_val"]
            .fill_null(False)
            .to_numpy()
        )
    else:
        raise LatkitError(f"--split must be 'sample' or 'config', got {how!r}")
    series = pl.Series("_val", mask)
    return samples.filter(~series), samples.filter(series)


#: The knob splits of DESIGN.md ("Knob splits"): which configurations are never profiled.
KNOB_SPLITS: tuple[str, ...] = ("config", "sparse", "extrap")
_SPARSE_TOP_K: tuple[int, ...] = (4, 8, 12)
_SPARSE_BLOCKS: tuple[int, ...] = (8, 12, 16)


def knob_split(samples: pl.DataFrame, name: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(profiled, never profiled) samples of a knob split (DESIGN.md, "Knob splits").

    - ``config``: hold out every configuration with top_k 10 or 14 blocks (interpolation);
    - ``sparse``: profile top_k 4/8/12 x blocks 8/12/16 of every tier, hold out the rest;
    - ``extrap``: hold out every configuration with top_k 12 or 16 blocks (the largest).
    """
    k, n = pl.col("top_k"), pl.col("num_active_blocks")
    if name == "config":
        held = (k == 10) | (n == 14)
    elif name == "sparse":
        held = ~(k.is_in(list(_SPARSE_TOP_K)) & n.is_in(list(_SPARSE_BLOCKS)))
    elif name == "extrap":
        held = (k == 12) | (n == 16)
    else:
        raise LatkitError(f"unknown knob split {name!r}: expected one of {', '.join(KNOB_SPLITS)}")
    return samples.filter(~held), samples.filter(held)


def subsample(samples: pl.DataFrame, max_samples: int | None, seed: int) -> pl.DataFrame:
    """At most ``max_samples`` rows, drawn with the seed (row order kept)."""
    if max_samples is None or samples.height <= max_samples:
        return samples
    if max_samples < 1:
        raise LatkitError(f"--max-samples must be >= 1, got {max_samples}")
    rng = np.random.default_rng(seed + 1)
    keep = np.zeros(samples.height, dtype=bool)
    keep[rng.choice(samples.height, max_samples, replace=False)] = True
    return samples.filter(pl.Series(keep))


def _steps_of(steps: pl.DataFrame | None, samples: pl.DataFrame) -> pl.DataFrame | None:
    if steps is None or steps.height == 0 or "sample_key" not in samples.columns:
        return steps
    return steps.join(samples.select("sample_key"), on="sample_key", how="semi")


@dataclass
class TrainResult:
    model: HybridLatencyModel
    output_dir: Path | None
    n_train: int
    validation: pl.DataFrame  # the held-out split: early stopping and validation metrics
    seconds: float
    validation_metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def n_val(self) -> int:
        return self.validation.height


def _log_epoch(entry: EpochLog) -> None:
    # Exactly the original tool's line (scripts parse it), shown with -v (debug level): by
    # default training shows a progress bar and one summary line.
    log.debug(
        "Epoch %d/%d: loss=%.6f, prefill_mae=%.3fms, decode_total_mae=%.3fms",
        entry.epoch,
        entry.num_epochs,
        entry.loss,
        entry.prefill_mae_ms,
        entry.decode_total_mae_ms,
    )
    if entry.best:
        log.debug(
            "Epoch %d: best validation loss so far (%.6g), weights kept",
            entry.epoch,
            entry.val_loss,
        )


def train_on_frames(
    samples: pl.DataFrame,
    steps: pl.DataFrame | None = None,
    *,
    output_dir: str | Path | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    num_epochs: int = 50,
    lr: float = 1e-2,
    seed: int = 3407,
    split: str = "sample",
    val_fraction: float = 0.2,
    max_samples: int | None = None,
    progress: bool = False,
    log_epochs: bool = True,
    model_params: dict[str, Any] | None = None,
) -> TrainResult:
    """Split, fit, (optionally) save: the whole of ``latkit train`` after loading."""
    if num_epochs < 1:
        raise LatkitError(f"--num-epochs must be >= 1, got {num_epochs}")
    if not (lr > 0 and math.isfinite(lr)):
        raise LatkitError(f"--lr must be a positive number, got {lr}")
    started = time.perf_counter()
    samples = subsample(samples, max_samples, seed)
    train, val = split_samples(samples, how=split, val_fraction=val_fraction, seed=seed)
    log.debug("Training samples: %d, Validation samples: %d", train.height, val.height)
    if split == "config":
        log.debug(
            "Held-out configurations: %d of %d",
            val.select(list(CONFIG_KEYS)).n_unique(),
            samples.select(list(CONFIG_KEYS)).n_unique(),
        )
    log.debug(
        "Decode net minibatch: %d samples (%s)",
        auto_batch_size(train.height, batch_size),
        "--batch-size" if batch_size is not None else "auto",
    )
    model = HybridLatencyModel(
        device=device,
        seed=seed,
        num_epochs=num_epochs,
        batch_size=batch_size,
        lr=lr,
        **(model_params or {}),
    )
    model.fit(
        train,
        _steps_of(steps, train),
        val_samples=val if val.height else None,
        val_steps=_steps_of(steps, val) if val.height else None,
        on_epoch=_log_epoch if log_epochs else None,
        progress=progress,
    )
    model.manifest["training_summary"]["split"] = split
    model.manifest["training_summary"]["val_fraction"] = val_fraction
    model.manifest["training_summary"]["max_samples"] = max_samples
    metrics = model.manifest.get("validation_metrics", {})
    out = None
    if output_dir is not None:
        out = Path(output_dir)
        model.save(out)
    summary = model.manifest["training_summary"]
    line = (
        f"Trained on {summary['n_train']} samples ({split} split; "
        f"{summary['n_val']} for early stopping, {summary.get('n_calibration', 0)} to "
        f"calibrate the bounds) in {time.perf_counter() - started:.1f} s"
    )
    if metrics:
        p, d = metrics["prefill"], metrics["decode_total"]
        cov = metrics.get("coverage", {})
        line += (
            f": validation prefill MAPE {_fmt(p.get('mape_pct'))}%, decode total MAPE "
            f"{_fmt(d.get('mape_pct'))}%, total_p95 covers {_fmt_share(cov.get('total_p95_ms'))}"
        )
    line += "; " + capacity_summary(model.manifest.get("prefill", {}).get("capacity", {}))
    log.info("%s%s", line, f" -> {out}" if out is not None else "")
    return TrainResult(
        model=model,
        output_dir=out,
        n_train=train.height,
        validation=val,
        seconds=time.perf_counter() - started,
        validation_metrics=metrics,
    )


def _fmt(value: Any, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _fmt_share(value: Any) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def train_model(
    results_dir: str | Path,
    output_dir: str | Path,
    *,
    dataset_names: list[str] | None = None,
    use_all_datasets: bool = True,
    outlier_ms: float | None = 60.0,
    outlier_rel: float | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    num_epochs: int = 50,
    lr: float = 1e-2,
    seed: int = 3407,
    split: str = "sample",
    val_fraction: float = 0.2,
    max_samples: int | None = None,
    progress: bool | None = None,
    model_params: dict[str, Any] | None = None,
) -> TrainResult:
    """Load ``results_dir``, train, save to ``output_dir``; logs like the original tool.
    ``model_params``: further ``HybridLatencyModel`` parameters (as ``train_on_frames``)."""
    import sys

    from tqdm.contrib.logging import logging_redirect_tqdm

    from toolkit.data import load_results

    resolve_device(device)  # fail fast on --device cuda without a GPU, before loading
    results = Path(results_dir)
    if not results.is_dir():
        raise LatkitError(f"{results}: results directory not found")
    loaded = load_results(
        results,
        dataset_names=dataset_names,
        use_all_datasets=use_all_datasets,
        outlier_ms=outlier_ms,
        outlier_rel=outlier_rel,
    )
    if progress is None:
        progress = sys.stderr.isatty()
    with logging_redirect_tqdm():
        result = train_on_frames(
            loaded.samples,
            loaded.steps,
            output_dir=output_dir,
            device=device,
            batch_size=batch_size,
            num_epochs=num_epochs,
            lr=lr,
            seed=seed,
            split=split,
            val_fraction=val_fraction,
            max_samples=max_samples,
            progress=progress,
            model_params=model_params,
        )
    best = result.model.manifest.get("best_epoch")
    log.debug("Best epoch (lowest validation loss): %s of %d", best, num_epochs)
    log.debug("Training completed! Best model saved to %s", output_dir)
    return result
