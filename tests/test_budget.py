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
    assert (got["max_output_tokens_p95"] <= got["max_output_tokens"]).all()


def test_budget_extremes(exported: Any) -> None:
    _, out, _ = exported
    features = _grid_features()
    none = run_budget_file(out / "latency_budget.onnx", features, np.full(75, 1e-3, np.float32))
    assert all((none[name] == 0).all() for name in BUDGET_OUTPUT_NAMES)
    every = run_budget_file(out / "latency_budget.onnx", features, np.full(75, 1e9, np.float32))
    assert all((every[name] == MAX_TOKENS).all() for name in BUDGET_OUTPUT_NAMES)


def test_runtime_budget_methods_equal_the_python_model(exported: Any) -> None:
    model, out, _ = exported
    runtime = LatencyPredictor(out / "latency_predictor.onnx", on_out_of_range="flag")
    features = _grid_features()
    median_total = float(np.median(model.predict(features, np.full(75, 6))["total_ms"]))
    table = model.answer_budget(60, median_total, output_tokens=6, bound="p90")
    by_config = {row["config"]: row for row in table.iter_rows(named=True)}
    feasible = runtime.feasible(features, median_total, output_tokens=6, bound="p90")
    names = [c.name for c in knob_grid()]
    assert 0 < feasible.sum() < 75
    assert feasible.tolist() == [by_config[n]["feasible"] for n in names]
    room = runtime.max_output_tokens(features, np.full(75, median_total, np.float32))
    python_room = model.max_output_tokens(features, median_total)
    assert np.abs(room["max_output_tokens"] - python_room).max() <= 1
    with pytest.raises(InputError, match="budget_ms row 0 is NaN"):
        runtime.max_output_tokens(features[:1], np.array([np.nan], np.float32))
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
