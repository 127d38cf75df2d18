"""Budget answers from the Python model, the exported budget query and the runtime agree."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

from exporters.budget import (
    BUDGET_OUTPUT_NAMES,
    MAX_TOKENS,
    budget_agreement,
    probe_budgets,
    reference_answers,
    run_budget_file,
)
from exporters.export import export_model
from exporters.runtime import InputError, LatencyPredictor
from toolkit.cli import main
from toolkit.controller import knob_grid, request_features


@pytest.fixture(scope="module")
def exported(small_trained: tuple[Any, Path, Path], tmp_path_factory: pytest.TempPathFactory):
    model, ckpt, _ = small_trained
    out = tmp_path_factory.mktemp("budget-export")
    training = pl.read_parquet(ckpt / "training_data.parquet")
    result = export_model(model, out, training_data=training)
    return model, out, result


def _grid_features() -> np.ndarray:
    return request_features(knob_grid(), text_tokens=60)


def test_export_writes_both_budget_files_checked(exported: Any) -> None:
    _, out, result = exported
    assert set(result.budget_written) == {"onnx", "torchscript"}
    assert (out / "latency_budget.onnx").is_file()
    assert (out / "latency_budget.ts").is_file()
    assert min(result.budget_agreement.values()) >= 0.99


@pytest.mark.parametrize("name", ["latency_budget.onnx", "latency_budget.ts"])
def test_budget_files_match_the_controller(exported: Any, name: str) -> None:
    model, out, _ = exported
    features = _grid_features()
    budgets = probe_budgets(model, features, seed=3)
    got = run_budget_file(out / name, features, budgets)
    agreement, worst = budget_agreement(got, reference_answers(model, features, budgets))
    assert agreement >= 0.99 and worst <= 1
    # The safe bounds never allow more output than the mean estimate.
    assert (got["max_output_tokens_p95"] <= got["max_output_tokens_p90"]).all()
    assert (got["max_output_tokens_p90"] <= got["max_output_tokens"]).all()
    # The probes reach every regime: nothing fits, some room, and room for the mean only.
    assert (got["max_output_tokens"] == 0).any() and (got["max_output_tokens"] > 1).any()
    assert (got["max_output_tokens_p95"] < got["max_output_tokens"]).any()


@pytest.mark.parametrize("name", ["latency_budget.onnx", "latency_budget.ts"])
def test_budget_answer_is_the_longest_total_within_budget(exported: Any, name: str) -> None:
    """Independently of any search: for each bound, the answer N is the largest with
    total_ms / total_p90_ms / total_p95_ms (N) <= budget, per the model's own predict over
    every N in 1..4096 (a float32 graph may land one token off right at the edge)."""
    model, out, _ = exported
    features = _grid_features()[::5]
    budgets = probe_budgets(model, features, seed=4)
    got = run_budget_file(out / name, features, budgets)
    lengths = np.arange(1, MAX_TOKENS + 1, dtype=np.float32)
    for row, (x, budget) in enumerate(zip(features, budgets, strict=True)):
        totals = model.predict(np.repeat(x[None], MAX_TOKENS, axis=0), lengths)
        for output, column in zip(
            BUDGET_OUTPUT_NAMES, ("total_ms", "total_p90_ms", "total_p95_ms"), strict=True
        ):
            fits = totals[column] <= float(budget)
            want = int(lengths[fits].max()) if fits[0] else 0
            assert abs(int(got[output][row]) - want) <= 1, (name, row, output)


def test_budget_extremes(exported: Any) -> None:
    _, out, _ = exported
    features = _grid_features()
    none = run_budget_file(out / "latency_budget.onnx", features, np.full(75, 1e-3, np.float32))
    assert all((none[name] == 0).all() for name in BUDGET_OUTPUT_NAMES)
    every = run_budget_file(out / "latency_budget.onnx", features, np.full(75, 1e9, np.float32))
    assert all((every[name] == MAX_TOKENS).all() for name in BUDGET_OUTPUT_NAMES)


def test_runtime_budget_methods_follow_the_total_bounds(exported: Any) -> None:
    model, out, _ = exported
    runtime = LatencyPredictor(out / "latency_predictor.onnx", on_out_of_range="flag")
    features = _grid_features()
    six = np.full(75, 6, np.float32)
    predicted = model.predict(features, six)
    # A budget midway between some row's mean total and its p90 total (that row fits the mean
    # rule, not p90), the one farthest from every row's p90 total: no row sits within float32
    # rounding of it.
    candidates = 0.5 * (predicted["total_ms"] + predicted["total_p90_ms"])
    distance = np.abs(candidates[:, None] - predicted["total_p90_ms"][None, :]).min(1)
    budget = float(candidates[np.argmax(distance / candidates)])
    assert distance.max() > 1e-5 * budget
    # p90: prefill_p90 <= budget x safety and total_p90_ms <= budget.
    feasible = runtime.feasible(features, budget, output_tokens=6, bound="p90")
    want = (predicted["prefill_p90_ms"] <= budget * 0.8) & (predicted["total_p90_ms"] <= budget)
    assert 0 < feasible.sum() < 75
    assert feasible.tolist() == want.tolist()
    # Rows whose mean total fits but whose calibrated p90 total does not: refused for p90.
    mean_only = (predicted["total_ms"] <= budget) & (predicted["total_p90_ms"] > budget)
    assert mean_only.any() and not feasible[mean_only].any()
    # The mean rule equals the controller's budget table.
    table = model.answer_budget(60, budget, output_tokens=6, bound="mean")
    by_config = {row["config"]: row for row in table.iter_rows(named=True)}
    names = [c.name for c in knob_grid()]
    mean = runtime.feasible(features, budget, output_tokens=6, bound="mean")
    assert mean.tolist() == [by_config[n]["feasible"] for n in names]
    room = runtime.max_output_tokens(features, np.full(75, budget, np.float32))
    for name, bound in zip(BUDGET_OUTPUT_NAMES, ("mean", "p90", "p95"), strict=True):
        python_room = model.max_output_tokens(features, budget, bound=bound)
        assert np.abs(room[name] - python_room).max() <= 1, name
    with pytest.raises(InputError, match="budget_ms row 0 is NaN"):
        runtime.max_output_tokens(features[:1], np.array([np.nan], np.float32))
    with pytest.raises(InputError, match="top_k"):
        runtime.max_output_tokens(features[:1] * [1, 1, 1, 0, 1], np.array([50.0], np.float32))
    with pytest.raises(InputError, match="bound"):
        runtime.feasible(features, 10.0, bound="p99")


def test_predict_budget_mode_cli(small_trained: tuple[Any, Path, Path]) -> None:
    _, ckpt, _ = small_trained
    runner = CliRunner()
    result = runner.invoke(
        main,
        [
            "predict",
            "--checkpoint",
            str(ckpt),
            "--budget-ms",
            "80",
            "--text-tokens",
            "60",
            "--output-tokens",
            "8",
            "--bound",
            "p95",
            "--rank",
            "quality",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "configurations feasible" in result.stdout
    assert result.stdout.count("\n") >= 75
    as_json = runner.invoke(
        main,
        [
            "predict",
            "--checkpoint",
            str(ckpt),
            "--budget-ms",
            "80",
            "--text-tokens",
            "60",
            "--configs",
            "low_4_8,high_12_16",
            "--json",
        ],
    )
    assert as_json.exit_code == 0, as_json.output
    rows = json.loads(as_json.stdout)
    assert {row["config"] for row in rows} == {"low_4_8", "high_12_16"}
    missing = runner.invoke(main, ["predict", "--checkpoint", str(ckpt), "--budget-ms", "80"])
    assert missing.exit_code == 2
    assert "needs --text-tokens" in missing.stderr
    bad = runner.invoke(
        main,
        [
            "predict",
            "--checkpoint",
            str(ckpt),
            "--budget-ms",
            "80",
            "--text-tokens",
            "5",
            "--configs",
            "huge_4_8",
        ],
    )
    assert bad.exit_code == 2
    assert "--configs" in bad.stderr
