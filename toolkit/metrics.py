"""Metrics of latency predictions (regression, coverage of bounds, bias); models and reports
both use them, so they live below both.

``score_frame`` is the one scoring of a predictions frame: the model's own validation
metrics, ``latkit evaluate``, the knob splits and the recalibration curve all call it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, TypedDict

import numpy as np
import polars as pl
from numpy.typing import ArrayLike

from toolkit.features import BOUND_LEVELS


class RegressionMetrics(TypedDict):
    n: int
    mae_ms: float
    rmse_ms: float
    mape_pct: float
    r2: float
    rel_error_pct: float


def regression_metrics(y_true: ArrayLike, y_pred: ArrayLike) -> RegressionMetrics:
    """MAE, RMSE, MAPE (over targets > 0), R² and relative error (MAE / mean target).

    Empty input gives n = 0 and NaN metrics rather than an exception, so a report over a
    subset that happens to be empty still renders.
    """
    true = np.asarray(y_true, dtype=np.float64).ravel()
    pred = np.asarray(y_pred, dtype=np.float64).ravel()
    if true.shape != pred.shape:
        raise ValueError(f"y_true has {true.size} values, y_pred {pred.size}")
    n = int(true.size)
    if n == 0:
        nan = math.nan
        return RegressionMetrics(
            n=0, mae_ms=nan, rmse_ms=nan, mape_pct=nan, r2=nan, rel_error_pct=nan
        )
    error = pred - true
    mae = float(np.mean(np.abs(error)))
    rmse = float(np.sqrt(np.mean(error**2)))
    positive = true > 0
    mape = (
        float(np.mean(np.abs(error[positive]) / true[positive]) * 100)
        if positive.any()
        else math.nan
    )
    total_ss = float(np.sum((true - true.mean()) ** 2))
    r2 = 1.0 - float(np.sum(error**2)) / total_ss if total_ss > 0 else math.nan
    mean_true = float(true.mean())
    rel_error = mae / mean_true * 100 if mean_true != 0 else math.nan
    return RegressionMetrics(
        n=n, mae_ms=mae, rmse_ms=rmse, mape_pct=mape, r2=r2, rel_error_pct=rel_error
    )


def coverage(y_true: ArrayLike, bound: ArrayLike) -> float:
    """Share of actuals at or below ``bound`` (the observed coverage of an upper bound);
    NaN when empty."""
    true = np.asarray(y_true, dtype=np.float64).ravel()
    upper = np.asarray(bound, dtype=np.float64).ravel()
    if true.shape != upper.shape:
        raise ValueError(f"y_true has {true.size} values, bound {upper.size}")
    return float(np.mean(true <= upper)) if true.size else math.nan


def bias_share(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Share of actuals at or below the point prediction: 0.5 for an unbiased model, near 0
    for one that predicts low; NaN when empty."""
    return coverage(y_true, y_pred)


def coverage_and_bias(
    prefill_true: ArrayLike,
    decode_true: ArrayLike,
    has_passes: ArrayLike,
    predictions: Mapping[str, ArrayLike],
) -> dict[str, dict[str, float]]:
    """``coverage``: share of actuals at or below each bound output the predictions have
    (``prefill_*`` against prefill, ``total_*`` against prefill + decode); ``bias``: share of
    actuals at or below the point prediction of ``prefill``, and of ``decode_total`` (samples
    with decode passes) and ``total`` when the predictions have decode."""
    prefill = np.asarray(prefill_true, dtype=np.float64)
    decode = np.asarray(decode_true, dtype=np.float64)
    passes = np.asarray(has_passes, dtype=bool)
    total = prefill + decode
    covered = {
        name: coverage(total if name.startswith("total_") else prefill, predictions[name])
        for name in BOUND_LEVELS
        if name in predictions
    }
    prefill_pred = np.asarray(predictions["prefill_ms"], dtype=np.float64)
    bias = {"prefill": bias_share(prefill, prefill_pred)}
    if "decode_total_ms" in predictions:
        decode_pred = np.asarray(predictions["decode_total_ms"], dtype=np.float64)
        total_pred = np.asarray(predictions.get("total_ms", prefill_pred + decode_pred))
        bias["decode_total"] = bias_share(decode[passes], decode_pred[passes])
        bias["total"] = bias_share(total, total_pred)
    return {"coverage": covered, "bias": bias}


def decode_passes(samples: pl.DataFrame) -> np.ndarray:
    """Decode passes per sample: ``n_decode_passes`` where present, else ``output_tokens - 1``."""
    if "n_decode_passes" in samples.columns:
        passes = samples["n_decode_passes"].to_numpy().astype(np.float64)
    elif "output_tokens" in samples.columns:
        passes = samples["output_tokens"].to_numpy().astype(np.float64) - 1.0
    else:
        raise KeyError("samples frame has neither n_decode_passes nor output_tokens")
    return np.maximum(passes, 0.0)


class FrameScores(TypedDict, total=False):
    """What ``score_frame`` returns (the decode and total blocks only for models that predict
    ``decode_total_ms``)."""

    prefill: RegressionMetrics
    decode_total: RegressionMetrics
    decode_per_token: RegressionMetrics
    total: RegressionMetrics
    coverage: dict[str, float]
    bias: dict[str, float]


def score_frame(samples: pl.DataFrame, predictions: Mapping[str, ArrayLike]) -> FrameScores:
    """Every score of one model's predictions of a samples frame.

    Targets, as the original tools defined them:

    - ``prefill``: ``T_prefill_total`` (vision + LLM prefill), every sample;
    - ``decode_total``: ``T_LLM_decode`` over the samples with at least one decode pass;
    - ``decode_per_token``: decode total / passes (the mean time of one pass), same samples;
      the prediction is the predicted decode total over the same measured passes, so every
      model is divided the same way;
    - ``total``: prefill + decode (``total_ms``, else predicted prefill + decode), every sample;
    - ``coverage`` and ``bias``: as ``coverage_and_bias``.

    A prefill-only model (no ``decode_total_ms``) gets ``prefill``, ``coverage`` and ``bias``.
    """
    prefill_true = samples["T_prefill_total"].to_numpy().astype(np.float64)
    decode_true = samples["T_LLM_decode"].to_numpy().astype(np.float64)
    passes = decode_passes(samples)
    has = passes > 0
    prefill_pred = np.asarray(predictions["prefill_ms"], dtype=np.float64)
    scores = FrameScores(prefill=regression_metrics(prefill_true, prefill_pred))
    if "decode_total_ms" in predictions:
        decode_pred = np.asarray(predictions["decode_total_ms"], dtype=np.float64)
        total_pred = np.asarray(predictions.get("total_ms", prefill_pred + decode_pred))
        scores["decode_total"] = regression_metrics(decode_true[has], decode_pred[has])
        scores["decode_per_token"] = regression_metrics(
            decode_true[has] / passes[has], decode_pred[has] / passes[has]
        )
        scores["total"] = regression_metrics(prefill_true + decode_true, total_pred)
    shares = coverage_and_bias(prefill_true, decode_true, has, predictions)
    scores["coverage"] = shares["coverage"]
    scores["bias"] = shares["bias"]
    return scores


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
