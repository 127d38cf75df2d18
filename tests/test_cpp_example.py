"""The C++ example (examples/cpp) builds, runs, and prints what Python predicts.

Marked ``cpp`` (and ``slow``: building against libtorch takes ~30 s and ~1 GB): run with
``pytest -m cpp tests/test_cpp_example.py`` or ``nox -s cpp``. Skips with the reason where
cmake, a compiler, or a runtime's headers cannot be had; the ONNX Runtime and libtorch halves
skip separately.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from synthetic import fit_small_model

from exporters.export import ONNX_FILE, TORCHSCRIPT_FILE, export_model
from toolkit.features import OUTPUT_NAMES
from toolkit.models.hybrid import HybridLatencyModel

pytestmark = [
    pytest.mark.cpp,
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning"),
]

CPP_DIR = Path(__file__).resolve().parents[1] / "examples" / "cpp"


@pytest.fixture(scope="module")
def built() -> dict[str, Path]:
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"C++ example needs {', '.join(missing)}")
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(CPP_DIR / "build.sh")],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        check=False,
    )
    if done.returncode == 3:
        pytest.skip(f"C++ toolchain unavailable: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stderr[-3000:]
    return {Path(line).name: Path(line) for line in done.stdout.split() if line.strip()}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[HybridLatencyModel, Path, Path]:
    root = tmp_path_factory.mktemp("cpp")
    model = fit_small_model(root / "results", seed=4)
    export_model(model, root / "out", training_data=model.training_data)
    queries = pl.DataFrame(
        {
            "vision_tokens": [1008, 432, 1872, 720, 576],
            "text_tokens": [60, 30, 100, 45, 33],
            "tier": ["medium", "low", "high", "1", "0"],
            "top_k": [8, 4, 12, 6, 10],
            "num_active_blocks": [12, 8, 16, 10, 14],
            "output_tokens": [24, 0, 1, 2, 500],
        }
    )
    csv = root / "queries.csv"
    queries.write_csv(csv)
    return model, root / "out", csv


def _check(exe: Path, model_file: Path, csv: Path, model: HybridLatencyModel) -> float:
    done = subprocess.run(
        [str(exe), str(model_file), str(csv), "--bench", "2000"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out = pl.read_csv(done.stdout.encode())
    assert out.columns[6:] == list(OUTPUT_NAMES)
    features = (
        out.select(["vision_tokens", "text_tokens", "tier_idx", "top_k", "num_active_blocks"])
        .to_numpy()
        .astype(np.float32)
    )
    want = model.predict(features, out["output_tokens"].to_numpy())
    for name in OUTPUT_NAMES:
        np.testing.assert_allclose(
            out[name].to_numpy(), want[name], rtol=1e-3, atol=1e-3, err_msg=f"{exe.name} {name}"
        )
    line = next(ln for ln in done.stderr.splitlines() if "median_us=" in ln)
    return float(line.rsplit("median_us=", 1)[1])


def test_onnxruntime_executable_matches_python(built, exported) -> None:
    if "latkit_predict_ort" not in built:
        pytest.skip(
            "ONNX Runtime C++ headers/library could not be had on this machine "
            "(see examples/cpp/build/ort-sdk.log)"
        )
    model, out, csv = exported
    us = _check(built["latkit_predict_ort"], out / ONNX_FILE, csv, model)
    print(f"C++ ONNX Runtime batch-1 median: {us:.1f} us")


def test_libtorch_executable_matches_python(built, exported) -> None:
    if "latkit_predict_ts" not in built:
        pytest.skip("libtorch not found by CMake (torch.utils.cmake_prefix_path)")
    model, out, csv = exported
    us = _check(built["latkit_predict_ts"], out / TORCHSCRIPT_FILE, csv, model)
    print(f"C++ libtorch batch-1 median: {us:.1f} us")


def _self_check(exe: Path, model_file: Path, threads: int, questions: int) -> dict[str, str]:
    """Run ``--threads`` and return the fields of its report line."""
    done = subprocess.run(
        [str(exe), str(model_file), "--threads", str(threads), "--questions", str(questions)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    line = next((ln for ln in done.stderr.splitlines() if "self-check" in ln), "")
    assert done.returncode == 0 and line, f"exit {done.returncode}: {done.stderr[-2000:]}"
    fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
    assert fields["threads"] == str(threads)
    return fields


def test_onnxruntime_predictor_shared_by_8_threads(built, exported) -> None:
    """8 std::threads share one Predictor: 100k batch-1 questions with batches of 8 and 75
    mixed in, every answer bit for bit the single-threaded one."""
    if "latkit_predict_ort" not in built:
        pytest.skip("ONNX Runtime C++ executable not built")
    _, out, _ = exported
    fields = _self_check(built["latkit_predict_ort"], out / ONNX_FILE, 8, 100_000)
    assert int(fields["questions"]) > 100_000 and int(fields["rows"]) > int(fields["questions"])
    assert fields["wrong"] == "0" and fields["errors"] == "0"
    print(f"C++ ONNX Runtime, 8 threads: {fields['threads_qps']} questions/s")


def test_libtorch_predictor_shared_by_8_threads(built, exported) -> None:
    """The same for libtorch (slower per call, so fewer questions)."""
    if "latkit_predict_ts" not in built:
        pytest.skip("libtorch executable not built")
    _, out, _ = exported
    fields = _self_check(built["latkit_predict_ts"], out / TORCHSCRIPT_FILE, 8, 10_000)
    assert fields["wrong"] == "0" and fields["errors"] == "0"


def test_bad_csv_fails_with_a_message(built, exported, tmp_path: Path) -> None:
    exe = built.get("latkit_predict_ort") or built.get("latkit_predict_ts")
    if exe is None:
        pytest.skip("no C++ executable was built")
    _, out, _ = exported
    bad = tmp_path / "bad.csv"
    bad.write_text(
        "vision_tokens,text_tokens,tier,top_k,num_active_blocks,output_tokens\n"
        "1008,60,huge,8,12,3\n"
    )
    model_file = out / (ONNX_FILE if exe.name.endswith("ort") else TORCHSCRIPT_FILE)
    done = subprocess.run(
        [str(exe), str(model_file), str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1 and "unknown tier 'huge'" in done.stderr
