"""How a model does on answers longer than any it was trained on.

A model learns decode from answers of at most ``output_tokens_range[1]`` tokens (its
manifest's training summary). Answers beyond that test how the per-pass time is carried
past the profiled positions, which is what a controller asks when it plans a long answer.
``long_answer_summary`` scores those samples: decode total MAPE and bias, the coverage of
the total's bounds, and the *growth error*.

Growth, per sample: whole-answer decode / decode of the first ``GROWTH_PASSES`` passes.
Measured: ``T_LLM_decode`` / the sum of the sample's first 60 timed passes
(``T_decode_per_step``); predicted: the model's decode total for the sample's answer / its
decode total for 61 output tokens (60 passes). The growth error is the mean absolute relative
error of the predicted growth; "too slow" is the share of samples whose predicted growth
exceeds the measured one. Only the model's public ``predict`` is used, so any decode model
is judged the same way.
"""

from __future__ import annotations

import math
from typing import Any, Final, TypedDict

import numpy as np
import polars as pl

from toolkit.features import feature_matrix
from toolkit.metrics import RegressionMetrics, decode_passes, score_frame

#: Passes of the reference part of an answer (issue 19: growth over the first 60 passes).
GROWTH_PASSES: Final[int] = 60
#: In-range reference: answers of at least this many output tokens (decode dominates there).
IN_RANGE_MIN_TOKENS: Final[int] = 21
#: The bounds whose coverage is reported on long answers.
LONG_ANSWER_BOUNDS: Final[tuple[str, ...]] = ("total_p90_ms", "total_p95_ms")


class GrowthError(TypedDict):
    passes: int
    n: int
    mean_abs_rel_error_pct: float
    max_abs_rel_error_pct: float
    share_predicted_too_slow: float


class InRangeReference(TypedDict):
    min_output_tokens: int
    n: int
    decode_total_mape_pct: float


class LongAnswers(TypedDict):
    trained_max_output_tokens: int
    supported_output_tokens: float  # the model's stated limit (inf: none stated)
    n_beyond_supported: int
    n_samples: int
    output_tokens_range: list[int]
    decode_total: RegressionMetrics
    decode_total_bias: float
    coverage: dict[str, float]
    growth: GrowthError
    in_range: InRangeReference


def trained_max_output_tokens(model: Any) -> int | None:
    """The longest answer in the model's training data (manifest), None when unknown."""
    manifest = getattr(model, "manifest", None) or {}
    span = manifest.get("training_summary", {}).get("output_tokens_range")
    return int(span[1]) if span else None


def long_answer_mask(model: Any, samples: pl.DataFrame) -> np.ndarray | None:
    """Per sample: is its answer longer than the longest trained one? None when unknown."""
    longest = trained_max_output_tokens(model)
    if longest is None:
        return None
    return samples["output_tokens"].to_numpy() > longest


def measured_growth(
    samples: pl.DataFrame, steps: pl.DataFrame | None, passes: int = GROWTH_PASSES
) -> np.ndarray:
    """Per sample, ``T_LLM_decode`` / its first ``passes`` timed passes; NaN where fewer
    were timed."""
    nan = np.full(samples.height, np.nan)
    if steps is None or steps.height == 0 or "sample_key" not in samples.columns:
        return nan
    first = (
        steps.filter(pl.col("k") <= passes)
        .group_by("sample_key")
        .agg(pl.col("T_decode_pass").sum().alias("_first"), pl.len().alias("_n"))
    )
    joined = samples.select("sample_key", "T_LLM_decode").join(
        first, on="sample_key", how="left", maintain_order="left"
    )
    complete = (joined["_n"].fill_null(0) == passes).to_numpy()
    first_ms = joined["_first"].fill_null(0.0).to_numpy().astype(np.float64)
    whole = joined["T_LLM_decode"].to_numpy().astype(np.float64)
    ok = complete & (first_ms > 0)
    return np.where(ok, whole / np.where(ok, first_ms, 1.0), np.nan)


def predicted_growth(model: Any, samples: pl.DataFrame, passes: int = GROWTH_PASSES) -> np.ndarray:
    """Per sample, the model's decode total of the whole answer / of its first ``passes``."""
    features = feature_matrix(samples)
    answer = decode_passes(samples) + 1.0  # N output tokens: N - 1 decode passes
    whole = model.predict(features, answer)["decode_total_ms"]
    first = model.predict(features, np.full(samples.height, passes + 1.0))["decode_total_ms"]
    whole, first = np.asarray(whole, np.float64), np.asarray(first, np.float64)
    return np.where(first > 0, whole / np.where(first > 0, first, 1.0), np.nan)


def growth_error(predicted: np.ndarray, measured: np.ndarray) -> GrowthError:
    """Mean and max absolute relative error of the predicted growth, and the share predicted
    too slow, over the samples whose measured growth is known."""
    known = np.isfinite(measured) & np.isfinite(predicted)
    relative = (predicted[known] - measured[known]) / measured[known]
    n = int(known.sum())
    return GrowthError(
        passes=GROWTH_PASSES,
        n=n,
        mean_abs_rel_error_pct=float(np.mean(np.abs(relative)) * 100) if n else math.nan,
        max_abs_rel_error_pct=float(np.max(np.abs(relative)) * 100) if n else math.nan,
        share_predicted_too_slow=float(np.mean(relative > 0)) if n else math.nan,
    )


def long_answer_summary(
    model: Any,
    samples: pl.DataFrame,
    steps: pl.DataFrame | None,
    predictions: dict[str, np.ndarray],
) -> LongAnswers | None:
    """The long-answer block of an evaluation (module doc); None when no scored answer is
    longer than the model's longest trained one, or the model does not say how long that is."""
    longest = trained_max_output_tokens(model)
    long = long_answer_mask(model, samples)
    if longest is None or long is None or not long.any():
        return None
    part = samples.filter(pl.Series(long))
    scores = score_frame(part, {k: np.asarray(v)[long] for k, v in predictions.items()})
    tokens = part["output_tokens"].to_numpy()
    growth = growth_error(predicted_growth(model, part), measured_growth(part, steps))
    reference = _in_range_block(samples, predictions, ~long)
    limit = getattr(model, "supported_output_tokens", None)
    supported = float(limit()) if callable(limit) else math.inf
    return LongAnswers(
        trained_max_output_tokens=longest,
        supported_output_tokens=supported,
        n_beyond_supported=int(np.sum(tokens > supported)),
        n_samples=part.height,
        output_tokens_range=[int(tokens.min()), int(tokens.max())],
        decode_total=scores["decode_total"],
        decode_total_bias=scores["bias"]["decode_total"],
        coverage={
            name: scores["coverage"][name]
            for name in LONG_ANSWER_BOUNDS
            if name in scores["coverage"]
        },
        growth=growth,
        in_range=reference,
    )


def _in_range_block(
    samples: pl.DataFrame, predictions: dict[str, np.ndarray], within: np.ndarray
) -> InRangeReference:
    """Decode total MAPE of the ``within`` samples with answers of ``IN_RANGE_MIN_TOKENS``+."""
    keep = (samples["output_tokens"].to_numpy() >= IN_RANGE_MIN_TOKENS) & within
    scores = score_frame(
        samples.filter(pl.Series(keep)), {k: np.asarray(v)[keep] for k, v in predictions.items()}
    )
    return InRangeReference(
        min_output_tokens=IN_RANGE_MIN_TOKENS,
        n=scores["decode_total"]["n"],
        decode_total_mape_pct=scores["decode_total"]["mape_pct"],
    )


def in_range_reference(model: Any, samples: pl.DataFrame) -> InRangeReference:
    """The in-range reference of a long-answer block from other samples (held out from the
    model's training sweep): answers of ``IN_RANGE_MIN_TOKENS``+ tokens within the trained
    length."""
    longest = trained_max_output_tokens(model)
    tokens = samples["output_tokens"].to_numpy()
    within = tokens <= longest if longest is not None else np.ones(len(tokens), dtype=bool)
    return _in_range_block(samples, model.predict_frame(samples), within)
