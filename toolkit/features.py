"""The configuration features every model and export shares, in their one fixed order."""

from __future__ import annotations

from typing import Final

import numpy as np
import polars as pl

#: Feature order of every matrix that crosses a boundary (models, exports, manifests).
FEATURE_NAMES: Final[tuple[str, ...]] = (
    "vision_tokens",
    "text_tokens",
    "tier_idx",
    "top_k",
    "num_active_blocks",
)

TIERS: Final[tuple[str, ...]] = ("low", "medium", "high")
TIER_INDEX: Final[dict[str, int]] = {name: i for i, name in enumerate(TIERS)}

#: Prefill can only grow with each feature but tier (+1 non-decreasing, 0 unconstrained).
PREFILL_MONOTONE: Final[tuple[int, ...]] = (1, 1, 0, 1, 1)

#: The knob grid of the core experiment.
GRID_TOP_K: Final[tuple[int, ...]] = (4, 6, 8, 10, 12)
GRID_BLOCKS: Final[tuple[int, ...]] = (8, 10, 12, 14, 16)

#: The prefill column of each controller bound: the mean, then the calibrated bounds.
PREFILL_BOUND_COLUMNS: Final[dict[str, str]] = {
    "mean": "prefill_ms",
    "p50": "prefill_p50_ms",
    "p90": "prefill_p90_ms",
    "p95": "prefill_p95_ms",
}
#: Outputs of the exported predictor, in graph order: the four of the export contract, then
#: the bounds (new outputs are appended, never inserted: embedders read by name or position).
OUTPUT_NAMES: Final[tuple[str, ...]] = (
    "prefill_ms",
    "decode_total_ms",
    "decode_per_token_ms",
    "total_ms",
    "prefill_p90_ms",
    "prefill_p95_ms",
    "prefill_p50_ms",
    "total_p90_ms",
    "total_p95_ms",
)
#: Nominal coverage of every bound output, prefill then total, levels ascending.
BOUND_LEVELS: Final[dict[str, float]] = {
    "prefill_p50_ms": 0.50,
    "prefill_p90_ms": 0.90,
    "prefill_p95_ms": 0.95,
    "total_p90_ms": 0.90,
    "total_p95_ms": 0.95,
}
#: The total column of each controller bound (a decision on prefill + decode uses these).
TOTAL_BOUND_COLUMNS: Final[dict[str, str]] = {
    "mean": "total_ms",
    "p90": "total_p90_ms",
    "p95": "total_p95_ms",
}

#: Vision tokens per crop after 2x2 pooling; the prompt holds (crops + 1) x this.
VISION_TOKENS_PER_CROP: Final[int] = 144

#: Crop range of each tier (inclusive), as the format describes it.
TIER_CROP_RANGE: Final[dict[str, tuple[int, int]]] = {
    "low": (1, 3),
    "medium": (4, 8),
    "high": (9, 15),
}


def tier_index(tier: str | int) -> int:
    """Index of a tier given by name ("low"/"medium"/"high") or index (0/1/2)."""
    if isinstance(tier, str):
        key = tier.strip().lower()
        if key in TIER_INDEX:
            return TIER_INDEX[key]
        if key.isdigit():
            tier = int(key)
        else:
            raise ValueError(f"unknown tier {tier!r}: expected one of {', '.join(TIERS)} or 0-2")
    if isinstance(tier, int | np.integer) and 0 <= int(tier) < len(TIERS):
        return int(tier)
    raise ValueError(f"unknown tier {tier!r}: expected one of {', '.join(TIERS)} or 0-2")


def default_vision_tokens(tier: str | int) -> int:
    """Vision tokens of a tier's typical image, for callers that do not know them:
    (mean crops of the tier's range + 1) x 144 (low 432, medium 1008, high 1872)."""
    low, high = TIER_CROP_RANGE[TIERS[tier_index(tier)]]
    return round((low + high) / 2 + 1) * VISION_TOKENS_PER_CROP


def config_name(tier: str, top_k: int, num_active_blocks: int) -> str:
    """The per-configuration key used in tables and JSON: ``<tier>_<top_k>_<blocks>``."""
    return f"{tier}_{top_k}_{num_active_blocks}"


def feature_matrix(samples: pl.DataFrame) -> np.ndarray:
    """Float32 matrix [n, 5] of a samples frame's features, in ``FEATURE_NAMES`` order."""
    missing = [name for name in FEATURE_NAMES if name not in samples.columns]
    if missing:
        raise KeyError(f"samples frame lacks feature columns: {', '.join(missing)}")
    return samples.select(FEATURE_NAMES).to_numpy().astype(np.float32, copy=False)


#: How far beyond its training range the prefill model is trusted, as a share of the range's
#: width on each side: the physics baseline carries it there (tested on a dense grid); past
#: it, ``latkit predict`` and the runtime flag the input as extrapolated.
EXTRAPOLATION_MARGIN: Final[float] = 0.5

#: The smallest possible value of each feature (and of output_tokens): below it an input is
#: impossible, an error everywhere, not a range warning.
FEATURE_MINIMUM: Final[dict[str, float]] = {
    "vision_tokens": 0.0,
    "text_tokens": 0.0,
    "tier_idx": 0.0,
    "top_k": 1.0,
    "num_active_blocks": 1.0,
    "output_tokens": 0.0,
}


def supported_range(name: str, low: float, high: float) -> tuple[float, float]:
    """The range a model trained on [low, high] of feature ``name`` answers without an
    extrapolation flag: ``EXTRAPOLATION_MARGIN`` of the width beyond each end (tier: exact)."""
    if name == "tier_idx":
        return float(low), float(high)
    width = float(high) - float(low)
    return (
        max(FEATURE_MINIMUM.get(name, -np.inf), float(low) - EXTRAPOLATION_MARGIN * width),
        float(high) + EXTRAPOLATION_MARGIN * width,
    )


#: How far beyond the longest trained answer decode is trusted, as a multiple of its output
#: tokens: the growth of decode with the answer's length was measured to hold that far (a
#: model trained on the bundled small sweep, answers of at most 52 tokens, against the
#: long-answer sweep's 128-448 tokens; README "Measured"). Beyond it a prediction is flagged.
OUTPUT_TOKENS_MULTIPLE: Final[float] = 8.0


def supported_output_tokens(longest_trained: float) -> float:
    """The largest output length answered without an extrapolation flag by a model whose
    longest training answer had ``longest_trained`` output tokens."""
    return OUTPUT_TOKENS_MULTIPLE * float(longest_trained)


def impossible_inputs(features: np.ndarray, output_tokens: np.ndarray | None = None) -> list[str]:
    """One message per feature with impossible values (below ``FEATURE_MINIMUM``, NaN/inf,
    or a tier other than 0, 1, 2); empty when every row is possible."""
    x = np.asarray(features, dtype=np.float64)
    problems = []
    columns = [(name, x[:, i]) for i, name in enumerate(FEATURE_NAMES)]
    if output_tokens is not None:
        columns.append(("output_tokens", np.asarray(output_tokens, dtype=np.float64).ravel()))
    for name, values in columns:
        bad = ~np.isfinite(values) | (values < FEATURE_MINIMUM[name])
        if name == "tier_idx":
            bad |= ~np.isin(values, np.arange(len(TIERS)))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            what = "0, 1 or 2" if name == "tier_idx" else f">= {FEATURE_MINIMUM[name]:g}"
            problems.append(
                f"{name} must be {what}: {int(bad.sum())} row(s), "
                f"first row {row} has {values[row]:g}"
            )
    return problems


#: Inputs that count things: a request with a fractional value of one is impossible.
INTEGER_INPUTS: Final[tuple[str, ...]] = (
    "vision_tokens",
    "text_tokens",
    "top_k",
    "num_active_blocks",
    "output_tokens",
)


def request_problems(
    features: np.ndarray,
    output_tokens: np.ndarray,
    num_total_blocks: int | None = None,
) -> list[str]:
    """What makes a user's request impossible (one message per input; empty when every row is
    possible): ``impossible_inputs``, plus counts that are not whole numbers, an answer of no
    token (``output_tokens`` < 1: the first token comes out of prefill), and more active blocks
    than the model has (``num_total_blocks``, from the training data, when known).

    The models themselves answer any finite, non-negative input (a dense grid of fractional
    knob values is how monotonicity is tested); this is the check of requests (``predict``).
    """
    x = np.asarray(features, dtype=np.float64)
    tokens = np.asarray(output_tokens, dtype=np.float64).ravel()
    problems = impossible_inputs(x, tokens)
    if problems:
        return problems
    columns = {name: x[:, i] for i, name in enumerate(FEATURE_NAMES)}
    columns["output_tokens"] = tokens
    checks: list[tuple[str, np.ndarray, str]] = [
        (name, columns[name] != np.round(columns[name]), "a whole number")
        for name in INTEGER_INPUTS
    ]
    checks.append(("output_tokens", tokens < 1, ">= 1 (the first token comes out of prefill)"))
    if num_total_blocks is not None:
        blocks = columns["num_active_blocks"]
        checks.append(
            (
                "num_active_blocks",
                blocks > num_total_blocks,
                f"<= {num_total_blocks} (the model has {num_total_blocks} blocks)",
            )
        )
    for name, bad, what in checks:
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            problems.append(
                f"{name} must be {what}: {int(bad.sum())} row(s), first row {row} has "
                f"{columns[name][row]:g}"
            )
    return problems
