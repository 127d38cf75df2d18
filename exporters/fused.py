"""The fused predictor: prefill lookup table + decode network, one torch module.

This module is what gets scripted to TorchScript and exported to ONNX. Its graph holds
only ordinary ops (matmul, compare, cast, gather and the decode network's arithmetic), so
ONNX Runtime's CUDA provider and libtorch run it as well as the CPU.

Per-call cost at batch 1 is dominated by the number of graph nodes (ONNX Runtime spends
~0.5 µs per node on a busy CPU, TorchScript more), so the decode side comes in two forms:

- :class:`FoldedDecode`: the trained ``DecodeNet`` with its input transform and
  standardisation folded into the first layer, its output scale and the closed-form
  prefix sums of the basis folded into one small matrix: about half the nodes.
- :class:`GenericDecode`: ``DecodeNet`` + ``decode_outputs`` exactly as the model defines
  them, used whenever folding does not apply or does not reproduce the model.

Which one was used is recorded in the metadata; the exporter proves either against the
Python model before writing a file.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from exporters.tree_table import PrefillTable
from toolkit.models.decode import decode_basis_prefix_sum, decode_outputs

log = logging.getLogger(__name__)

#: Output names in graph order: the four of the export contract, then the quantiles.
OUTPUT_NAMES: tuple[str, ...] = (
    "prefill_ms",
    "decode_total_ms",
    "decode_per_token_ms",
    "total_ms",
    "prefill_p90_ms",
    "prefill_p95_ms",
    "prefill_p50_ms",
)
INPUT_NAMES: tuple[str, ...] = ("features", "output_tokens")

# Decay of the saturating basis term exp(-m / TAU) the folded form expects (TAU = 8 passes);
# FoldedDecode.forward spells it as the literal -0.125 (TorchScript cannot read globals).
_FOLD_DECAY = -1.0 / 8.0


class GenericDecode(torch.nn.Module):
    """``(features, output_tokens) -> (decode_total_ms, decode_per_token_ms)``, unfolded."""

    def __init__(self, decode_net: torch.nn.Module) -> None:
        super().__init__()
        self.decode_net = decode_net

    def forward(self, features: Tensor, output_tokens: Tensor) -> tuple[Tensor, Tensor]:
        return decode_outputs(self.decode_net(features), output_tokens)


class FoldedDecode(torch.nn.Module):
    """The same function as :class:`GenericDecode` with constants folded (fewer ops).

    first layer:  W1 ((t(x) - mean) / std) + b1  ==  [log1p(max(x, 0)), x] @ W + b
    prefix sums:  coef_scale * S(m)              ==  [m, m^2, m^3, exp(-m/8)] @ A + a
    """

    if TYPE_CHECKING:  # buffers, declared for mypy only (TorchScript rejects the annotations)
        basis_matrix: Tensor
        basis_bias: Tensor
        exponents: Tensor

    def __init__(
        self,
        first: torch.nn.Linear,
        hidden: list[torch.nn.Linear],
        head: torch.nn.Linear,
        basis_matrix: Tensor,
        basis_bias: Tensor,
    ) -> None:
        super().__init__()
        self.first = first
        self.hidden = torch.nn.ModuleList(hidden)
        self.head = head
        self.register_buffer("basis_matrix", basis_matrix)  # [4, N_BASIS]
        self.register_buffer("basis_bias", basis_bias)  # [N_BASIS]
        self.register_buffer("exponents", torch.tensor([1.0, 2.0, 3.0]))

    def forward(self, features: Tensor, output_tokens: Tensor) -> tuple[Tensor, Tensor]:
        logged = torch.log1p(torch.clamp(features, min=0.0))
        h = torch.nn.functional.silu(self.first(torch.cat([logged, features], dim=1)))
        for layer in self.hidden:
            h = torch.nn.functional.silu(layer(h))
        coef = torch.nn.functional.softplus(self.head(h))
        passes = torch.relu(output_tokens - 1.0)  # [B]
        column = passes.unsqueeze(1)  # [B, 1]
        # One Pow node for m, m^2, m^3 (exponents broadcast), one Exp for the saturating term.
        powers = torch.cat([torch.pow(column, self.exponents), torch.exp(column * -0.125)], dim=1)
        prefix = torch.addmm(self.basis_bias, powers, self.basis_matrix)  # [B, N_BASIS]
        total = (coef * prefix).sum(1)
        # total is exactly 0 where passes == 0, so no select is needed for per-token.
        per_token = total / torch.clamp(passes, min=1.0)
        return total, per_token


class CalibratedDecode(torch.nn.Module):
    """A decode module moved to another machine by ``toolkit.models.calibration``:
    every pass ``a x pass + b``, so over m passes ``total' = a x total + b x m`` (still O(1))."""

    if TYPE_CHECKING:  # buffers, declared for mypy only (TorchScript rejects the annotations)
        scale: Tensor
        offset: Tensor

    def __init__(self, decode: torch.nn.Module, scale: float, offset_ms: float) -> None:
        super().__init__()
        self.decode = decode
        self.register_buffer("scale", torch.tensor(float(scale), dtype=torch.float32))
        self.register_buffer("offset", torch.tensor(float(offset_ms), dtype=torch.float32))

    def forward(self, features: Tensor, output_tokens: Tensor) -> tuple[Tensor, Tensor]:
        total, _ = self.decode(features, output_tokens)
        passes = torch.relu(output_tokens - 1.0)
        total = total * self.scale + passes * self.offset
        # 0 passes: total is exactly 0, so per-token is 0 without a select.
        return total, total / torch.clamp(passes, min=1.0)


def _fold_basis(coef_scale: Tensor) -> tuple[Tensor, Tensor] | None:
    """Express ``coef_scale * decode_basis_prefix_sum(m)`` as ``powers(m) @ A + a``.

    Solved by least squares on the model's own closed form in float64; None if the basis
    is not in that family (the residual must be at round-off level).
    """

    def design(m: Tensor) -> Tensor:
        return torch.stack([m, m * m, m**3, torch.exp(m * _FOLD_DECAY), torch.ones_like(m)], 1)

    # Fit on small m (well conditioned), verify far beyond: up to ~3e5 passes.
    fit_m = torch.arange(0, 48, dtype=torch.float64)
    with torch.no_grad():
        fit_target = decode_basis_prefix_sum(fit_m).to(torch.float64)  # [M, N_BASIS]
    fit_design = design(fit_m)
    col_scale = fit_design.abs().amax(0)
    solution = torch.linalg.lstsq(fit_design / col_scale, fit_target).solution
    solution = solution / col_scale.unsqueeze(1)
    # Clean round-off so that exact zeros stay zeros.
    tiny = solution.abs() < 1e-12 * solution.abs().amax(0, keepdim=True)
    solution = torch.where(tiny, torch.zeros_like(solution), solution)
    m = torch.cat(
        [
            torch.arange(0, 2000, dtype=torch.float64),
            torch.logspace(3.3, 5.5, 60, dtype=torch.float64),
        ]
    )
    with torch.no_grad():
        target = decode_basis_prefix_sum(m).to(torch.float64)
    err = (design(m) @ solution - target).abs() / target.abs().clamp(min=1e-3)
    if not bool(torch.isfinite(err).all()) or float(err.max()) > 1e-9:
        return None
    matrix = (solution * coef_scale.to(torch.float64).unsqueeze(0)).to(torch.float32)
    # S(0) = 0 and powers(0) = [0, 0, 0, 1]: a bias of exactly -A[3] makes every prefix sum
    # exactly 0 at m = 0 in float32, so decode outputs are exact zeros for output_tokens <= 1.
    return matrix[:4].contiguous(), (-matrix[3]).contiguous()


def fold_decode_net(decode_net: torch.nn.Module) -> FoldedDecode | None:
    """Fold a ``toolkit.models.decode.DecodeNet`` into :class:`FoldedDecode`, or None.

    Only the architecture the model module defines today is recognised (Linear + SiLU
    body, Linear head, softplus, ``log_mask`` / ``feature_mean`` / ``feature_std`` /
    ``coef_scale`` buffers); anything else keeps the generic form.
    """
    try:
        body = list(getattr(decode_net, "body"))  # noqa: B009  (typed access to a submodule)
        head = getattr(decode_net, "head")  # noqa: B009
        mask = _buffer(decode_net, "log_mask").to(torch.float64)
        mean = _buffer(decode_net, "feature_mean").to(torch.float64)
        std = _buffer(decode_net, "feature_std").to(torch.float64)
        scale = _buffer(decode_net, "coef_scale")
    except (AttributeError, TypeError):
        return None
    linears = body[0::2]
    activations = body[1::2]
    if (
        not linears
        or len(linears) != len(activations)
        or not all(isinstance(m, torch.nn.Linear) for m in linears)
        or not all(isinstance(a, torch.nn.SiLU) for a in activations)
        or not isinstance(head, torch.nn.Linear)
    ):
        return None
    basis = _fold_basis(scale)
    if basis is None:
        return None
    first = linears[0]
    w = first.weight.detach().to(torch.float64) / std.unsqueeze(0)  # [H, F]
    b = first.bias.detach().to(torch.float64) - w @ mean
    w_logged = w * mask.unsqueeze(0)
    w_raw = w * (1.0 - mask).unsqueeze(0)
    folded_first = torch.nn.Linear(2 * w.shape[1], w.shape[0])
    with torch.no_grad():
        folded_first.weight.copy_(torch.cat([w_logged, w_raw], dim=1).to(torch.float32))
        folded_first.bias.copy_(b.to(torch.float32))
    hidden = [_copy_linear(layer) for layer in linears[1:]]
    return FoldedDecode(folded_first, hidden, _copy_linear(head), basis[0], basis[1])


def _buffer(module: torch.nn.Module, name: str) -> Tensor:
    value = getattr(module, name)
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} is not a tensor")
    return value.detach()


def _copy_linear(layer: torch.nn.Linear) -> torch.nn.Linear:
    out = torch.nn.Linear(layer.in_features, layer.out_features)
    with torch.no_grad():
        out.weight.copy_(layer.weight)
        out.bias.copy_(layer.bias)
    return out


def decode_agrees(
    candidate: torch.nn.Module, reference: torch.nn.Module, features: np.ndarray
) -> float:
    """Largest relative difference of two decode modules over ``features`` x token counts."""
    tokens = np.array([0, 1, 2, 3, 5, 17, 64, 200, 1000, 4096, 65536], dtype=np.float32)
    x = torch.from_numpy(np.repeat(np.asarray(features, dtype=np.float32), len(tokens), axis=0))
    n = torch.from_numpy(np.tile(tokens, len(features)))
    worst = 0.0
    with torch.no_grad():
        for got, want in zip(candidate(x, n), reference(x, n), strict=True):
            diff = (got.double() - want.double()).abs()
            worst = max(worst, float((diff / want.double().abs().clamp(min=1e-6)).max()))
    return worst


class FusedPredictor(torch.nn.Module):
    """``forward(features [B,5] float32, output_tokens [B] float32)`` -> 7 tensors [B].

    Outputs in ``OUTPUT_NAMES`` order. The decode total for any output_tokens is a closed
    form (O(1) per row), never a loop over positions.
    """

    if TYPE_CHECKING:  # buffers, declared for mypy only (TorchScript rejects the annotations)
        select: Tensor
        thresholds: Tensor
        weights: Tensor
        table_mean: Tensor
        table_p50: Tensor
        table_p90: Tensor
        table_p95: Tensor

    def __init__(self, table: PrefillTable, decode: torch.nn.Module) -> None:
        super().__init__()
        select, thresholds, weights = table.flat_thresholds()
        self.register_buffer("select", torch.from_numpy(select))  # float64 [F, N] one-hot
        self.register_buffer("thresholds", torch.from_numpy(thresholds))  # float64 [N]
        # [N, 1], not [N]: ONNX Runtime's matrix-vector MatMul path is several times slower.
        self.register_buffer("weights", torch.from_numpy(weights))  # float64 [N, 1] strides
        # One column per output: gathering each directly saves a [B, 4] intermediate.
        columns = np.ascontiguousarray(table.table.T)
        self.register_buffer("table_mean", torch.from_numpy(columns[0].copy()))
        self.register_buffer("table_p50", torch.from_numpy(columns[1].copy()))
        self.register_buffer("table_p90", torch.from_numpy(columns[2].copy()))
        self.register_buffer("table_p95", torch.from_numpy(columns[3].copy()))
        self.decode = decode

    def cell_index(self, features: Tensor) -> Tensor:
        """Table row (int64 [B]) of float32 ``features`` [B, F].

        Two small float64 matmuls instead of gathers: ONNX Runtime's Gather along axis 1
        is ~20x slower per element, and float64 keeps both exact (see ``flat_thresholds``).
        """
        spread = torch.matmul(features.to(torch.float64), self.select)  # [B, N]
        # x >= t on float32 values is exactly XGBoost's "not left" test.
        hit = (spread >= self.thresholds).to(torch.float64)
        return torch.matmul(hit, self.weights).reshape(-1).to(torch.int64)

    def forward(
        self, features: Tensor, output_tokens: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        index = self.cell_index(features)
        prefill_ms = self.table_mean.index_select(0, index)
        decode_total, per_token = self.decode(features, output_tokens)
        return (
            prefill_ms,
            decode_total,
            per_token,
            prefill_ms + decode_total,
            self.table_p90.index_select(0, index),
            self.table_p95.index_select(0, index),
            self.table_p50.index_select(0, index),
        )


def make_decode(
    decode_net: torch.nn.Module, probe_features: np.ndarray
) -> tuple[torch.nn.Module, str]:
    """The folded decode if it reproduces the network within 1e-5 relative, else generic."""
    generic = GenericDecode(decode_net).eval()
    folded = fold_decode_net(decode_net)
    if folded is not None:
        folded.eval()
        worst = decode_agrees(folded, generic, probe_features)
        if worst <= 1e-5:
            return folded, "folded"
        log.info("folded decode differs by %.3g relative; exporting the generic form", worst)
    return generic, "generic"
