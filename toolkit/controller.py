"""Controller-facing answers: which configurations fit a latency budget, with how much output.

Everything here works with any predictor that maps ``(features [B, 5], output_tokens [B])``
to a dict of arrays with the outputs of ``toolkit.features.OUTPUT_NAMES``:
``HybridLatencyModel.predict`` and ``exporters.runtime.LatencyPredictor.predict`` alike, so
Python and the exported predictor give the same answers.

The original controller's rule is the default: a configuration is feasible when its
prefill fits ``budget x safety`` (0.8) and, when an expected output length is given, the
total fits the whole budget. ``bound`` picks the estimates the rule uses: the mean
(``prefill_ms``, ``total_ms``), or for a safe decision the calibrated bounds
(``prefill_p90_ms`` and ``total_p90_ms``; p95 likewise). ``p50`` has no total bound of its
own: it adds the mean decode total to ``prefill_p50_ms``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import polars as pl

from toolkit.features import (
    GRID_BLOCKS,
    GRID_TOP_K,
    PREFILL_BOUND_COLUMNS,
    TIERS,
    TOTAL_BOUND_COLUMNS,
    config_name,
    default_vision_tokens,
    tier_index,
)

PredictFn = Callable[[np.ndarray, np.ndarray], Mapping[str, np.ndarray]]

BOUNDS: Final[dict[str, str]] = PREFILL_BOUND_COLUMNS
RANKINGS: Final[tuple[str, ...]] = ("fastest", "quality")
DEFAULT_SAFETY: Final[float] = 0.8
#: Largest output length the budget search considers.
DEFAULT_MAX_TOKENS: Final[int] = 4096


@dataclass(frozen=True)
class Config:
    """One point of the knob grid."""

    tier: str
    top_k: int
    num_active_blocks: int

    @property
    def name(self) -> str:
        return config_name(self.tier, self.top_k, self.num_active_blocks)


def knob_grid(
    tiers: Sequence[str] = TIERS,
    top_ks: Sequence[int] = GRID_TOP_K,
    blocks: Sequence[int] = GRID_BLOCKS,
) -> list[Config]:
    """Every (tier, top_k, blocks) combination, in grid order."""
    return [Config(t, k, b) for t in tiers for k in top_ks for b in blocks]


def parse_config(name: str) -> Config:
    """``"medium_8_12"`` -> Config("medium", 8, 12)."""
    parts = name.strip().split("_")
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        raise ValueError(f"configuration {name!r} is not <tier>_<top_k>_<blocks>")
    tier = TIERS[tier_index(parts[0])]
    return Config(tier, int(parts[1]), int(parts[2]))


def request_features(
    configs: Sequence[Config],
    text_tokens: int,
    vision_tokens: int | Mapping[str, int] | None = None,
) -> np.ndarray:
    """Feature rows [C, 5] of one request under each configuration.

    ``vision_tokens``: one count for every tier, a ``{tier: count}`` mapping, or None for
    each tier's typical count (``default_vision_tokens``).
    """
    rows = []
    for config in configs:
        if vision_tokens is None:
            vision = default_vision_tokens(config.tier)
        elif isinstance(vision_tokens, Mapping):
            vision = int(vision_tokens[config.tier])
        else:
            vision = int(vision_tokens)
        rows.append(
            [vision, text_tokens, tier_index(config.tier), config.top_k, config.num_active_blocks]
        )
    return np.asarray(rows, dtype=np.float32)


def spent_ms(out: Mapping[str, np.ndarray], bound: str) -> np.ndarray:
    """The total (prefill + decode) estimate that ``bound`` decides on, float64 [B]."""
    if bound in TOTAL_BOUND_COLUMNS:
        return np.asarray(out[TOTAL_BOUND_COLUMNS[bound]], dtype=np.float64)
    return np.asarray(out[BOUNDS[bound]], dtype=np.float64) + np.asarray(
        out["decode_total_ms"], dtype=np.float64
    )


def max_output_tokens(
    predict: PredictFn,
    features: np.ndarray,
    budget_ms: float | np.ndarray,
    bound: str = "mean",
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> np.ndarray:
    """Largest N <= ``max_tokens`` whose total estimate (``spent_ms``) fits the budget.

    0 where even the prefill (which yields the first token) does not fit. The decode
    total is non-decreasing in N and O(1) to evaluate, so this is a bisection over N,
    all rows at once: about log2(max_tokens) batched predictor calls, no scan.
    """
    features = np.asarray(features, dtype=np.float32)
    budget = np.broadcast_to(np.asarray(budget_ms, dtype=np.float64), (features.shape[0],))
    if bound not in BOUNDS:
        raise ValueError(f"bound must be one of {', '.join(BOUNDS)}, got {bound!r}")

    def fits(n_tokens: np.ndarray) -> np.ndarray:
        out = predict(features, n_tokens.astype(np.float32))
        return np.asarray(spent_ms(out, bound) <= budget)

    low = np.ones(features.shape[0], dtype=np.int64)  # N = 1: prefill alone
    feasible_at_one = fits(low)
    high = np.full(features.shape[0], max_tokens + 1, dtype=np.int64)  # infeasible sentinel
    while True:
        open_rows = feasible_at_one & (high - low > 1)
        if not open_rows.any():
            break
        middle = np.where(open_rows, (low + high) // 2, low)
        ok = fits(middle)
        low = np.where(open_rows & ok, middle, low)
        high = np.where(open_rows & ~ok, middle, high)
    return np.where(feasible_at_one, low, 0)


def budget_table(
    predict: PredictFn,
    configs: Sequence[Config],
    features: np.ndarray,
    budget_ms: float,
    output_tokens: int | None = None,
    safety: float = DEFAULT_SAFETY,
    bound: str = "mean",
    rank: str = "fastest",
    max_tokens: int = DEFAULT_MAX_TOKENS,
    supported_output_tokens: float = math.inf,
) -> pl.DataFrame:
    """Every configuration with its estimate, feasibility and output room, ranked.

    Columns: config, tier, top_k, num_active_blocks, vision_tokens, text_tokens,
    prefill_ms (the chosen bound), decode_total_ms (mean) and total_ms (the chosen bound's
    total, ``spent_ms``; both at ``output_tokens``, null without it), max_output_tokens,
    output_extrapolated (max_output_tokens lies beyond ``supported_output_tokens``, the
    longest answer the model's decode is trusted for), feasible, why_not (the rules an
    infeasible row breaks, null when feasible). Feasible rows come first, then
    ``rank``: "fastest" (lowest estimate first) or "quality" (highest tier, top_k and
    blocks first: the most capable configuration that fits leads); ties keep grid order.
    """
    if bound not in BOUNDS:
        raise ValueError(f"bound must be one of {', '.join(BOUNDS)}, got {bound!r}")
    if rank not in RANKINGS:
        raise ValueError(f"rank must be one of {', '.join(RANKINGS)}, got {rank!r}")
    if not budget_ms > 0:
        raise ValueError(f"budget must be a positive number of ms, got {budget_ms}")
    if not 0 < safety <= 1:
        raise ValueError(f"safety factor must be in (0, 1], got {safety}")
    features = np.asarray(features, dtype=np.float32)
    n_tokens = np.full(features.shape[0], output_tokens or 1, dtype=np.float32)
    out = predict(features, n_tokens)
    prefill = np.asarray(out[BOUNDS[bound]], dtype=np.float64)
    prefill_fits = prefill <= budget_ms * safety
    feasible = prefill_fits.copy()
    why_not = np.where(prefill_fits, "", f"prefill > budget x {safety:g}")
    decode_total: np.ndarray | None = None
    total: np.ndarray | None = None
    if output_tokens is not None:
        decode_total = np.asarray(out["decode_total_ms"], dtype=np.float64)
        total = spent_ms(out, bound)
        total_fits = total <= budget_ms
        feasible &= total_fits
        both = np.char.add(why_not, np.where(prefill_fits, "", "; "))
        why_not = np.where(total_fits, why_not, np.char.add(both, "total > budget"))
    room = max_output_tokens(predict, features, budget_ms, bound=bound, max_tokens=max_tokens)
    frame = pl.DataFrame(
        {
            "config": [c.name for c in configs],
            "tier": [c.tier for c in configs],
            "top_k": [c.top_k for c in configs],
            "num_active_blocks": [c.num_active_blocks for c in configs],
            "vision_tokens": features[:, 0].astype(np.int64),
            "text_tokens": features[:, 1].astype(np.int64),
            "prefill_ms": prefill,
            "decode_total_ms": decode_total,
            "total_ms": total,
            "max_output_tokens": room,
            "output_extrapolated": room > supported_output_tokens,
            "feasible": feasible,
            "why_not": [reason or None for reason in why_not.tolist()],
        },
        schema_overrides={
            "decode_total_ms": pl.Float64,
            "total_ms": pl.Float64,
            "why_not": pl.String,
        },
    ).with_row_index("_grid_order")
    if rank == "fastest":
        order = [pl.col("total_ms" if output_tokens is not None else "prefill_ms")]
        descending = [False]
    else:
        tier_rank = pl.col("tier").replace_strict({t: i for i, t in enumerate(TIERS)})
        order = [tier_rank, pl.col("top_k"), pl.col("num_active_blocks")]
        descending = [True, True, True]
    return frame.sort(
        [pl.col("feasible"), *order, pl.col("_grid_order")],
        descending=[True, *descending, False],
    ).drop("_grid_order")


def answer_budget(
    predict: PredictFn,
    text_tokens: int,
    budget_ms: float,
    *,
    vision_tokens: int | Mapping[str, int] | None = None,
    output_tokens: int | None = None,
    configs: Sequence[Config] | None = None,
    safety: float = DEFAULT_SAFETY,
    bound: str = "mean",
    rank: str = "fastest",
    max_tokens: int = DEFAULT_MAX_TOKENS,
    supported_output_tokens: float = math.inf,
) -> pl.DataFrame:
    """``budget_table`` for one request over ``configs`` (default: the whole 75-point grid)."""
    chosen = list(configs) if configs is not None else knob_grid()
    features = request_features(chosen, text_tokens, vision_tokens)
    return budget_table(
        predict,
        chosen,
        features,
        budget_ms,
        output_tokens=output_tokens,
        safety=safety,
        bound=bound,
        rank=rank,
        max_tokens=max_tokens,
        supported_output_tokens=supported_output_tokens,
    )


def format_budget_table(table: pl.DataFrame, budget_ms: float, bound: str, safety: float) -> str:
    """The budget answer as a terminal table, feasible configurations first."""
    n_ok = int(table["feasible"].sum())
    has_total = table["total_ms"].null_count() < table.height
    lines = [
        f"Budget {budget_ms:g} ms (bound: {bound}, safety {safety:g}): "
        f"{n_ok} of {table.height} configurations feasible",
        f"{'config':<14}{'vision':>8}{'prefill ms':>12}"
        + (f"{'total ms':>11}" if has_total else "")
        + f"{'max output':>12}{'feasible':>10}  why not",
    ]
    beyond = "output_extrapolated" in table.columns and bool(table["output_extrapolated"].any())
    for row in table.iter_rows(named=True):
        total = f"{row['total_ms']:>11.2f}" if has_total else ""
        room = f"{row['max_output_tokens']}" + ("*" if row.get("output_extrapolated") else "")
        lines.append(
            f"{row['config']:<14}{row['vision_tokens']:>8}{row['prefill_ms']:>12.2f}{total}"
            f"{room:>12}{'yes' if row['feasible'] else 'no':>10}"
            + (f"  {row['why_not']}" if row["why_not"] else "")
        )
    if beyond:
        lines.append(
            "* beyond the longest answer the model's decode is trusted for (a stated multiple "
            "of the longest trained answer): an extrapolation"
        )
    return "\n".join(lines)
