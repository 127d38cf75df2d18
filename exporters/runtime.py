"""Serve an exported ``latency_predictor.onnx`` with nothing but numpy and onnxruntime.

    from exporters.runtime import LatencyPredictor

    predictor = LatencyPredictor("exported/latency_predictor.onnx")
    out = predictor.predict(vision_tokens=1008, text_tokens=120, tier="medium", top_k=8,
                            num_active_blocks=12, output_tokens=64)
    out["total_ms"], out["total_p95_ms"], out["out_of_range"]

Outputs, by name (float32 [B] each): ``prefill_ms``, ``decode_total_ms``,
``decode_per_token_ms``, ``total_ms``, the prefill bounds ``prefill_p90_ms``,
``prefill_p95_ms``, ``prefill_p50_ms`` and the calibrated bounds of the total
``total_p90_ms``, ``total_p95_ms`` (+inf where the model had too few calibration samples for
a level), plus ``out_of_range`` (bool [B]).

This file deliberately imports nothing from latkit (copy it next to a controller as is):
feature order, tier names and training ranges come from the model's own metadata.

Sessions: a batch-1 query is fastest on one thread (no pool wake-up), so small batches run
on a single-threaded CPU session. Batches of ``large_batch`` rows or more run on a second
session with all cores, on the CUDA execution provider when one is usable.

Threads: one ``LatencyPredictor`` may be shared by any number of threads. ``predict``,
``run``, ``feasible`` and ``max_output_tokens`` return exactly what they return on one thread,
at any mix of batch sizes. Small batches run on buffers bound to the session (an ONNX Runtime
IoBinding); a set of them serves one call at a time: a call takes an idle set of its batch size
from a pool (or binds a new one) and puts it back when done, so concurrent calls never share
buffers and a set in use is referenced by its call, never freed under ONNX Runtime. The pool
keeps sets for at most ``MAX_BOUND_BATCH_SIZES`` batch sizes (a new size beyond drops the
oldest), as many per size as calls of that size ever ran at once. ONNX Runtime releases the
GIL while it computes, so threads add throughput where cores are free (the Python around a
call holds it: see the README's "Using the predictor in a service"). Forked worker processes
(a pre-fork server) may use a predictor made and used before the fork: each has its own copy.

Inputs are validated: wrong shapes, NaN/inf and impossible values (negative token counts,
top_k or num_active_blocks below 1, a tier other than 0/1/2, values above the exported
graph's limits) raise ``InputError`` naming the field. Rows beyond the supported range, the
training range widened by ``EXTRAPOLATION_MARGIN`` of its width on each side (the tier:
exactly the trained tiers; output tokens: above ``OUTPUT_TOKENS_MULTIPLE`` x the longest
trained answer, how far decode's growth was measured to hold), are flagged in
``out["out_of_range"]`` and, by default, warned about: past them a prediction is an
extrapolation. ``toolkit.features`` holds the same rules (``supported_range``,
``supported_output_tokens``); a test keeps the two copies equal.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

METADATA_KEY = "latkit_metadata.json"
DEFAULT_FEATURE_NAMES = ("vision_tokens", "text_tokens", "tier_idx", "top_k", "num_active_blocks")
DEFAULT_TIERS = ("low", "medium", "high")
#: Vision tokens of a tier when a caller does not know them: (mean crops + 1) x 144, with the
#: crop ranges of the core-experiment format (low 1-3, medium 4-8, high 9-15 crops).
DEFAULT_VISION_TOKENS = {"low": 432, "medium": 1008, "high": 1872}
#: The budget query exported beside the predictor (``exporters.budget``).
BUDGET_FILE = "latency_budget.onnx"
#: The prefill output of each budget bound (the prefill-alone test), and the total output
#: (the whole answer's test); p50 has no calibrated total: prefill_p50 + decode total.
_BOUND_OUTPUTS = {
    "mean": "prefill_ms",
    "p50": "prefill_p50_ms",
    "p90": "prefill_p90_ms",
    "p95": "prefill_p95_ms",
}
_TOTAL_OUTPUTS = {"mean": "total_ms", "p90": "total_p90_ms", "p95": "total_p95_ms"}
#: Share of a training range's width by which the supported range extends beyond each end
#: (``toolkit.features.EXTRAPOLATION_MARGIN``).
EXTRAPOLATION_MARGIN = 0.5
#: Output lengths up to this multiple of the longest trained answer are answered without a
#: flag (``toolkit.features.OUTPUT_TOKENS_MULTIPLE``).
OUTPUT_TOKENS_MULTIPLE = 8.0
#: The smallest possible value of each input (``toolkit.features.FEATURE_MINIMUM``).
FEATURE_MINIMUM = {
    "vision_tokens": 0.0,
    "text_tokens": 0.0,
    "tier_idx": 0.0,
    "top_k": 1.0,
    "num_active_blocks": 1.0,
    "output_tokens": 0.0,
}
#: Batch sizes below ``large_batch`` whose bound buffers a predictor keeps (see the module doc).
MAX_BOUND_BATCH_SIZES = 16


class InputError(ValueError):
    """Inputs the predictor refuses: wrong shape, NaN/inf, impossible values, unknown tier,
    missing value."""


class OutOfRangeWarning(UserWarning):
    """Some rows lie outside the ranges the model was trained on."""


def supported_range(name: str, low: float, high: float) -> tuple[float, float]:
    """The range a model trained on [low, high] of ``name`` answers without a flag: the width
    times ``EXTRAPOLATION_MARGIN`` beyond each end, not below the input's minimum; the tier
    exactly (a copy of ``toolkit.features.supported_range``)."""
    if name == "tier_idx":
        return float(low), float(high)
    width = float(high) - float(low)
    return (
        max(FEATURE_MINIMUM.get(name, -np.inf), float(low) - EXTRAPOLATION_MARGIN * width),
        float(high) + EXTRAPOLATION_MARGIN * width,
    )


@functools.lru_cache(maxsize=64)
def _possible_bounds(
    feature_names: tuple[str, ...], n_tiers: int, limits: tuple[tuple[str, float], ...]
) -> tuple[np.ndarray, np.ndarray, int | None]:
    """(lowest, highest) possible value per feature and the tier's column (None: no tier)."""
    lowest = np.array([FEATURE_MINIMUM.get(name, -np.inf) for name in feature_names])
    highest = np.array([dict(limits).get(name, np.inf) for name in feature_names])
    tier = feature_names.index("tier_idx") if "tier_idx" in feature_names else None
    if tier is not None:  # a tier is 0, 1, ..., n_tiers - 1
        lowest[tier] = max(lowest[tier], 0.0)
        highest[tier] = min(highest[tier], n_tiers - 1)
    lowest.flags.writeable = highest.flags.writeable = False  # shared by every call
    return lowest, highest, tier


def impossible_inputs(
    features: np.ndarray,
    feature_names: Sequence[str] = DEFAULT_FEATURE_NAMES,
    n_tiers: int = len(DEFAULT_TIERS),
    limits: Mapping[str, float] | None = None,
) -> list[str]:
    """One message per feature with impossible values (below its minimum, a tier other than
    0 .. n_tiers - 1, above ``limits``); empty when every row is possible. Finite inputs
    assumed (``check_inputs`` refuses NaN/inf first)."""
    limits = limits or {}
    # Every rule as one [B, F] mask first (a few array operations: this runs on every
    # query); messages only for the columns it marks.
    lowest, highest, tier = _possible_bounds(tuple(feature_names), n_tiers, tuple(limits.items()))
    bad = (features < lowest) | (features > highest)
    if tier is not None:
        bad[:, tier] |= features[:, tier] != np.floor(features[:, tier])
    if not bad.any():
        return []
    problems = []
    for f in np.flatnonzero(bad.any(axis=0)).tolist():
        name, column = feature_names[f], bad[:, f]
        what = f">= {FEATURE_MINIMUM.get(name, -np.inf):g}"
        if f == tier:
            what = ", ".join(str(i) for i in range(n_tiers - 1)) + f" or {n_tiers - 1}"
        if name in limits:
            what += f" and <= {limits[name]:g} (the exported graph's limit)"
        row = int(np.flatnonzero(column)[0])
        problems.append(
            f"{name} must be {what}: {int(column.sum())} row(s), first row {row} has "
            f"{features[row, f]:g}"
        )
    return problems


def tier_to_index(tier: Any, tiers: Sequence[str] = DEFAULT_TIERS) -> np.ndarray:
    """Tier names ("low", "medium", "high") or indices (0-2), scalar or array -> float32."""
    values = np.atleast_1d(np.asarray(tier, dtype=object))
    out = np.empty(values.shape, dtype=np.float32)
    lookup = {name: i for i, name in enumerate(tiers)}
    for i, value in enumerate(values):
        if isinstance(value, str):
            key = value.strip().lower()
            if key in lookup:
                out[i] = lookup[key]
                continue
            if key.isdigit() and int(key) < len(tiers):
                out[i] = int(key)
                continue
        elif (
            isinstance(value, int | np.integer | float | np.floating)
            and not isinstance(value, bool)
            and float(value) in range(len(tiers))
        ):
            out[i] = float(value)
            continue
        raise InputError(f"unknown tier {value!r}: expected one of {', '.join(tiers)} or 0-2")
    return out


def check_inputs(
    features: Any,
    output_tokens: Any,
    n_features: int = 5,
    name: str = "output_tokens",
    feature_names: Sequence[str] = DEFAULT_FEATURE_NAMES,
) -> tuple[np.ndarray, np.ndarray]:
    """Contiguous float32 ``features`` [B, n_features] and ``output_tokens`` [B], or InputError.

    ``name`` is what the second input is called in messages (``budget_ms`` for budgets).
    Shapes, NaN/inf and a negative second input only: ``impossible_inputs`` checks values.
    """
    try:
        x = np.asarray(features, dtype=np.float32)
        n = np.asarray(output_tokens, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InputError(f"inputs must be numeric arrays ({exc})") from None
    if x.ndim == 1 and x.shape[0] == n_features:
        x = x.reshape(1, n_features)
    if x.ndim != 2 or x.shape[1] != n_features:
        raise InputError(f"features must have shape [B, {n_features}], got {list(x.shape)}")
    n = n.reshape(-1) if n.ndim <= 1 else n
    if n.ndim != 1:
        raise InputError(f"{name} must have shape [B], got {list(n.shape)}")
    if n.shape[0] == 1 and x.shape[0] > 1:
        n = np.repeat(n, x.shape[0])
    if n.shape[0] != x.shape[0]:
        raise InputError(f"features has {x.shape[0]} rows but {name} has {n.shape[0]}")
    if x.shape[0] == 0:
        raise InputError("empty batch")
    if not np.isfinite(x).all():
        row, column = np.argwhere(~np.isfinite(x))[0]
        field = f" ({feature_names[column]})" if column < len(feature_names) else ""
        raise InputError(f"features row {row} column {column}{field} is NaN or infinite")
    if not np.isfinite(n).all():
        raise InputError(f"{name} row {int(np.argmax(~np.isfinite(n)))} is NaN or infinite")
    if (n < 0).any():
        raise InputError(f"{name} row {int(np.argmax(n < 0))} is negative")
    return np.ascontiguousarray(x), np.ascontiguousarray(n)


class _BoundBuffers:
    """Input and output buffers of one batch size, bound to a session by an ONNX Runtime
    IoBinding: a call copies its inputs in, runs, and copies the outputs out, with no OrtValue
    or array made per tensor. Serves one call at a time (``LatencyPredictor.run``)."""

    __slots__ = ("binding", "features", "output_tokens", "outputs")

    def __init__(
        self,
        session: ort.InferenceSession,
        batch: int,
        n_features: int,
        output_names: Sequence[str],
    ) -> None:
        self.features = np.empty((batch, n_features), dtype=np.float32)
        self.output_tokens = np.empty(batch, dtype=np.float32)
        self.outputs = np.empty((len(output_names), batch), dtype=np.float32)
        # The binding holds raw pointers into the arrays above: they live as long as this
        # object, which whoever runs the binding references.
        self.binding = session.io_binding()
        self.binding.bind_input(
            "features", "cpu", 0, np.float32, [batch, n_features], self.features.ctypes.data
        )
        self.binding.bind_input(
            "output_tokens", "cpu", 0, np.float32, [batch], self.output_tokens.ctypes.data
        )
        for row, name in enumerate(output_names):
            self.binding.bind_output(
                name, "cpu", 0, np.float32, [batch], self.outputs[row].ctypes.data
            )


def _cuda_usable() -> bool:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    # The GPU wheel lists the provider even without a GPU; a device node says one is there.
    return os.name != "posix" or os.path.exists("/dev/nvidiactl")


class LatencyPredictor:
    """The exported latency predictor, ready for queries.

    Parameters
    ----------
    path: the ``latency_predictor.onnx`` file.
    device: "auto" (CPU for small batches, CUDA for large ones when usable), "cpu", "cuda".
    threads: CPU threads of the large-batch session (default: all cores).
    large_batch: batch size from which the large-batch session is used.
    on_out_of_range: "warn" (flag + ``OutOfRangeWarning``), "flag" (flag only) or "error".
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        device: str = "auto",
        threads: int | None = None,
        large_batch: int = 1024,
        on_out_of_range: str = "warn",
    ) -> None:
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, not {device!r}")
        if on_out_of_range not in ("warn", "flag", "error"):
            raise ValueError(
                f"on_out_of_range must be warn, flag or error, not {on_out_of_range!r}"
            )
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such predictor file")
        self._model_bytes = self.path.read_bytes()
        self.device = device
        self.threads = threads
        self.large_batch = max(1, int(large_batch))
        self.on_out_of_range = on_out_of_range

        small_cuda = device == "cuda"
        self._small = self._session(threads=1, cuda=small_cuda)
        self._large: ort.InferenceSession | None = None
        meta = self._small.get_modelmeta().custom_metadata_map
        self.metadata: dict[str, Any] = (
            json.loads(meta[METADATA_KEY]) if METADATA_KEY in meta else {}
        )
        self.feature_names: tuple[str, ...] = tuple(
            self.metadata.get("feature_names", DEFAULT_FEATURE_NAMES)
        )
        self.tiers: tuple[str, ...] = tuple(self.metadata.get("tiers", DEFAULT_TIERS))
        self.output_names: tuple[str, ...] = tuple(o.name for o in self._small.get_outputs())
        summary = self.metadata.get("training_summary", {}) or {}
        ranges = summary.get("feature_ranges", {}) or {}
        #: Per feature, the training range and the supported range (see the module doc).
        self.training_ranges: dict[str, tuple[float, float]] = {
            name: (float(ranges[name][0]), float(ranges[name][1]))
            for name in self.feature_names
            if name in ranges
        }
        self.supported_ranges: dict[str, tuple[float, float]] = {
            name: supported_range(name, *bounds) for name, bounds in self.training_ranges.items()
        }
        self._low = np.array(
            [self.supported_ranges.get(name, (-np.inf, np.inf))[0] for name in self.feature_names],
            np.float64,
        )
        self._high = np.array(
            [self.supported_ranges.get(name, (-np.inf, np.inf))[1] for name in self.feature_names],
            np.float64,
        )
        tokens_range = summary.get("output_tokens_range")
        self._tokens_high = (
            OUTPUT_TOKENS_MULTIPLE * float(tokens_range[1]) if tokens_range else np.inf
        )
        # Above it the graph's decode factors would clip: refused like a feature's limit.
        self._tokens_limit = float(self.metadata.get("output_tokens_limit", np.inf))
        limits = self.metadata.get("feature_limits") or {}
        self._limits: dict[str, float] = {k: float(v) for k, v in limits.items()}
        # Idle bound buffers per batch size, oldest batch size first (see ``run``). Calls
        # take and return sets with list.pop / list.append, which are atomic; the dict
        # changes only under ``_lock``, which also guards the lazily made sessions.
        self._idle: dict[int, list[_BoundBuffers]] = {}
        self._lock = threading.Lock()
        self._budget: ort.InferenceSession | None = None

    # ------------------------------------------------------------------ sessions

    def _session(self, threads: int, cuda: bool) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if threads != 1:
            # A controller shares its cores: don't let idle pool threads spin.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if cuda and _cuda_usable():
            # TF32 would round matmul inputs to 10-bit mantissas: the prefill threshold test
            # and table row would be wrong, the decode network off by ~1e-3.
            providers: list[Any] = [
                ("CUDAExecutionProvider", {"use_tf32": "0"}),
                "CPUExecutionProvider",
            ]
            try:
                return ort.InferenceSession(self._model_bytes, options, providers=providers)
            except Exception:  # a provider that cannot start (driver, libraries): use the CPU
                pass
        return ort.InferenceSession(self._model_bytes, options, providers=["CPUExecutionProvider"])

    def _large_session(self) -> ort.InferenceSession:
        if self._large is None:
            with self._lock:  # one session, however many threads ask at once
                if self._large is None:
                    threads = self.threads or os.cpu_count() or 1
                    self._large = self._session(
                        threads=threads, cuda=self.device in ("auto", "cuda")
                    )
        return self._large

    @property
    def providers(self) -> dict[str, list[str]]:
        out = {"small_batch": self._small.get_providers()}
        if self._large is not None:
            out["large_batch"] = self._large.get_providers()
        return out

    # ------------------------------------------------------------------ queries

    def features_from_kwargs(
        self,
        *,
        tier: Any,
        top_k: Any,
        num_active_blocks: Any,
        vision_tokens: Any = None,
        text_tokens: Any = None,
    ) -> np.ndarray:
        """[B, 5] float32 feature matrix from per-column values (scalars broadcast)."""
        tier_idx = tier_to_index(tier, self.tiers)
        if vision_tokens is None:
            defaults = self.metadata.get("default_vision_tokens", DEFAULT_VISION_TOKENS)
            vision_tokens = np.array([defaults[self.tiers[int(t)]] for t in tier_idx], np.float32)
        if text_tokens is None:
            raise InputError("text_tokens is required")
        columns = {
            "vision_tokens": vision_tokens,
            "text_tokens": text_tokens,
            "tier_idx": tier_idx,
            "top_k": top_k,
            "num_active_blocks": num_active_blocks,
        }
        arrays = []
        for name in self.feature_names:
            try:
                arrays.append(np.atleast_1d(np.asarray(columns[name], dtype=np.float32)))
            except (TypeError, ValueError):
                raise InputError(f"{name} must be numeric, got {columns[name]!r}") from None
        try:
            return np.stack(np.broadcast_arrays(*arrays), axis=1)
        except ValueError:
            raise InputError("feature columns have different lengths") from None

    def predict(
        self,
        features: Any = None,
        output_tokens: Any = None,
        **columns: Any,
    ) -> dict[str, np.ndarray]:
        """Predict from ``features`` [B, 5] + ``output_tokens`` [B], or from keyword columns.

        Keyword form: ``vision_tokens``, ``text_tokens``, ``tier`` (name or index), ``top_k``,
        ``num_active_blocks`` (scalars or arrays); vision tokens default from the tier.
        Returns every output name -> float32 [B], plus ``out_of_range`` (bool [B]).
        """
        if features is None:
            if output_tokens is None:
                raise InputError("output_tokens is required")
            unknown = set(columns) - {
                "vision_tokens",
                "text_tokens",
                "tier",
                "top_k",
                "num_active_blocks",
            }
            if unknown:
                raise InputError(f"unknown argument(s): {', '.join(sorted(unknown))}")
            missing = [k for k in ("tier", "top_k", "num_active_blocks") if k not in columns]
            if missing:
                raise InputError(f"missing argument(s): {', '.join(missing)}")
            features = self.features_from_kwargs(**columns)
        elif columns:
            raise InputError("give either a features matrix or keyword columns, not both")
        x, n = self.checked(features, output_tokens)
        flags = self.out_of_range(x, n)
        if self.on_out_of_range != "flag" and flags.any():
            message = self._range_message(x, n, flags)
            if self.on_out_of_range == "error":
                raise InputError(message)
            if self.on_out_of_range == "warn":
                warnings.warn(message, OutOfRangeWarning, stacklevel=2)
        out = self.run(x, n)
        out["out_of_range"] = flags
        return out

    def checked(
        self, features: Any, second: Any, name: str = "output_tokens"
    ) -> tuple[np.ndarray, np.ndarray]:
        """``check_inputs`` + ``impossible_inputs``: validated float32 arrays, or InputError."""
        x, n = check_inputs(features, second, len(self.feature_names), name, self.feature_names)
        problems = impossible_inputs(x, self.feature_names, len(self.tiers), self._limits)
        if name == "output_tokens" and (n > self._tokens_limit).any():
            row = int(np.argmax(n > self._tokens_limit))
            problems.append(
                f"output_tokens must be <= {self._tokens_limit:g} (the exported graph's limit): "
                f"row {row} has {n[row]:g}"
            )
        if problems:
            raise InputError("impossible input: " + "; ".join(problems))
        return x, n

    def out_of_range(self, features: np.ndarray, output_tokens: np.ndarray) -> np.ndarray:
        """bool [B]: the row lies beyond the supported range (see the module doc)."""
        outside = (features < self._low) | (features > self._high)
        return outside.any(axis=1) | (output_tokens > self._tokens_high)

    def _range_message(self, x: np.ndarray, n: np.ndarray, flags: np.ndarray) -> str:
        parts = []
        for f, name in enumerate(self.feature_names):
            if ((x[:, f] < self._low[f]) | (x[:, f] > self._high[f])).any():
                low, high = self.training_ranges[name]
                parts.append(f"{name} (trained {low:g}-{high:g})")
        if (n > self._tokens_high).any():
            parts.append(
                f"output_tokens (beyond {OUTPUT_TOKENS_MULTIPLE:g}x the longest trained answer, "
                f"{self._tokens_high:g})"
            )
        return (
            f"{int(flags.sum())} of {len(flags)} rows outside the supported range of "
            f"{', '.join(parts)} (features: {EXTRAPOLATION_MARGIN:.0%} of the training range's "
            "width beyond it): predictions there are extrapolations"
        )

    def run(self, features: np.ndarray, output_tokens: np.ndarray) -> dict[str, np.ndarray]:
        """Run validated, contiguous float32 inputs (no checks: the hot path). Thread-safe."""
        batch = features.shape[0]
        if batch >= self.large_batch:
            session = self._large_session()
            values = session.run(None, {"features": features, "output_tokens": output_tokens})
            return dict(zip(self.output_names, values, strict=True))
        idle = self._idle.get(batch)
        if idle is None:
            idle = self._idle_list(batch)
        try:
            bound = idle.pop()
        except IndexError:  # every set of this size is in use (or none was made yet)
            bound = _BoundBuffers(self._small, batch, len(self.feature_names), self.output_names)
        np.copyto(bound.features, features)
        np.copyto(bound.output_tokens, output_tokens)
        self._small.run_with_iobinding(bound.binding)
        block = bound.outputs.copy()
        # Back to the pool only now: no other call wrote to these buffers meanwhile. A call
        # that raised drops its set instead (the garbage collector frees it).
        idle.append(bound)
        return dict(zip(self.output_names, block, strict=True))

    def _idle_list(self, batch: int) -> list[_BoundBuffers]:
        """The pool's list of idle sets of ``batch`` rows, made (and the oldest batch size
        dropped beyond ``MAX_BOUND_BATCH_SIZES``) under the lock. A dropped size's sets in
        use stay alive with their calls; they return to a list nobody reads any more."""
        with self._lock:
            idle = self._idle.get(batch)
            if idle is None:
                while len(self._idle) >= MAX_BOUND_BATCH_SIZES:
                    del self._idle[next(iter(self._idle))]
                idle = self._idle[batch] = []
            return idle

    # ------------------------------------------------------------------ budgets

    def feasible(
        self,
        features: Any,
        budget_ms: Any,
        output_tokens: Any = None,
        *,
        safety: float = 0.8,
        bound: str = "mean",
    ) -> np.ndarray:
        """The controller's budget rule per row (the rule of ``toolkit.controller``): the
        prefill (``prefill_ms`` or the ``bound``'s prefill bound) <= budget x ``safety`` and,
        when an expected ``output_tokens`` is given, the total <= budget: ``total_ms``, or the
        calibrated ``total_p90_ms`` / ``total_p95_ms`` for bound p90 / p95 (p50, which has no
        total bound: ``prefill_p50_ms`` + decode total)."""
        key = _BOUND_OUTPUTS.get(bound)
        if key is None:
            raise InputError(f"bound must be one of {', '.join(_BOUND_OUTPUTS)}, not {bound!r}")
        x = np.asarray(features, dtype=np.float32)
        tokens = np.ones(len(x), np.float32) if output_tokens is None else output_tokens
        out = self.predict(x, np.broadcast_to(np.asarray(tokens, np.float32), (len(x),)))
        budget = np.broadcast_to(np.asarray(budget_ms, dtype=np.float64), (len(x),))
        prefill = out[key].astype(np.float64)
        ok = prefill <= budget * safety
        if output_tokens is not None:
            total_key = _TOTAL_OUTPUTS.get(bound)
            if total_key is not None and total_key not in out:
                raise InputError(
                    f"{self.path.name} has no {total_key} output (exported by an older "
                    "latkit): re-export it to decide on the calibrated total bounds"
                )
            total = (
                out[total_key].astype(np.float64)
                if total_key is not None
                else prefill + out["decode_total_ms"].astype(np.float64)
            )
            ok &= total <= budget
        return np.asarray(ok)

    def max_output_tokens(self, features: Any, budget_ms: Any) -> dict[str, np.ndarray]:
        """Largest output length within ``budget_ms`` per row (0: even prefill does not fit),
        from the exported budget query ``latency_budget.onnx`` beside the predictor:
        ``max_output_tokens`` (``total_ms`` <= budget), ``max_output_tokens_p90`` /
        ``_p95`` (``total_p90_ms`` / ``total_p95_ms`` <= budget; 0 for an unbounded level)."""
        session = self._budget_session()
        x, budget = self.checked(features, budget_ms, "budget_ms")
        values = session.run(None, {"features": x, "budget_ms": budget})
        names = [o.name for o in session.get_outputs()]
        return {name: np.asarray(v).astype(np.int64) for name, v in zip(names, values, strict=True)}

    def _budget_session(self) -> ort.InferenceSession:
        if self._budget is None:
            path = self.path.with_name(BUDGET_FILE)
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no budget query beside the predictor")
            with self._lock:
                if self._budget is None:
                    options = ort.SessionOptions()
                    options.intra_op_num_threads = 1
                    self._budget = ort.InferenceSession(
                        str(path), options, providers=["CPUExecutionProvider"]
                    )
        return self._budget

    def __repr__(self) -> str:
        return f"LatencyPredictor({str(self.path)!r}, outputs={list(self.output_names)})"


def predict_table(predictor: LatencyPredictor, table: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Predict for a column mapping (dict of arrays, e.g. from a CSV reader)."""
    columns = {
        k: table[k]
        for k in ("vision_tokens", "text_tokens", "tier", "top_k", "num_active_blocks")
        if k in table
    }
    return predictor.predict(output_tokens=table["output_tokens"], **columns)
