"""Exported predictors (ONNX, TorchScript) equal the Python model, thresholds included."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import polars as pl
import pytest
import torch
import xgboost as xgb
from click.testing import CliRunner

from exporters.export import (
    ATOL,
    METADATA_KEY,
    ONNX_FILE,
    RTOL,
    TORCHSCRIPT_FILE,
    build_predictor,
    export_model,
    onnx_model_proto,
    run_onnx,
    run_torchscript,
    table_from_model,
    threshold_probe_rows,
)
from exporters.fused import (
    FusedPredictor,
    GenericDecode,
    fold_decode_net,
    threshold_columns,
)
from exporters.tree_table import (
    PrefillTable,
    booster_predict_fn,
    compile_prefill_table,
    representative_points,
    row_strides,
    split_thresholds,
)
from toolkit.cli import main
from toolkit.errors import LatkitError
from toolkit.features import FEATURE_NAMES, OUTPUT_NAMES
from toolkit.models.decode import DecodeNet
from toolkit.models.hybrid import HybridLatencyModel

# torch 2.13 marks TorchScript deprecated; the .ts file is still part of the contract.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")

# ----------------------------------------------------------------------------- fixtures


def _features(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack(
        [
            rng.integers(2, 17, n) * 144.0,
            rng.integers(10, 400, n) + rng.random(n).round(1),
            rng.integers(0, 3, n),
            rng.choice([4, 6, 8, 10, 12], n),
            rng.choice([8, 10, 12, 14, 16], n),
        ],
        axis=1,
    ).astype(np.float32)


def _boosters(target_transform: str, seed: int = 0) -> tuple[xgb.Booster, xgb.Booster]:
    x = _features(600, seed)
    y = 2.0 + (x[:, 0] + x[:, 1]) * (0.004 + 0.0011 * x[:, 3]) * x[:, 4] / 16
    y = y * np.random.default_rng(seed).lognormal(0, 0.05, len(y))
    if target_transform == "log":
        y = np.log(y)
    data = xgb.DMatrix(x, y)
    # base_score far from the target mean makes a wrong intercept visible at once.
    params = {"max_depth": 4, "max_bin": 32, "nthread": 1, "base_score": 0.5, "seed": seed}
    mean = xgb.train(params, data, 25)
    quant = xgb.train(
        {**params, "objective": "reg:quantileerror", "quantile_alpha": [0.5, 0.9, 0.95]}, data, 25
    )
    return mean, quant


@pytest.fixture(scope="module")
def trained(
    small_trained: tuple[HybridLatencyModel, Path, Path],
) -> tuple[HybridLatencyModel, Path]:
    """A real HybridLatencyModel fitted on synthetic results (tiny budgets), saved."""
    model, ckpt, _ = small_trained
    return model, ckpt


@pytest.fixture(scope="module")
def exported(trained: tuple[HybridLatencyModel, Path], tmp_path_factory: pytest.TempPathFactory):
    model, ckpt = trained
    out = tmp_path_factory.mktemp("exported")
    training = pl.read_parquet(ckpt / "training_data.parquet")
    result = export_model(model, out, training_data=training)
    return model, out, result


def _assert_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray], what: str) -> None:
    for name in OUTPUT_NAMES:
        a = np.asarray(got[name], dtype=np.float64)
        b = np.asarray(want[name], dtype=np.float64)
        assert a.shape == b.shape, (what, name)
        bad = np.abs(a - b) > ATOL + RTOL * np.abs(b)
        assert not bad.any(), f"{what} {name}: {a[bad][:5]} vs {b[bad][:5]}"


def _query_rows(model: HybridLatencyModel, table_thresholds: bool = True) -> np.ndarray:
    x = _features(50, 7)
    if table_thresholds:
        base = np.median(x, axis=0).astype(np.float32)
        thresholds = split_thresholds(
            [model.prefill.booster, model.prefill.quantile_booster], len(FEATURE_NAMES)
        )
        from exporters.tree_table import PrefillTable

        probes = threshold_probe_rows(
            PrefillTable(thresholds, np.ones(5, np.int64), np.zeros((1, 4), np.float32)), base
        )
        x = np.concatenate([x, probes])
    return x


# ----------------------------------------------------------------------------- the table


@pytest.mark.parametrize("target_transform", ["identity", "log"])
def test_table_equals_boosters_on_and_around_every_threshold(target_transform: str) -> None:
    mean, quant = _boosters(target_transform)
    predict = booster_predict_fn(mean, quant, target_transform)
    table = compile_prefill_table([mean, quant], predict)
    x = _features(300, 3)
    probes = threshold_probe_rows(table, np.median(x, axis=0).astype(np.float32))
    x = np.concatenate([x, probes, _features(5, 4) * 100.0, np.zeros((1, 5), np.float32)])
    # The table reproduces the boosters bit for bit: same cell, same float32 value.
    np.testing.assert_array_equal(table.lookup(x), predict(x))


def test_representative_points_fall_in_their_bins() -> None:
    t = np.array([-1.5, 0.0, 3.25, 1e6], dtype=np.float32)
    reps = representative_points(t)
    bins = np.searchsorted(t, reps, side="right")
    np.testing.assert_array_equal(bins, np.arange(len(t) + 1))


def test_table_too_large_is_refused_with_advice() -> None:
    mean, quant = _boosters("identity")
    with pytest.raises(LatkitError, match="max_bin"):
        compile_prefill_table([mean, quant], booster_predict_fn(mean, quant), max_cells=10)


# ----------------------------------------------------------------------------- decode folding


@pytest.mark.parametrize("scale, offset", [(1.0, 0.0), (1.7, 0.0), (0.6, -0.25), (1.3, 0.4)])
def test_folded_decode_matches_generic(
    trained: tuple[HybridLatencyModel, Path], scale: float, offset: float
) -> None:
    model, _ = trained
    table = table_from_model(model)
    pair = fold_decode_net(model.decode_net, scale, offset)
    assert pair is not None
    folded = FusedPredictor(table, pair).eval()
    generic = FusedPredictor(table, GenericDecode(model.decode_net, scale, offset)).eval()
    x = torch.from_numpy(np.repeat(_features(20, 5), 7, axis=0))
    n = torch.tensor([0.0, 0.5, 1.0, 2.0, 3.0, 500.0, 1e5]).repeat(20)
    with torch.no_grad():
        got, want = folded(x, n), generic(x, n)
    for name, g, w in zip(OUTPUT_NAMES, got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=name)
    # No decode pass for 0 or 1 output tokens: exactly zero, not round-off.
    assert (got[1][n <= 1] == 0).all() and (got[2][n <= 1] == 0).all()


@pytest.mark.parametrize("n_layers", [1, 2, 3])
def test_folding_any_depth_matches_generic(trained, n_layers: int) -> None:
    """The shared first layer feeds a hidden layer (n_layers > 1) or the head (n_layers 1)."""
    model, _ = trained
    torch.manual_seed(n_layers)
    net = DecodeNet(hidden=16, n_layers=n_layers)
    net.set_normalisation(_features(50, 1), pass_scale_ms=7.0)
    table = table_from_model(model)
    pair = fold_decode_net(net)
    assert pair is not None
    folded = FusedPredictor(table, pair).eval()
    generic = FusedPredictor(table, GenericDecode(net)).eval()
    x = torch.from_numpy(np.repeat(_features(30, 2), 4, axis=0))
    n = torch.tensor([0.0, 1.0, 7.0, 4096.0]).repeat(30)
    with torch.no_grad():
        for name, g, w in zip(OUTPUT_NAMES, folded(x, n), generic(x, n), strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=name)


def test_folded_predictor_is_one_shared_first_layer(trained, tmp_path: Path) -> None:
    """Prefill thresholds and the decode network's first layer are one Gemm: the graph
    stays at a handful of nodes (what batch-1 latency is made of)."""
    model, _ = trained
    predictor, table, form = build_predictor(model)
    n_thresholds = sum(len(t) for t in table.thresholds)
    assert form == "folded"
    assert predictor.first_weight.shape == (5, n_thresholds + model.decode_net.hidden)
    proto = onnx_model_proto(predictor)
    ops = [node.op_type for node in proto.graph.node]
    assert "HardSigmoid" in ops and "Sign" not in ops, ops
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    optimized = [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]
    # One layer: Gemm, MatMul, Reshape, Cast, 4 Gather, Gemm, Unsqueeze, Gemm, Pow, Mul,
    # ReduceSum, Sub, Clip, Div, Add (Gemm + activation fused by ONNX Runtime).
    assert len(optimized) <= 17 + model.decode_net.n_layers, optimized


def _table_with(thresholds: list[list[float]]) -> PrefillTable:
    sizes = [len(t) + 1 for t in thresholds]
    n_cells = int(np.prod(sizes))
    return PrefillTable(
        thresholds=tuple(np.asarray(t, dtype=np.float32) for t in thresholds),
        strides=row_strides(sizes),
        table=np.zeros((n_cells, 4), dtype=np.float32),
    )


def test_threshold_columns_are_exact_step_functions() -> None:
    """clip(x @ W + b, 0, 1) is exactly XGBoost's float32 test x >= t, on and around every
    threshold, for thresholds of very different magnitudes (each has its own scale)."""
    thresholds = [[-7.25, 3.0e-20, 0.5, 1.0, 576.5], [1.0e-8, 2.0, 1.0e6, 3.0e30]]
    table = _table_with(thresholds)
    weight, bias, strides = threshold_columns(table)
    flat = np.concatenate([np.asarray(t, np.float32) for t in thresholds])
    for f, values in enumerate(thresholds):
        for t in np.asarray(values, np.float32):
            probes = [
                t,
                np.nextafter(t, np.float32(-np.inf)),
                np.nextafter(t, np.float32(np.inf)),
                np.float32(0.0),
                np.float32(-3.0e38),
                np.float32(3.0e38),
                t * np.float32(0.999),
                t * np.float32(1.001),
            ]
            x = np.zeros((len(probes), len(thresholds)), np.float32)
            x[:, f] = probes
            with torch.no_grad():
                hits = torch.clamp(
                    torch.addmm(
                        torch.from_numpy(bias), torch.from_numpy(x), torch.from_numpy(weight)
                    ),
                    0.0,
                    1.0,
                ).numpy()
            mine = np.array([j for j in range(len(flat)) if weight[f, j] != 0])
            want = (x[:, [f]] >= flat[mine][None, :]).astype(np.float32)
            np.testing.assert_array_equal(hits[:, mine], want, err_msg=f"feature {f} t={t!r}")
    # And the row index is the numpy reference's.
    rng = np.random.default_rng(0)
    x = rng.choice(flat, size=(64, 2)).astype(np.float32)
    with np.errstate(over="ignore"):  # 3e30 x its scale overflows to inf: still a hit
        hits = np.clip(x @ weight + bias, 0, 1)
    np.testing.assert_array_equal((hits @ strides).astype(np.int64), table.bins(x) @ table.strides)


@pytest.mark.parametrize("tiny", [0.0, 1.0e-35])
def test_threshold_too_close_to_zero_is_refused(tiny: float) -> None:
    with pytest.raises(LatkitError, match="too close to 0"):
        threshold_columns(_table_with([[tiny, 1.0]]))


# ----------------------------------------------------------------------------- exported files


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("batch", [1, 3, 7, 129])
def test_parity_odd_batches_and_token_counts(exported, fmt: str, batch: int) -> None:
    model, out, _ = exported
    rows = _query_rows(model)
    rng = np.random.default_rng(batch)
    pick = rng.choice(len(rows), batch, replace=batch > len(rows))
    x = rows[pick]
    tokens = np.resize(np.array([0, 1, 2, 3, 24, 1000, 65536], np.float32), batch)
    runner = run_onnx if fmt == "onnx" else run_torchscript
    path = out / (ONNX_FILE if fmt == "onnx" else TORCHSCRIPT_FILE)
    _assert_close(runner(path, x, tokens), model.predict(x, tokens), f"{fmt} batch {batch}")


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_parity_exactly_on_split_thresholds(exported, fmt: str) -> None:
    model, out, _ = exported
    x = _query_rows(model)
    tokens = np.resize(np.array([0, 1, 2, 50], np.float32), len(x))
    runner = run_onnx if fmt == "onnx" else run_torchscript
    path = out / (ONNX_FILE if fmt == "onnx" else TORCHSCRIPT_FILE)
    got, want = runner(path, x, tokens), model.predict(x, tokens)
    _assert_close(got, want, fmt)
    # Prefill comes from the table: equal to the model's float32 value exactly.
    np.testing.assert_array_equal(got["prefill_ms"], want["prefill_ms"].astype(np.float32))
    per_token = got["decode_per_token_ms"]
    assert (per_token[tokens <= 1] == 0).all()


def test_export_reports_parity_on_training_data(exported) -> None:
    _, _, result = exported
    assert set(result.written) == {"onnx", "torchscript"}
    for fmt in ("onnx", "torchscript"):
        labels = [label for label, _ in result.parity[fmt]]
        assert labels == ["training_data", "split_probes"]
        assert all(report.ok for _, report in result.parity[fmt])
    assert result.decode_form == "folded"


def test_onnx_contract_metadata_and_checker(exported) -> None:
    _, out, _ = exported
    model = onnx.load(str(out / ONNX_FILE))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["features", "output_tokens"]
    assert [o.name for o in model.graph.output][:4] == list(OUTPUT_NAMES[:4])
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and dims[1].dim_value == 5  # dynamic batch, 5 features
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    props = {p.key: p.value for p in model.metadata_props}
    meta = json.loads(props[METADATA_KEY])
    assert props["feature_names"] == ",".join(FEATURE_NAMES)
    assert meta["feature_names"] == list(FEATURE_NAMES)
    assert meta["training_summary"]["feature_ranges"]["top_k"] == [4.0, 12.0]
    assert "latkit_version" in props
    # An ordinary-op graph: no TreeEnsemble, nothing outside the default domain, and small.
    ops = {node.op_type for node in model.graph.node}
    assert not any("Tree" in op for op in ops)
    assert all(node.domain in ("", "ai.onnx") for node in model.graph.node)
    assert len(model.graph.node) <= 60


def test_torchscript_metadata_and_signature(exported) -> None:
    _, out, _ = exported
    extra = {METADATA_KEY: ""}
    module = torch.jit.load(str(out / TORCHSCRIPT_FILE), _extra_files=extra)
    assert json.loads(extra[METADATA_KEY])["output_names"] == list(OUTPUT_NAMES)
    outputs = module(torch.ones(2, 5), torch.tensor([0.0, 10.0]))
    assert isinstance(outputs, tuple) and len(outputs) == len(OUTPUT_NAMES)
    assert all(o.shape == (2,) and o.dtype == torch.float32 for o in outputs)


def test_onnx_runs_with_optimisations_and_any_batch(exported) -> None:
    model, out, _ = exported
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(
        str(out / ONNX_FILE), options, providers=["CPUExecutionProvider"]
    )
    x = _features(1000, 11)
    n = np.full(1000, 30, np.float32)
    got = dict(
        zip(OUTPUT_NAMES, session.run(None, {"features": x, "output_tokens": n}), strict=True)
    )
    _assert_close(got, model.predict(x, n), "optimised session")


class _ShiftedDecode:
    """A model whose Python decode disagrees with its network: export must refuse it."""

    def __init__(self, model: HybridLatencyModel) -> None:
        self.prefill, self.decode_net, self.manifest = model.prefill, model.decode_net, {}
        self._model = model

    def predict(self, features: np.ndarray, output_tokens: np.ndarray) -> dict[str, np.ndarray]:
        out = dict(self._model.predict(features, output_tokens))
        out["decode_total_ms"] = out["decode_total_ms"] * 1.01 + 0.01
        return out


def test_failed_parity_writes_nothing(trained, tmp_path: Path) -> None:
    model, _ = trained
    with pytest.raises(LatkitError, match="parity"):
        export_model(_ShiftedDecode(model), tmp_path, formats=["torchscript"])  # type: ignore[arg-type]
    assert not (tmp_path / TORCHSCRIPT_FILE).exists()


def test_generic_decode_form_exports_too(trained, tmp_path: Path) -> None:
    model, _ = trained
    result = export_model(model, tmp_path, formats=["torchscript", "onnx"], fold=False)
    assert result.decode_form == "generic"
    x = _query_rows(model, table_thresholds=False)
    n = np.resize(np.array([0, 1, 2, 77], np.float32), len(x))
    want = model.predict(x, n)
    _assert_close(run_torchscript(tmp_path / TORCHSCRIPT_FILE, x, n), want, "generic ts")
    _assert_close(run_onnx(tmp_path / ONNX_FILE, x, n), want, "generic onnx")


# ----------------------------------------------------------------------------- CLI


def test_cli_export_prints_files_and_parity(trained, tmp_path: Path) -> None:
    _, ckpt = trained
    result = CliRunner().invoke(
        main,
        [
            "export",
            "--checkpoint_path",
            str(ckpt),
            "--output_dir",
            str(tmp_path),
            "--format",
            "torchscript",
        ],
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / TORCHSCRIPT_FILE).exists() and not (tmp_path / ONNX_FILE).exists()
    assert "Wrote" in result.output and "parity torchscript training_data" in result.output
    assert "ok" in result.output


def test_cli_export_bad_format_and_missing_checkpoint(tmp_path: Path) -> None:
    bad = CliRunner().invoke(
        main,
        [
            "export",
            "--checkpoint",
            str(tmp_path),
            "--output-dir",
            str(tmp_path / "o"),
            "--format",
            "tflite",
        ],
    )
    assert bad.exit_code == 2 and "tflite" in bad.output
    missing = CliRunner().invoke(
        main,
        ["export", "--checkpoint", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "o")],
    )
    assert missing.exit_code == 2
    assert len(missing.output.strip().splitlines()) == 1


def test_legacy_onnx_exporter_path_is_equal_too(trained, tmp_path: Path) -> None:
    """The fallback used when torch's dynamo exporter fails gives a file that is proven too."""
    model, _ = trained
    result = export_model(model, tmp_path, formats=["onnx"], onnx_exporter="legacy")
    assert all(report.ok for _, report in result.parity["onnx"])
    x = _query_rows(model)
    n = np.resize(np.array([0, 1, 2, 99], np.float32), len(x))
    _assert_close(run_onnx(tmp_path / ONNX_FILE, x, n), model.predict(x, n), "legacy")


def test_cli_export_refuses_a_table_too_large(trained, tmp_path: Path) -> None:
    _, ckpt = trained
    result = CliRunner().invoke(
        main,
        ["export", "--checkpoint", str(ckpt), "--output-dir", str(tmp_path), "--max-cells", "100"],
    )
    assert result.exit_code == 2
    assert "max_bin" in result.output and len(result.output.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())


class _Recalibrated:
    """A model moved to another machine (toolkit.models.calibration semantics): prefill and
    every decode pass mapped affinely. Export must carry both into the graph."""

    def __init__(self, model: HybridLatencyModel) -> None:
        from toolkit.models.calibration import Calibration

        self.prefill, self.decode_net, self.manifest = model.prefill, model.decode_net, {}
        self.calibration = Calibration(1.3, 2.0, 0.8, 0.25, method="affine", n_samples=10)
        self._model = model

    def predict(self, features: np.ndarray, output_tokens: np.ndarray) -> dict[str, np.ndarray]:
        out = dict(self._model.predict(features, output_tokens))
        cal = self.calibration
        passes = np.maximum(np.asarray(output_tokens, np.float64) - 1, 0)
        for name in ("prefill_ms", "prefill_p50_ms", "prefill_p90_ms", "prefill_p95_ms"):
            out[name] = cal.prefill(out[name])
        out["decode_total_ms"] = cal.decode_total(out["decode_total_ms"], passes)
        out["decode_per_token_ms"] = np.where(
            passes > 0, out["decode_total_ms"] / np.maximum(passes, 1), 0.0
        )
        out["total_ms"] = out["prefill_ms"] + out["decode_total_ms"]
        return out


def test_recalibrated_model_exports_with_its_calibration(trained, tmp_path: Path) -> None:
    model, _ = trained
    calibrated = _Recalibrated(model)
    result = export_model(calibrated, tmp_path, formats=["torchscript"])  # type: ignore[arg-type]
    assert result.decode_form == "folded+calibrated"
    x = _query_rows(model)
    n = np.resize(np.array([0, 1, 2, 300], np.float32), len(x))
    got = run_torchscript(tmp_path / TORCHSCRIPT_FILE, x, n)
    _assert_close(got, calibrated.predict(x, n), "calibrated")
    assert (got["decode_per_token_ms"][n <= 1] == 0).all()
