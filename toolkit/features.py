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

#: The prefill column of each controller bound: the mean, then the quantile heads.
PREFILL_BOUND_COLUMNS: Final[dict[str, str]] = {
    "mean": "prefill_ms",
    "p50": "prefill_p50_ms",
    "p90": "prefill_p90_ms",
    "p95": "prefill_p95_ms",
}
#: Outputs of the exported predictor, in graph order: the four of the export contract, then
#: the quantiles.
OUTPUT_NAMES: Final[tuple[str, ...]] = (
    "prefill_ms",
    "decode_total_ms",
    "decode_per_token_ms",
    "total_ms",
    "prefill_p90_ms",
    "prefill_p95_ms",
    "prefill_p50_ms",
)

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
