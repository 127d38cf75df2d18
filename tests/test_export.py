"""Exported predictors (ONNX, TorchScript) equal the Python model, thresholds included."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
    compare_outputs,
    export_model,
    onnx_model_proto,
    output_differences,
    output_spec,
    run_onnx,
    run_torchscript,
    table_from_model,
    threshold_probe_rows,
)
from exporters.fused import (
    DECODE_TERMS,
    FEATURE_LIMITS,
    M_SCALE,
    Q_SCALE,
    FusedPredictor,
    GenericDecode,
    baseline_columns,
    first_layer,
    fold_decode_net,
    prior_factor_scales,
    threshold_columns,
)
from exporters.tree_table import (
    PrefillTable,
    booster_residual_fn,
    compile_prefill_table,
    representative_points,
    row_strides,
    split_thresholds,
)
from toolkit.cli import main
from toolkit.errors import LatkitError
from toolkit.features import FEATURE_MINIMUM, FEATURE_NAMES, OUTPUT_NAMES, impossible_inputs
from toolkit.models.bounds import ConformalBounds
from toolkit.models.calibration import Calibration
from toolkit.models.decode import DecodeNet
from toolkit.models.hybrid import HybridLatencyModel
from toolkit.models.physics import PhysicsBaseline

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


def _booster(seed: int = 0) -> xgb.Booster:
    """A booster on a log residual, as ``PrefillModel`` fits one."""
    x = _features(600, seed)
    y = 2.0 + (x[:, 0] + x[:, 1]) * (0.004 + 0.0011 * x[:, 3]) * x[:, 4] / 16
    y = y * np.random.default_rng(seed).lognormal(0, 0.05, len(y))
    data = xgb.DMatrix(x, np.log(y) - np.log(np.median(y)))
    # base_score far from the target mean makes a wrong intercept visible at once.
    params = {"max_depth": 4, "max_bin": 32, "nthread": 1, "base_score": 0.5, "seed": seed}
    return xgb.train(params, data, 25)


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
    """Every output within the export tolerance; an infinite bound must be the same infinity."""
    for name in OUTPUT_NAMES:
        a = np.asarray(got[name], dtype=np.float64)
        b = np.asarray(want[name], dtype=np.float64)
        assert a.shape == b.shape, (what, name)
        diff, _ = output_differences(a, b)
        bad = diff > ATOL + RTOL * np.where(np.isfinite(b), np.abs(b), 0.0)
        assert not bad.any(), f"{what} {name}: {a[bad][:5]} vs {b[bad][:5]}"


def _query_rows(model: HybridLatencyModel, table_thresholds: bool = True) -> np.ndarray:
    x = _features(50, 7)
    if table_thresholds:
        base = np.median(x, axis=0).astype(np.float32)
        thresholds = split_thresholds([model.prefill.booster])
        none = np.zeros(1, np.float32)
        probes = threshold_probe_rows(
            PrefillTable(thresholds, np.ones(5, np.int64), none, none), base
        )
        x = np.concatenate([x, probes])
    return x


# ----------------------------------------------------------------------------- the table


def test_table_equals_the_booster_on_and_around_every_threshold() -> None:
    booster = _booster()
    predict = booster_residual_fn(booster)
    table = compile_prefill_table([booster], predict)
    assert table.table.shape == (table.n_cells,) and table.n_cells > 100
    x = _features(300, 3)
    probes = threshold_probe_rows(table, np.median(x, axis=0).astype(np.float32))
    x = np.concatenate([x, probes, _features(5, 4) * 100.0, np.zeros((1, 5), np.float32)])
    # The table reproduces the booster bit for bit: same cell, same float32 value.
    np.testing.assert_array_equal(table.lookup(x), predict(x).astype(np.float32))


def test_table_of_a_model_is_its_prediction(trained) -> None:
    """The exported table is what the Python model predicts through, on and one float32 step
    around every cut of its grid (tier and values below a minimum included, raw)."""
    model, _ = trained
    table = table_from_model(model)
    assert table.n_cells > 1 and (table.floor > 0).all()
    x = _features(200, 8)
    rows = []
    for f, thresholds in enumerate(table.thresholds):
        for t in thresholds:
            for value in (np.nextafter(t, np.float32(-np.inf)), t, np.nextafter(t, np.inf)):
                row = np.median(x, axis=0).astype(np.float32)
                row[f] = value
                rows.append(row)
    assert len(rows) > 30
    probes = np.concatenate([x, np.asarray(rows, np.float32)])
    baseline = model.prefill.baseline.predict(probes)
    np.testing.assert_array_equal(table.predict(probes, baseline), model.prefill.predict(probes))


def test_representative_points_fall_in_their_bins() -> None:
    t = np.array([-1.5, 0.0, 3.25, 1e6], dtype=np.float32)
    reps = representative_points(t)
    bins = np.searchsorted(t, reps, side="right")
    np.testing.assert_array_equal(bins, np.arange(len(t) + 1))


def test_table_too_large_is_refused_with_advice() -> None:
    booster = _booster()
    with pytest.raises(LatkitError, match="max_bin"):
        compile_prefill_table([booster], booster_residual_fn(booster), max_cells=10)


def test_threshold_probes_are_possible_inputs(trained) -> None:
    """Probe rows never hold an impossible value (the model refuses those): the tier takes
    its three values, no feature goes below its minimum."""
    model, _ = trained
    table = table_from_model(model)
    base = np.array([1008.0, 60.0, 1.0, 8.0, 12.0], np.float32)
    probes = threshold_probe_rows(table, base)
    assert impossible_inputs(probes) == []
    tier = FEATURE_NAMES.index("tier_idx")
    if len(table.thresholds[tier]):
        assert set(np.unique(probes[:, tier])) == {0.0, 1.0, 2.0}
    # A top_k threshold at its minimum 1 keeps t and the value above, not the one below.
    one = _table_with([[], [], [], [1.0], []])
    values = threshold_probe_rows(one, base)[:, FEATURE_NAMES.index("top_k")]
    assert values.min() == FEATURE_MINIMUM["top_k"] and len(values) == 2


# ----------------------------------------------------------------------------- the baseline


def test_baseline_columns_reproduce_the_physics_baseline() -> None:
    """The first Gemm's baseline factors, their products and the compensation give
    ``PhysicsBaseline.predict``; at the feature limits no factor reaches the clip at 1."""
    baseline = PhysicsBaseline(weights=(3.5, 20.9, 0.002, 0.0, 0.24, 0.069, 0.0058))
    weight, bias, compensation = baseline_columns(baseline.product_form())
    x = np.concatenate(
        [
            _features(200, 1),
            np.array([FEATURE_LIMITS, [0.0, 0.0, 0.0, 1.0, 1.0], [1.0, 0.0, 2.0, 1.0, 1.0]]),
        ]
    ).astype(np.float32)
    factors = np.einsum("bf,fij->bij", x.astype(np.float64), weight) + bias[None]
    assert factors.max() <= 1.0 and factors.min() >= 0.0
    assert factors[-3].max() > 0.25  # the scaling is tight: the limits come close to 1
    got = (factors.prod(axis=1) * compensation).sum(axis=1)
    np.testing.assert_allclose(got, baseline.predict(x), rtol=1e-12)


def test_first_layer_layout_puts_each_products_factors_on_one_axis(trained) -> None:
    model, _ = trained
    table = table_from_model(model)
    pair = fold_decode_net(model.decode_net)
    assert pair is not None
    terms = pair.decode.product_terms()
    prior = pair.decode.prior.double().tolist()
    layer = first_layer(table, model.prefill.baseline.product_form(), pair.first, terms, prior)
    width = layer.weight.shape[1]
    n_thresholds = sum(len(t) for t in table.thresholds)
    # The product block leads (3 factors x n products), then thresholds and hidden units.
    assert layer.n_products == 3 + len(terms)
    assert width == 3 * layer.n_products + n_thresholds + model.decode_net.hidden
    # Every threshold column has a stride, every hidden unit a slot, none shared.
    assert int((layer.strides != 0).sum()) == n_thresholds
    slots = set(layer.hidden_slots.tolist())
    assert len(slots) == model.decode_net.hidden
    assert not slots & set(np.flatnonzero(layer.strides).tolist())
    assert min(slots | set(np.flatnonzero(layer.strides).tolist())) == 3 * layer.n_products
    x = torch.from_numpy(_features(64, 9))
    n = torch.arange(64, dtype=torch.float32) * 37.0  # 0, 37, ... output tokens
    predictor = FusedPredictor(table, pair, output_spec(model)).eval()
    with torch.no_grad():
        first, weighted, products_f32 = predictor.front(torch.cat([x, n.unsqueeze(1)], 1))
        residual = torch.from_numpy(table.lookup(x.numpy())).double()
    n_products = layer.n_products
    products = first.double()[:, : 3 * n_products].reshape(-1, 3, n_products).prod(1)
    torch.testing.assert_close(products.float(), products_f32)
    baseline = (products[:, :3] * torch.from_numpy(layer.compensation)).sum(1)
    # The decode products after the baseline's (fused.DECODE_TERMS): m, m q C, m B K, and the
    # same with ind for m; B = blocks, K = a1 + a2 top_k, C = c0 + c1 blocks (the prior).
    m = torch.clamp(n.double() - 1, min=0) * M_SCALE
    q = (x[:, 0].double() + x[:, 1].double() + n.double() / 2) * Q_SCALE
    ind = (n > 1).double()
    _a0, a1, a2, c0, c1 = prior
    assert min(prior) >= 0 and a1 + a2 > 0 and c0 + c1 > 0  # a fitted prior, not the identity
    scales = prior_factor_scales(prior)
    top_k, blocks = x[:, 3].double(), x[:, 4].double()
    big_b = blocks * scales["B"]
    big_k = (a1 + a2 * top_k) * scales["K"]
    big_c = (c0 + c1 * blocks) * scales["C"]
    want_decode = torch.stack(
        [m, m * q * big_c, m * big_b * big_k, ind, ind * q * big_c, ind * big_b * big_k], 1
    )
    assert len(DECODE_TERMS) == want_decode.shape[1]
    torch.testing.assert_close(
        products[:, 3 : 3 + len(DECODE_TERMS)], want_decode, rtol=1e-6, atol=0.0
    )
    want = model.prefill.baseline.predict(x.numpy())
    np.testing.assert_allclose(baseline.numpy(), want, rtol=1e-5)
    np.testing.assert_allclose(
        (weighted[:, :3].double() * torch.from_numpy(layer.compensation)).sum(1),
        want * residual.numpy(),
        rtol=1e-5,
    )


# ----------------------------------------------------------------------------- decode folding


@pytest.mark.parametrize("scale, offset", [(1.0, 0.0), (1.7, 0.0), (0.6, -0.25), (1.3, 0.4)])
def test_folded_decode_matches_generic(
    trained: tuple[HybridLatencyModel, Path], scale: float, offset: float
) -> None:
    model, _ = trained
    table, spec = table_from_model(model), output_spec(model)
    pair = fold_decode_net(model.decode_net, scale, offset)
    assert pair is not None
    folded = FusedPredictor(table, pair, spec).eval()
    generic = FusedPredictor(table, GenericDecode(model.decode_net, scale, offset), spec).eval()
    x = torch.from_numpy(np.repeat(_features(20, 5), 7, axis=0))
    n = torch.tensor([0.0, 0.5, 1.0, 2.0, 3.0, 500.0, 1e5]).repeat(20)
    with torch.no_grad():
        got, want = folded(x, n), generic(x, n)
    for name, g, w in zip(OUTPUT_NAMES, got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=name)
    # No decode pass for 0 or 1 output tokens: exactly zero, not round-off.
    assert (got[1][n <= 1] == 0).all() and (got[2][n <= 1] == 0).all()
    # The budget graph's decode totals (FoldedDecode.totals) are the same function.
    with torch.no_grad():
        inputs = torch.cat([x, n.unsqueeze(1)], 1)
        first = folded.front(inputs)[0]
        coef = folded.decode.coefficients(first, inputs)
        total, per_token = folded.decode.totals(coef, n, x[:, 0] + x[:, 1])
    torch.testing.assert_close(total, want[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(per_token, want[2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_layers", [1, 2, 3])
def test_folding_any_depth_matches_generic(trained, n_layers: int) -> None:
    """The shared first layer feeds a hidden layer (n_layers > 1) or the head (n_layers 1)."""
    model, _ = trained
    torch.manual_seed(n_layers)
    net = DecodeNet(hidden=16, n_layers=n_layers)
    net.set_normalisation(_features(50, 1), pass_scale_ms=7.0)
    with torch.no_grad():  # a physics prior with every term (a0, a1, a2, c0, c1) at work
        net.prior.copy_(torch.tensor([0.3, 0.05, 0.004, 0.02, 0.003]))
    table, spec = table_from_model(model), output_spec(model)
    pair = fold_decode_net(net)
    assert pair is not None
    folded = FusedPredictor(table, pair, spec).eval()
    generic = FusedPredictor(table, GenericDecode(net), spec).eval()
    x = torch.from_numpy(np.repeat(_features(30, 2), 4, axis=0))
    n = torch.tensor([0.0, 1.0, 7.0, 4096.0]).repeat(30)
    with torch.no_grad():
        for name, g, w in zip(OUTPUT_NAMES, folded(x, n), generic(x, n), strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=name)


def test_folded_predictor_is_one_shared_first_layer(trained, tmp_path: Path) -> None:
    """Prefill thresholds, baseline factors and the decode network's first layer are one
    Gemm, and one output Gemm hands out all nine outputs: the graph stays at a handful of
    nodes (what batch-1 latency is made of)."""
    model, _ = trained
    predictor, table, form = build_predictor(model)
    n_thresholds = sum(len(t) for t in table.thresholds)
    assert form == "folded"
    width = predictor.first_weight.shape[1]
    products = 3 * (3 + len(DECODE_TERMS))  # baseline and decode factors
    assert predictor.n_products == 3 + len(DECODE_TERMS)
    assert width == n_thresholds + model.decode_net.hidden + products
    proto = onnx_model_proto(predictor)
    ops = [node.op_type for node in proto.graph.node]
    assert "HardSigmoid" in ops and "Sign" not in ops, ops
    assert ops.count("Split") == 1 and ops.count("Gather") == 2, ops
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    optimized = [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]
    # One layer: 18 nodes for nine outputs: Unsqueeze, Concat [X = features, output_tokens];
    # Gemm (+HardSigmoid) [the shared first layer]; Slice, Reshape, ReduceProd [all products];
    # Gemm (+Softplus), Mul [decode terms: one head output per product]; MatMul, Cast, Gather,
    # Gather, Mul [prefill = max(floor, baseline x residual)]; Concat, Gemm (Transpose fused),
    # Reshape, ReduceMax [the max of each output's candidates], Split [outputs]. Each further
    # hidden layer adds one fused Gemm.
    assert len(optimized) <= 17 + model.decode_net.n_layers, optimized
    assert "Pow" not in optimized and "Div" not in optimized, optimized
    assert optimized.count("ReduceMax") == 1 and "Max" not in optimized, optimized


def _table_with(thresholds: list[list[float]]) -> PrefillTable:
    sizes = [len(t) + 1 for t in thresholds]
    n_cells = int(np.prod(sizes))
    return PrefillTable(
        thresholds=tuple(np.asarray(t, dtype=np.float32) for t in thresholds),
        strides=row_strides(sizes),
        table=np.ones(n_cells, dtype=np.float32),
        floor=np.zeros(n_cells, dtype=np.float32),
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
    # The graph picks the booster's own cell on every side of every threshold: a wrong cell
    # is a whole tree step off (percent), the float32 baseline product ~1e-7.
    np.testing.assert_allclose(got["prefill_ms"], want["prefill_ms"], rtol=2e-6)
    per_token = got["decode_per_token_ms"]
    assert (per_token[tokens <= 1] == 0).all()
    # Bounds are constant multiples of their point predictions, in order.
    assert (got["prefill_p50_ms"] <= got["prefill_p90_ms"]).all()
    assert (got["prefill_p90_ms"] <= got["prefill_p95_ms"]).all()
    assert (got["total_p90_ms"] <= got["total_p95_ms"]).all()
    assert (got["total_p90_ms"] >= got["prefill_p90_ms"]).all()


def test_export_reports_parity_on_training_data(exported) -> None:
    _, _, result = exported
    assert set(result.written) == {"onnx", "torchscript"}
    for fmt in ("onnx", "torchscript"):
        labels = [label for label, _ in result.parity[fmt]]
        assert labels == ["training_data", "split_probes"]
        for _, report in result.parity[fmt]:
            assert report.ok and set(report.per_output) == set(OUTPUT_NAMES)
            assert max(report.per_output.values()) == report.max_rel < 1e-5
    assert result.decode_form == "folded"


def test_onnx_contract_metadata_and_checker(exported) -> None:
    model, out, _ = exported
    proto = onnx.load(str(out / ONNX_FILE))
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["features", "output_tokens"]
    assert [o.name for o in proto.graph.output] == list(OUTPUT_NAMES)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and dims[1].dim_value == 5  # dynamic batch, 5 features
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    props = {p.key: p.value for p in proto.metadata_props}
    meta = json.loads(props[METADATA_KEY])
    assert props["feature_names"] == ",".join(FEATURE_NAMES)
    assert props["output_names"] == ",".join(OUTPUT_NAMES)
    assert meta["feature_names"] == list(FEATURE_NAMES)
    assert meta["training_summary"]["feature_ranges"]["top_k"] == [4.0, 12.0]
    assert meta["feature_limits"] == dict(zip(FEATURE_NAMES, FEATURE_LIMITS, strict=True))
    assert meta["bound_factors"]["total"] == model.bounds.to_dict()["total"]
    assert "latkit_version" in props
    # An ordinary-op graph: no TreeEnsemble, nothing outside the default domain, and small.
    ops = {node.op_type for node in proto.graph.node}
    assert not any("Tree" in op for op in ops)
    assert all(node.domain in ("", "ai.onnx") for node in proto.graph.node)
    assert len(proto.graph.node) <= 30


def test_torchscript_metadata_and_signature(exported) -> None:
    _, out, _ = exported
    extra = {METADATA_KEY: ""}
    module = torch.jit.load(str(out / TORCHSCRIPT_FILE), _extra_files=extra)
    assert json.loads(extra[METADATA_KEY])["output_names"] == list(OUTPUT_NAMES)
    outputs = module(torch.ones(2, 5), torch.tensor([0.0, 10.0]))
    assert isinstance(outputs, tuple) and len(outputs) == len(OUTPUT_NAMES) == 9
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


class _Shifted:
    """A model whose Python ``predict`` disagrees with its parts in one output: export must
    refuse it, whichever output it is."""

    def __init__(self, model: HybridLatencyModel, output: str, factor: float) -> None:
        self.prefill, self.decode_net = model.prefill, model.decode_net
        self.manifest: dict[str, Any] = {}
        self.calibration, self.bounds = model.calibration, model.bounds
        self._model, self._output, self._factor = model, output, factor

    def predict(self, features: np.ndarray, output_tokens: np.ndarray) -> dict[str, np.ndarray]:
        out = dict(self._model.predict(features, output_tokens))
        out[self._output] = out[self._output] * self._factor + 0.01
        return out


@pytest.mark.parametrize("output", ["decode_total_ms", "prefill_p50_ms", "total_p95_ms"])
def test_failed_parity_writes_nothing(trained, tmp_path: Path, output: str) -> None:
    model, _ = trained
    shifted = _Shifted(model, output, 1.01)
    with pytest.raises(LatkitError, match=f"parity check failed .* in {output}"):
        export_model(shifted, tmp_path, formats=["torchscript"])  # type: ignore[arg-type]
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


def test_output_differences_treat_equal_infinities_as_equal() -> None:
    inf, nan = np.inf, np.nan
    want = {name: np.array([1.0, inf, inf, 2.0, nan]) for name in OUTPUT_NAMES}
    diff, rel = output_differences(np.array([1.0, inf, 3.0, inf, nan]), want["total_ms"])
    assert diff.tolist() == [0.0, 0.0, inf, inf, 0.0] and rel.tolist() == diff.tolist()
    assert compare_outputs("x", dict(want), want).ok
    for bad in ([1.0, inf, inf, 2.0, 1.0], [1.0, -inf, inf, 2.0, nan], [1.0, 9.9, inf, 2.0, nan]):
        got = {**want, "total_p95_ms": np.array(bad)}
        report = compare_outputs("x", got, want)
        assert not report.ok and report.worst_output == "total_p95_ms"


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


# ----------------------------------------------------------------------------- recalibration


def test_recalibrated_model_exports_with_its_calibration(trained, tmp_path: Path) -> None:
    """A model moved to another machine (``with_calibration``): prefill and every decode pass
    mapped affinely, bounds recalibrated. The export carries all of it into the graph."""
    model, _ = trained
    # Total factors below the prefill's: total_pXX = max(prefill f_p + decode f_d + mean
    # pass f_g, prefill_pXX) takes the prefill bound for short answers and the total's for long
    # ones; both are exercised, with a decode factor unlike the prefill's and a per-pass term.
    bounds = ConformalBounds(
        prefill={"p50": 0.97, "p90": 1.3, "p95": 1.5},
        total={"p90": (1.1, 1.15, 0.4), "p95": (1.2, 1.35, 0.7)},
    )
    calibrated = model.with_calibration(Calibration(1.3, 2.0, 0.8, 0.25, "affine", 10), bounds)
    result = export_model(calibrated, tmp_path, formats=["torchscript", "onnx"])
    assert result.decode_form == "folded+calibrated"
    x = _query_rows(model)
    n = np.resize(np.array([0, 1, 2, 300], np.float32), len(x))
    want = calibrated.predict(x, n)
    got = run_torchscript(tmp_path / TORCHSCRIPT_FILE, x, n)
    _assert_close(got, want, "calibrated ts")
    _assert_close(run_onnx(tmp_path / ONNX_FILE, x, n), want, "calibrated onnx")
    assert (got["decode_per_token_ms"][n <= 1] == 0).all()
    # The calibration really is in the graph: the uncalibrated model differs by far more.
    plain = model.predict(x, n)
    assert np.abs(got["prefill_ms"] / plain["prefill_ms"] - 1).min() > 0.05
    floor = got["total_p95_ms"] == got["prefill_p95_ms"]
    assert floor.any() and not floor.all()
    np.testing.assert_allclose(got["total_p95_ms"][floor], want["prefill_ms"][floor] * 1.5, 1e-5)
    bound = want["prefill_ms"] * 1.2 + want["decode_total_ms"] * 1.35
    bound += want["decode_per_token_ms"] * 0.7
    np.testing.assert_allclose(got["total_p95_ms"][~floor], bound[~floor], 1e-5)


def test_prefill_scale_alone_is_calibrated_too(trained, tmp_path: Path) -> None:
    """Only the prefill map recalibrated (decode untouched): still "+calibrated", exact."""
    model, _ = trained
    calibrated = model.with_calibration(Calibration(0.7, 0.0, 1.0, 0.0, "affine", 10))
    result = export_model(calibrated, tmp_path, formats=["onnx"])
    assert result.decode_form == "folded+calibrated"
    x = _query_rows(model)
    n = np.resize(np.array([0, 1, 5], np.float32), len(x))
    _assert_close(run_onnx(tmp_path / ONNX_FILE, x, n), calibrated.predict(x, n), "scale")


def test_unbounded_levels_stay_infinite_in_both_formats(trained, tmp_path: Path) -> None:
    """Too few calibration samples after a recalibration: factor +inf for a level. The graph
    answers +inf there (never a finite guess, never NaN), parity holds (inf == inf), and the
    budget query finds no room under those bounds."""
    model, _ = trained
    inf = float("inf")
    bounds = ConformalBounds(
        prefill={"p50": 0.98, "p90": 1.1, "p95": inf},
        total={"p90": (1.2, 1.3, 0.2), "p95": (inf, inf, inf)},
    )
    calibrated = model.with_calibration(Calibration(1.1, -0.5, 1.2, 0.1, "affine", 5), bounds)
    result = export_model(calibrated, tmp_path)
    assert all(report.ok for reports in result.parity.values() for _, report in reports)
    x = _query_rows(model)
    n = np.resize(np.array([0, 1, 2, 40], np.float32), len(x))
    want = calibrated.predict(x, n)
    assert np.isinf(want["total_p95_ms"]).all() and np.isfinite(want["total_p90_ms"]).all()
    for runner, path in ((run_onnx, ONNX_FILE), (run_torchscript, TORCHSCRIPT_FILE)):
        got = runner(tmp_path / path, x, n)
        _assert_close(got, want, path)
        for name in ("prefill_p95_ms", "total_p95_ms"):
            assert (got[name] == np.inf).all(), (path, name)
        assert np.isfinite(got["total_p90_ms"]).all()
    from exporters.budget import run_budget_file

    budgets = np.full(len(x), 1e9, np.float32)
    for name in ("latency_budget.onnx", "latency_budget.ts"):
        room = run_budget_file(tmp_path / name, x, budgets)
        assert (room["max_output_tokens_p95"] == 0).all(), name
        assert (room["max_output_tokens_p90"] == 4096).all(), name
