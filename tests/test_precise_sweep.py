"""The simulated precise sweep (benchmarks/precise_sweep.py): the roofline's structure, the
core-exp files it writes, and that it says everywhere that it is a simulation."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_roofline
from precise_sweep import write_precise_sweep

from toolkit.data import load_results

DEVICE = gpu_roofline.Device()
MODEL = gpu_roofline.MODEL


def test_gemm_steps_at_tile_rows_and_waves() -> None:
    """Compute-bound GEMMs are flat inside one 64/128-row tile band and step at the next;
    few rows are bound by reading the weights (a slow ramp)."""
    times = np.array([gpu_roofline.gemm_us(DEVICE, m, 6144, 2048) for m in range(1, 4097)])
    assert (np.diff(times) >= 0).all()
    compute_bound = np.diff(times[1023:])
    assert (compute_bound > 0).sum() <= 3072 // 64  # stairs, not a ramp
    assert compute_bound.max() > 0.02 * times[1023]  # steps far above 1 % noise


def test_moe_memory_bound_then_compute_bound() -> None:
    """Few tokens per expert: the weights' read sets the time (flat in top_k); many: compute."""
    few = [gpu_roofline.moe_block_us(DEVICE, 64, k, MODEL) for k in (4, 12)]
    many = [gpu_roofline.moe_block_us(DEVICE, 2400, k, MODEL) for k in (4, 12)]
    assert few[1] / few[0] < 1.1
    assert many[1] / many[0] > 1.5


def test_prefill_attention_quadratic_and_decode_linear() -> None:
    short = gpu_roofline.flash_attention_us(DEVICE, 4096, 4096, 16, 128, True)
    long = gpu_roofline.flash_attention_us(DEVICE, 8192, 8192, 16, 128, True)
    assert long / short > 3.5  # 4x the work, minus the fixed cost
    constant, slope = gpu_roofline.decode_pass_line(8, 16)
    passes = gpu_roofline.decode_pass_us(8, 16, np.array([500.0, 1500.0, 2500.0]))
    np.testing.assert_allclose(np.diff(passes), [1000 * slope] * 2)
    assert constant > 0 and slope > 0


def test_sweep_files_load_and_say_they_are_simulated(tmp_path: Path) -> None:
    run_log = write_precise_sweep(
        tmp_path, samples_per_config=1, repeats=2, datasets=["coco_2014_vqa"], seed=3
    )
    assert run_log["status"] == "complete" and run_log["simulated"] is True
    assert run_log["samples"] == 75 and run_log["noise_floor"]["prefill_total_spread"]["n"] == 75
    logged = json.loads((tmp_path / "logs" / "run.json").read_text())
    assert "SIMULATED" in logged["note"]
    files = sorted((tmp_path / "coco-2014-vqa").glob("*.json"))
    assert len(files) == 75
    document = json.loads(files[0].read_text())
    assert "SIMULATED" in document["simulation"]["note"]
    assert all(s["metadata"]["simulated"] for s in document["per_sample_results"])
    loaded = load_results(tmp_path, cache=False)
    assert loaded.samples.height == 75
    # The same seed writes the same numbers; prefill and decode grow with the knobs.
    again = write_precise_sweep(
        tmp_path / "again", samples_per_config=1, repeats=2, datasets=["coco_2014_vqa"], seed=3
    )
    assert again["samples"] == 75
    assert (tmp_path / "again" / files[0].relative_to(tmp_path)).read_text() == files[0].read_text()


def test_noise_is_multiplicative_at_the_given_sigma(tmp_path: Path) -> None:
    write_precise_sweep(tmp_path, samples_per_config=2, datasets=["tally_qa"], noise=0.0)
    exact = load_results(tmp_path, cache=False).samples
    write_precise_sweep(tmp_path / "noisy", samples_per_config=2, datasets=["tally_qa"])
    noisy = load_results(tmp_path / "noisy", cache=False).samples
    joined = exact.join(noisy, on=["config", "sample_id"], suffix="_noisy")
    ratio = np.log(joined["T_LLM_prefill_noisy"].to_numpy() / joined["T_LLM_prefill"].to_numpy())
    assert ratio.std() == pytest.approx(0.01, rel=0.3)
    for stage in ("T_vision_total", "T_LLM_prefill"):
        assert (exact[stage].to_numpy() > 0).all()


def test_output_tokens_draws_long_answers_in_range(tmp_path: Path) -> None:
    """``output_tokens=(LO, HI)``: every answer in [LO, HI], every pass timed, recorded."""
    run_log = write_precise_sweep(
        tmp_path, samples_per_config=2, datasets=["coco_caption"], output_tokens=(128, 448)
    )
    assert run_log["settings"]["output_tokens"] == [128, 448]
    loaded = load_results(tmp_path, cache=False)
    lengths = loaded.samples["output_tokens"].to_numpy()
    assert loaded.samples.height == 150
    assert lengths.min() >= 128 and lengths.max() <= 448 and len(set(lengths.tolist())) > 50
    assert loaded.steps is not None
    passes = loaded.steps.group_by("sample_key").len()
    assert passes.height == 150 and passes["len"].min() >= 127
