"""Recalibration to another machine: calibration draws, affine fits, artifact, CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner
from synthetic import make_samples, write_results_dir

from toolkit.cli import main
from toolkit.data import load_results
from toolkit.metrics import regression_metrics
from toolkit.models.calibration import Calibration
from toolkit.models.hybrid import HybridLatencyModel
from toolkit.recalibrate import (
    _affine_maps,
    _Targets,
    calibration_split,
    fit_calibration,
    recalibrate,
)

PREFILL_SCALE, PREFILL_OFFSET = 1.6, 3.0
PASS_SCALE, PASS_OFFSET = 0.7, 0.5


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same grid on a 'machine' whose stages cost a x source + b."""
    samples = make_samples(n_per_config=4, seed=11)
    for sample in samples:
        sample.t_vision = sample.t_vision * PREFILL_SCALE + PREFILL_OFFSET
        sample.t_prefill *= PREFILL_SCALE
        sample.pass_runs_ms = [
            [t * PASS_SCALE + PASS_OFFSET for t in runs] for runs in sample.pass_runs_ms
        ]
    root = tmp_path_factory.mktemp("target")
    write_results_dir(root, samples)
    return root


def _mape(model: HybridLatencyModel, samples: pl.DataFrame) -> tuple[float, float]:
    out = model.predict_frame(samples)
    passes = samples["n_decode_passes"].to_numpy() > 0
    prefill = regression_metrics(samples["T_prefill_total"].to_numpy(), out["prefill_ms"])
    decode = regression_metrics(
        samples["T_LLM_decode"].to_numpy()[passes], out["decode_total_ms"][passes]
    )
    return prefill["mape_pct"], decode["mape_pct"]


def test_calibration_draws_spread_over_the_grid(target_dir: Path) -> None:
    samples = load_results(target_dir).samples
    calibration, rest = calibration_split(samples, 25, seed=1)
    assert calibration.height == 25
    assert calibration["config"].n_unique() == 25  # 27 configurations: one sample each
    assert rest.height == samples.height - 25
    assert set(calibration["sample_key"]).isdisjoint(set(rest["sample_key"]))
    none, everything = calibration_split(samples, 0)
    assert none.height == 0 and everything.height == samples.height
    too_many, left = calibration_split(samples, 10 * samples.height)
    assert too_many.height == samples.height and left.height == 0


def test_affine_recalibration_recovers_the_target(
    small_trained: tuple[HybridLatencyModel, Path, Path], target_dir: Path
) -> None:
    model, _, _ = small_trained
    target = load_results(target_dir).samples
    calibrated, _, rest = recalibrate(model, target, 25, seed=2)
    cal = calibrated.calibration
    assert cal.n_samples == 25 and cal.method == "affine"
    assert cal.prefill_scale == pytest.approx(PREFILL_SCALE, rel=0.15)
    assert cal.decode_pass_scale == pytest.approx(PASS_SCALE, rel=0.2)
    before, after = _mape(model, rest), _mape(calibrated, rest)
    assert after[0] < before[0] / 3
    assert after[1] < before[1] / 3
    # The source model is untouched; N = 0 is the identity.
    assert model.calibration.is_identity
    identity, _, _ = recalibrate(model, target, 0)
    assert identity.calibration.is_identity


def test_calibration_round_trips_through_the_artifact(
    small_trained: tuple[HybridLatencyModel, Path, Path], target_dir: Path, tmp_path: Path
) -> None:
    model, _, _ = small_trained
    target = load_results(target_dir).samples
    calibrated, _, _ = recalibrate(model, target, 30)
    calibrated.save(tmp_path / "recal")
    loaded = HybridLatencyModel.load(tmp_path / "recal")
    assert loaded.calibration == calibrated.calibration
    features = (
        target.select("vision_tokens", "text_tokens", "tier_idx", "top_k", "num_active_blocks")
        .to_numpy()
        .astype(np.float32)
    )
    tokens = target["output_tokens"].to_numpy()
    for key, value in calibrated.predict(features, tokens).items():
        np.testing.assert_array_equal(loaded.predict(features, tokens)[key], value)
    passes = loaded.predict_decode_passes(features[:3], np.arange(1, 5))
    raw = loaded.uncalibrated().predict_decode_passes(features[:3], np.arange(1, 5))
    np.testing.assert_allclose(
        passes,
        raw * loaded.calibration.decode_pass_scale + loaded.calibration.decode_pass_offset_ms,
    )


def _random_calibration(n: int, seed: int) -> tuple[dict[str, np.ndarray], _Targets]:
    """Source predictions and target times of ``n`` samples, some without decode passes."""
    rng = np.random.default_rng(seed)
    prefill = rng.uniform(50, 500, n)
    passes = rng.integers(0, 12, n).astype(np.float64)
    passes[:3] = 0
    decode = passes * rng.uniform(5, 30, n)
    predicted = {"prefill_ms": prefill, "decode_total_ms": decode}
    targets = _Targets(
        prefill_ms=1.7 * prefill + 4 + rng.normal(0, 3, n),
        decode_total_ms=np.where(passes > 0, 0.6 * decode + 0.8 * passes + rng.normal(0, 1, n), 0),
        passes=passes,
    )
    return predicted, targets


def test_the_affine_fit_is_relative_least_squares() -> None:
    predicted, targets = _random_calibration(40, seed=3)
    (scale, offset), _ = _affine_maps(predicted, targets, leave_one_out=False)
    weight = 1 / targets.prefill_ms
    design = np.stack([predicted["prefill_ms"], np.ones(40)], axis=1) * weight[:, None]
    want, *_ = np.linalg.lstsq(design, targets.prefill_ms * weight, rcond=None)
    np.testing.assert_allclose([scale[0], offset[0]], want, rtol=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_leave_one_out_maps_equal_a_fit_without_each_sample(seed: int) -> None:
    n = 25
    predicted, targets = _random_calibration(n, seed)
    if seed == 1:
        # Two samples whose prefill is wildly off: without them the offset changes a lot.
        targets.prefill_ms[5] *= 40
        targets.prefill_ms[9] = 0.01
    if seed == 2:
        # Decode passes on only two samples: leaving one out leaves a scale-only fit.
        targets.passes[2:] = 0
        targets.passes[:2] = (3, 5)
        predicted["decode_total_ms"][:2] = (40, 70)
        targets.decode_total_ms[:2] = (20, 30)
    loo = _affine_maps(predicted, targets, leave_one_out=True)
    for i in range(n):
        keep = np.arange(n) != i
        subset = _Targets(
            targets.prefill_ms[keep], targets.decode_total_ms[keep], targets.passes[keep]
        )
        one = _affine_maps({k: v[keep] for k, v in predicted.items()}, subset, leave_one_out=False)
        for stage in (0, 1):
            for part in (0, 1):
                # Same sums added in another order: equal to rounding (the extreme weights
                # of seed 1 make the 2x2 normal equations lose a few more digits).
                np.testing.assert_allclose(
                    loo[stage][part][i], one[stage][part][0], rtol=1e-7, atol=1e-9
                )


def test_one_calibration_sample_is_enough(
    small_trained: tuple[HybridLatencyModel, Path, Path], target_dir: Path
) -> None:
    model, _, _ = small_trained
    calibrated, calibration, _ = recalibrate(model, load_results(target_dir).samples, 1)
    assert calibration.height == 1 and calibrated.calibration.n_samples == 1
    assert calibrated.bounds.is_unbounded("p95")  # one score bounds nothing


def test_bad_calibration_block_is_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        Calibration.from_dict(
            {
                "prefill_scale": -1.0,
                "prefill_offset_ms": 0.0,
                "decode_pass_scale": 1.0,
                "decode_pass_offset_ms": 0.0,
            }
        )


def test_single_sample_fits_a_scale_only(
    small_trained: tuple[HybridLatencyModel, Path, Path], target_dir: Path
) -> None:
    model, _, _ = small_trained
    one = load_results(target_dir).samples.head(1)
    fitted = fit_calibration(model, one)
    assert fitted.prefill_offset_ms == 0.0 and fitted.prefill_scale > 0
    predicted = model.predict_frame(one)["prefill_ms"][0]
    assert fitted.prefill_scale * predicted == pytest.approx(one["T_prefill_total"][0])


@pytest.mark.slow
def test_recalibrate_cli_with_curve(
    small_trained: tuple[Any, Path, Path], target_dir: Path, tmp_path: Path
) -> None:
    _, ckpt, _ = small_trained
    out = tmp_path / "recalibrated"
    result = CliRunner().invoke(
        main,
        [
            "recalibrate",
            "--checkpoint",
            str(ckpt),
            "--results-dir",
            str(target_dir),
            "--samples",
            "25",
            "--output-dir",
            str(out),
            "--curve",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "Recalibrated model saved to" in result.stdout
    assert "target-trained (whole pool)" in result.stdout
    assert HybridLatencyModel.load(out).calibration.n_samples == 25
    curve = json.loads((out / "recalibration_curve.json").read_text())
    assert [row["n_samples"] for row in curve if row["model"] == "affine recalibration"] == [
        10,
        25,
        50,
        100,
    ]
    assert (out / "recalibration_curve.png").stat().st_size > 10_000
    missing = CliRunner().invoke(
        main,
        [
            "recalibrate",
            "--checkpoint",
            str(tmp_path / "nope"),
            "--results-dir",
            str(target_dir),
            "--output-dir",
            str(out),
        ],
    )
    assert missing.exit_code == 2


def test_recalibrate_cli_refuses_more_samples_than_the_target_has(
    small_trained: tuple[Any, Path, Path], target_dir: Path, tmp_path: Path
) -> None:
    _, ckpt, _ = small_trained
    n_target = load_results(target_dir).n_samples
    args = ["recalibrate", "--checkpoint", str(ckpt), "--results-dir", str(target_dir)]
    args += ["--output-dir", str(tmp_path / "out"), "--samples", str(n_target + 1)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert f"holds only {n_target} usable samples" in result.stderr
    assert not (tmp_path / "out").exists()


def test_recalibrated_model_exports_with_parity(
    small_trained: tuple[HybridLatencyModel, Path, Path], target_dir: Path, tmp_path: Path
) -> None:
    from exporters.export import export_model
    from exporters.runtime import LatencyPredictor

    model, _, _ = small_trained
    target = load_results(target_dir).samples
    calibrated, _, rest = recalibrate(model, target, 25)
    result = export_model(calibrated, tmp_path, formats=("onnx",), training_data=rest)
    assert "calibrated" in result.decode_form
    runtime = LatencyPredictor(result.written["onnx"], on_out_of_range="flag")
    features = (
        rest.select("vision_tokens", "text_tokens", "tier_idx", "top_k", "num_active_blocks")
        .to_numpy()
        .astype(np.float32)
    )
    tokens = rest["output_tokens"].to_numpy().astype(np.float32)
    got = runtime.predict(features, tokens)
    want = calibrated.predict(features, tokens)
    for key in ("prefill_ms", "decode_total_ms", "total_ms", "prefill_p95_ms"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-3, atol=1e-3)
