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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from toolkit.errors import LatkitError
from toolkit.metrics import score_frame
from toolkit.models.bounds import ConformalBounds
from toolkit.models.calibration import Calibration
from toolkit.models.hybrid import HybridLatencyModel, predicted_passes

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
    shuffled = samples[order].with_columns(pl.int_range(pl.len()).over("config").alias("_round"))
    config_rank = {c: i for i, c in enumerate(rng.permutation(sorted(shuffled["config"].unique())))}
    ranked = shuffled.with_columns(
        pl.col("config").replace_strict(config_rank, return_dtype=pl.Int64).alias("_config_rank")
    ).sort("_round", "_config_rank")
    picked = ranked.head(n)["sample_key"]
    is_picked = pl.col("sample_key").is_in(picked.implode())
    return samples.filter(is_picked), samples.filter(~is_picked)


def _min_without_each(values: np.ndarray, include: np.ndarray) -> np.ndarray:
    """For every row i, the minimum of ``values`` over the included rows other than i
    (+inf where there is none)."""
    low = np.full(values.size, np.inf)
    rows = np.flatnonzero(include)
    if rows.size:
        order = rows[np.argsort(values[rows], kind="stable")]
        low[:] = values[order[0]]
        low[order[0]] = values[order[1]] if rows.size > 1 else np.inf
    return low


def _sum_without_each(values: np.ndarray) -> np.ndarray:
    """For every row i, the sum of ``values`` over the other rows: the sums before and after
    i, so that one huge value does not cancel away the others' precision (total - value
    would)."""
    before = np.concatenate([[0.0], np.cumsum(values)[:-1]])
    after = np.concatenate([np.cumsum(values[::-1])[::-1][1:], [0.0]])
    return before + after


def _affine_fit(
    source: np.ndarray,
    target: np.ndarray,
    ones: np.ndarray,
    include: np.ndarray,
    positive: np.ndarray,
    leave_one_out: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Relative least squares of target ~ a x source + b x ones over the ``include`` rows.

    Returns (a, b, rows fitted on): one fit (arrays of length 1), or with ``leave_one_out``
    one fit per row i on the included rows other than i, all from the same sums (O(n), not
    n fits). The offset is dropped (a scale-only fit) below 2 rows, when source / ones is
    constant (a and b are not identifiable), when the joint fit's scale is not positive, or
    when a x ``positive`` + b would not be positive on every row fitted on.
    """
    weight = include / np.maximum(np.abs(target), 1e-9) ** 2
    terms = [weight * source * source, weight * source * ones, weight * ones * ones]
    terms += [weight * source * target, weight * ones * target]
    ratio = source / np.maximum(ones, 1e-9)
    if leave_one_out:
        ss, so, oo, st, ot = (_sum_without_each(term) for term in terms)
        count = include.sum() - include
        spread = -_min_without_each(-ratio, include) - _min_without_each(ratio, include)
        lowest = _min_without_each(positive, include)
    else:
        ss, so, oo, st, ot = (np.array([term.sum()]) for term in terms)
        count = np.array([include.sum()])
        spread = np.array([np.ptp(ratio[include]) if include.any() else 0.0])
        lowest = np.array([positive[include].min() if include.any() else np.inf])
    with np.errstate(divide="ignore", invalid="ignore"):
        det = ss * oo - so * so
        scale = (oo * st - so * ot) / det
        offset = (ss * ot - so * st) / det
        scale_only = st / ss
        joint = (count >= 2) & (spread > 0) & (det > 0) & (scale > 0)
        joint &= scale * lowest + offset > 0
    return np.where(joint, scale, scale_only), np.where(joint, offset, 0.0), count


def fit_calibration(model: HybridLatencyModel, calibration: pl.DataFrame) -> Calibration:
    """Per-stage affine maps from the source model's predictions to the target's times."""
    if calibration.height == 0:
        return Calibration(method="affine", n_samples=0)
    predicted = model.uncalibrated().predict_frame(calibration)
    prefill, decode = _affine_maps(predicted, _Targets.of(calibration), leave_one_out=False)
    return Calibration(
        prefill_scale=float(prefill[0][0]),
        prefill_offset_ms=float(prefill[1][0]),
        decode_pass_scale=float(decode[0][0]),
        decode_pass_offset_ms=float(decode[1][0]),
        method="affine",
        n_samples=calibration.height,
    )


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


_Maps = tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def _affine_maps(
    predicted: Mapping[str, np.ndarray], targets: _Targets, leave_one_out: bool
) -> _Maps:
    """((prefill scale, offset), (decode pass scale, offset)) from the source model's
    predictions of the samples: one map, or one per left-out sample (``_affine_fit``).

    Prefill: every sample; a map must keep every prefill positive. Decode: the samples with
    decode passes, per pass (``ones`` are the passes); a map must keep every pass time
    positive. A stage with no sample to fit on keeps the identity.
    """
    everyone = np.ones(targets.prefill_ms.size, dtype=bool)
    prefill_ms = predicted["prefill_ms"]
    prefill_scale, prefill_offset, n_prefill = _affine_fit(
        prefill_ms, targets.prefill_ms, np.ones(everyone.size), everyone, prefill_ms, leave_one_out
    )
    passes = targets.passes
    has_passes = passes > 0
    total = predicted["decode_total_ms"]
    decode_scale, decode_offset, n_decode = _affine_fit(
        total,
        targets.decode_total_ms,
        passes,
        has_passes,
        total / np.maximum(passes, 1.0),
        leave_one_out,
    )
    return _or_identity(prefill_scale, prefill_offset, n_prefill), _or_identity(
        decode_scale, decode_offset, n_decode
    )


def _or_identity(
    scale: np.ndarray, offset: np.ndarray, n_fitted: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The fitted map, or the identity where it was fitted on no sample."""
    none = n_fitted == 0
    return np.where(none, 1.0, scale), np.where(none, 0.0, offset)


def recalibrate_bounds(model: HybridLatencyModel, calibration: pl.DataFrame) -> ConformalBounds:
    """Conformal bounds of the recalibrated model from leave-one-out scores on ``calibration``
    (see the module docstring). The source model predicts the samples once; each left-out
    sample's prediction is that prediction through the map fitted on the others (all maps
    at once, in O(N)). A single sample has no others: its map is the identity."""
    n = calibration.height
    if n == 0:
        return ConformalBounds()
    source = model.uncalibrated().predict_frame(calibration)
    targets = _Targets.of(calibration)
    passes = predicted_passes(calibration["output_tokens"].to_numpy())
    (prefill_scale, prefill_offset), (decode_scale, decode_offset) = _affine_maps(
        source, targets, leave_one_out=True
    )
    prefill_pred = prefill_scale * source["prefill_ms"] + prefill_offset
    decode_pred = decode_scale * source["decode_total_ms"] + decode_offset * passes
    return ConformalBounds.fit(
        targets.prefill_ms,
        prefill_pred,
        targets.decode_total_ms,
        decode_pred,
        passes,
        source="recalibration (leave-one-out)",
    )


def _total_factors(bounds: ConformalBounds, level: str) -> str:
    if bounds.is_unbounded(level):
        return "unbounded (P95 needs >= 19 samples)" if level == "p95" else "unbounded"
    prefill, decode, per_pass = bounds.total[level]
    return f"prefill x {prefill:.3f} + decode x {decode:.3f} + mean pass x {per_pass:.3f}"


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

    The calibration samples of every N are the first N of one seeded draw over the whole
    target (``calibration_split(target, N, seed)``: the 10 are among the 25, and so on), so
    the row of N is the very model ``recalibrate(model, target, N, seed=seed)`` returns,
    which ``latkit recalibrate --samples N`` saves. The evaluation part is a seeded
    ``eval_fraction`` of the samples that no N draws; every row is scored on it: the source
    model as is (N = 0), the recalibrated model for each N, and a model trained on the rest
    of the target ("target-trained", the bar to approach; its pool holds every calibration
    sample).
    """
    ns = sorted(set(ns))
    if not ns or ns[0] < 1 or ns[-1] >= target_samples.height:
        raise LatkitError(
            f"the recalibration curve needs 1 <= N < {target_samples.height} (the target's "
            f"usable samples), got N = {', '.join(map(str, ns))}"
        )
    largest, undrawn = calibration_split(target_samples, ns[-1], seed)
    rng = np.random.default_rng(seed)
    is_eval = pl.Series(rng.random(undrawn.height) < eval_fraction)
    evaluation = undrawn.filter(is_eval)
    if evaluation.height == 0:
        raise LatkitError(
            f"too few target samples for the recalibration curve: {target_samples.height}"
        )
    pool = pl.concat([largest, undrawn.filter(~is_eval)])
    rows = [CurveRow("source (no recalibration)", 0, *_score(model, evaluation))]
    for n in ns:
        calibrated, _, _ = recalibrate(model, target_samples, n, seed=seed)
        rows.append(CurveRow("affine recalibration", n, *_score(calibrated, evaluation)))
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


def _format_table(rows: pl.DataFrame, saved_n: int | None = None) -> str:
    """The curve as a table; the row of the saved model (N = ``saved_n``) is marked."""
    lines = [
        f"{'model':<30}{'N':>6}{'prefill MAPE':>14}{'prefill R2':>12}"
        f"{'decode MAPE':>13}{'decode R2':>11}{'total_p95 covers':>18}"
    ]
    for row in rows.iter_rows(named=True):
        saved = row["model"] == "affine recalibration" and row["n_samples"] == saved_n
        lines.append(
            f"{row['model']:<30}{row['n_samples']:>6}{row['prefill_mape_pct']:>13.2f}%"
            f"{row['prefill_r2']:>12.4f}{row['decode_total_mape_pct']:>12.2f}%"
            f"{row['decode_total_r2']:>11.4f}{100 * row['total_p95_coverage']:>17.1f}%"
            + ("  <- the saved model" if saved else "")
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

    if n_samples < 1:
        raise LatkitError(f"--samples must be at least 1, got {n_samples}")
    model = HybridLatencyModel.load(checkpoint)
    target = load_results(
        results_dir, dataset_names=dataset_names, outlier_ms=outlier_ms, outlier_rel=outlier_rel
    )
    if n_samples > target.n_samples:
        raise LatkitError(
            f"--samples {n_samples}: {results_dir} holds only {target.n_samples} usable samples"
        )
    calibrated, calibration, rest = recalibrate(model, target.samples, n_samples, method, seed)
    calibrated.save(output_dir)
    cal = calibrated.calibration
    lines = [
        f"Calibrated on {calibration.height} samples "
        f"({calibration['config'].n_unique()} configurations) of {results_dir}",
        f"  prefill'     = {cal.prefill_scale:.4f} x prefill {cal.prefill_offset_ms:+.3f} ms",
        f"  decode pass' = {cal.decode_pass_scale:.4f} x pass {cal.decode_pass_offset_ms:+.3f} ms",
        "  bounds re-calibrated (leave-one-out conformal): total P90 = "
        f"{_total_factors(calibrated.bounds, 'p90')}, P95 = "
        f"{_total_factors(calibrated.bounds, 'p95')}",
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
        # The saved model is the curve's row N = n_samples (same draw, same fit).
        ns = sorted({*curve_ns, n_samples})
        too_many = [n for n in ns if n >= target.n_samples]
        ns = [n for n in ns if n < target.n_samples]
        if not ns:
            raise LatkitError(
                f"--curve: {results_dir} has too few usable samples ({target.n_samples})"
            )
        curve = recalibration_curve(model, target.samples, target.steps, ns, seed=seed)
        # Beside the artifact's files: the manifest checksums only the files it lists.
        out = Path(output_dir)
        write_json_atomic(out / "recalibration_curve.json", curve.to_dicts())
        plot_curve(curve, out / "recalibration_curve.png")
        saved = (
            f", so the row N = {n_samples} is the saved model"
            if n_samples in ns
            else f"; the saved model (N = {n_samples}) leaves no sample to score on"
        )
        lines += [
            "",
            "Recalibration curve: every row scored on the same held-out target samples, which "
            "no row calibrated on; the calibration samples of N are the first N of one draw"
            f"{saved}.",
            _format_table(curve, saved_n=n_samples),
            f"Curve written to {out / 'recalibration_curve.png'} and recalibration_curve.json",
        ]
        if too_many:
            lines.append(
                f"(N = {', '.join(map(str, too_many))} left out: the target has "
                f"{target.n_samples} usable samples and the curve needs some to score on)"
            )
    return "\n".join(lines)
