"""Evaluation JSON, per-configuration table, baselines, and the ``latkit evaluate`` command."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from synthetic import fit_small_model, make_samples, write_results_dir

from reports.baselines import (
    LinearBaseline,
    LookupTableBaseline,
    OriginalSingleNetwork,
    OriginalSingleNetworkModule,
)
from reports.evaluation import (
    METRIC_KEYS,
    evaluate_model,
    fit_baselines,
    format_report,
    per_config_table,
    write_evaluation,
)
from toolkit.data import load_results
from toolkit.features import feature_matrix

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
    # the zero-pass sample does not count for decode
    assert table["low_4_8"]["decode_total_mae_ms"] == pytest.approx(4.0)
    assert table["high_8_16"] == {"count": 1, "prefill_mae_ms": 10.0, "decode_total_mae_ms": 3.0}
    assert table["low_8_8"]["decode_total_mae_ms"] == pytest.approx(8.0)


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
    for name, model in models.items():
        out = model.predict_frame(test)
        assert set(out) == PREDICTION_KEYS, name
        for key in PREDICTION_KEYS:
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
        assert set(row) == {"count", "prefill_mae_ms", "decode_total_mae_ms"}
    assert list(result["baselines"]) == ["lookup_table", "linear", "single_network"]
    for scores in result["baselines"].values():
        for block in ("prefill", "decode_total", "decode_per_token"):
            assert tuple(scores[block]) == METRIC_KEYS
    # the stand-in model is the lookup table: identical scores
    assert result["prefill"] == result["baselines"]["lookup_table"]["prefill"]

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
    for label in ("hybrid", "lookup table", "linear regression", "original single network"):
        assert label in text


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
    model = fit_small_model(
        results, seed=3, n_estimators=30, quantile_n_estimators=20, val_fraction=0.25
    )
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
    code, text = _invoke(
        [
            "evaluate",
            "--checkpoint",
            str(checkpoint),
            "--results-dir",
            str(results),
            "--output-file",
            str(out),
        ]
    )
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
    assert list(data["baselines"]) == ["lookup_table", "linear", "single_network"]
    n_train = json.loads((checkpoint / "manifest.json").read_text())["training_summary"]["n_train"]
    assert data["n_dropped_training_samples"] == n_train
    assert data["n_samples"] == load_results(results).samples.height - n_train
    assert "original single network" in text


def test_cli_evaluate_train_results_dir(trained: tuple[Path, Path], tmp_path: Path) -> None:
    checkpoint, results = trained
    out = tmp_path / "eval.json"
    code, text = _invoke(
        [
            "evaluate",
            "--checkpoint",
            str(checkpoint),
            "--results-dir",
            str(results),
            "--dataset-names",
            "text_vqa",
            "--output-file",
            str(out),
            "--baselines",
            "--train-results-dir",
            str(results),
            "--single-network-epochs",
            "1",
        ]
    )
    assert code == 0, text
    data = json.loads(out.read_text())
    assert data["datasets"] == ["text_vqa"]
    assert data["baselines_train_samples"] == load_results(results).samples.height


def test_cli_evaluate_missing_checkpoint_exits_2(tmp_path: Path, results_dir: Path) -> None:
    code, text = _invoke(
        [
            "evaluate",
            "--checkpoint",
            str(tmp_path / "nope"),
            "--results-dir",
            str(results_dir),
            "--output-file",
            str(tmp_path / "e.json"),
        ]
    )
    assert code == 2
    assert len(text.strip().splitlines()) == 1 and "nope" in text
    assert not (tmp_path / "e.json").exists()
