"""Evaluation JSON, per-configuration table, baselines, and the ``latkit evaluate`` command."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from synthetic import fit_small_model, make_samples, write_results_dir

from reports.baselines import (
    BASELINE_NAMES,
    LinearBaseline,
    LookupTableBaseline,
    OriginalSingleNetwork,
    OriginalSingleNetworkModule,
    TreesOnlyPrefill,
)
from reports.evaluation import (
    METRIC_KEYS,
    coverage_and_bias,
    evaluate_model,
    fit_baselines,
    format_report,
    per_config_table,
    profiled_mask,
    profiling_summary,
    write_evaluation,
)
from toolkit.data import load_results
from toolkit.features import BOUND_LEVELS, config_name, feature_matrix
from toolkit.models.hybrid import HybridLatencyModel
from toolkit.models.prefill import PrefillModel
from toolkit.training import knob_split

PREDICTION_KEYS = {"prefill_ms", "decode_total_ms", "decode_per_token_ms"}


@pytest.fixture(scope="module")
def frames(tmp_path_factory: pytest.TempPathFactory) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(train, test) samples of the synthetic physics, split by sample, seeded."""
    root = tmp_path_factory.mktemp("evaluate") / "results"
    write_results_dir(root, make_samples(n_per_config=4, seed=1))
    samples = load_results(root).samples
    test_mask = np.random.default_rng(0).random(samples.height) < 0.3
    return samples.filter(~pl.Series(test_mask)), samples.filter(pl.Series(test_mask))


class MeanModel:
    """A stand-in model: the lookup table under another name."""

    def __init__(self, train: pl.DataFrame) -> None:
        self.table = LookupTableBaseline().fit(train)

    def predict_frame(self, samples: pl.DataFrame) -> Mapping[str, np.ndarray]:
        return self.table.predict_frame(samples)


def _hand_frame() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "tier": ["low", "low", "low", "high"],
            "top_k": [4, 4, 8, 8],
            "num_active_blocks": [8, 8, 8, 16],
            "vision_tokens": [288, 432, 288, 1440],
            "text_tokens": [50, 60, 70, 80],
            "tier_idx": [0, 0, 0, 2],
            "output_tokens": [3, 1, 5, 2],
            "n_decode_passes": [2, 0, 4, 1],
            "T_prefill_total": [100.0, 120.0, 150.0, 400.0],
            "T_LLM_decode": [20.0, 0.0, 48.0, 30.0],
        }
    )


# -- per-configuration table ------------------------------------------------------------------


def test_per_config_table_hand_computed() -> None:
    samples = _hand_frame()
    predictions = {
        "prefill_ms": np.array([110.0, 116.0, 150.0, 390.0]),
        "decode_total_ms": np.array([24.0, 3.0, 40.0, 33.0]),
    }
    table = per_config_table(samples, predictions)
    # sorted by count: low_4_8 (2 samples) first
    assert list(table) == ["low_4_8", "high_8_16", "low_8_8"]
    assert table["low_4_8"]["count"] == 2
    assert table["low_4_8"]["prefill_mae_ms"] == pytest.approx((10 + 4) / 2)
    assert table["low_4_8"]["prefill_mape_pct"] == pytest.approx((10 / 100 + 4 / 120) / 2 * 100)
    # the zero-pass sample does not count for decode
    assert table["low_4_8"]["decode_total_mae_ms"] == pytest.approx(4.0)
    assert table["low_4_8"]["decode_total_mape_pct"] == pytest.approx(4 / 20 * 100)
    assert table["high_8_16"] == {
        "count": 1,
        "prefill_mae_ms": 10.0,
        "decode_total_mae_ms": 3.0,
        "prefill_mape_pct": pytest.approx(10 / 400 * 100),
        "decode_total_mape_pct": pytest.approx(10.0),
        "profiled": None,  # no training data given: unknown
    }
    assert table["low_8_8"]["decode_total_mae_ms"] == pytest.approx(8.0)


def test_profiled_mask_and_per_config_flag() -> None:
    samples = _hand_frame()
    # training data knows low_4_8 and high_8_16 (with other dtypes than the samples)
    training = pl.DataFrame(
        {
            "tier": ["low", "high", "low"],
            "top_k": [4.0, 8.0, 4.0],
            "num_active_blocks": [8, 16, 8],
        }
    )
    mask = profiled_mask(samples, training)
    assert mask is not None and mask.tolist() == [True, True, False, True]
    assert profiled_mask(samples, None) is None
    assert profiled_mask(samples, training.drop("tier")) is None
    predictions = {
        "prefill_ms": samples["T_prefill_total"].to_numpy() * 1.1,
        "decode_total_ms": samples["T_LLM_decode"].to_numpy(),
    }
    table = per_config_table(samples, predictions, mask)
    assert {name: row["profiled"] for name, row in table.items()} == {
        "low_4_8": True,
        "high_8_16": True,
        "low_8_8": False,
    }
    summary = profiling_summary(samples, predictions, mask)
    assert summary["profiled"]["n_configs"] == 2 and summary["profiled"]["n_samples"] == 3
    assert summary["unprofiled"]["n_configs"] == 1 and summary["unprofiled"]["n_samples"] == 1
    assert summary["profiled"]["prefill"]["mape_pct"] == pytest.approx(10.0)
    # every prediction 10 % high: all actuals under it
    assert summary["unprofiled"]["bias"]["prefill"] == 1.0
    assert summary["mape_ratio"]["prefill"] == pytest.approx(1.0)
    # decode exact: the ratio is 0 / 0, i.e. undefined
    assert math.isnan(summary["mape_ratio"]["decode_total"])


def test_coverage_and_bias_hand_computed() -> None:
    samples = _hand_frame()  # prefill 100 120 150 400, decode 20 0 48 30
    predictions = {
        "prefill_ms": np.array([90.0, 120.0, 160.0, 390.0]),
        "decode_total_ms": np.array([25.0, 5.0, 40.0, 30.0]),
        "prefill_p90_ms": np.array([110.0, 130.0, 140.0, 500.0]),
        "total_p95_ms": np.array([130.0, 100.0, 150.0, 500.0]),
    }
    checks = coverage_and_bias(samples, predictions)
    assert checks["coverage"] == {"prefill_p90_ms": 0.75, "total_p95_ms": 0.5}
    # actual totals 120 120 198 430. Bias: prefill 120 <= 120 and 150 <= 160; decode over the
    # samples with passes 20 <= 25, 30 <= 30, not 48 > 40; total (no total_ms: prefill +
    # decode = 115 125 200 420): 120 <= 125 and 198 <= 200
    assert checks["bias"] == {"prefill": 0.5, "decode_total": pytest.approx(2 / 3), "total": 0.5}
    # a prefill-only model has only the prefill bias
    assert coverage_and_bias(samples, {"prefill_ms": predictions["prefill_ms"]}) == {
        "coverage": {},
        "bias": {"prefill": 0.5},
    }


def test_per_config_without_decode_is_nan() -> None:
    samples = _hand_frame().filter(pl.col("n_decode_passes") == 0)
    table = per_config_table(
        samples, {"prefill_ms": np.array([1.0]), "decode_total_ms": np.array([0.0])}
    )
    assert math.isnan(table["low_4_8"]["decode_total_mae_ms"])


# -- baselines --------------------------------------------------------------------------------


def test_lookup_table_hand_computed_and_fallback() -> None:
    train = _hand_frame()
    model = LookupTableBaseline().fit(train)
    test = pl.DataFrame(
        {
            "tier": ["low", "medium"],
            "top_k": [4, 4],
            "num_active_blocks": [8, 8],
            "n_decode_passes": [3, 2],
        }
    )
    out = model.predict_frame(test)
    assert set(out) == PREDICTION_KEYS
    # low_4_8: prefill mean (100 + 120) / 2; per pass only from the sample with passes: 20 / 2
    assert out["prefill_ms"][0] == pytest.approx(110.0)
    assert out["decode_per_token_ms"][0] == pytest.approx(10.0)
    assert out["decode_total_ms"][0] == pytest.approx(30.0)
    # medium_4_8 unseen: global means (prefill 192.5; per pass mean of 10, 12, 30)
    assert out["prefill_ms"][1] == pytest.approx(770.0 / 4)
    assert out["decode_per_token_ms"][1] == pytest.approx((10 + 12 + 30) / 3)
    assert model.unseen_mask(test).tolist() == [False, True]


def test_linear_baseline_recovers_a_linear_law() -> None:
    rng = np.random.default_rng(0)
    n = 60
    frame = pl.DataFrame(
        {
            "vision_tokens": rng.integers(288, 2000, n),
            "text_tokens": rng.integers(20, 120, n),
            "tier_idx": rng.integers(0, 3, n),
            "top_k": rng.choice([4, 8, 12], n),
            "num_active_blocks": rng.choice([8, 12, 16], n),
            "n_decode_passes": rng.integers(0, 10, n),
        }
    )
    prefill = 5 + 0.02 * frame["vision_tokens"].to_numpy() + 2.0 * frame["top_k"].to_numpy()
    per_pass = 1 + 0.1 * frame["num_active_blocks"].to_numpy()
    frame = frame.with_columns(
        pl.Series("T_prefill_total", prefill),
        pl.Series("T_LLM_decode", per_pass * frame["n_decode_passes"].to_numpy()),
    )
    out = LinearBaseline().fit(frame).predict_frame(frame)
    np.testing.assert_allclose(out["prefill_ms"], prefill, rtol=1e-6)
    has = frame["n_decode_passes"].to_numpy() > 0
    np.testing.assert_allclose(out["decode_per_token_ms"][has], per_pass[has], rtol=1e-6)
    assert np.all(out["decode_total_ms"][~has] == 0)


def test_baselines_fit_predict_on_synthetic(frames: tuple[pl.DataFrame, pl.DataFrame]) -> None:
    train, test = frames
    models = fit_baselines(train, single_network_epochs=2)
    assert list(models) == list(BASELINE_NAMES)
    for name, model in models.items():
        out = model.predict_frame(test)
        keys = {"prefill_ms"} if name == "trees_only" else PREDICTION_KEYS
        assert set(out) == keys, name
        for key in keys:
            assert out[key].shape == (test.height,), (name, key)
            assert np.all(np.isfinite(out[key])), (name, key)
    # lookup and linear fit these smooth physics well; the table sees every configuration
    lookup = models["lookup_table"]
    assert isinstance(lookup, LookupTableBaseline)
    assert not lookup.unseen_mask(test).any()
    truth = test["T_prefill_total"].to_numpy()
    prefill_mape = np.mean(
        np.abs(models["linear"].predict_frame(test)["prefill_ms"] - truth) / truth
    )
    assert prefill_mape < 0.15


def test_single_network_is_deterministic_and_learns(
    frames: tuple[pl.DataFrame, pl.DataFrame],
) -> None:
    train, _ = frames
    first = OriginalSingleNetwork(epochs=3, seed=7).fit(train)
    second = OriginalSingleNetwork(epochs=3, seed=7).fit(train)
    np.testing.assert_array_equal(
        first.predict_frame(train)["prefill_ms"], second.predict_frame(train)["prefill_ms"]
    )
    losses = [h["train_loss"] for h in first.history_]
    assert losses[-1] < losses[0]
    assert len(first.history_) == 3 and "val_loss" in first.history_[0]


def test_single_network_position_loss_uses_steps(tmp_path: Path) -> None:
    write_results_dir(tmp_path, make_samples(n_per_config=1, seed=2, datasets=("text_vqa",)))
    loaded = load_results(tmp_path)
    model = OriginalSingleNetwork(epochs=1, position_loss_weight=0.5, seed=1)
    targets = model._step_targets(loaded.samples, loaded.steps)
    assert targets is not None
    _, mask = targets
    assert float(mask.sum()) == loaded.steps.height
    model.fit(loaded.samples, loaded.steps)
    assert np.isfinite(model.history_[0]["train_loss"])


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@torch.no_grad()
def test_single_network_module_is_scriptable_and_factored_is_exact() -> None:
    torch.manual_seed(0)
    module = OriginalSingleNetworkModule().eval()
    scripted = torch.jit.script(module)
    features = torch.tensor([[576.0, 40.0, 0.0, 4.0, 8.0], [1872.0, 90.0, 2.0, 12.0, 16.0]])
    tokens = torch.tensor([1.0, 6.0])
    eager = module(features, tokens)
    script = scripted(features, tokens)
    assert len(eager) == 4
    for a, b in zip(eager, script, strict=True):
        torch.testing.assert_close(a, b)
    prefill, total, per_token, overall = eager
    assert float(total[0]) == 0.0 and float(per_token[0]) == 0.0  # one token: no decode pass
    torch.testing.assert_close(per_token[1], total[1] / 5)
    torch.testing.assert_close(overall, prefill + total)
    encoded = module.encode(features)
    positions = torch.arange(1, 9, dtype=torch.float32)
    torch.testing.assert_close(
        module.decode_from_encoding(encoded, positions, factored=True),
        module.decode_from_encoding(encoded, positions),
        rtol=1e-5,
        atol=1e-5,
    )


# -- evaluation dict and JSON -----------------------------------------------------------------


def test_evaluate_json_keys_exact(
    frames: tuple[pl.DataFrame, pl.DataFrame], tmp_path: Path
) -> None:
    train, test = frames
    result = evaluate_model(
        MeanModel(train),
        test,
        baselines=True,
        train_samples=train,
        n_filtered_outliers=3,
        single_network_epochs=1,
    )
    assert result["n_samples"] == test.height
    assert result["n_filtered_outliers"] == 3
    for block in ("prefill", "decode_total", "decode_per_token"):
        assert tuple(result[block]) == METRIC_KEYS
    has = test["n_decode_passes"].to_numpy() > 0
    assert result["prefill"]["n"] == test.height
    assert result["decode_total"]["n"] == result["decode_per_token"]["n"] == int(has.sum())
    assert sum(row["count"] for row in result["per_config"].values()) == test.height
    for row in result["per_config"].values():
        assert set(row) == {
            "count",
            "prefill_mae_ms",
            "decode_total_mae_ms",
            "prefill_mape_pct",
            "decode_total_mape_pct",
            "profiled",
        }
        assert row["profiled"] is None  # the stand-in carries no training data
    assert "profiling" not in result
    assert result["coverage"] == {}  # no bound outputs
    assert set(result["bias"]) == {"prefill", "decode_total", "total"}
    assert (
        list(result["baselines"])
        == [*BASELINE_NAMES]
        == [
            "lookup_table",
            "linear",
            "single_network",
            "trees_only",
        ]
    )
    for name, scores in result["baselines"].items():
        blocks = ("prefill",) if name == "trees_only" else ("prefill", "decode_total")
        for block in blocks:
            assert tuple(scores[block]) == METRIC_KEYS
        assert set(scores["bias"]) == (
            {"prefill"} if name == "trees_only" else {"prefill", "decode_total", "total"}
        )
    assert "decode_total" not in result["baselines"]["trees_only"]  # prefill only
    # the stand-in model is the lookup table: identical scores
    assert result["prefill"] == result["baselines"]["lookup_table"]["prefill"]
    assert result["bias"] == result["baselines"]["lookup_table"]["bias"]

    path = tmp_path / "evaluation_results.json"
    write_evaluation(path, result)
    loaded = json.loads(path.read_text())  # strict JSON: NaN would have failed to write
    required = {
        "n_samples",
        "n_filtered_outliers",
        "prefill",
        "decode_total",
        "decode_per_token",
        "per_config",
        "baselines",
    }
    assert required <= set(loaded)
    assert loaded["prefill"]["mae_ms"] == pytest.approx(result["prefill"]["mae_ms"])


def test_no_baselines_block_without_flag(frames: tuple[pl.DataFrame, pl.DataFrame]) -> None:
    train, test = frames
    result = evaluate_model(MeanModel(train), test)
    assert "baselines" not in result


def test_report_has_verdicts_and_side_by_side(frames: tuple[pl.DataFrame, pl.DataFrame]) -> None:
    train, test = frames
    models = fit_baselines(train, single_network_epochs=1)
    result = evaluate_model(
        MeanModel(train), test, baselines=True, fitted_baselines=models, train_samples=train
    )
    text = format_report(result, max_configs=5)
    assert "✓ Excellent (Relative error < 5%)" in text or "⚠ Needs improvement" in text
    assert "✓ Good (Relative error < 20%)" in text or "⚠ Acceptable" in text
    assert "more in the JSON" in text
    for label in (
        "hybrid",
        "lookup table",
        "linear regression",
        "original single network",
        "trees-only prefill",
    ):
        assert label in text
    assert "bias prefill" in text
    assert "profiled configurations unknown" in text  # the stand-in has no training data


def test_verdict_thresholds() -> None:
    samples = _hand_frame()
    exact = {
        "prefill_ms": samples["T_prefill_total"].to_numpy(),
        "decode_total_ms": samples["T_LLM_decode"].to_numpy(),
    }

    class Exact:
        def predict_frame(self, s: pl.DataFrame) -> Mapping[str, np.ndarray]:
            return exact

    class Off:
        def predict_frame(self, s: pl.DataFrame) -> Mapping[str, np.ndarray]:
            return {k: v * 1.5 for k, v in exact.items()}

    good = format_report(evaluate_model(Exact(), samples))
    assert "✓ Excellent (Relative error < 5%)" in good and "✓ Good (Relative error < 20%)" in good
    bad = format_report(evaluate_model(Off(), samples))
    assert "⚠ Needs improvement" in bad and "⚠ Acceptable" in bad


def test_features_of_hand_frame_are_in_order() -> None:
    # the baselines read features through feature_matrix: the frame order must not matter
    frame = _hand_frame()
    shuffled = frame.select(list(reversed(frame.columns)))
    np.testing.assert_array_equal(feature_matrix(frame), feature_matrix(shuffled))


# -- the command, on a tiny trained model -----------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, results_dir): a hybrid model trained in seconds on synthetic results."""

    root = tmp_path_factory.mktemp("cli")
    results = root / "results"
    model = fit_small_model(results, seed=3, n_estimators=30, val_fraction=0.25)
    model.save(root / "checkpoint")
    return root / "checkpoint", results


def _invoke(args: list[str]) -> tuple[int, str]:
    from click.testing import CliRunner

    from toolkit.cli import main

    result = CliRunner().invoke(main, args)
    return result.exit_code, result.output


def test_cli_evaluate_writes_json(trained: tuple[Path, Path], tmp_path: Path) -> None:
    checkpoint, results = trained
    out = tmp_path / "evaluation_results.json"
    code, text = _invoke(_evaluate_args(checkpoint, results, out))
    assert code == 0, text
    assert "Performance assessment" in text and "Per-configuration errors" in text
    data = json.loads(out.read_text())
    assert data["n_samples"] == load_results(results).samples.height
    assert tuple(data["prefill"]) == METRIC_KEYS
    assert "baselines" not in data
    assert out.stat().st_size > 500


def test_cli_evaluate_baselines_with_original_spellings(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    checkpoint, results = trained
    out = tmp_path / "eval.json"
    code, text = _invoke(
        [
            "evaluate",
            "--checkpoint_path",
            str(checkpoint),
            "--results_dir",
            str(results),
            "--use_all_datasets",
            "--output_file",
            str(out),
            "--baselines",
            "--single-network-epochs",
            "1",
            "--held-out-only",
        ]
    )
    assert code == 0, text
    data = json.loads(out.read_text())
    assert list(data["baselines"]) == ["lookup_table", "linear", "single_network", "trees_only"]
    summary = json.loads((checkpoint / "manifest.json").read_text())["training_summary"]
    # Held out: neither fitted on nor used to calibrate the bounds.
    n_train = summary["n_train"] + summary["n_calibration"]
    assert data["n_dropped_training_samples"] == n_train
    assert data["n_samples"] == load_results(results).samples.height - n_train
    assert "original single network" in text


def test_cli_evaluate_train_results_dir(trained: tuple[Path, Path], tmp_path: Path) -> None:
    checkpoint, results = trained
    out = tmp_path / "eval.json"
    code, text = _invoke(
        _evaluate_args(
            checkpoint,
            results,
            out,
            "--dataset-names",
            "text_vqa",
            "--baselines",
            "--train-results-dir",
            str(results),
            "--single-network-epochs",
            "1",
        )
    )
    assert code == 0, text
    data = json.loads(out.read_text())
    assert data["datasets"] == ["text_vqa"]
    assert data["baselines_train_samples"] == load_results(results).samples.height


def test_cli_evaluate_missing_checkpoint_exits_2(tmp_path: Path, results_dir: Path) -> None:
    code, text = _invoke(_evaluate_args(tmp_path / "nope", results_dir, tmp_path / "e.json"))
    assert code == 2
    assert len(text.strip().splitlines()) == 1 and "nope" in text
    assert not (tmp_path / "e.json").exists()


# -- coverage, bias and never-profiled configurations of a real model ------------------------


@pytest.fixture(scope="module")
def knob_trained(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[HybridLatencyModel, Path, Path, pl.DataFrame]:
    """(model, checkpoint, results, all samples): a small hybrid model fitted on the profiled
    part of the ``extrap`` knob split (configurations with top_k 12 or 16 blocks never seen)."""
    root = tmp_path_factory.mktemp("knob")
    results = root / "results"
    write_results_dir(results, make_samples(n_per_config=2, seed=5))
    loaded = load_results(results)
    profiled, _ = knob_split(loaded.samples, "extrap")
    model = HybridLatencyModel(
        num_epochs=2, device="cpu", prefill_params={"n_estimators": 30, "nthread": 1}
    ).fit(profiled, loaded.steps)
    model.save(root / "checkpoint")
    return model, root / "checkpoint", results, loaded.samples


def _evaluate_args(checkpoint: Path, results: Path, out: Path, *extra: str) -> list[str]:
    return [
        "evaluate",
        "--checkpoint",
        str(checkpoint),
        "--results-dir",
        str(results),
        "--output-file",
        str(out),
        *extra,
    ]


def _configs(frame: pl.DataFrame) -> set[str]:
    keys = frame.select("tier", "top_k", "num_active_blocks").unique()
    return {config_name(*row) for row in keys.iter_rows()}


def test_cli_evaluate_coverage_and_bias_match_the_predictions(
    knob_trained: tuple[HybridLatencyModel, Path, Path, pl.DataFrame], tmp_path: Path
) -> None:
    model, checkpoint, results, samples = knob_trained
    out = tmp_path / "eval.json"
    code, text = _invoke(_evaluate_args(checkpoint, results, out))
    assert code == 0, text
    data = json.loads(out.read_text())
    assert data["n_samples"] == samples.height  # same samples, same order as loaded here

    # independently, from the model's own predictions
    pred = model.predict_frame(samples)
    prefill = samples["T_prefill_total"].to_numpy()
    decode = samples["T_LLM_decode"].to_numpy()
    total = prefill + decode
    has = samples["n_decode_passes"].to_numpy() > 0
    expected_coverage = {
        "prefill_p50_ms": np.mean(prefill <= pred["prefill_p50_ms"]),
        "prefill_p90_ms": np.mean(prefill <= pred["prefill_p90_ms"]),
        "prefill_p95_ms": np.mean(prefill <= pred["prefill_p95_ms"]),
        "total_p90_ms": np.mean(total <= pred["total_p90_ms"]),
        "total_p95_ms": np.mean(total <= pred["total_p95_ms"]),
    }
    assert set(data["coverage"]) == set(expected_coverage) == set(BOUND_LEVELS)
    assert data["coverage"] == pytest.approx(expected_coverage, abs=1e-12)
    expected_bias = {
        "prefill": np.mean(prefill <= pred["prefill_ms"]),
        "decode_total": np.mean(decode[has] <= pred["decode_total_ms"][has]),
        "total": np.mean(total <= pred["total_ms"]),
    }
    assert data["bias"] == pytest.approx(expected_bias, abs=1e-12)
    # the same definitions as the model's own evaluate
    own = model.evaluate(samples)
    assert data["bias"] == pytest.approx(own["bias"], abs=1e-12)
    assert data["coverage"] == pytest.approx(
        {name: own["coverage"][name] for name in BOUND_LEVELS}, abs=1e-12
    )
    # the calibrated bounds are ordered, so are their coverages, and they do cover something
    cov = data["coverage"]
    assert cov["prefill_p50_ms"] <= cov["prefill_p90_ms"] <= cov["prefill_p95_ms"]
    assert cov["total_p90_ms"] <= cov["total_p95_ms"]
    assert 0.5 < cov["prefill_p95_ms"] <= 1.0
    # (Right-aligned columns: the number of spaces depends on the widest value.)
    assert re.search(
        rf"coverage prefill_p90_ms \(nominal 0\.90\) +{re.escape(_two(cov['prefill_p90_ms']))}",
        text,
    )
    assert "bias decode total" in text


def _two(value: float) -> str:
    return f"{value:.2f}"


def test_cli_evaluate_profiled_is_exactly_the_training_configs(
    knob_trained: tuple[HybridLatencyModel, Path, Path, pl.DataFrame], tmp_path: Path
) -> None:
    model, checkpoint, results, samples = knob_trained
    out = tmp_path / "eval.json"
    code, text = _invoke(_evaluate_args(checkpoint, results, out, "--max-configs", "100"))
    assert code == 0, text
    data = json.loads(out.read_text())
    assert model.training_data is not None
    training = _configs(model.training_data)
    profiled_part, never_part = knob_split(samples, "extrap")
    assert training == _configs(profiled_part)  # the calibration share took no whole config
    assert len(training) == 12 and len(_configs(never_part)) == 15
    flags = {name: row["profiled"] for name, row in data["per_config"].items()}
    assert {name for name, flag in flags.items() if flag is True} == training
    assert {name for name, flag in flags.items() if flag is False} == _configs(never_part)
    assert len(flags) == 27

    # the summaries of each group, against an independent computation
    summary = data["profiling"]
    assert summary["profiled"]["n_configs"] == 12 and summary["unprofiled"]["n_configs"] == 15
    assert summary["profiled"]["n_samples"] == profiled_part.height
    assert summary["unprofiled"]["n_samples"] == never_part.height
    for part, name in ((profiled_part, "profiled"), (never_part, "unprofiled")):
        pred = model.predict_frame(part)
        truth = part["T_prefill_total"].to_numpy()
        block = summary[name]
        assert block["prefill"]["mape_pct"] == pytest.approx(
            np.mean(np.abs(pred["prefill_ms"] - truth) / truth) * 100
        )
        has = part["n_decode_passes"].to_numpy() > 0
        decode = part["T_LLM_decode"].to_numpy()[has]
        assert block["decode_total"]["mape_pct"] == pytest.approx(
            np.mean(np.abs(pred["decode_total_ms"][has] - decode) / decode) * 100
        )
        assert block["bias"]["prefill"] == pytest.approx(np.mean(truth <= pred["prefill_ms"]))
        assert block["coverage"]["prefill_p90_ms"] == pytest.approx(
            np.mean(truth <= pred["prefill_p90_ms"])
        )
    assert summary["mape_ratio"]["prefill"] == pytest.approx(
        summary["unprofiled"]["prefill"]["mape_pct"] / summary["profiled"]["prefill"]["mape_pct"]
    )
    # printed: the group columns, the ratio line and the flag of every configuration
    assert "never profiled" in text and "never-profiled / profiled MAPE: prefill" in text
    for name, flag in flags.items():
        assert any(
            line.split()[:2] == [name, "yes" if flag else "no"] for line in text.splitlines()
        ), name


def test_cli_evaluate_baselines_include_trees_only(
    knob_trained: tuple[HybridLatencyModel, Path, Path, pl.DataFrame], tmp_path: Path
) -> None:
    model, checkpoint, results, samples = knob_trained
    out = tmp_path / "eval.json"
    code, text = _invoke(
        _evaluate_args(
            checkpoint, results, out, "--baselines", "--single-network-epochs", "1", "--seed", "11"
        )
    )
    assert code == 0, text
    data = json.loads(out.read_text())
    assert list(data["baselines"]) == list(BASELINE_NAMES)
    trees = data["baselines"]["trees_only"]
    assert set(trees) == {"prefill", "bias", "profiling"}  # prefill only: no decode blocks
    # independently: latkit 0.2's prefill (trees alone), the model's own tree parameters,
    # fitted on the checkpoint's training split
    assert model.training_data is not None
    params = {**model.prefill.get_params(), "structure": "trees", "seed": 11, "device": "cpu"}
    reference = PrefillModel(**params).fit(
        feature_matrix(model.training_data), model.training_data["T_prefill_total"].to_numpy()
    )
    pred = reference.predict(feature_matrix(samples))
    truth = samples["T_prefill_total"].to_numpy()
    assert trees["prefill"]["n"] == samples.height
    assert trees["prefill"]["mape_pct"] == pytest.approx(
        np.mean(np.abs(pred - truth) / truth) * 100
    )
    assert trees["bias"] == pytest.approx({"prefill": np.mean(truth <= pred)})
    assert trees["profiling"]["unprofiled"]["n_configs"] == 15
    # the trees-only model is not the hybrid's prefill (physics x trees)
    assert trees["prefill"]["mape_pct"] != pytest.approx(data["prefill"]["mape_pct"])
    # printed beside the others, with empty decode cells, and on never-profiled configs
    rows = [line for line in text.splitlines() if line.startswith("trees-only prefill")]
    assert len(rows) == 2 and all("—" in row for row in rows)
    assert "Models on profiled vs never-profiled configurations" in text


def test_trees_only_baseline_is_prefill_only(frames: tuple[pl.DataFrame, pl.DataFrame]) -> None:
    train, test = frames
    baseline = TreesOnlyPrefill(seed=1, prefill_params={"n_estimators": 50, "structure": "x"})
    out = baseline.fit(train).predict_frame(test)
    assert set(out) == {"prefill_ms"}
    assert baseline.model_.structure == "trees" and baseline.model_.n_estimators == 50
    truth = test["T_prefill_total"].to_numpy()
    assert np.mean(np.abs(out["prefill_ms"] - truth) / truth) < 0.15
