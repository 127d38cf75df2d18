"""Metric formulas against values computed by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from reports.evaluation import write_evaluation
from toolkit.metrics import jsonable, regression_metrics, score_frame


def test_regression_metrics_hand_computed() -> None:
    # errors 2, -2, 3, 0 on targets 10, 20, 30, 40 (mean 25)
    m = regression_metrics([10, 20, 30, 40], [12, 18, 33, 40])
    assert m["n"] == 4
    assert m["mae_ms"] == pytest.approx(7 / 4)
    assert m["rmse_ms"] == pytest.approx(math.sqrt(17 / 4))
    assert m["mape_pct"] == pytest.approx((0.2 + 0.1 + 0.1 + 0.0) / 4 * 100)
    # SS_tot = 15² + 5² + 5² + 15² = 500, SS_res = 17
    assert m["r2"] == pytest.approx(1 - 17 / 500)
    assert m["rel_error_pct"] == pytest.approx(1.75 / 25 * 100)


def test_perfect_prediction() -> None:
    m = regression_metrics([1.0, 2.0, 4.0], [1.0, 2.0, 4.0])
    assert m["mae_ms"] == 0 and m["rmse_ms"] == 0 and m["mape_pct"] == 0
    assert m["r2"] == 1.0 and m["rel_error_pct"] == 0


def test_mape_skips_zero_targets() -> None:
    # the zero target would divide by zero: MAPE is over the positive targets only
    m = regression_metrics([0.0, 10.0], [1.0, 11.0])
    assert m["mape_pct"] == pytest.approx(10.0)
    assert m["mae_ms"] == pytest.approx(1.0)
    assert m["rel_error_pct"] == pytest.approx(1.0 / 5.0 * 100)


def test_constant_target_has_no_r2_and_empty_is_nan() -> None:
    assert math.isnan(regression_metrics([3.0, 3.0], [2.0, 4.0])["r2"])
    empty = regression_metrics([], [])
    assert empty["n"] == 0
    assert all(math.isnan(empty[k]) for k in ("mae_ms", "rmse_ms", "mape_pct", "r2"))


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError):
        regression_metrics([1.0, 2.0], [1.0])


def test_score_frame_decode_and_total_blocks_hand_computed() -> None:
    # three samples: 0, 2 and 4 decode passes; only the last two count for decode
    samples = pl.DataFrame(
        {
            "tier": ["low", "low", "high"],
            "top_k": [4, 4, 8],
            "num_active_blocks": [8, 8, 16],
            "n_decode_passes": [0, 2, 4],
            "T_prefill_total": [100.0, 110.0, 200.0],
            "T_LLM_decode": [0.0, 20.0, 60.0],
        }
    )
    predictions = {
        "prefill_ms": np.array([101.0, 108.0, 203.0]),
        "decode_total_ms": np.array([5.0, 22.0, 56.0]),
    }
    scores = score_frame(samples, predictions)
    assert scores["prefill"]["n"] == 3
    assert scores["prefill"]["mae_ms"] == pytest.approx((1 + 2 + 3) / 3)
    assert scores["decode_total"]["n"] == 2
    assert scores["decode_total"]["mae_ms"] == pytest.approx((2 + 4) / 2)
    assert scores["decode_total"]["rel_error_pct"] == pytest.approx(3 / 40 * 100)
    # per token: truth 10 and 15, predicted 11 and 14
    assert scores["decode_per_token"]["n"] == 2
    assert scores["decode_per_token"]["mae_ms"] == pytest.approx(1.0)
    assert scores["decode_per_token"]["mape_pct"] == pytest.approx((1 / 10 + 1 / 15) / 2 * 100)
    # total: every sample, prefill + decode (no total_ms given): 106 vs 100, 130 vs 130,
    # 259 vs 260
    assert scores["total"]["n"] == 3
    assert scores["total"]["mae_ms"] == pytest.approx((6 + 0 + 1) / 3)
    assert scores["bias"] == pytest.approx({"prefill": 2 / 3, "decode_total": 0.5, "total": 2 / 3})
    assert scores["coverage"] == {}  # no bound outputs
    # a prefill-only model: its prefill, bias and (no) coverage only
    prefill_only = score_frame(samples, {"prefill_ms": predictions["prefill_ms"]})
    assert set(prefill_only) == {"prefill", "coverage", "bias"}


def test_nan_becomes_null_in_json(tmp_path: Path) -> None:
    result = {"a": math.nan, "b": [np.float32(1.5), math.inf], "c": {"d": np.int64(3)}}
    assert jsonable(result) == {"a": None, "b": [1.5, None], "c": {"d": 3}}
    path = tmp_path / "out.json"
    write_evaluation(path, result)
    assert json.loads(path.read_text()) == {"a": None, "b": [1.5, None], "c": {"d": 3}}


def test_noise_floor_hand_computed() -> None:
    from reports.evaluation import noise_floor

    # two samples of identical work (10 ms and 14 ms prefill), one unique sample
    samples = pl.DataFrame(
        {
            "tier": ["low", "low", "high"],
            "top_k": [4, 4, 4],
            "num_active_blocks": [8, 8, 8],
            "vision_tokens": [288, 288, 1440],
            "text_tokens": [20, 20, 20],
            "n_decode_passes": [2, 2, 3],
            "T_prefill_total": [10.0, 14.0, 50.0],
            "T_LLM_decode": [4.0, 6.0, 9.0],
        }
    )
    floor = noise_floor(samples)
    # leave-one-out error 4 ms each, times sqrt((n - 1) / n) = sqrt(1/2)
    expected = 4 * math.sqrt(0.5)
    assert floor["prefill"]["n"] == 2 and floor["prefill"]["n_groups"] == 1
    assert floor["prefill"]["mae_ms"] == pytest.approx(expected)
    assert floor["prefill"]["mape_pct"] == pytest.approx((expected / 10 + expected / 14) / 2 * 100)
    assert floor["decode_total"]["mae_ms"] == pytest.approx(2 * math.sqrt(0.5))
    assert floor["decode_per_token"]["mae_ms"] == pytest.approx(1 * math.sqrt(0.5))
    # the total (14 and 20 ms) of the same identical work
    assert floor["total"]["mae_ms"] == pytest.approx(6 * math.sqrt(0.5))
    # no repeats at all: n = 0 and NaN, not an error
    assert math.isnan(noise_floor(samples.tail(1))["prefill"]["mae_ms"])
