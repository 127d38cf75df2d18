"""exporters.runtime.LatencyPredictor: numpy + onnxruntime only, validated, flags ranges."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from synthetic import fit_small_model

import exporters.runtime as runtime
import toolkit.features as features_module
from exporters.export import ONNX_FILE, export_model
from exporters.runtime import InputError, LatencyPredictor, OutOfRangeWarning, tier_to_index
from toolkit.features import FEATURE_NAMES, OUTPUT_NAMES
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
    assert predictor.output_names == OUTPUT_NAMES
    assert set(got) == {*OUTPUT_NAMES, "out_of_range"}
    for name in OUTPUT_NAMES:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-3, atol=1e-3, err_msg=name)
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
    with pytest.raises(InputError, match=r"row 1 column 3 \(top_k\) is NaN"):
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


@pytest.mark.parametrize(
    "column, value, field",
    [
        (1, -5.0, "text_tokens must be >= 0"),
        (0, -1.0, "vision_tokens must be >= 0"),
        (3, 0.0, "top_k must be >= 1"),
        (4, 0.5, "num_active_blocks must be >= 1"),
        (2, 3.0, "tier_idx must be 0, 1 or 2"),
        (2, 0.5, "tier_idx must be 0, 1 or 2"),
        (1, 2.0**25, "text_tokens must be >= 0 and <= 1.67772e[+]07"),
    ],
)
def test_impossible_inputs_raise_naming_the_field(
    exported, column: int, value: float, field: str
) -> None:
    """Impossible values are errors, never a warning or a silent prediction."""
    _, path = exported
    x, n = _rows()
    bad = x.copy()
    bad[2, column] = value
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused before any range warning
        with pytest.raises(InputError, match=f"{field}.*first row 2 has"):
            LatencyPredictor(path).predict(bad, n)
    # The same rule as the Python model's (toolkit.features.impossible_inputs), limits aside.
    if value < 2.0**24:
        assert features_module.impossible_inputs(bad) != []


def test_negative_text_tokens_by_keyword_and_output_tokens(exported) -> None:
    _, path = exported
    predictor = LatencyPredictor(path)
    with pytest.raises(InputError, match="text_tokens must be >= 0"):
        predictor.predict(
            text_tokens=-5, tier="low", top_k=8, num_active_blocks=12, output_tokens=3
        )
    with pytest.raises(InputError, match="output_tokens row 0 is negative"):
        predictor.predict(
            text_tokens=5, tier="low", top_k=8, num_active_blocks=12, output_tokens=-1
        )


def test_supported_range_is_the_toolkits(exported) -> None:
    """The runtime keeps its own copy of the range rule (it imports nothing from latkit):
    the two must agree on every feature and on output tokens."""
    assert runtime.EXTRAPOLATION_MARGIN == features_module.EXTRAPOLATION_MARGIN
    assert runtime.OUTPUT_TOKENS_MULTIPLE == features_module.OUTPUT_TOKENS_MULTIPLE
    assert runtime.FEATURE_MINIMUM == features_module.FEATURE_MINIMUM
    assert runtime.DEFAULT_FEATURE_NAMES == FEATURE_NAMES
    ranges = [(0.0, 2.0), (1.0, 1.0), (432.0, 2304.0), (20.0, 119.0), (4.0, 12.0), (-3.0, 7.5)]
    for name in [*FEATURE_NAMES, "output_tokens", "unknown"]:
        for low, high in ranges:
            assert runtime.supported_range(name, low, high) == features_module.supported_range(
                name, low, high
            ), (name, low, high)
    # And a predictor applies it to its training summary.
    model, path = exported
    predictor = LatencyPredictor(path)
    trained = model.manifest["training_summary"]["feature_ranges"]
    for name in FEATURE_NAMES:
        want = features_module.supported_range(name, *trained[name])
        assert predictor.supported_ranges[name] == want
    assert predictor._tokens_high == model.supported_output_tokens()


def test_out_of_training_range_is_flagged(exported) -> None:
    model, path = exported
    x, n = _rows()
    low, high = model.manifest["training_summary"]["feature_ranges"]["text_tokens"]
    width = high - low
    near = x.copy()
    near[0, 1] = high + 0.45 * width  # beyond the data, within the supported margin
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not LatencyPredictor(path).predict(near, n)["out_of_range"].any()
    far = x.copy()
    far[0, 1] = high + 0.55 * width  # beyond the margin
    with pytest.warns(OutOfRangeWarning, match="text_tokens"):
        out = LatencyPredictor(path).predict(far, n)
    assert out["out_of_range"].tolist() == [True, False, False]
    # Output tokens: flagged beyond the stated multiple of the longest trained answer, as
    # the model itself (and latkit predict) flags them.
    limit = model.supported_output_tokens()
    longer = n.copy()
    longer[1] = limit + 1
    flagged_tokens = LatencyPredictor(path, on_out_of_range="flag").predict(x, longer)
    assert flagged_tokens["out_of_range"].tolist() == [False, True, False]
    assert model.extrapolation(x, longer)[0].tolist() == [False, True, False]
    longer[1] = limit
    assert (
        not LatencyPredictor(path, on_out_of_range="flag").predict(x, longer)["out_of_range"].any()
    )
    with pytest.warns(OutOfRangeWarning, match="output_tokens"):
        LatencyPredictor(path).predict(x, np.array([5000.0, 3.0, 3.0], np.float32))
    with pytest.raises(InputError, match=r"output_tokens must be <= 1\.67772e\+07"):
        LatencyPredictor(path).predict(x, np.array([2.0**25, 3.0, 3.0], np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flagged = LatencyPredictor(path, on_out_of_range="flag").predict(far, n)
    assert flagged["out_of_range"][0]
    with pytest.raises(InputError, match="outside the supported range"):
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
    for name in OUTPUT_NAMES:
        np.testing.assert_allclose(out[name], cpu[name], rtol=1e-4, err_msg=name)
    # Same table cell on both (TF32 off): a wrong cell is a whole tree step (percent) off;
    # the baseline's float32 products may round differently on the GPU (1e-7).
    np.testing.assert_allclose(out["prefill_ms"], cpu["prefill_ms"], rtol=2e-6)


def test_impossible_rules_are_the_toolkits() -> None:
    """The runtime's copy of the impossible-input rules flags the same fields as
    ``toolkit.features.impossible_inputs`` on random rows with impossible values mixed in."""
    rng = np.random.default_rng(0)
    bad_values = [-1.0, -0.5, 0.0, 0.5, 1.5, 2.5, 3.0, 7.0]
    for _ in range(300):
        x = np.column_stack(
            [
                rng.integers(0, 3000, 6),
                rng.integers(0, 300, 6),
                rng.integers(0, 3, 6),
                rng.integers(1, 17, 6),
                rng.integers(1, 17, 6),
            ]
        ).astype(np.float32)
        for _ in range(rng.integers(0, 3)):
            x[rng.integers(0, 6), rng.integers(0, 5)] = rng.choice(bad_values)
        flagged = [m.split(" must be")[0] for m in runtime.impossible_inputs(x)]
        want = [m.split(" must be")[0] for m in features_module.impossible_inputs(x)]
        assert flagged == want, x
