"""The fused predictor: prefill lookup table + decode network, one torch module.

This module is what gets scripted to TorchScript and exported to ONNX. Its graph holds
only ordinary ops (Gemm, Sign, MatMul, Cast, Gather, Pow and a few elementwise ops), so
ONNX Runtime's CUDA provider and libtorch run it as well as the CPU.

A batch-1 query costs ONNX Runtime about 0.4 µs per graph node on this project's CPUs,
whatever the node computes, so the graph is laid out for few nodes (18 after ONNX
Runtime's own Gemm + activation fusion, for the default one-layer network):

- one Gemm + clip-to-[0, 1] (ONNX ``HardSigmoid`` with alpha 1, beta 0, which ONNX Runtime
  fuses into the Gemm) serves both models. Its first columns are
  ``clip(a_t * (x_f - prev(t)), 0, 1)`` for every split threshold t of feature f, with
  ``prev(t)`` the float32 just below t and ``a_t`` a power of two no smaller than
  1 / (t - prev(t)): exactly 1 where ``x_f >= t`` (XGBoost's "not left" test on float32
  values) and exactly 0 elsewhere. The other columns are the decode network's first
  layer, standardisation folded in and scaled by 2**-40 so that the clip never binds
  (``clip(2**-40 z, 0, 1) = 2**-40 relu(z)`` bit for bit; the next layer's weights carry
  2**40): the network is still the trained ReLU network;
- one MatMul with the strides (zero on the network's columns) gives the table row,
  exact in float32 (integers below 2**24); Gathers read the four prefill tables;
- the closed-form totals: ``relu(N * s - s)`` gives ``s_j * m`` (m = N - 1 passes) per
  basis power, one ``Pow`` gives ``(s_j m)^(j+1)`` = coefficient scale x basis prefix
  sum, and ``(coef * powers).sum`` is the decode total.

ONNX Runtime's MatMul with a 1-D right operand is several times slower than with an
[N, 1] matrix (1.3 µs more at batch 1, 12x at batch 4096), hence ``[N, 1]`` + reshape.

TF32: on a GPU that rounds float32 matmul inputs to TF32 (ONNX Runtime's CUDA provider
does unless ``use_tf32=0``), the threshold Gemm and the row MatMul are not exact. The
runtime (``exporters.runtime``) always disables TF32; anyone embedding the file on CUDA
must do the same (the file's metadata says so).

:class:`GenericDecode` (the model's own ``DecodeNet`` and ``decode_outputs``) remains for
``export --no-fold``: a slower graph, useful to tell a folding bug from a model bug.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from exporters.tree_table import PrefillTable
from toolkit.errors import LatkitError
from toolkit.models.decode import K0, N_BASIS, decode_outputs

log = logging.getLogger(__name__)

INPUT_NAMES: tuple[str, ...] = ("features", "output_tokens")
#: Largest table the float32 row index addresses exactly.
MAX_EXACT_CELLS = 1 << 24
#: Scale of the decode network's first-layer columns in the shared Gemm (see the module doc).
HIDDEN_SCALE = 2.0**-40
# |prev(t)| below this has no power-of-two threshold scale in float32 (see threshold_columns).
_TINY_THRESHOLD = 2.0**-100


class GenericDecode(torch.nn.Module):
    """Decode totals exactly as the model defines them (``DecodeNet`` + ``decode_outputs``),
    with an optional recalibration ``pass -> a x pass + b``: ``total' = a total + b m``."""

    if TYPE_CHECKING:  # buffers, declared for mypy only (TorchScript rejects the annotations)
        scale: Tensor
        offset: Tensor

    def __init__(
        self, decode_net: torch.nn.Module, scale: float = 1.0, offset_ms: float = 0.0
    ) -> None:
        super().__init__()
        self.decode_net = decode_net
        self.register_buffer("scale", torch.tensor(float(scale), dtype=torch.float32))
        self.register_buffer("offset", torch.tensor(float(offset_ms), dtype=torch.float32))

    def coefficients(self, first: Tensor, features: Tensor) -> Tensor:
        return self.decode_net(features)

    def totals(self, coef: Tensor, output_tokens: Tensor) -> tuple[Tensor, Tensor]:
        total, _ = decode_outputs(coef, output_tokens)
        passes = torch.relu(output_tokens - 1.0)
        total = total * self.scale + passes * self.offset
        # 0 passes: total is exactly 0, so per-token is 0 without a select.
        return total, total / torch.clamp(passes, min=1.0)


class FoldedDecode(torch.nn.Module):
    """The same function as :class:`GenericDecode`, folded for few graph nodes.

    ``coefficients`` takes the first layer's activations (computed by the caller, which
    shares that Gemm with the prefill thresholds and scales them by ``2**-40``) and returns
    the ``N_BASIS`` softplus outputs. ``totals`` evaluates ``sum_j coef_j (s_j m)^(j+1)``
    (+ ``b m`` when recalibrated).
    """

    if TYPE_CHECKING:  # buffers, declared for mypy only (TorchScript rejects the annotations)
        token_weight: Tensor
        token_bias: Tensor
        exponents: Tensor
        offset: Tensor

    def __init__(
        self,
        layers: list[torch.nn.Linear],
        head: torch.nn.Linear,
        powers_scale: Tensor,
        offset_ms: float = 0.0,
    ) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)
        self.head = head
        self.register_buffer("token_weight", powers_scale.reshape(1, -1).clone())  # [1, K]
        self.register_buffer("token_bias", -powers_scale.clone())  # [K]
        self.register_buffer("exponents", torch.arange(1, N_BASIS + 1, dtype=torch.float32))
        self.register_buffer("offset", torch.tensor(float(offset_ms), dtype=torch.float32))
        self.has_offset = offset_ms != 0.0

    @torch.jit.unused
    def reading_after(self, skip: int, input_scale: float) -> FoldedDecode:
        """A copy whose first layer reads ``skip`` leading columns (the thresholds) with
        weight 0 and the rest scaled by ``input_scale`` (a power of two: exact)."""
        readers = [*self.layers, self.head]  # the first one reads the shared Gemm
        copies = [_copy_linear(readers[0], skip, input_scale)]
        copies += [_copy_linear(layer) for layer in readers[1:]]
        copy = FoldedDecode(
            copies[:-1], copies[-1], self.token_weight.reshape(-1), float(self.offset)
        )
        return copy.eval()

    def coefficients(self, first: Tensor, features: Tensor) -> Tensor:
        h = first
        for layer in self.layers:
            h = torch.relu(layer(h))
        return torch.nn.functional.softplus(self.head(h))

    def totals(self, coef: Tensor, output_tokens: Tensor) -> tuple[Tensor, Tensor]:
        scaled = torch.relu(
            torch.addmm(self.token_bias, output_tokens.unsqueeze(1), self.token_weight)
        )
        total = (coef * torch.pow(scaled, self.exponents)).sum(1)
        passes = output_tokens - 1.0
        if self.has_offset:
            total = total + torch.relu(passes) * self.offset
        # 0 passes: total is exactly 0 ((s * 0)^j = 0), so per-token is 0 without a select.
        return total, total / torch.clamp(passes, min=1.0)


@dataclass(frozen=True)
class FoldedPair:
    """A folded decode network: its first layer (standardisation folded in; the caller runs
    it, with ReLU) and the rest."""

    first: torch.nn.Linear
    decode: FoldedDecode


def fold_decode_net(
    decode_net: torch.nn.Module, scale: float = 1.0, offset_ms: float = 0.0
) -> FoldedPair | None:
    """The network as a :class:`FoldedPair` (a recalibration folded in too), or None.

    Only the architecture ``toolkit.models.decode.DecodeNet`` defines is recognised
    (Linear + ReLU body, Linear head, softplus, ``feature_mean`` / ``feature_std`` /
    ``coef_scale`` buffers); anything else returns None and keeps the generic form.
    """
    try:
        body = list(getattr(decode_net, "body"))  # noqa: B009  (typed access to a submodule)
        head = getattr(decode_net, "head")  # noqa: B009
        mean = _buffer(decode_net, "feature_mean").to(torch.float64)
        std = _buffer(decode_net, "feature_std").to(torch.float64)
        coef_scale = _buffer(decode_net, "coef_scale").to(torch.float64)
    except (AttributeError, TypeError):
        return None
    linears = body[0::2]
    activations = body[1::2]
    if (
        not linears
        or len(linears) != len(activations)
        or not all(isinstance(m, torch.nn.Linear) for m in linears)
        or not all(isinstance(a, torch.nn.ReLU) for a in activations)
        or not isinstance(head, torch.nn.Linear)
        or head.out_features != N_BASIS
        or coef_scale.shape != (N_BASIS,)
        or not bool((coef_scale > 0).all())
        or not scale > 0
    ):
        return None
    first = linears[0]
    w = first.weight.detach().to(torch.float64) / std.unsqueeze(0)  # [H, F]
    b = first.bias.detach().to(torch.float64) - w @ mean
    folded_first = torch.nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        folded_first.weight.copy_(w.to(torch.float32))
        folded_first.bias.copy_(b.to(torch.float32))
    # coef_j K0 (m / K0)^(j+1) x scale = softplus_j x (s_j m)^(j+1)
    powers = torch.arange(1, N_BASIS + 1, dtype=torch.float64)
    s = (scale * coef_scale * K0) ** (1.0 / powers) / K0
    decode = FoldedDecode(
        [_copy_linear(layer) for layer in linears[1:]],
        _copy_linear(head),
        s.to(torch.float32),
        offset_ms,
    )
    return FoldedPair(folded_first, decode.eval())


def _buffer(module: torch.nn.Module, name: str) -> Tensor:
    value = getattr(module, name)
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} is not a tensor")
    return value.detach()


def _copy_linear(
    layer: torch.nn.Module, skip: int = 0, input_scale: float = 1.0
) -> torch.nn.Linear:
    """A copy of ``layer`` that reads ``skip`` extra leading input columns with weight 0 and
    expects its inputs multiplied by ``input_scale``."""
    if not isinstance(layer, torch.nn.Linear):
        raise TypeError(f"expected a Linear layer, got {type(layer).__name__}")
    out = torch.nn.Linear(layer.in_features + skip, layer.out_features)
    with torch.no_grad():
        out.weight.zero_()
        out.weight[:, skip:].copy_(layer.weight / input_scale)
        out.bias.copy_(layer.bias)
    return out


def threshold_columns(table: PrefillTable) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The table's split tests as first-layer columns, float32.

    Returns ``weight`` [F, N] (column j is ``a_j`` times the one-hot of the feature that
    threshold j belongs to), ``bias`` [N] (``-a_j prev(t_j)``) and ``strides`` [N], so that
    ``clip(x @ weight + bias, 0, 1) @ strides`` is the row index. Why it is exact: scaling
    by a power of two commutes with float32 rounding, so the Gemm yields
    ``a_j * fl(x_f - prev(t_j))`` (the other features enter as ``0 * x``, exact for finite
    x); that difference is never 0 and keeps its sign for ``x_f != prev(t_j)``, and when
    positive it is at least ``t_j - prev(t_j)``, which ``a_j`` lifts to >= 1. Overflow to
    +-inf still lands on the right side.
    """
    n_features = len(table.thresholds)
    # Trees without a split still get one column, never hit (0 x - 1), so no tensor is empty.
    n_total = max(1, sum(len(t) for t in table.thresholds))
    weight = np.zeros((n_features, n_total), dtype=np.float32)
    bias = np.full(n_total, -1.0, dtype=np.float32)
    strides = np.zeros(n_total, dtype=np.float32)
    j = 0
    for f, values in enumerate(table.thresholds):
        t = np.asarray(values, dtype=np.float32)
        below = np.nextafter(t, np.float32(-np.inf))
        if not (np.isfinite(below).all() and (np.abs(below) >= _TINY_THRESHOLD).all()):
            bad = t[~(np.isfinite(below) & (np.abs(below) >= _TINY_THRESHOLD))][0]
            raise LatkitError(
                f"prefill split threshold {bad!r} of feature {f} is too close to 0 (or not "
                "finite) for the exported graph's exact threshold test"
            )
        gap = t.astype(np.float64) - below.astype(np.float64)
        scale = np.exp2(np.ceil(-np.log2(gap)))
        n = len(t)
        weight[f, j : j + n] = scale
        bias[j : j + n] = -(scale * below.astype(np.float64))  # exact: a power-of-two scaling
        strides[j : j + n] = float(table.strides[f])
        j += n
    return weight, bias, strides


class FusedPredictor(torch.nn.Module):
    """``forward(features [B,5] float32, output_tokens [B] float32)`` -> 7 tensors [B].

    Outputs in ``toolkit.features.OUTPUT_NAMES`` order. The decode total for any
    output_tokens is a closed form (O(1) per row), never a loop over positions.
    """

    if TYPE_CHECKING:  # buffers, declared for mypy only (TorchScript rejects the annotations)
        first_weight: Tensor
        first_bias: Tensor
        strides: Tensor
        table_mean: Tensor
        table_p50: Tensor
        table_p90: Tensor
        table_p95: Tensor
        decode: GenericDecode | FoldedDecode

    def __init__(self, table: PrefillTable, decode: GenericDecode | FoldedPair) -> None:
        """``decode``: a :class:`GenericDecode`, or a :class:`FoldedPair` whose first layer
        then shares the threshold Gemm."""
        super().__init__()
        if table.n_cells > MAX_EXACT_CELLS:
            raise LatkitError(
                f"prefill table of {table.n_cells:,} cells is above the {MAX_EXACT_CELLS:,} "
                "a float32 row index addresses exactly; retrain with a smaller max_bin"
            )
        weight, bias, strides = threshold_columns(table)
        n_thresholds = weight.shape[1]
        first_weight = torch.from_numpy(weight)  # [F, N]
        first_bias = torch.from_numpy(bias)
        index_weight = torch.from_numpy(strides)
        module = decode if isinstance(decode, GenericDecode) else decode.decode
        if isinstance(decode, FoldedPair):
            first = decode.first
            hidden_weight = first.weight.detach().T * HIDDEN_SCALE
            first_weight = torch.cat([first_weight, hidden_weight], dim=1)
            first_bias = torch.cat([first_bias, first.bias.detach() * HIDDEN_SCALE])
            index_weight = torch.cat([index_weight, torch.zeros(first.out_features)])
            module = decode.decode.reading_after(n_thresholds, HIDDEN_SCALE)
        self.register_buffer("first_weight", first_weight.contiguous())  # [F, N (+ H)]
        self.register_buffer("first_bias", first_bias.contiguous())
        # [N, 1], not [N]: see the module doc.
        self.register_buffer("strides", index_weight.reshape(-1, 1).contiguous())
        # One column per output: gathering each directly saves a [B, 4] intermediate.
        columns = np.ascontiguousarray(table.table.T)
        self.register_buffer("table_mean", torch.from_numpy(columns[0].copy()))
        self.register_buffer("table_p50", torch.from_numpy(columns[1].copy()))
        self.register_buffer("table_p90", torch.from_numpy(columns[2].copy()))
        self.register_buffer("table_p95", torch.from_numpy(columns[3].copy()))
        self.decode = module

    def first_layer(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """(shared first-layer activations, table row int64 [B]) of ``features`` [B, F]."""
        # hardtanh(., 0, 1) exports as HardSigmoid(alpha=1, beta=0) (exporters.export).
        first = torch.nn.functional.hardtanh(
            torch.addmm(self.first_bias, features, self.first_weight), 0.0, 1.0
        )
        index = torch.matmul(first, self.strides).reshape(-1).to(torch.int64)
        return first, index

    def forward(
        self, features: Tensor, output_tokens: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        first, index = self.first_layer(features)
        prefill_ms = self.table_mean.index_select(0, index)
        coef = self.decode.coefficients(first, features)
        decode_total, per_token = self.decode.totals(coef, output_tokens)
        return (
            prefill_ms,
            decode_total,
            per_token,
            prefill_ms + decode_total,
            self.table_p90.index_select(0, index),
            self.table_p95.index_select(0, index),
            self.table_p50.index_select(0, index),
        )


def decode_agreement(
    candidate: FusedPredictor, reference: FusedPredictor, features: np.ndarray
) -> float:
    """Largest relative difference of the decode outputs of two predictors over
    ``features`` x a spread of token counts (0, 1, 2, ..., 65536)."""
    tokens = np.array([0, 1, 2, 3, 5, 17, 64, 200, 1000, 4096, 65536], dtype=np.float32)
    x = torch.from_numpy(np.repeat(np.asarray(features, dtype=np.float32), len(tokens), axis=0))
    n = torch.from_numpy(np.tile(tokens, len(features)))
    worst = 0.0
    with torch.no_grad():
        got, want = candidate(x, n), reference(x, n)
    for i in (1, 2):  # decode_total_ms, decode_per_token_ms
        diff = (got[i].double() - want[i].double()).abs()
        worst = max(worst, float((diff / want[i].double().abs().clamp(min=1e-6)).max()))
    return worst
