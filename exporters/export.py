"""Export a trained ``HybridLatencyModel`` as ONE predictor file per format, and prove it.

``export_checkpoint`` loads an artifact directory, compiles the prefill booster's residual
factor into an exact lookup table (:mod:`exporters.tree_table`), fuses it with the physics
baseline, the calibrated bounds and the decode network (:mod:`exporters.fused`), writes
``latency_predictor.onnx`` and/or ``latency_predictor.ts`` atomically, reloads what it wrote
and compares every output with the Python model on the checkpoint's stored training data and
on rows placed exactly on (and one float32 step around) every split threshold. A file that
disagrees is not left behind.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from exporters.budget import (
    BUDGET_ONNX_FILE,
    BUDGET_TORCHSCRIPT_FILE,
    BudgetPredictor,
    budget_agreement,
    budget_metadata,
    probe_budgets,
    reference_answers,
    run_budget_file,
)
from exporters.fused import (
    FEATURE_LIMITS,
    INPUT_NAMES,
    OUTPUT_TOKENS_LIMIT,
    FusedPredictor,
    GenericDecode,
    OutputSpec,
    decode_agreement,
    fold_decode_net,
)
from exporters.tree_table import (
    DEFAULT_MAX_CELLS,
    TABLE_COLUMN,
    PrefillTable,
    table_from_prefill,
)
from toolkit import __version__
from toolkit.atomic import atomic_path, write_bytes_atomic
from toolkit.checkpoint import load_model, training_split
from toolkit.errors import LatkitError
from toolkit.features import (
    FEATURE_MINIMUM,
    FEATURE_NAMES,
    OUTPUT_NAMES,
    TIERS,
    default_vision_tokens,
)

if TYPE_CHECKING:
    from toolkit.models.hybrid import HybridLatencyModel

log = logging.getLogger(__name__)

ONNX_FILE = "latency_predictor.onnx"
TORCHSCRIPT_FILE = "latency_predictor.ts"
#: Name of the JSON metadata: an ONNX metadata_props key and a TorchScript extra file.
METADATA_KEY = "latkit_metadata.json"
FORMATS: tuple[str, ...] = ("onnx", "torchscript")
DEFAULT_OPSET = 18
#: Parity tolerance: |exported - python| <= ATOL + RTOL * |python| for every output
#: (an infinite bound must be the same infinity).
RTOL = 1e-3
ATOL = 1e-3
# Outputs compared against HybridLatencyModel.predict (its keys are the output names).
_PARITY_OUTPUTS = OUTPUT_NAMES


@dataclass
class ParityReport:
    """Largest differences of one exported file against the Python model."""

    fmt: str
    n_rows: int
    max_abs_ms: float
    max_rel: float
    worst_output: str
    ok: bool
    #: Largest relative difference of each output.
    per_output: dict[str, float] = field(default_factory=dict)

    def line(self, label: str) -> str:
        status = "ok" if self.ok else "FAILED"
        return (
            f"{self.fmt:<11} {label:<14} rows={self.n_rows:<6} max|diff|={self.max_abs_ms:.3g} ms "
            f"max rel={self.max_rel:.3g} (worst: {self.worst_output}) {status}"
        )


@dataclass
class ExportResult:
    written: dict[str, Path] = field(default_factory=dict)
    parity: dict[str, list[tuple[str, ParityReport]]] = field(default_factory=dict)
    n_cells: int = 0
    decode_form: str = "generic"
    thresholds_per_feature: dict[str, int] = field(default_factory=dict)
    #: The budget entry point (``exporters.budget``) per format, and the share of checked
    #: rows where it equals ``toolkit.controller.max_output_tokens``.
    budget_written: dict[str, Path] = field(default_factory=dict)
    budget_agreement: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------- building


def table_from_model(model: HybridLatencyModel, max_cells: int = DEFAULT_MAX_CELLS) -> PrefillTable:
    """The prefill model's own table (residual factor and floor): the graph reads the very
    arrays the Python model predicts through."""
    return table_from_prefill(model.prefill, max_cells)


def output_spec(model: HybridLatencyModel) -> OutputSpec:
    """Baseline, prefill recalibration and bound factors of ``model`` for the graph."""
    calibration, bounds = model.calibration, model.bounds
    return OutputSpec(
        form=model.prefill.baseline.product_form(),
        prefill_scale=float(calibration.prefill_scale),
        prefill_offset_ms=float(calibration.prefill_offset_ms),
        prefill_bounds={k: float(v) for k, v in bounds.prefill.items()},
        total_bounds={k: (float(p), float(d), float(g)) for k, (p, d, g) in bounds.total.items()},
    )


def build_predictor(
    model: HybridLatencyModel,
    max_cells: int = DEFAULT_MAX_CELLS,
    probe_features: np.ndarray | None = None,
    fold: bool = True,
) -> tuple[FusedPredictor, PrefillTable, str]:
    """(fused module, compiled table, decode form "folded" or "generic").

    The folded form (shared first layer, 18 ONNX nodes after ONNX Runtime's fusions) is used
    when it reproduces the generic one within 1e-5 relative on ``probe_features``; a
    recalibration adds "+calibrated" (the prefill map and the bounds are in the output
    Gemm; the decode one is folded into the closed form).
    """
    table = table_from_model(model, max_cells)
    spec = output_spec(model)
    if probe_features is None or len(probe_features) == 0:
        probe_features = _default_probe_features()
    scale, offset = decode_calibration(model)
    prefill_map = (spec.prefill_scale, spec.prefill_offset_ms)
    suffix = "" if (scale, offset, *prefill_map) == (1.0, 0.0, 1.0, 0.0) else "+calibrated"
    generic = FusedPredictor(table, GenericDecode(model.decode_net, scale, offset), spec).eval()
    predictor, form = generic, "generic"
    pair = fold_decode_net(model.decode_net, scale, offset) if fold else None
    if pair is not None:
        folded = FusedPredictor(table, pair, spec).eval()
        worst = decode_agreement(folded, generic, probe_features[:512])
        if worst <= 1e-5:
            predictor, form = folded, "folded"
        else:
            log.info("folded decode differs by %.3g relative; exporting the generic form", worst)
    for param in predictor.parameters():
        param.requires_grad_(False)
    return predictor, table, form + suffix


def decode_calibration(model: HybridLatencyModel) -> tuple[float, float]:
    """(decode pass scale, offset ms) of a recalibrated model; (1, 0) for none."""
    calibration = model.calibration
    return float(calibration.decode_pass_scale), float(calibration.decode_pass_offset_ms)


def _default_probe_features() -> np.ndarray:
    rng = np.random.default_rng(0)
    n = 256
    return np.stack(
        [
            rng.integers(2, 17, n) * 144.0,
            rng.integers(1, 2048, n),
            rng.integers(0, 3, n),
            rng.choice([4, 6, 8, 10, 12], n),
            rng.choice([8, 10, 12, 14, 16], n),
        ],
        axis=1,
    ).astype(np.float32)


def predictor_metadata(
    model: HybridLatencyModel, table: PrefillTable, decode_form: str
) -> dict[str, Any]:
    """What a runtime must know: order of features, outputs, training ranges, versions."""
    manifest = dict(getattr(model, "manifest", {}) or {})
    summary = dict(manifest.get("training_summary", {}) or {})
    bounds = model.bounds
    return {
        "format": "latkit-predictor",
        "format_version": 3,
        "latkit_version": __version__,
        "torch_version": torch.__version__,
        "feature_names": list(FEATURE_NAMES),
        "tiers": list(TIERS),
        # (mean crops + 1) x 144 per tier: what predict uses when vision tokens are unknown.
        "default_vision_tokens": {tier: default_vision_tokens(tier) for tier in TIERS},
        "input_names": list(INPUT_NAMES),
        "output_names": list(OUTPUT_NAMES),
        "target_transform": manifest.get("target_transform"),
        "decode_form": decode_form,
        # Above these feature values the graph's baseline factors would clip: refuse them.
        "feature_limits": dict(zip(FEATURE_NAMES, FEATURE_LIMITS, strict=True)),
        "output_tokens_limit": OUTPUT_TOKENS_LIMIT,
        # Multipliers of prefill_ms / total_ms per bound level (null: unbounded, +inf).
        "bound_factors": {
            "prefill": {k: _json_factor(v) for k, v in bounds.prefill.items()},
            "total": {
                k: {"prefill": _json_factor(p), "decode": _json_factor(d), "pass": _json_factor(g)}
                for k, (p, d, g) in bounds.total.items()
            },
        },
        # The threshold test and row index are exact float32 matmuls; TF32 breaks them.
        "cuda_provider_options": {"use_tf32": "0"},
        "calibration": _calibration_dict(model),
        "prefill_table": {
            "column": TABLE_COLUMN,
            "floor_ms": True,
            "n_cells": table.n_cells,
            "thresholds_per_feature": {
                name: len(t) for name, t in zip(FEATURE_NAMES, table.thresholds, strict=True)
            },
        },
        "training_summary": summary,
        "source_manifest_versions": {
            key: manifest[key]
            for key in ("format", "format_version", "latkit_version", "xgboost_version")
            if key in manifest
        },
    }


def _json_factor(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _calibration_dict(model: HybridLatencyModel) -> dict[str, Any] | None:
    calibration = getattr(model, "calibration", None)
    to_dict = getattr(calibration, "to_dict", None)
    return dict(to_dict()) if callable(to_dict) else None


# --------------------------------------------------------------------------- writing


def _example_inputs(batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    features = torch.tensor([[1152.0, 100.0, 1.0, 8.0, 12.0]] * batch, dtype=torch.float32)
    return features, torch.arange(batch, dtype=torch.float32)


def export_torchscript(
    predictor: torch.nn.Module, path: str | Path, metadata: dict[str, Any]
) -> Path:
    """``torch.jit.script`` the predictor; metadata travels as the extra file METADATA_KEY."""
    path = Path(path)
    # TorchScript is deprecated in torch 2.x but is what libtorch deployments load; the
    # deprecation warnings say nothing the user can act on here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(predictor)
        scripted = torch.jit.freeze(scripted.eval())  # constants inlined: fewer ops per call
        with atomic_path(path) as tmp:
            torch.jit.save(scripted, str(tmp), _extra_files={METADATA_KEY: json.dumps(metadata)})
    return path


def onnx_model_proto(
    predictor: torch.nn.Module,
    opset: int = DEFAULT_OPSET,
    exporter: str = "dynamo",
    names: tuple[Sequence[str], Sequence[str]] = (INPUT_NAMES, OUTPUT_NAMES),
) -> Any:
    """The predictor as an optimised ``onnx.ModelProto`` with a dynamic batch axis.

    torch 2.13's default (dynamo) exporter gives the smaller graph (36 nodes against ~60);
    the legacy TorchScript exporter (``dynamo=False``) is deprecated, so it is used only when
    asked for or when the dynamo one fails.
    """
    if exporter not in ("dynamo", "legacy"):
        raise ValueError(f"exporter must be dynamo or legacy, not {exporter!r}")
    model = None
    if exporter == "dynamo":
        try:
            model = _export_dynamo(predictor, opset, names)
        except Exception as exc:  # exporter internals vary between torch releases
            log.warning("dynamo ONNX exporter failed (%s); using the legacy exporter", exc)
    if model is None:
        model = _export_legacy(predictor, opset, names)
    with _quiet_torch_onnx():
        return _fold(model)


def _export_dynamo(
    predictor: torch.nn.Module, opset: int, names: tuple[Sequence[str], Sequence[str]]
) -> Any:
    input_names, output_names = names
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings(), _quiet_torch_onnx():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            predictor,
            _example_inputs(),
            dynamo=True,
            input_names=list(input_names),
            output_names=list(output_names),
            opset_version=opset,
            dynamic_shapes={name: {0: batch} for name in input_names},
            custom_translation_table=_translations(),
            optimize=True,
            verbose=False,
        )
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    return program.model_proto


def _export_legacy(
    predictor: torch.nn.Module, opset: int, names: tuple[Sequence[str], Sequence[str]]
) -> Any:
    import onnx

    input_names, output_names = names
    buffer = io.BytesIO()
    axes = {name: {0: "batch"} for name in (*input_names, *output_names)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            predictor,
            _example_inputs(),
            buffer,  # type: ignore[arg-type]  # the legacy exporter takes file objects
            dynamo=False,
            input_names=list(input_names),
            output_names=list(output_names),
            opset_version=opset,
            dynamic_axes=axes,
            do_constant_folding=True,
        )
    return onnx.load_from_string(buffer.getvalue())


def _translations() -> dict[Any, Any]:
    """ONNX translations shorter than the exporter's defaults (every node costs ~0.4 µs).

    softplus: torch's threshold form (x > 20 ? x : log1p(exp(x))) becomes Greater + Where +
    Softplus; ONNX Runtime's Softplus kernel is already stable for large x (it agrees with
    torch to 1 ulp, and the parity check proves the file), so one Softplus node suffices.

    hardtanh(x, 0, 1): HardSigmoid(alpha=1, beta=0) computes exactly max(0, min(1, x)), and
    ONNX Runtime fuses it into the preceding Gemm (it does not fuse Clip, the default).

    unbind(x, 0) of a [n, B] tensor: Reshape to [n B] + one Split with ``num_outputs=n`` gives
    the n rows as [B] tensors (the default is n Slice + n Squeeze nodes).

    table[index] with one integer index tensor: one Gather (the default adds an Unsqueeze
    and uses GatherND).
    """
    from onnxscript import opset18 as op

    def softplus(self: Any, beta: float = 1.0, threshold: float = 20.0) -> Any:
        if beta != 1.0:
            return op.Div(op.Softplus(op.Mul(self, beta)), beta)
        return op.Softplus(self)

    def hardtanh(self: Any, min_val: float = -1.0, max_val: float = 1.0) -> Any:
        if (min_val, max_val) != (0.0, 1.0):
            raise NotImplementedError("only hardtanh(x, 0, 1) is translated")
        return op.HardSigmoid(self, alpha=1.0, beta=0.0)

    def unbind(self: Any, dim: int = 0) -> Any:
        rows = self.shape[dim] if self.shape is not None else None
        if dim != 0 or not isinstance(rows, int) or len(self.shape) != 2:
            raise NotImplementedError("only unbind(x, 0) of a 2-D x with a static n is translated")
        flat_shape: Any = op.Constant(value_ints=[-1])
        flat = op.Reshape(self, flat_shape)
        return list(op.Split(flat, axis=0, num_outputs=rows))

    def index(self: Any, indices: Sequence[Any]) -> Any:
        if len(indices) != 1 or indices[0] is None:
            raise NotImplementedError("only table[index] with one index tensor is translated")
        return op.Gather(self, indices[0], axis=0)

    return {
        torch.ops.aten.softplus.default: softplus,
        torch.ops.aten.hardtanh.default: hardtanh,
        torch.ops.aten.unbind.int: unbind,
        torch.ops.aten.index.Tensor: index,
    }


def _fold(model: Any) -> Any:
    """Fold constants and drop dead nodes once more (fewer nodes = less per-call overhead)."""
    try:
        import onnxscript.optimizer

        model = onnxscript.optimizer.optimize(model)
    except Exception as exc:  # the optimiser is an optional nicety, never a requirement
        log.debug("onnxscript optimizer skipped: %s", exc)
    return _drop_noop_reshapes(model)


def _drop_noop_reshapes(model: Any) -> Any:
    """Remove ``Reshape(x, [-1])`` where x is already 1-D (index_select adds one per lookup)."""
    import onnx
    from onnx import numpy_helper

    inferred = onnx.shape_inference.infer_shapes(model)
    ranks = {
        info.name: len(info.type.tensor_type.shape.dim)
        for info in [*inferred.graph.value_info, *inferred.graph.input]
        if info.type.tensor_type.HasField("shape")
    }
    constants = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    outputs = {o.name for o in model.graph.output}
    rename: dict[str, str] = {}
    keep = []
    for node in model.graph.node:
        inputs = [rename.get(name, name) for name in node.input]
        del node.input[:]
        node.input.extend(inputs)
        if (
            node.op_type == "Reshape"
            and len(node.input) == 2
            and ranks.get(node.input[0]) == 1
            and node.input[1] in constants
            and constants[node.input[1]].tolist() == [-1]
            and node.output[0] not in outputs
        ):
            rename[node.output[0]] = node.input[0]
            continue
        keep.append(node)
    if len(keep) == len(model.graph.node):
        return model
    del model.graph.node[:]
    model.graph.node.extend(keep)
    # Their shape constants are dead now (ONNX Runtime warns about unused initializers).
    used = {name for node in keep for name in node.input} | outputs
    live = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(live)
    # Drop value_info of removed tensors; the checker re-infers the rest.
    del model.graph.value_info[:]
    return model


@contextlib.contextmanager
def _quiet_torch_onnx() -> Iterator[None]:
    """Silence the dynamo exporter's progress lines (it prints and logs them)."""
    names = ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "onnx_ir")
    levels = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def export_onnx(
    predictor: torch.nn.Module,
    path: str | Path,
    metadata: dict[str, Any],
    opset: int = DEFAULT_OPSET,
    exporter: str = "dynamo",
) -> Path:
    """Write the ONNX predictor with metadata_props; ``onnx.checker`` (full check) must pass."""
    import onnx

    path = Path(path)
    names = (metadata["input_names"], metadata["output_names"])
    model = onnx_model_proto(predictor, opset, exporter, names)
    model.doc_string = str(
        metadata.get("description", "latkit fused latency predictor (prefill table + decode net)")
    )
    model.producer_name = "latkit"
    model.producer_version = __version__
    props = {
        METADATA_KEY: json.dumps(metadata),
        "feature_names": ",".join(metadata["feature_names"]),
        "output_names": ",".join(metadata["output_names"]),
        "latkit_version": str(metadata["latkit_version"]),
        "training_summary": json.dumps(metadata.get("training_summary", {})),
    }
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise LatkitError(f"exported ONNX graph fails onnx.checker: {exc}") from exc
    write_bytes_atomic(path, model.SerializeToString())
    return path


# --------------------------------------------------------------------------- parity


def run_onnx(
    path: str | Path, features: np.ndarray, output_tokens: np.ndarray
) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    outputs = session.run(
        None,
        {
            "features": np.ascontiguousarray(features, dtype=np.float32),
            "output_tokens": np.ascontiguousarray(output_tokens, dtype=np.float32),
        },
    )
    names = [o.name for o in session.get_outputs()]
    return {name: np.asarray(value) for name, value in zip(names, outputs, strict=True)}


def run_torchscript(
    path: str | Path, features: np.ndarray, output_tokens: np.ndarray
) -> dict[str, np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(str(path), map_location="cpu")
    with torch.inference_mode():
        outputs = module(
            torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)),
            torch.from_numpy(np.ascontiguousarray(output_tokens, dtype=np.float32)),
        )
    return {name: out.numpy() for name, out in zip(OUTPUT_NAMES, outputs, strict=True)}


def output_differences(got: np.ndarray, want: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(|got - want|, relative difference) per element, float64; equal infinities (and NaN
    against NaN) differ by 0, an infinity against anything else by inf."""
    a = np.asarray(got, dtype=np.float64)
    b = np.asarray(want, dtype=np.float64)
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    with np.errstate(invalid="ignore"):
        diff = np.where(same, 0.0, np.abs(a - b))
    diff[np.isnan(diff)] = np.inf  # NaN against a number
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.where(diff == 0, 0.0, diff / np.maximum(np.abs(b), 1e-12))
    rel[np.isnan(rel)] = np.inf  # inf against inf of the other sign
    return diff, rel


def compare_outputs(
    fmt: str, got: dict[str, np.ndarray], want: dict[str, np.ndarray]
) -> ParityReport:
    max_abs, max_rel, worst, ok, n = 0.0, 0.0, OUTPUT_NAMES[0], True, 0
    per_output: dict[str, float] = {}
    for name in _PARITY_OUTPUTS:
        b = np.asarray(want[name], dtype=np.float64)
        a = np.asarray(got[name], dtype=np.float64)
        n = len(b)
        if a.shape != b.shape:
            raise LatkitError(f"{fmt} output {name} has shape {a.shape}, expected {b.shape}")
        if b.size == 0:
            continue
        diff, rel = output_differences(a, b)
        finite_b = np.where(np.isfinite(b), np.abs(b), 0.0)
        ok &= bool(np.all(diff <= ATOL + RTOL * finite_b))
        if diff.max() > max_abs:
            max_abs, worst = float(diff.max()), name
        per_output[name] = float(rel.max())
        max_rel = max(max_rel, per_output[name])
    return ParityReport(fmt, n, max_abs, max_rel, worst, ok, per_output)


def threshold_probe_rows(table: PrefillTable, base: np.ndarray) -> np.ndarray:
    """Rows of ``base`` with one feature set exactly on each threshold and one ulp around it.

    Only possible inputs (the model refuses the others): no value below a feature's minimum,
    and the tier takes each of its values 0, 1, 2 instead (which covers both sides of any
    tier threshold).
    """
    rows = []
    tier = FEATURE_NAMES.index("tier_idx")
    for f, thresholds in enumerate(table.thresholds):
        if f == tier:
            values = [np.float32(i) for i in range(len(TIERS))] if len(thresholds) else []
        else:
            lowest = np.float32(FEATURE_MINIMUM[FEATURE_NAMES[f]])
            values = [
                v
                for t in thresholds
                for v in (
                    np.nextafter(t, np.float32(-np.inf), dtype=np.float32),
                    t,
                    np.nextafter(t, np.float32(np.inf), dtype=np.float32),
                )
                if v >= lowest
            ]
        for value in values:
            row = base.copy()
            row[f] = value
            rows.append(row)
    if not rows:
        return base.reshape(1, -1).astype(np.float32)
    return np.asarray(rows, dtype=np.float32)


def parity_sets(
    model: HybridLatencyModel, table: PrefillTable, training_data: Any | None
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(label, features, output_tokens) sets to check: training data + threshold probes."""
    sets: list[tuple[str, np.ndarray, np.ndarray]] = []
    rng = np.random.default_rng(0)
    if training_data is not None and training_data.height:
        from toolkit.features import feature_matrix

        features = feature_matrix(training_data)
        tokens = training_data["output_tokens"].to_numpy().astype(np.float32)
        sets.append(("training_data", features, tokens))
        base = np.median(features, axis=0).astype(np.float32)
        max_tokens = float(tokens.max()) if len(tokens) else 64.0
    else:
        base = np.array([1152.0, 100.0, 1.0, 8.0, 12.0], dtype=np.float32)
        max_tokens = 64.0
    probes = threshold_probe_rows(table, base)
    # Output tokens 0, 1, 2 and up to the largest seen cycle through the probe rows.
    cycle = np.array([0.0, 1.0, 2.0, 3.0, max_tokens], dtype=np.float32)
    probe_tokens = np.resize(cycle, len(probes))
    rng.shuffle(probe_tokens)
    sets.append(("split_probes", probes, probe_tokens.astype(np.float32)))
    return sets


def python_outputs(
    model: HybridLatencyModel, features: np.ndarray, output_tokens: np.ndarray
) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in model.predict(features, output_tokens).items()}


# --------------------------------------------------------------------------- entry point


def parse_formats(formats: str | Sequence[str]) -> tuple[str, ...]:
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    aliases = {
        "onnx": "onnx",
        "torchscript": "torchscript",
        "ts": "torchscript",
        "pt": "torchscript",
    }
    out: list[str] = []
    for item in (i.strip().lower() for i in items):
        if not item:
            continue
        if item not in aliases:
            raise LatkitError(f"--format: unknown format {item!r} (expected onnx, torchscript)")
        if aliases[item] not in out:
            out.append(aliases[item])
    if not out:
        raise LatkitError("--format: no format given (expected onnx, torchscript)")
    return tuple(out)


def export_model(
    model: HybridLatencyModel,
    output_dir: str | Path,
    formats: Sequence[str] = FORMATS,
    opset: int = DEFAULT_OPSET,
    training_data: Any | None = None,
    max_cells: int = DEFAULT_MAX_CELLS,
    check: bool = True,
    fold: bool = True,
    onnx_exporter: str = "dynamo",
) -> ExportResult:
    """Write the predictor files for ``model`` into ``output_dir`` and check their parity.

    A file whose outputs disagree with ``model.predict`` beyond the tolerance is removed and
    a ``LatkitError`` raised: a controller must never load a predictor that was not proven.
    """
    output_dir = Path(output_dir)
    probe = None
    if training_data is not None and training_data.height:
        from toolkit.features import feature_matrix

        probe = feature_matrix(training_data)
    predictor, table, form = build_predictor(model, max_cells, probe, fold)
    output_dir.mkdir(parents=True, exist_ok=True)
    metadata = predictor_metadata(model, table, form)
    result = ExportResult(
        decode_form=form,
        n_cells=table.n_cells,
        thresholds_per_feature=dict(metadata["prefill_table"]["thresholds_per_feature"]),
    )
    sets = parity_sets(model, table, training_data) if check else []
    references = [(label, f, t, python_outputs(model, f, t)) for label, f, t in sets]
    for fmt in parse_formats(list(formats)):
        # Write to a scratch folder first so that a failed parity check replaces nothing.
        with tempfile.TemporaryDirectory(dir=output_dir, prefix=".latkit-export-") as scratch:
            if fmt == "onnx":
                tmp = export_onnx(
                    predictor, Path(scratch) / ONNX_FILE, metadata, opset, onnx_exporter
                )
                runner = run_onnx
                target = output_dir / ONNX_FILE
            else:
                tmp = export_torchscript(predictor, Path(scratch) / TORCHSCRIPT_FILE, metadata)
                runner = run_torchscript
                target = output_dir / TORCHSCRIPT_FILE
            reports = []
            for label, features, tokens, want in references:
                report = compare_outputs(fmt, runner(tmp, features, tokens), want)
                reports.append((label, report))
                if not report.ok:
                    raise LatkitError(
                        f"{target.name}: parity check failed on {label} "
                        f"(max |diff| {report.max_abs_ms:.3g} ms, max rel {report.max_rel:.3g} "
                        f"in {report.worst_output}); nothing written"
                    )
            write_bytes_atomic(target, tmp.read_bytes())
        result.written[fmt] = target
        result.parity[fmt] = reports
        budget_target, agreement = _export_budget(
            model, predictor, metadata, fmt, output_dir, opset, onnx_exporter, sets, check
        )
        result.budget_written[fmt] = budget_target
        result.budget_agreement[fmt] = agreement
    return result


def _export_budget(
    model: HybridLatencyModel,
    predictor: FusedPredictor,
    metadata: dict[str, Any],
    fmt: str,
    output_dir: Path,
    opset: int,
    onnx_exporter: str,
    sets: list[tuple[str, np.ndarray, np.ndarray]],
    check: bool,
) -> tuple[Path, float]:
    """Write the budget entry point in ``fmt`` and check it against the controller.

    Float32 in the graph against float64 in Python can flip a row whose cost lands within
    rounding of the budget, so the check allows 1 % of rows one token apart and no more.
    """
    module = BudgetPredictor(predictor).eval()
    info = budget_metadata(metadata)
    name = BUDGET_ONNX_FILE if fmt == "onnx" else BUDGET_TORCHSCRIPT_FILE
    target = output_dir / name
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".latkit-export-") as scratch:
        tmp = Path(scratch) / name
        if fmt == "onnx":
            export_onnx(module, tmp, info, opset, onnx_exporter)
        else:
            export_torchscript(module, tmp, info)
        agreement = 1.0
        if check and sets:
            features = np.concatenate([f for _, f, _ in sets])[:4000]
            budgets = probe_budgets(model, features)
            got = run_budget_file(tmp, features, budgets)
            agreement, worst = budget_agreement(got, reference_answers(model, features, budgets))
            if agreement < 0.99 or worst > 1:
                raise LatkitError(
                    f"{name}: budget answers disagree with the controller on "
                    f"{100 * (1 - agreement):.2f}% of rows (worst {worst} tokens); nothing written"
                )
        write_bytes_atomic(target, tmp.read_bytes())
    return target, agreement


def export_checkpoint(
    checkpoint: str | Path,
    output_dir: str | Path,
    formats: Sequence[str] | str = FORMATS,
    opset: int = DEFAULT_OPSET,
    max_cells: int = DEFAULT_MAX_CELLS,
) -> ExportResult:
    """``latkit export``: load the artifact in ``checkpoint`` and export it to ``output_dir``."""
    fmts = parse_formats(formats)
    model = load_model(checkpoint)
    return export_model(model, output_dir, fmts, opset, training_split(model), max_cells)
