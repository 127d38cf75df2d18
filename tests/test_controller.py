"""Budget answers: feasibility rule, bisection for output room, ranking."""

from __future__ import annotations

import numpy as np
import pytest

from exporters.runtime import DEFAULT_VISION_TOKENS
from toolkit.controller import (
    Config,
    budget_table,
    knob_grid,
    max_output_tokens,
    parse_config,
    request_features,
)
from toolkit.features import default_vision_tokens


def toy_predict(features: np.ndarray, output_tokens: np.ndarray) -> dict[str, np.ndarray]:
    """A predictor with a closed form: decode pass time constant per configuration; bounds
    are fixed multiples like the conformal ones (total factor >= prefill factor)."""
    vision, text, _, top_k, blocks = features.T.astype(np.float64)
    prefill = 5.0 + 0.01 * (vision + text) + 0.5 * top_k + 0.8 * blocks
    passes = np.clip(output_tokens.astype(np.float64) - 1, 0, None)
    decode_total = passes * (1.0 + 0.1 * top_k) * blocks / 16
    return {
        "prefill_ms": prefill,
        "prefill_p50_ms": prefill,
        "prefill_p90_ms": prefill * 1.1,
        "prefill_p95_ms": prefill * 1.2,
        "decode_total_ms": decode_total,
        "total_ms": prefill + decode_total,
        "total_p90_ms": (prefill + decode_total) * 1.15,
        "total_p95_ms": (prefill + decode_total) * 1.3,
    }


def brute_force_max_tokens(features: np.ndarray, budget: float, bound: str, cap: int) -> list[int]:
    """Scan of N: mean and p90/p95 decide on total_ms / total_pXX_ms, p50 on
    prefill_p50_ms + decode total."""
    answers = []
    for row in features:
        best = 0
        for n in range(1, cap + 1):
            out = toy_predict(row[None, :], np.array([n], dtype=np.float32))
            spent = (
                out["prefill_p50_ms"][0] + out["decode_total_ms"][0]
                if bound == "p50"
                else out[{"mean": "total_ms", "p90": "total_p90_ms", "p95": "total_p95_ms"}[bound]][
                    0
                ]
            )
            if spent <= budget:
                best = n
        answers.append(best)
    return answers


def test_grid_and_parsing() -> None:
    grid = knob_grid()
    assert len(grid) == 75
    assert grid[0] == Config("low", 4, 8)
    assert parse_config("medium_8_12") == Config("medium", 8, 12)
    with pytest.raises(ValueError, match="not <tier>_<top_k>_<blocks>"):
        parse_config("medium-8")
    assert default_vision_tokens("low") == (2 + 1) * 144
    assert default_vision_tokens("high") == (12 + 1) * 144
    # The standalone runtime carries its own copy (it imports nothing from latkit).
    assert {t: default_vision_tokens(t) for t in DEFAULT_VISION_TOKENS} == DEFAULT_VISION_TOKENS


@pytest.mark.parametrize("budget", [20.0, 40.0, 55.5, 80.0])
@pytest.mark.parametrize("bound", ["mean", "p50", "p90", "p95"])
def test_max_output_tokens_matches_a_scan(budget: float, bound: str) -> None:
    configs = knob_grid(top_ks=(4, 12), blocks=(8, 16))
    features = request_features(configs, text_tokens=40)
    got = max_output_tokens(toy_predict, features, budget, bound=bound, max_tokens=300)
    assert got.tolist() == brute_force_max_tokens(features, budget, bound, cap=300)


def test_budget_nobody_meets_and_everybody_meets() -> None:
    configs = knob_grid()
    features = request_features(configs, text_tokens=30)
    none_fit = budget_table(toy_predict, configs, features, budget_ms=1.0)
    assert not none_fit["feasible"].any()
    assert (none_fit["max_output_tokens"] == 0).all()
    all_fit = budget_table(
        toy_predict, configs, features, budget_ms=1e6, output_tokens=50, max_tokens=512
    )
    assert all_fit["feasible"].all()
    assert (all_fit["max_output_tokens"] == 512).all()
    assert all_fit["total_ms"].is_sorted()


def test_feasibility_rule_uses_safety_and_output_length() -> None:
    configs = [Config("low", 4, 8), Config("high", 12, 16)]
    features = request_features(configs, text_tokens=10, vision_tokens=432)
    prefill = toy_predict(features, np.ones(2, dtype=np.float32))["prefill_ms"]
    # A budget where the small config's prefill fits 0.8 x budget and the large one's doesn't.
    budget = float(prefill[1] / 0.8 - 0.01)
    table = budget_table(toy_predict, configs, features, budget_ms=budget)
    feasible = dict(zip(table["config"], table["feasible"], strict=True))
    assert feasible == {"low_4_8": True, "high_12_16": False}
    why_not = dict(zip(table["config"], table["why_not"], strict=True))
    assert why_not == {"low_4_8": None, "high_12_16": "prefill > budget x 0.8"}
    # With a long expected answer, the decode total no longer fits for either.
    long_answer = budget_table(toy_predict, configs, features, budget_ms=budget, output_tokens=200)
    assert not long_answer["feasible"].any()
    assert dict(zip(long_answer["config"], long_answer["why_not"], strict=True)) == {
        "low_4_8": "total > budget",
        "high_12_16": "prefill > budget x 0.8; total > budget",
    }
    # A quantile bound is stricter than the mean.
    p95 = budget_table(
        toy_predict, configs, features, budget_ms=float(prefill[0] / 0.8 + 0.01), bound="p95"
    )
    assert not p95.filter(p95["config"] == "low_4_8")["feasible"].item()


def test_quality_ranking_puts_the_most_capable_feasible_config_first() -> None:
    configs = knob_grid()
    features = request_features(configs, text_tokens=30)
    table = budget_table(toy_predict, configs, features, budget_ms=35.0, rank="quality")
    feasible = table.filter(table["feasible"])
    assert 0 < feasible.height < 75
    tiers = ["low", "medium", "high"]
    best = max(
        feasible.iter_rows(named=True),
        key=lambda r: (tiers.index(r["tier"]), r["top_k"], r["num_active_blocks"]),
    )
    assert feasible.row(0, named=True) == best
    assert table["feasible"].to_list() == sorted(table["feasible"].to_list(), reverse=True)


def test_bad_arguments_are_clear() -> None:
    configs = knob_grid()
    features = request_features(configs, text_tokens=30)
    with pytest.raises(ValueError, match="bound"):
        budget_table(toy_predict, configs, features, budget_ms=10, bound="p99")
    with pytest.raises(ValueError, match="positive"):
        budget_table(toy_predict, configs, features, budget_ms=0)
