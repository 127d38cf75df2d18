"""Scoring a latency model on profiled samples: metrics, per-configuration table, baselines.

``evaluate_model`` returns the evaluation JSON of ``latkit evaluate`` as a dict;
``format_report`` renders it for a terminal; ``write_evaluation`` writes it atomically (NaN as
null); ``run_evaluation`` is the one function the CLI calls (load checkpoint and data, evaluate,
write).

Beyond accuracy: ``coverage`` (share of actuals at or below each bound output, against its
nominal level) and ``bias`` (share of actuals at or below the point prediction, 0.5 =
unbiased), and every configuration marked ``profiled`` or not (in the model's training data
or not), with the never-profiled configurations scored apart (``profiling``): DESIGN.md's
"configs never profiled" and "safe bounds" targets.

Targets, as the original tools defined them:

- ``prefill``: ``T_prefill_total`` (vision + LLM prefill), every sample.
- ``decode_total``: ``T_LLM_decode`` over samples with at least one decode pass.
- ``decode_per_token``: decode total / passes (the mean time of one pass), same samples; the
  prediction is the predicted decode total over the same passes, so every model is divided
  the same way.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import polars as pl

from reports.baselines import (
    BASELINE_NAMES,
    LinearBaseline,
    LookupTableBaseline,
    OriginalSingleNetwork,
    TreesOnlyPrefill,
    baseline_training_samples,
    decode_passes,
)
from toolkit.atomic import write_json_atomic
from toolkit.errors import LatkitError
from toolkit.features import BOUND_LEVELS, config_name
from toolkit.metrics import RegressionMetrics, regression_metrics
from toolkit.metrics import coverage_and_bias as metrics_coverage_and_bias
from toolkit.training import CONFIG_KEYS

log = logging.getLogger(__name__)

__all__ = [
    "METRIC_KEYS",
    "Predictor",
    "coverage_and_bias",
    "drop_training_samples",
    "evaluate_model",
    "fit_baselines",
    "format_report",
    "jsonable",
    "load_checkpoint",
    "model_training_data",
    "noise_floor",
    "per_config_table",
    "profiled_mask",
    "profiling_summary",
    "run_evaluation",
    "score_predictions",
    "write_evaluation",
]

#: Keys of each metric block, in the order the JSON and the tables show them.
METRIC_KEYS: tuple[str, ...] = ("n", "mae_ms", "rmse_ms", "mape_pct", "r2", "rel_error_pct")

#: Display names of the models in the side-by-side table.
MODEL_LABELS: dict[str, str] = {
    "hybrid": "hybrid (physics x trees + decode net)",
    "lookup_table": "lookup table (config means)",
    "linear": "linear regression",
    "single_network": "original single network",
    "trees_only": "trees-only prefill (latkit 0.2)",
}

#: Columns a samples frame needs for scoring.
REQUIRED_COLUMNS: tuple[str, ...] = (
    "tier",
    "top_k",
    "num_active_blocks",
    "T_prefill_total",
    "T_LLM_decode",
)


class Predictor(Protocol):
    """Anything with ``predict_frame`` (the hybrid model, the baselines)."""

    def predict_frame(self, samples: pl.DataFrame) -> Mapping[str, np.ndarray]: ...


def _check_columns(samples: pl.DataFrame, what: str) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in samples.columns]
    if missing:
        raise LatkitError(f"{what} lacks column(s): {', '.join(missing)}")


def score_predictions(
    samples: pl.DataFrame, predictions: Mapping[str, np.ndarray]
) -> dict[str, RegressionMetrics]:
    """Metric blocks ``prefill``, ``decode_total``, ``decode_per_token`` of one model (the
    decode blocks only when it predicts ``decode_total_ms``: a prefill-only baseline has
    none)."""
    prefill_true = samples["T_prefill_total"].to_numpy()
    prefill_pred = np.asarray(predictions["prefill_ms"], dtype=np.float64)
    scores = {"prefill": regression_metrics(prefill_true, prefill_pred)}
    if "decode_total_ms" not in predictions:
        return scores
    passes = decode_passes(samples)
    has = passes > 0
    decode_true = samples["T_LLM_decode"].to_numpy()
    decode_pred = np.asarray(predictions["decode_total_ms"], dtype=np.float64)
    scores["decode_total"] = regression_metrics(decode_true[has], decode_pred[has])
    scores["decode_per_token"] = regression_metrics(
        decode_true[has] / passes[has], decode_pred[has] / passes[has]
    )
    return scores


def coverage_and_bias(
    samples: pl.DataFrame, predictions: Mapping[str, np.ndarray]
) -> dict[str, dict[str, float]]:
    """``toolkit.metrics.coverage_and_bias`` of a samples frame (the definitions
    ``HybridLatencyModel.evaluate`` uses too)."""
    return metrics_coverage_and_bias(
        samples["T_prefill_total"].to_numpy(),
        samples["T_LLM_decode"].to_numpy(),
        decode_passes(samples) > 0,
        predictions,
    )


def _config_frame(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.select(
        pl.col("tier").cast(pl.Utf8),
        pl.col("top_k").cast(pl.Int64),
        pl.col("num_active_blocks").cast(pl.Int64),
    )


def profiled_mask(samples: pl.DataFrame, training: pl.DataFrame | None) -> np.ndarray | None:
    """Per sample: is its configuration (tier, top_k, num_active_blocks) in ``training`` (the
    model's training data)? None when ``training`` is None or lacks those columns."""
    if training is None or not set(CONFIG_KEYS) <= set(training.columns):
        return None
    profiled = _config_frame(training).unique().with_columns(pl.lit(True).alias("_profiled"))
    joined = _config_frame(samples).join(
        profiled, on=list(CONFIG_KEYS), how="left", maintain_order="left"
    )
    return joined["_profiled"].fill_null(False).to_numpy().astype(bool)


def _ape(pred: np.ndarray, true: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Absolute percentage error where ``keep`` and the actual is positive, else NaN."""
    ok = keep & (true > 0)
    return np.where(ok, np.abs(pred - true) / np.where(ok, true, 1.0) * 100.0, np.nan)


def per_config_table(
    samples: pl.DataFrame,
    predictions: Mapping[str, np.ndarray],
    profiled: np.ndarray | None = None,
) -> dict[str, dict[str, Any]]:
    """``{"<tier>_<k>_<blocks>": {count, prefill_mae_ms, decode_total_mae_ms,
    prefill_mape_pct, decode_total_mape_pct, profiled}}``, by count.

    The decode columns cover the configuration's samples with at least one decode pass (NaN
    when it has none). ``profiled`` (see ``profiled_mask``) is None when unknown. Ties in count
    keep the configuration names in sorted order.
    """
    passes = decode_passes(samples)
    prefill_true = samples["T_prefill_total"].to_numpy().astype(np.float64)
    decode_true = samples["T_LLM_decode"].to_numpy().astype(np.float64)
    prefill_pred = np.asarray(predictions["prefill_ms"], dtype=np.float64)
    decode_pred = np.asarray(predictions["decode_total_ms"], dtype=np.float64)
    everything = np.ones(samples.height, dtype=bool)
    frame = pl.DataFrame(
        {
            "tier": samples["tier"].cast(pl.Utf8),
            "top_k": samples["top_k"].cast(pl.Int64),
            "blocks": samples["num_active_blocks"].cast(pl.Int64),
            "prefill_err": np.abs(prefill_pred - prefill_true),
            "decode_err": np.where(passes > 0, np.abs(decode_pred - decode_true), np.nan),
            "prefill_ape": _ape(prefill_pred, prefill_true, everything),
            "decode_ape": _ape(decode_pred, decode_true, passes > 0),
            "profiled": everything if profiled is None else np.asarray(profiled, dtype=bool),
        }
    ).with_columns(pl.col("decode_err", "prefill_ape", "decode_ape").fill_nan(None))
    grouped = frame.group_by("tier", "top_k", "blocks").agg(
        pl.len().alias("count"),
        pl.col("prefill_err").mean().alias("prefill_mae_ms"),
        pl.col("decode_err").mean().alias("decode_total_mae_ms"),
        pl.col("prefill_ape").mean().alias("prefill_mape_pct"),
        pl.col("decode_ape").mean().alias("decode_total_mape_pct"),
        pl.col("profiled").first(),
    )

    def number(value: Any) -> float:
        return math.nan if value is None else float(value)

    table: dict[str, dict[str, Any]] = {}
    for row in grouped.iter_rows(named=True):
        table[config_name(row["tier"], row["top_k"], row["blocks"])] = {
            "count": int(row["count"]),
            "prefill_mae_ms": float(row["prefill_mae_ms"]),
            "decode_total_mae_ms": number(row["decode_total_mae_ms"]),
            "prefill_mape_pct": number(row["prefill_mape_pct"]),
            "decode_total_mape_pct": number(row["decode_total_mape_pct"]),
            "profiled": None if profiled is None else bool(row["profiled"]),
        }
    return dict(sorted(table.items(), key=lambda item: (-int(item[1]["count"]), item[0])))


def _mape_ratio(unprofiled: Mapping[str, Any], profiled: Mapping[str, Any]) -> float:
    never, seen = unprofiled.get("mape_pct", math.nan), profiled.get("mape_pct", math.nan)
    ok = all(isinstance(v, float) and math.isfinite(v) for v in (never, seen)) and seen > 0
    return float(never / seen) if ok else math.nan


def profiling_summary(
    samples: pl.DataFrame, predictions: Mapping[str, np.ndarray], profiled: np.ndarray
) -> dict[str, Any]:
    """Metrics of the profiled and of the never-profiled configurations separately.

    ``profiled`` / ``unprofiled``: ``n_configs``, ``n_samples``, the ``prefill`` and
    ``decode_total`` metric blocks, ``bias`` and ``coverage`` (as ``coverage_and_bias``);
    ``mape_ratio``: never-profiled MAPE / profiled MAPE of prefill and decode total (DESIGN.md
    targets 1.10x interpolation, 1.15x sparse grid, 1.25x beyond the grid; NaN when a side is
    empty).
    """
    out: dict[str, Any] = {}
    for name, keep in (("profiled", profiled), ("unprofiled", ~profiled)):
        part = samples.filter(pl.Series(keep))
        part_pred = {k: np.asarray(v)[keep] for k, v in predictions.items()}
        scores = score_predictions(part, part_pred)
        block: dict[str, Any] = {
            "n_configs": int(_config_frame(part).unique().height),
            "n_samples": int(part.height),
        }
        block.update({k: v for k, v in scores.items() if k in ("prefill", "decode_total")})
        checks = coverage_and_bias(part, part_pred)
        block["bias"] = checks["bias"]
        if checks["coverage"]:
            block["coverage"] = checks["coverage"]
        out[name] = block
    out["mape_ratio"] = {
        target: _mape_ratio(out["unprofiled"][target], out["profiled"][target])
        for target in ("prefill", "decode_total")
        if target in out["profiled"]
    }
    return out


#: Samples with equal values here did identical work (same knobs, same prompt length);
#: decode adds the number of passes. Their spread is measurement noise.
_PREFILL_WORK: tuple[str, ...] = (
    "tier",
    "top_k",
    "num_active_blocks",
    "vision_tokens",
    "text_tokens",
)
_DECODE_WORK: tuple[str, ...] = (*_PREFILL_WORK, "n_decode_passes")


def _repeat_noise(frame: pl.DataFrame, keys: Sequence[str], target: str) -> dict[str, Any]:
    """Error of a perfect model, estimated from repeated measurements of identical work.

    For each sample in a group of n >= 2 identical ones, the error of the mean of the others
    (leave-one-out) has variance sigma² x n / (n - 1); scaling it by sqrt((n - 1) / n) leaves
    an estimate of the noise itself, i.e. of what a model that knew the true mean would miss
    by on this data.
    """
    keys = [k for k in keys if k in frame.columns]
    grouped = (
        frame.select([*keys, target])
        .with_columns(
            pl.len().over(keys).alias("_n"), pl.col(target).sum().over(keys).alias("_sum")
        )
        .filter(pl.col("_n") >= 2)
    )
    if grouped.height == 0:
        return {"n": 0, "n_groups": 0, "mae_ms": math.nan, "mape_pct": math.nan}
    n = grouped["_n"].to_numpy().astype(np.float64)
    value = grouped[target].to_numpy().astype(np.float64)
    loo = (grouped["_sum"].to_numpy() - value) / (n - 1)
    error = np.abs(value - loo) * np.sqrt((n - 1) / n)
    positive = value > 0
    return {
        "n": int(grouped.height),
        "n_groups": int(grouped.select(keys).unique().height),
        "mae_ms": float(error.mean()),
        "mape_pct": float(np.mean(error[positive] / value[positive]) * 100)
        if positive.any()
        else math.nan,
    }


def noise_floor(samples: pl.DataFrame) -> dict[str, dict[str, Any]]:
    """Measurement-noise floor of ``prefill``, ``decode_total`` and ``decode_per_token``.

    No model can beat it on these samples; where it is above the design targets, the target
    is the floor. Computed from samples that repeat identical work (see ``_repeat_noise``).
    """
    if not set(_PREFILL_WORK) <= set(samples.columns):
        return {}
    passes = decode_passes(samples)
    decode = samples.with_columns(
        pl.Series("n_decode_passes", passes),
        pl.Series("_per_token", samples["T_LLM_decode"].to_numpy() / np.maximum(passes, 1.0)),
    ).filter(pl.Series(passes > 0))
    return {
        "prefill": _repeat_noise(samples, _PREFILL_WORK, "T_prefill_total"),
        "decode_total": _repeat_noise(decode, _DECODE_WORK, "T_LLM_decode"),
        "decode_per_token": _repeat_noise(decode, _DECODE_WORK, "_per_token"),
    }


def fit_baselines(
    train_samples: pl.DataFrame,
    train_steps: pl.DataFrame | None = None,
    *,
    single_network_epochs: int = 50,
    seed: int = 3407,
    device: str = "cpu",
    prefill_params: Mapping[str, Any] | None = None,
) -> dict[str, Predictor]:
    """The baselines, fit on the same training samples, keyed as in the JSON.

    ``prefill_params``: ``PrefillModel`` parameters of the trees-only prefill (the evaluated
    model's own, so that only the structure differs); its structure, seed and device are the
    baseline's.
    """
    _check_columns(train_samples, "training data")
    models: dict[str, Predictor] = {}
    started = time.perf_counter()
    models["lookup_table"] = LookupTableBaseline().fit(train_samples, train_steps)
    models["linear"] = LinearBaseline().fit(train_samples, train_steps)
    network = OriginalSingleNetwork(epochs=single_network_epochs, seed=seed, device=device)
    models["single_network"] = network.fit(train_samples, train_steps)
    trees = TreesOnlyPrefill(seed=seed, device=device, prefill_params=prefill_params)
    models["trees_only"] = trees.fit(train_samples, train_steps)
    log.info(
        "Fit baselines on %d training samples in %.1f s (single network: %d epochs)",
        train_samples.height,
        time.perf_counter() - started,
        single_network_epochs,
    )
    return models


def _passes_range(samples: pl.DataFrame) -> list[int]:
    passes = decode_passes(samples)
    return [int(passes.min()), int(passes.max())] if passes.size else [0, 0]


def _prefill_params(model: Any) -> dict[str, Any] | None:
    """The ``PrefillModel`` parameters of a hybrid model (None for anything else)."""
    get_params = getattr(getattr(model, "prefill", None), "get_params", None)
    return dict(get_params()) if callable(get_params) else None


def evaluate_model(
    model: Predictor,
    samples: pl.DataFrame,
    steps: pl.DataFrame | None = None,
    *,
    baselines: bool = False,
    train_samples: pl.DataFrame | None = None,
    train_steps: pl.DataFrame | None = None,
    n_filtered_outliers: int = 0,
    single_network_epochs: int = 50,
    seed: int = 3407,
    device: str = "cpu",
    fitted_baselines: Mapping[str, Predictor] | None = None,
    model_training: pl.DataFrame | None = None,
) -> dict[str, Any]:
    """The evaluation dict of ``latkit evaluate`` (keys as in issue 5, extra keys welcome).

    ``steps`` is accepted for symmetry with the loader; the metrics use sample totals. With
    ``baselines=True`` the baselines are fit on ``train_samples`` (or ``fitted_baselines`` are
    used as they are) and scored on the same ``samples``.

    ``model_training`` (default: ``model.training_data``) is the data the model was fitted
    on: a configuration in it is ``profiled``, and the ``profiling`` block scores the
    profiled and the never-profiled configurations separately (for the model and each
    baseline). Without it, ``profiled`` is None and there is no ``profiling`` block.
    """
    del steps
    _check_columns(samples, "evaluation samples")
    if samples.height == 0:
        raise LatkitError("no samples to evaluate")
    if model_training is None:
        own = getattr(model, "training_data", None)
        model_training = own if isinstance(own, pl.DataFrame) and own.height else None
    profiled = profiled_mask(samples, model_training)
    predictions = model.predict_frame(samples)
    result: dict[str, Any] = {
        "n_samples": int(samples.height),
        "n_filtered_outliers": int(n_filtered_outliers),
        **score_predictions(samples, predictions),
        **coverage_and_bias(samples, predictions),
        "per_config": per_config_table(samples, predictions, profiled),
        "n_configs": int(samples.select("tier", "top_k", "num_active_blocks").unique().height),
        "n_decode_passes_range": _passes_range(samples),
        "noise_floor": noise_floor(samples),
    }
    if profiled is not None:
        result["profiling"] = profiling_summary(samples, predictions, profiled)
    if baselines:
        if fitted_baselines is None:
            if train_samples is None or train_samples.height == 0:
                raise LatkitError(
                    "--baselines needs training data: the checkpoint has no "
                    "training_data.parquet; pass --train-results-dir"
                )
            train_samples = baseline_training_samples(train_samples, seed)
            fitted_baselines = fit_baselines(
                train_samples,
                train_steps,
                single_network_epochs=single_network_epochs,
                seed=seed,
                device=device,
                prefill_params=_prefill_params(model),
            )
        block: dict[str, Any] = {}
        for name in BASELINE_NAMES:
            if name not in fitted_baselines:
                continue
            baseline = fitted_baselines[name]
            predicted = baseline.predict_frame(samples)
            scores: dict[str, Any] = dict(score_predictions(samples, predicted))
            scores["bias"] = coverage_and_bias(samples, predicted)["bias"]
            if profiled is not None:
                scores["profiling"] = profiling_summary(samples, predicted, profiled)
            if isinstance(baseline, LookupTableBaseline):
                scores["n_fallback_samples"] = int(baseline.unseen_mask(samples).sum())
            if isinstance(baseline, OriginalSingleNetwork):
                scores["epochs"] = baseline.epochs
            block[name] = scores
        result["baselines"] = block
        if train_samples is not None:
            result["baselines_train_samples"] = int(train_samples.height)
    return result


# -- output -------------------------------------------------------------------------------


def jsonable(value: Any) -> Any:
    """Deep copy with NaN/inf as None and numpy scalars as Python numbers (JSON has no NaN)."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_evaluation(path: str | Path, result: Mapping[str, Any]) -> None:
    """Write the evaluation JSON atomically, NaN as null."""
    write_json_atomic(path, jsonable(result))


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def _metric_block(title: str, metrics: Mapping[str, Any]) -> list[str]:
    return [
        f"{title} (n={metrics['n']}):",
        f"  MAE:            {_fmt(metrics['mae_ms'])} ms",
        f"  RMSE:           {_fmt(metrics['rmse_ms'])} ms",
        f"  MAPE:           {_fmt(metrics['mape_pct'])} %",
        f"  R²:             {_fmt(metrics['r2'], 4)}",
        f"  Relative error: {_fmt(metrics['rel_error_pct'])} %",
    ]


def _verdict(rel_error: Any, threshold: float, good: str, bad: str) -> str:
    ok = isinstance(rel_error, float | int) and math.isfinite(rel_error) and rel_error < threshold
    return good if ok else bad


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Plain monospace table: first column left-aligned, the rest right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        parts = [
            str(c).ljust(widths[i]) if i == 0 else str(c).rjust(widths[i])
            for i, c in enumerate(cells)
        ]
        return "  ".join(parts).rstrip()

    return [line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


#: Cell of a metric a model does not predict (the trees-only baseline has no decode).
MISSING = "—"


def _cell(block: Mapping[str, Any] | None, key: str, digits: int = 2) -> str:
    return MISSING if block is None else _fmt(block.get(key), digits)


def side_by_side_rows(result: Mapping[str, Any]) -> list[list[str]]:
    models: list[tuple[str, Mapping[str, Any]]] = [("hybrid", result)]
    models += list(result.get("baselines", {}).items())
    rows = []
    for name, scores in models:
        prefill, decode = scores["prefill"], scores.get("decode_total")
        bias = scores.get("bias", {})
        rows.append(
            [
                MODEL_LABELS.get(name, name),
                _cell(prefill, "mae_ms"),
                _cell(prefill, "mape_pct"),
                _cell(prefill, "r2", 4),
                _fmt(bias.get("prefill")),
                _cell(decode, "mae_ms"),
                _cell(decode, "mape_pct"),
                _cell(decode, "r2", 4),
                _fmt(bias.get("decode_total")) if decode is not None else MISSING,
            ]
        )
    floor = result.get("noise_floor", {})
    if floor.get("prefill", {}).get("n") or floor.get("decode_total", {}).get("n"):
        prefill, decode = floor["prefill"], floor["decode_total"]
        rows.append(
            [
                "noise floor (repeated identical work)",
                _fmt(prefill["mae_ms"]),
                _fmt(prefill["mape_pct"]),
                "",
                "",
                _fmt(decode["mae_ms"]),
                _fmt(decode["mape_pct"]),
                "",
                "",
            ]
        )
    return rows


SIDE_BY_SIDE_HEADER: tuple[str, ...] = (
    "model",
    "prefill MAE ms",
    "prefill MAPE %",
    "prefill R²",
    "prefill bias",
    "decode total MAE ms",
    "decode total MAPE %",
    "decode total R²",
    "decode total bias",
)


def checks_rows(result: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the model's accuracy, bias and bound coverage: all samples, and the
    profiled and never-profiled configurations separately when known."""
    profiling = _both_groups(result)
    columns: list[Mapping[str, Any]] = [result]
    header = ["", "all"]
    if profiling is not None:
        columns += [profiling["profiled"], profiling["unprofiled"]]
        header += ["profiled", "never profiled"]

    def row(label: str, get: Any, digits: int = 2) -> list[str]:
        return [label, *(_fmt(get(block), digits) for block in columns)]

    def metric(target: str) -> Any:
        return lambda block: (block.get(target) or {}).get("mape_pct")

    rows = []
    if profiling is not None:
        rows.append(
            [
                "configurations",
                str(result["n_configs"]),
                *(str(block["n_configs"]) for block in columns[1:]),
            ]
        )
        rows.append(
            ["samples", str(result["n_samples"]), *(str(b["n_samples"]) for b in columns[1:])]
        )
        rows.append(row("prefill MAPE %", metric("prefill")))
        rows.append(row("decode total MAPE %", metric("decode_total")))
    for target, label in (
        ("prefill", "prefill"),
        ("decode_total", "decode total"),
        ("total", "total"),
    ):
        rows.append(row(f"bias {label}", lambda b, t=target: (b.get("bias") or {}).get(t)))
    for name, level in BOUND_LEVELS.items():
        if name in result.get("coverage", {}):
            rows.append(
                row(
                    f"coverage {name} (nominal {level:.2f})",
                    lambda b, n=name: (b.get("coverage") or {}).get(n),
                )
            )
    return header, rows


def _both_groups(scores: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The ``profiling`` block when it has samples of both profiled and never-profiled
    configurations, else None (then one column says it all)."""
    profiling = scores.get("profiling")
    if profiling is None:
        return None
    both = profiling["profiled"]["n_samples"] and profiling["unprofiled"]["n_samples"]
    return profiling if both else None


def _ratio(value: Any) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.2f}x"


def unprofiled_rows(result: Mapping[str, Any]) -> list[list[str]]:
    """One row per model (the hybrid, then each baseline with a ``profiling`` block): MAPE on
    profiled and on never-profiled configurations, and their ratio."""
    models: list[tuple[str, Mapping[str, Any]]] = [("hybrid", result)]
    models += list(result.get("baselines", {}).items())
    rows = []
    for name, scores in models:
        profiling = _both_groups(scores)
        if profiling is None:
            continue
        cells = [MODEL_LABELS.get(name, name)]
        for target in ("prefill", "decode_total"):
            seen = profiling["profiled"].get(target)
            never = profiling["unprofiled"].get(target)
            cells += [
                _cell(seen, "mape_pct"),
                _cell(never, "mape_pct"),
                _ratio(profiling["mape_ratio"].get(target)) if seen is not None else MISSING,
            ]
        cells.append(_fmt(profiling["unprofiled"]["bias"].get("prefill")))
        rows.append(cells)
    return rows


UNPROFILED_HEADER: tuple[str, ...] = (
    "model",
    "prefill MAPE % profiled",
    "never",
    "ratio",
    "decode total MAPE % profiled",
    "never",
    "ratio",
    "prefill bias never",
)


def format_report(result: Mapping[str, Any], max_configs: int | None = None) -> str:
    """The printed report: metric blocks, verdicts, bias and coverage (profiled and never
    profiled apart), per-config table, side-by-side tables."""
    lines = [
        "=" * 72,
        "Latency model evaluation",
        "=" * 72,
        f"Samples: {result['n_samples']}  (outliers filtered: {result['n_filtered_outliers']})",
        "",
        *_metric_block("Prefill latency (T_vision_total + T_LLM_prefill)", result["prefill"]),
        "",
        *_metric_block(
            "Decode total latency (T_LLM_decode, samples with >= 1 pass)", result["decode_total"]
        ),
        "",
        *_metric_block("Decode per token (mean time of one pass)", result["decode_per_token"]),
        "",
        "Performance assessment:",
        "  Prefill latency: "
        + _verdict(
            result["prefill"]["rel_error_pct"],
            5.0,
            "✓ Excellent (Relative error < 5%)",
            "⚠ Needs improvement",
        ),
        "  Decode total latency: "
        + _verdict(
            result["decode_total"]["rel_error_pct"],
            20.0,
            "✓ Good (Relative error < 20%)",
            "⚠ Acceptable",
        ),
        "",
    ]
    profiling = _both_groups(result)
    lines += [
        "Bias and bound coverage",
        "  bias: share of actuals <= the point prediction (0.5 = unbiased)",
        "  coverage: share of actuals <= the bound (nominal: the bound's level)",
    ]
    if profiling is not None:
        lines.append("  profiled: the configuration is in the model's training data")
    lines += format_table(*checks_rows(result))
    if profiling is not None:
        ratio = profiling["mape_ratio"]
        lines.append(
            "never-profiled / profiled MAPE: prefill "
            f"{_ratio(ratio.get('prefill'))}, decode total {_ratio(ratio.get('decode_total'))} "
            "(DESIGN.md targets: 1.10x interpolation, 1.15x sparse grid, 1.25x beyond the grid)"
        )
    elif "profiling" in result:
        seen = result["profiling"]["profiled"]
        lines.append(
            "(every configuration scored is in the model's training data)"
            if seen["n_samples"]
            else "(no configuration scored is in the model's training data)"
        )
    else:
        lines.append("(the model carries no training data: profiled configurations unknown)")
    lines.append("")
    per_config = result["per_config"]
    items = list(per_config.items())
    shown = items if max_configs is None else items[:max_configs]
    known = any(row.get("profiled") is not None for _, row in items)
    lines.append(f"Per-configuration errors ({len(items)} configurations, by sample count):")
    lines += format_table(
        (
            "config",
            *(["profiled"] if known else []),
            "count",
            "prefill MAE ms",
            "prefill MAPE %",
            "decode total MAE ms",
            "decode total MAPE %",
        ),
        [
            [
                name,
                *((["yes" if row.get("profiled") else "no"]) if known else []),
                str(row["count"]),
                _fmt(row["prefill_mae_ms"]),
                _fmt(row.get("prefill_mape_pct")),
                _fmt(row["decode_total_mae_ms"]),
                _fmt(row.get("decode_total_mape_pct")),
            ]
            for name, row in shown
        ],
    )
    if len(shown) < len(items):
        lines.append(f"... {len(items) - len(shown)} more in the JSON")
    lines.append("")
    title = "Models side by side (same samples)"
    if "baselines" in result:
        n_train = result.get("baselines_train_samples")
        title += f"; baselines fit on {n_train} training samples" if n_train else ""
    lines.append(title + ":")
    lines += format_table(SIDE_BY_SIDE_HEADER, side_by_side_rows(result))
    floor = result.get("noise_floor", {})
    if floor.get("prefill", {}).get("n") or floor.get("decode_total", {}).get("n"):
        lines.append(
            "(noise floor: the error a perfect model would make, from samples that repeat "
            f"identical work: prefill {floor['prefill']['n']} samples in "
            f"{floor['prefill']['n_groups']} groups, decode {floor['decode_total']['n']} in "
            f"{floor['decode_total']['n_groups']})"
        )
    lookup = result.get("baselines", {}).get("lookup_table", {})
    if lookup.get("n_fallback_samples"):
        lines.append(
            f"(lookup table: {lookup['n_fallback_samples']} samples of configurations unseen in "
            "training used the global means)"
        )
    if "baselines" in result and profiling is not None and unprofiled_rows(result):
        lines.append("")
        lines.append(
            "Models on profiled vs never-profiled configurations (profiled: in the model's "
            "training data):"
        )
        lines += format_table(UNPROFILED_HEADER, unprofiled_rows(result))
    return "\n".join(lines)


# -- the command's one function --------------------------------------------------------------


def load_training_data(checkpoint: Path) -> pl.DataFrame | None:
    """The checkpoint's own training split (``training_data.parquet``), or None."""
    path = checkpoint / "training_data.parquet"
    if not path.is_file():
        return None
    try:
        return pl.read_parquet(path)
    except Exception as exc:  # a corrupt file is a user-facing problem, not a traceback
        raise LatkitError(f"{path}: cannot read training data ({exc.__class__.__name__})") from None


#: Columns that identify a sample of the training split (its measured times are unique).
_IDENTITY_COLUMNS: tuple[str, ...] = (
    "dataset",
    "vision_tokens",
    "text_tokens",
    "top_k",
    "num_active_blocks",
    "output_tokens",
    "T_prefill_total",
    "T_LLM_decode",
)


def drop_training_samples(
    samples: pl.DataFrame, training: pl.DataFrame
) -> tuple[pl.DataFrame, int]:
    """``samples`` without those of the training split; returns (kept, number dropped).

    The artifact stores no sample ids, so a sample is matched on its dataset, features,
    length and measured times: float times round-trip exactly through parquet, and two
    distinct samples with identical times to the last bit do not occur in practice.
    """
    keys = [c for c in _IDENTITY_COLUMNS if c in samples.columns and c in training.columns]
    if not {"T_prefill_total", "T_LLM_decode"} <= set(keys):
        raise LatkitError("training data lacks T_prefill_total/T_LLM_decode: cannot match samples")
    right = (
        training.select(keys)
        .with_columns([pl.col(c).cast(samples.schema[c]) for c in keys])
        .unique()
    )
    kept = samples.join(right, on=keys, how="anti", nulls_equal=True)
    return kept, samples.height - kept.height


def model_training_data(model: Any, checkpoint: Path) -> pl.DataFrame | None:
    """The training split the loaded model carries, else the artifact's parquet, else None."""
    frame = getattr(model, "training_data", None)
    if isinstance(frame, pl.DataFrame) and frame.height > 0:
        return frame
    frame = load_training_data(checkpoint)
    return frame if frame is not None and frame.height > 0 else None


def held_out_samples(
    model: Any, checkpoint: str | Path, samples: pl.DataFrame
) -> tuple[pl.DataFrame, int]:
    """``samples`` without the checkpoint's training split, and how many were dropped."""
    training = model_training_data(model, Path(checkpoint))
    if training is None:
        raise LatkitError(
            f"{Path(checkpoint) / 'training_data.parquet'} not found: "
            "cannot tell which samples were held out"
        )
    kept, dropped = drop_training_samples(samples, training)
    log.info(
        "Held-out only: dropped %d samples of the training split, %d left", dropped, kept.height
    )
    return kept, dropped


def load_checkpoint(checkpoint: str | Path) -> Any:
    """Load a ``HybridLatencyModel`` artifact directory, with one-line errors."""
    path = Path(checkpoint)
    if not path.exists():
        raise LatkitError(f"checkpoint not found: {path}")
    if not path.is_dir():
        raise LatkitError(
            f"checkpoint {path} is a file: latkit expects the artifact directory written by "
            "`latkit train --output-dir`"
        )
    from toolkit.models.hybrid import HybridLatencyModel

    return HybridLatencyModel.load(path)


def load_model_and_samples(
    checkpoint: str | Path,
    results_dir: str | Path,
    *,
    dataset_names: Sequence[str] | None,
    use_all_datasets: bool,
    outlier_ms: float,
    outlier_rel: float | None,
    held_out_only: bool,
) -> tuple[Any, Any, pl.DataFrame, int]:
    """(model, the loaded results, the samples to score, how many training samples were
    dropped): what ``latkit evaluate`` and ``latkit plot`` both start from."""
    from toolkit.data import load_results

    model = load_checkpoint(checkpoint)
    loaded = load_results(
        results_dir,
        dataset_names=list(dataset_names) if dataset_names else None,
        use_all_datasets=use_all_datasets,
        outlier_ms=outlier_ms,
        outlier_rel=outlier_rel,
    )
    samples = loaded.samples
    n_dropped = 0
    if held_out_only:
        samples, n_dropped = held_out_samples(model, checkpoint, samples)
    return model, loaded, samples, n_dropped


def run_evaluation(
    checkpoint: str | Path,
    results_dir: str | Path,
    *,
    dataset_names: Sequence[str] | None = None,
    use_all_datasets: bool = True,
    outlier_ms: float = 60.0,
    outlier_rel: float | None = None,
    output_file: str | Path | None = "evaluation_results.json",
    baselines: bool = False,
    train_results_dir: str | Path | None = None,
    held_out_only: bool = False,
    single_network_epochs: int = 50,
    seed: int = 3407,
    device: str = "cpu",
) -> dict[str, Any]:
    """Load the model and the samples, evaluate, write the JSON; returns the result dict.

    ``held_out_only`` drops the samples of the checkpoint's training split first, so a model
    evaluated on the directory it was trained from is scored on data it never fit.
    """
    from toolkit.data import load_results

    model, loaded, samples, n_dropped_training = load_model_and_samples(
        checkpoint,
        results_dir,
        dataset_names=dataset_names,
        use_all_datasets=use_all_datasets,
        outlier_ms=outlier_ms,
        outlier_rel=outlier_rel,
        held_out_only=held_out_only,
    )
    train_samples: pl.DataFrame | None = None
    train_steps: pl.DataFrame | None = None
    if baselines:
        if train_results_dir is not None:
            train = load_results(
                train_results_dir,
                use_all_datasets=True,
                outlier_ms=outlier_ms,
                outlier_rel=outlier_rel,
            )
            train_samples, train_steps = train.samples, train.steps
            log.info(
                "Baselines: training data from %s (%d samples)",
                train_results_dir,
                train_samples.height,
            )
        else:
            train_samples = model_training_data(model, Path(checkpoint))
            if train_samples is None:
                raise LatkitError(
                    f"{Path(checkpoint) / 'training_data.parquet'} not found: "
                    "pass --train-results-dir to fit the baselines"
                )
            log.info(
                "Baselines: training data from the checkpoint (%d samples)", train_samples.height
            )
    result = evaluate_model(
        model,
        samples,
        loaded.steps,
        baselines=baselines,
        train_samples=train_samples,
        train_steps=train_steps,
        n_filtered_outliers=loaded.n_filtered_outliers,
        single_network_epochs=single_network_epochs,
        seed=seed,
        device=device,
        model_training=model_training_data(model, Path(checkpoint)),
    )
    if held_out_only:
        result["n_dropped_training_samples"] = n_dropped_training
    result["checkpoint"] = str(checkpoint)
    result["results_dir"] = str(results_dir)
    result["datasets"] = list(loaded.datasets)
    if output_file is not None:
        write_evaluation(output_file, result)
    return result
