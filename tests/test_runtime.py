"""exporters.runtime.LatencyPredictor: numpy + onnxruntime only, validated, flags ranges."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from synthetic import fit_small_model

from exporters.export import ONNX_FILE, export_model
from exporters.runtime import InputError, LatencyPredictor, OutOfRangeWarning, tier_to_index
from toolkit.models.hybrid import HybridLatencyModel

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[HybridLatencyModel, Path]:
    root = tmp_path_factory.mktemp("runtime")
    model = fit_small_model(root / "results", seed=2)
    export_model(model, root / "out", formats=["onnx"], training_data=model.training_data)
    return model, root / "out" / ONNX_FILE


def _rows() -> tuple[np.ndarray, np.ndarray]:
    x = np.array(
        [[1008, 60, 1, 8, 12], [432, 30, 0, 4, 8], [1872, 100, 2, 12, 16]], dtype=np.float32
    )
    return x, np.array([1, 10, 24], dtype=np.float32)


def test_arrays_match_python_model(exported) -> None:
    model, path = exported
    predictor = LatencyPredictor(path)
    x, n = _rows()
    got, want = predictor.predict(x, n), model.predict(x, n)
    for name in (
        "prefill_ms",
        "decode_total_ms",
        "decode_per_token_ms",
        "total_ms",
        "prefill_p50_ms",
        "prefill_p90_ms",
        "prefill_p95_ms",
    ):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-3, atol=1e-3)
    assert got["out_of_range"].dtype == bool and not got["out_of_range"].any()
    # Called again with another batch size, then the first: buffers are not mixed up.
    one = predictor.predict(x[:1], n[:1])
    again = predictor.predict(x, n)
    np.testing.assert_array_equal(again["total_ms"], got["total_ms"])
    assert one["total_ms"][0] == got["total_ms"][0]


def test_keyword_form_and_tier_names(exported) -> None:
    _, path = exported
    predictor = LatencyPredictor(path)
    x, n = _rows()
    by_kwargs = predictor.predict(
        vision_tokens=x[:, 0],
        text_tokens=x[:, 1],
        tier=["medium", "low", "high"],
        top_k=x[:, 3],
        num_active_blocks=x[:, 4],
        output_tokens=n,
    )
    np.testing.assert_array_equal(by_kwargs["total_ms"], predictor.predict(x, n)["total_ms"])
    scalar = predictor.predict(
        vision_tokens=1008,
        text_tokens=60,
        tier="medium",
        top_k=8,
        num_active_blocks=12,
        output_tokens=1,
    )
    assert scalar["total_ms"].shape == (1,)
    assert scalar["total_ms"][0] == pytest.approx(by_kwargs["total_ms"][0])
    # Vision tokens default from the tier: (mean crops + 1) x 144 = 1008 for medium.
    default = predictor.predict(
        text_tokens=60, tier=1, top_k=8, num_active_blocks=12, output_tokens=1
    )
    assert default["total_ms"][0] == scalar["total_ms"][0]


def test_bad_inputs_raise_clear_errors(exported) -> None:
    _, path = exported
    predictor = LatencyPredictor(path)
    x, n = _rows()
    bad = x.copy()
    bad[1, 3] = np.nan
    with pytest.raises(InputError, match="row 1 column 3"):
        predictor.predict(bad, n)
    with pytest.raises(InputError, match=r"\[B, 5\]"):
        predictor.predict(x[:, :4], n)
    with pytest.raises(InputError, match="rows"):
        predictor.predict(x, n[:2])
    with pytest.raises(InputError, match="negative"):
        predictor.predict(x, -n)
    with pytest.raises(InputError, match="unknown tier"):
        predictor.predict(
            text_tokens=1, tier="huge", top_k=8, num_active_blocks=12, output_tokens=3
        )
    with pytest.raises(InputError, match="missing"):
        predictor.predict(text_tokens=1, tier="low", output_tokens=3)
    with pytest.raises(InputError, match="unknown argument"):
        predictor.predict(
            text_tokens=1, tier="low", top_k=8, num_active_blocks=12, output_tokens=3, blocks=3
        )


def test_out_of_training_range_is_flagged(exported) -> None:
    _, path = exported
    x, n = _rows()
    far = x.copy()
    far[0, 1] = 50_000  # text tokens far beyond the training data
    with pytest.warns(OutOfRangeWarning, match="text_tokens"):
        out = LatencyPredictor(path).predict(far, n)
    assert out["out_of_range"].tolist() == [True, False, False]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flagged = LatencyPredictor(path, on_out_of_range="flag").predict(far, n)
    assert flagged["out_of_range"][0]
    with pytest.raises(InputError, match="outside the training range"):
        LatencyPredictor(path, on_out_of_range="error").predict(far, n)


def test_large_batches_use_the_threaded_session_and_agree(exported) -> None:
    _, path = exported
    x, n = _rows()
    big_x, big_n = np.tile(x, (7, 1)), np.tile(n, 7)
    small = LatencyPredictor(path, large_batch=10_000).predict(big_x, big_n)
    predictor = LatencyPredictor(path, large_batch=8, device="cpu")
    large = predictor.predict(big_x, big_n)
    np.testing.assert_array_equal(small["total_ms"], large["total_ms"])
    assert "large_batch" in predictor.providers
    assert predictor.providers["small_batch"][0] == "CPUExecutionProvider"


def test_tier_to_index() -> None:
    assert tier_to_index(["low", "MEDIUM", " high ", 0, "2"]).tolist() == [0, 1, 2, 0, 2]
    with pytest.raises(InputError):
        tier_to_index(3)
    with pytest.raises(InputError):
        tier_to_index(True)


def test_runtime_needs_only_numpy_and_onnxruntime(exported) -> None:
    _, path = exported
    code = (
        "import sys\n"
        "import exporters.runtime as r\n"
        f"p = r.LatencyPredictor({str(path)!r})\n"
        "p.predict([[1008, 60, 1, 8, 12]], [5])\n"
        "heavy = [m for m in ('torch', 'xgboost', 'polars', 'toolkit') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.mark.gpu
def test_cuda_provider_agrees(exported) -> None:
    _, path = exported
    x, n = _rows()
    big_x, big_n = np.tile(x, (400, 1)), np.tile(n, 400)
    cpu = LatencyPredictor(path, device="cpu").predict(big_x, big_n)
    cuda = LatencyPredictor(path, device="cuda", large_batch=1)
    out = cuda.predict(big_x, big_n)
    assert "CUDAExecutionProvider" in cuda.providers["large_batch"]
    np.testing.assert_allclose(out["total_ms"], cpu["total_ms"], rtol=1e-4)
    np.testing.assert_array_equal(out["prefill_ms"], cpu["prefill_ms"])
