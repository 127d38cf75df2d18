"""Recalibration of a trained model to another machine from a few target samples.

``fit_calibration`` fits the per-stage affine maps of ``toolkit.models.calibration`` on N
calibration samples drawn evenly over the knob grid; ``recalibrate_bounds`` re-calibrates
the conformal bounds on the same N samples; ``recalibration_curve`` measures how the error
(and the coverage of ``total_p95_ms``) on the rest of the target data changes with N, against
the uncalibrated source model and a model trained on the whole target pool.

The bounds' scores are leave-one-out: sample i is scored by the affine map fitted on the
other N - 1, so no score comes from a map that saw its own sample (scoring the fit's own
samples would under-state the error, and the bounds would under-cover). The conformal
quantile is the finite-sample one: with few samples the bound widens, and below 19 samples
the P95 bound is +inf (unknown) rather than a guess that could under-cover.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from toolkit.errors import LatkitError
from toolkit.metrics import score_frame
from toolkit.models.bounds import ConformalBounds
from toolkit.models.calibration import Calibration
from toolkit.models.hybrid import HybridLatencyModel

log = logging.getLogger("latkit.recalibrate")

METHODS = ("affine",)
DEFAULT_CURVE_NS: tuple[int, ...] = (10, 25, 50, 100)


def calibration_split(
    samples: pl.DataFrame, n: int, seed: int = 3407
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(calibration, rest): N samples spread evenly over the configurations.

    Configurations are visited in a seeded random order, one sample each, round after
    round, so N = 25 on a 75-configuration grid touches 25 different configurations and
    N = 100 touches every one at least once. N larger than the data takes all of it.
    """
    if n < 0:
        raise LatkitError(f"--samples must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(samples.height)
    shuffled = samples[order.tolist()].with_columns(
        pl.int_range(pl.len()).over("config").alias("_round")
    )
    config_rank = {c: i for i, c in enumerate(rng.permutation(sorted(shuffled["config"].unique())))}
    ranked = shuffled.with_columns(
        pl.col("config").replace_strict(config_rank, return_dtype=pl.Int64).alias("_config_rank")
    ).sort("_round", "_config_rank")
    picked = ranked.head(n)["sample_key"]
    is_picked = pl.col("sample_key").is_in(picked.implode())
    return samples.filter(is_picked), samples.filter(~is_picked)


def _affine_fit(source: np.ndarray, target: np.ndarray, ones: np.ndarray) -> tuple[float, float]:
    """Relative least squares of target ~ a x source + b x ones (scale only below 2 rows)."""
    weights = 1.0 / np.maximum(np.abs(target), 1e-9)
    if source.size >= 2 and np.ptp(source / np.maximum(ones, 1e-9)) > 0:
        design = np.stack([source, ones], axis=1) * weights[:, None]
        (scale, offset), *_ = np.linalg.lstsq(design, target * weights, rcond=None)
        if scale > 0:
            return float(scale), float(offset)
    scale = float(np.sum(weights**2 * source * target) / np.sum((weights * source) ** 2))
    return scale, 0.0


def fit_calibration(model: HybridLatencyModel, calibration: pl.DataFrame) -> Calibration:
    """Per-stage affine maps from the source model's predictions to the target's times."""
    if calibration.height == 0:
        return Calibration(method="affine", n_samples=0)
    predicted = model.uncalibrated().predict_frame(calibration)
    return _affine_maps(predicted, _Targets.of(calibration))


@dataclass(frozen=True)
class _Targets:
    """The measured times of calibration samples, as arrays."""

    prefill_ms: np.ndarray
    decode_total_ms: np.ndarray
    passes: np.ndarray  # decode passes measured

    @classmethod
    def of(cls, samples: pl.DataFrame) -> _Targets:
        return cls(
            samples["T_prefill_total"].to_numpy().astype(np.float64),
            samples["T_LLM_decode"].to_numpy().astype(np.float64),
            samples["n_decode_passes"].to_numpy().astype(np.float64),
        )

    def subset(self, keep: np.ndarray) -> _Targets:
        return _Targets(self.prefill_ms[keep], self.decode_total_ms[keep], self.passes[keep])


def _affine_maps(predicted: dict[str, np.ndarray], targets: _Targets) -> Calibration:
    """``fit_calibration`` given the source model's predictions of the samples."""
    prefill_true = targets.prefill_ms
    prefill_scale, prefill_offset = _affine_fit(
        predicted["prefill_ms"], prefill_true, np.ones_like(prefill_true)
    )
    if prefill_scale * predicted["prefill_ms"].min() + prefill_offset <= 0:
        prefill_scale, prefill_offset = _affine_fit(
            predicted["prefill_ms"], prefill_true, np.zeros_like(prefill_true)
        )
    passes = targets.passes
    has_passes = passes > 0
    decode_scale, decode_offset = 1.0, 0.0
    if has_passes.any():
        total_pred = predicted["decode_total_ms"][has_passes]
        total_true = targets.decode_total_ms[has_passes]
        decode_scale, decode_offset = _affine_fit(total_pred, total_true, passes[has_passes])
        mean_pass = total_pred / passes[has_passes]
        if decode_scale * mean_pass.min() + decode_offset <= 0:
            # The offset would make some pass time non-positive: keep the scale alone.
            decode_scale, decode_offset = _affine_fit(
                total_pred, total_true, np.zeros_like(total_pred)
            )
    return Calibration(
        prefill_scale=prefill_scale,
        prefill_offset_ms=prefill_offset,
        decode_pass_scale=decode_scale,
        decode_pass_offset_ms=decode_offset,
        method="affine",
        n_samples=int(prefill_true.size),
    )


def recalibrate_bounds(model: HybridLatencyModel, calibration: pl.DataFrame) -> ConformalBounds:
    """Conformal bounds of the recalibrated model from leave-one-out scores on ``calibration``
    (see the module docstring). The source model predicts the samples once; each left-out
    sample's prediction is that prediction through the map fitted on the others."""
    n = calibration.height
    if n == 0:
        return ConformalBounds()
    source = model.uncalibrated().predict_frame(calibration)
    targets = _Targets.of(calibration)
    # Passes of the prediction: N output tokens give N - 1 (as HybridLatencyModel.predict).
    predicted_passes = np.clip(
        calibration["output_tokens"].to_numpy().astype(np.float64) - 1, 0, None
    )
    prefill_pred = np.empty(n)
    total_pred = np.empty(n)
    for i in range(n):
        keep = np.ones(n, dtype=bool)
        keep[i] = False
        others = {name: values[keep] for name, values in source.items()}
        cal = _affine_maps(others, targets.subset(keep))
        prefill_pred[i] = cal.prefill(source["prefill_ms"][i])
        decode = cal.decode_total(source["decode_total_ms"][i], predicted_passes[i])
        total_pred[i] = prefill_pred[i] + decode
    total_true = targets.prefill_ms + targets.decode_total_ms
    return ConformalBounds.fit(
        targets.prefill_ms,
        prefill_pred,
        total_true,
        total_pred,
        source="recalibration (leave-one-out)",
    )


def recalibrate(
    model: HybridLatencyModel,
    target: pl.DataFrame,
    n_samples: int,
    method: str = "affine",
    seed: int = 3407,
) -> tuple[HybridLatencyModel, pl.DataFrame, pl.DataFrame]:
    """(recalibrated model, calibration samples, rest of target)."""
    if method not in METHODS:
        raise LatkitError(f"unknown recalibration method {method!r} (choose from {METHODS})")
    calibration, rest = calibration_split(target, n_samples, seed)
    fitted = fit_calibration(model, calibration)
    bounds = recalibrate_bounds(model, calibration) if calibration.height else None
    log.info(
        "Calibration on %d samples: prefill' = %.4f x prefill %+.3f ms; "
        "decode pass' = %.4f x pass %+.3f ms",
        calibration.height,
        fitted.prefill_scale,
        fitted.prefill_offset_ms,
        fitted.decode_pass_scale,
        fitted.decode_pass_offset_ms,
    )
    return model.with_calibration(fitted, bounds), calibration, rest


@dataclass
class CurveRow:
    model: str
    n_samples: int
    prefill_mape_pct: float
    prefill_r2: float
    decode_total_mape_pct: float
    decode_total_r2: float
    total_p95_coverage: float


def _score(
    model: HybridLatencyModel, samples: pl.DataFrame
) -> tuple[float, float, float, float, float]:
    """Prefill MAPE and R², decode total MAPE and R², coverage of ``total_p95_ms``."""
    scores = score_frame(samples, model.predict_frame(samples))
    prefill, decode = scores["prefill"], scores["decode_total"]
    covered = scores["coverage"]["total_p95_ms"]
    return prefill["mape_pct"], prefill["r2"], decode["mape_pct"], decode["r2"], covered


def recalibration_curve(
    model: HybridLatencyModel,
    target_samples: pl.DataFrame,
    target_steps: pl.DataFrame | None,
    ns: Sequence[int] = DEFAULT_CURVE_NS,
    seed: int = 3407,
    eval_fraction: float = 0.3,
    reference_params: dict[str, Any] | None = None,
) -> pl.DataFrame:
    """Error on a held-out part of the target for each N, with two reference rows.

    The target is split once (seeded, by sample) into a pool and an evaluation part;
    calibration samples come from the pool, and every row is scored on the same
    evaluation part: the source model as is (N = 0), the recalibrated model for each N,
    and a model trained on the whole pool ("target-trained", the bar to approach).
    """
    rng = np.random.default_rng(seed)
    is_eval = rng.random(target_samples.height) < eval_fraction
    evaluation = target_samples.filter(pl.Series(is_eval))
    pool = target_samples.filter(pl.Series(~is_eval))
    rows = [CurveRow("source (no recalibration)", 0, *_score(model, evaluation))]
    for n in ns:
        calibrated, _, _ = recalibrate(model, pool, n, seed=seed)
        rows.append(
            CurveRow("affine recalibration", min(n, pool.height), *_score(calibrated, evaluation))
        )
    params = {"seed": seed, **(reference_params or {})}
    pool_steps = None
    if target_steps is not None:
        pool_steps = target_steps.filter(pl.col("sample_key").is_in(pool["sample_key"].implode()))
    reference = HybridLatencyModel(**params).fit(pool, pool_steps)
    rows.append(
        CurveRow("target-trained (whole pool)", pool.height, *_score(reference, evaluation))
    )
    return pl.DataFrame([row.__dict__ for row in rows])


def plot_curve(curve: pl.DataFrame, path: str | Path) -> None:
    """recalibration_curve.png: MAPE of prefill and decode total, and the coverage of
    ``total_p95_ms``, against N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from toolkit.atomic import atomic_path

    calibrated = curve.filter(pl.col("model") == "affine recalibration")
    source = curve.filter(pl.col("model").str.starts_with("source")).row(0, named=True)
    reference = curve.filter(pl.col("model").str.starts_with("target")).row(0, named=True)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    axis = axes[2]
    axis.plot(
        calibrated["n_samples"],
        100 * calibrated["total_p95_coverage"],
        "o-",
        label="recalibrated bounds (inf below 19 samples)",
    )
    axis.axhline(
        100 * source["total_p95_coverage"], color="tab:red", ls="--", label="source model's bound"
    )
    axis.axhline(95, color="grey", ls=":", label="nominal 95 %")
    axis.set_xlabel("calibration samples N")
    axis.set_ylabel("held-out target actuals <= total_p95_ms (%)")
    axis.set_title("Coverage of total_p95_ms")
    axis.set_ylim(0, 101)
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8)
    for axis, key, title in [
        (axes[0], "prefill_mape_pct", "Prefill"),
        (axes[1], "decode_total_mape_pct", "Decode total"),
    ]:
        axis.plot(calibrated["n_samples"], calibrated[key], "o-", label="affine recalibration")
        axis.axhline(source[key], color="tab:red", ls="--", label="source model, no recalibration")
        axis.axhline(
            reference[key],
            color="tab:green",
            ls=":",
            label=f"trained on {reference['n_samples']} target samples",
        )
        axis.set_xlabel("calibration samples N")
        axis.set_ylabel("MAPE on held-out target samples (%)")
        axis.set_title(f"{title}: error vs calibration samples")
        axis.set_ylim(bottom=0)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _format_table(rows: pl.DataFrame) -> str:
    lines = [
        f"{'model':<30}{'N':>6}{'prefill MAPE':>14}{'prefill R2':>12}"
        f"{'decode MAPE':>13}{'decode R2':>11}{'total_p95 covers':>18}"
    ]
    for row in rows.iter_rows(named=True):
        lines.append(
            f"{row['model']:<30}{row['n_samples']:>6}{row['prefill_mape_pct']:>13.2f}%"
            f"{row['prefill_r2']:>12.4f}{row['decode_total_mape_pct']:>12.2f}%"
            f"{row['decode_total_r2']:>11.4f}{100 * row['total_p95_coverage']:>17.1f}%"
        )
    return "\n".join(lines)


def run_recalibration(
    checkpoint: str | Path,
    results_dir: str | Path,
    output_dir: str | Path,
    *,
    n_samples: int,
    method: str = "affine",
    dataset_names: Sequence[str] | None = None,
    outlier_ms: float | None = 60.0,
    outlier_rel: float | None = None,
    curve_ns: Sequence[int] = (),
    seed: int = 3407,
) -> str:
    """What ``latkit recalibrate`` does; returns the report it prints."""
    from toolkit.atomic import write_json_atomic
    from toolkit.data import load_results

    model = HybridLatencyModel.load(checkpoint)
    target = load_results(
        results_dir, dataset_names=dataset_names, outlier_ms=outlier_ms, outlier_rel=outlier_rel
    )
    calibrated, calibration, rest = recalibrate(model, target.samples, n_samples, method, seed)
    calibrated.save(output_dir)
    cal = calibrated.calibration
    lines = [
        f"Calibrated on {calibration.height} samples "
        f"({calibration['config'].n_unique()} configurations) of {results_dir}",
        f"  prefill'     = {cal.prefill_scale:.4f} x prefill {cal.prefill_offset_ms:+.3f} ms",
        f"  decode pass' = {cal.decode_pass_scale:.4f} x pass {cal.decode_pass_offset_ms:+.3f} ms",
        "  bounds re-calibrated (leave-one-out conformal): total P90 x "
        f"{calibrated.bounds.total['p90']:.3f}, P95 x {calibrated.bounds.total['p95']:.3f}"
        + (
            " (unbounded: P95 needs >= 19 samples)"
            if calibrated.bounds.total["p95"] == np.inf
            else ""
        ),
    ]
    if rest.height:
        before = _score(model, rest)
        after = _score(calibrated, rest)
        lines += [
            f"Error on the other {rest.height} target samples:",
            f"  prefill MAPE {before[0]:.2f}% -> {after[0]:.2f}%, "
            f"decode total MAPE {before[2]:.2f}% -> {after[2]:.2f}%, "
            f"total_p95_ms covers {100 * before[4]:.1f}% -> {100 * after[4]:.1f}%",
        ]
    lines.append(f"Recalibrated model saved to {output_dir}")
    if curve_ns:
        curve = recalibration_curve(model, target.samples, target.steps, curve_ns, seed=seed)
        # Beside the artifact's files: the manifest checksums only the files it lists.
        out = Path(output_dir)
        write_json_atomic(out / "recalibration_curve.json", curve.to_dicts())
        plot_curve(curve, out / "recalibration_curve.png")
        lines += [
            "",
            "Recalibration curve (every row scored on the same held-out target samples):",
            _format_table(curve),
            f"Curve written to {out / 'recalibration_curve.png'} and recalibration_curve.json",
        ]
    return "\n".join(lines)
