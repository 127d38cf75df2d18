"""The fused predictor: physics baseline x tree table + decode network, one torch module.

This module is what gets scripted to TorchScript and exported to ONNX. Its graph holds only
ordinary ops (Concat, Gemm, MatMul, Cast, Gather, Slice, ReduceProd, Softplus, Split and a few
elementwise ops), so ONNX Runtime's CUDA provider and libtorch run it as well as the CPU.

A batch-1 query costs ONNX Runtime about 0.2-0.7 µs per graph node on this project's CPUs
(``benchmarks/predictor_speed.py`` prints each node's cost), so the graph is laid out for few
nodes and narrow tensors:

- the inputs are joined into ``X = [features, output_tokens]`` [B, 6];
- one Gemm + clip-to-[0, 1] (ONNX ``HardSigmoid`` with alpha 1, beta 0, which ONNX Runtime
  fuses into the Gemm) computes, side by side:

  * ``clip(a_t * (x_f - prev(t)), 0, 1)`` for every split threshold t of feature f, with
    ``prev(t)`` the float32 just below t and ``a_t`` a power of two no smaller than
    1 / (t - prev(t)): exactly 1 where ``x_f >= t`` (XGBoost's "not left" test on float32
    values) and exactly 0 elsewhere;
  * the nine linear factors of the physics baseline (``PhysicsBaseline.product_form``: a
    sum of three products of three linear forms), each scaled by a power of two so that it
    stays below 1 (the clip never binds) for every input up to ``FEATURE_LIMITS``;
  * the factors of the decode terms (``DECODE_TERMS``): ``m = relu(N - 1) 2^-24`` (the
    passes), ``q = (P + N / 2) 2^-26`` (the mean KV length over the passes, P the prompt),
    ``ind = [N > 1]`` (exact for float32 N: ``clip((N - 1) 2^23, 0, 1)``), the constant 1
    and the physics prior's linear factors ``B = blocks``, ``K = a1 + a2 top_k``,
    ``C = c0 + c1 blocks`` (``toolkit.models.decode``; scaled by powers of two like the
    baseline's);
  * the decode network's first layer, standardisation folded in and scaled by 2**-40 so
    that the clip never binds (``clip(2**-40 z, 0, 1) = 2**-40 relu(z)`` bit for bit; the
    next layer's weights carry 2**40).

  The first columns are the product block, laid out so that a Slice and a Reshape to
  [B, 3, n] put the three factors of each product on one axis: one ReduceProd yields the
  n = 9 products, the baseline's three and the decode products ``m``, ``m q C``, ``m B K``,
  ``ind``, ``ind q C``, ``ind B K`` (a block of its own, so that everything after it is 9
  columns wide, not as wide as the split tests);
- one MatMul with the strides gives the table row, exact in float32 (integers below 2**24);
  a Cast and a Gather read the residual factor, one Mul applies it to the products, and a
  second Gather reads the cell's floor in ms (the prefill is ``max(floor, baseline x
  residual factor)``, ``toolkit.models.prefill_table``);
- the decode network's head (Gemm + Softplus) gives, for every product, the coefficient that
  multiplies it: 0 for the baseline's (bias -inf), and the network's factors ``f_a`` (of the
  constant per pass) and ``f_c`` (of the slope over the KV length; ``toolkit.models.decode``)
  for the decode products; one Mul gives the decode terms. With the prior's a0 in the output
  Gemm's weights, the decode total over m passes, ``a m + c m (P + N / 2) / 1024`` with
  ``a = f_a (a0 + B K)`` and ``c = f_c C``, and the mean pass, ``[N > 1] (a + c (P + N / 2)
  / 1024)``, are linear in those six columns: no division;
- ONE output Gemm maps the concatenated products, floor and decode terms to every output at
  once (transposed: [36, B]): the calibration scale, the powers of two of the factor scaling
  and every bound factor are in its weights, the calibration offsets in its bias. Its four
  quarters are the candidates each output is the max of: the output through the products,
  through the floor (the prefill's max distributes over everything affine in it with a
  positive factor), and for a total bound (``max(prefill_ms x f_p + decode_total_ms x f_d,
  prefill_pXX_ms)``, ``toolkit.models.bounds``) the prefill bound through either; -inf where
  an output has fewer. A Reshape to [4, 9B] and one ReduceMax take the max, one Split
  (``num_outputs=9``) hands out the rows. A bound level with an infinite factor (too few
  calibration samples) is the constant +inf: weight 0, bias +inf.

ONNX Runtime's MatMul with a 1-D right operand is several times slower than with an
[N, 1] matrix (1.3 µs more at batch 1, 12x at batch 4096), hence ``[N, 1]``.

TF32: on a GPU that rounds float32 matmul inputs to TF32 (ONNX Runtime's CUDA provider
does unless ``use_tf32=0``), the threshold Gemm and the row MatMul are not exact. The
runtime (``exporters.runtime``) always disables TF32; anyone embedding the file on CUDA
must do the same (the file's metadata says so).

:class:`GenericDecode` (the model's own ``DecodeNet`` and ``decode_outputs``) remains for
``export --no-fold``: a slower graph, useful to tell a folding bug from a model bug.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import numpy as np
import torch
from torch import Tensor

from exporters.tree_table import PrefillTable
from toolkit.errors import LatkitError
from toolkit.features import FEATURE_NAMES, OUTPUT_NAMES
from toolkit.models.decode import (
    BLOCKS_COLUMN,
    IDENTITY_PRIOR,
    KV_UNIT,
    N_BASIS,
    TOP_K_COLUMN,
    decode_outputs,
    prior_coefficients,
)

log = logging.getLogger(__name__)

INPUT_NAMES: tuple[str, ...] = ("features", "output_tokens")
#: Largest table the float32 row index addresses exactly.
MAX_EXACT_CELLS = 1 << 24
#: Scale of the decode network's first-layer columns in the shared Gemm (see the module doc).
HIDDEN_SCALE = 2.0**-40
#: Largest feature values (``FEATURE_NAMES`` order) for which the graph's baseline factors stay
#: below the clip at 1, i.e. the graph computes the model exactly: token counts up to 2**24
#: (where float32 stops counting exactly), top_k and blocks up to 2**16. The runtime refuses
#: larger inputs.
FEATURE_LIMITS: tuple[float, ...] = (2.0**24, 2.0**24, 2.0, 2.0**16, 2.0**16)
#: Largest output_tokens for which the decode factors stay below the clip (refused above).
OUTPUT_TOKENS_LIMIT: Final[float] = 2.0**24
#: Scales of the decode factors (module doc): powers of two, so scaling changes no rounding.
M_SCALE: Final[float] = 2.0**-24
Q_SCALE: Final[float] = 2.0**-26
IND_GAIN: Final[float] = 2.0**23
#: softplus(CONST_LOGIT) == CONST_LOGIT in float32 (the correction is below 1e-13): a head
#: row with zero weights and this bias passes its product through, times CONST_LOGIT. Used
#: for a recalibration's per-pass offset, which multiplies the passes, not a coefficient.
CONST_LOGIT: Final[float] = 32.0
#: Rows of the output Gemm, in graph order.
GEMM_ROWS: tuple[str, ...] = OUTPUT_NAMES
#: The decode products of the folded form (factors of one product; "1" is the constant), and
#: which head coefficient multiplies each: "a", "c" or "const" (recalibration offset only).
#: With the physics prior (``toolkit.models.decode``) ``a = f_a (a0 + b (a1 + a2 k))`` and
#: ``c = f_c (c0 + c1 b)``, ``f`` the network's factors: ``a m = f_a (a0 m + m B K)`` and
#: ``c m q = f_c m q C`` with the linear factors ``B = b``, ``K = a1 + a2 k`` and
#: ``C = c0 + c1 b`` (each scaled by a power of two, ``prior_factor_scales``), a0 in the
#: output Gemm's weights.
DECODE_TERMS: Final[tuple[tuple[tuple[str, str, str], str], ...]] = (
    (("m", "1", "1"), "a"),
    (("m", "q", "C"), "c"),
    (("m", "B", "K"), "a"),
    (("ind", "1", "1"), "a"),
    (("ind", "q", "C"), "c"),
    (("ind", "B", "K"), "a"),
)
OFFSET_TERMS: Final[tuple[tuple[tuple[str, str, str], str], ...]] = (
    (("m", "1", "1"), "const"),
    (("ind", "1", "1"), "const"),
)
# |prev(t)| below this has no power-of-two threshold scale in float32 (see threshold_columns).
_TINY_THRESHOLD = 2.0**-100
# Factors of one product, and baseline products (see PhysicsBaseline.product_form).
_FACTORS = 3
_PRODUCTS = 3
# Column of output_tokens in X = [features, output_tokens].
_N = len(FEATURE_NAMES)
_V, _T = FEATURE_NAMES.index("vision_tokens"), FEATURE_NAMES.index("text_tokens")


def prior_factor_scales(prior: Sequence[float]) -> dict[str, float]:
    """Per prior factor ("B", "K", "C"; ``DECODE_TERMS``), the power of two its column is
    scaled by so that it stays <= 1 for every input up to ``FEATURE_LIMITS``."""
    _a0, a1, a2, c0, c1 = (float(v) for v in prior)
    k_limit, b_limit = FEATURE_LIMITS[TOP_K_COLUMN], FEATURE_LIMITS[BLOCKS_COLUMN]
    uppers = {"B": b_limit, "K": a1 + a2 * k_limit, "C": c0 + c1 * b_limit}
    return {name: 2.0 ** -math.ceil(math.log2(max(upper, 1.0))) for name, upper in uppers.items()}


def decode_factor_column(
    name: str, prior: Sequence[float] = IDENTITY_PRIOR
) -> tuple[np.ndarray, float]:
    """(weight over X [F + 1], bias) of a decode factor (module doc)."""
    weight = np.zeros(len(FEATURE_NAMES) + 1)
    if name in ("B", "K", "C"):
        _a0, a1, a2, c0, c1 = (float(v) for v in prior)
        scale = prior_factor_scales(prior)[name]
        if name == "B":
            weight[BLOCKS_COLUMN] = scale
            return weight, 0.0
        if name == "K":
            weight[TOP_K_COLUMN] = a2 * scale
            return weight, a1 * scale
        weight[BLOCKS_COLUMN] = c1 * scale
        return weight, c0 * scale
    if name == "m":
        weight[_N] = M_SCALE
        return weight, -M_SCALE
    if name == "q":
        weight[[_V, _T]] = Q_SCALE
        weight[_N] = 0.5 * Q_SCALE
        return weight, 0.0
    if name == "ind":
        weight[_N] = IND_GAIN
        return weight, -IND_GAIN
    if name == "1":
        return weight, 1.0
    raise ValueError(f"unknown decode factor {name!r}")


class GenericDecode(torch.nn.Module):
    """Decode totals exactly as the model defines them (``DecodeNet`` + ``decode_outputs``),
    with an optional recalibration ``pass -> a x pass + b``: the coefficients become
    ``(a coef_0 + b, a coef_1)``, which is the same map (the basis' first term is 1)."""

    if TYPE_CHECKING:  # buffers, declared for mypy only (TorchScript rejects the annotations)
        coef_scale: Tensor
        coef_offset: Tensor

    def __init__(
        self, decode_net: torch.nn.Module, scale: float = 1.0, offset_ms: float = 0.0
    ) -> None:
        super().__init__()
        self.decode_net = decode_net
        self.register_buffer("coef_scale", torch.full((N_BASIS,), float(scale)))
        offset = torch.zeros(N_BASIS)
        offset[0] = float(offset_ms)
        self.register_buffer("coef_offset", offset)

    def coefficients(self, first: Tensor, inputs: Tensor) -> Tensor:
        """Calibrated per-pass coefficients [B, N_BASIS] (ms, ms per KV_UNIT tokens)."""
        return self.decode_net(inputs[:, :5]) * self.coef_scale + self.coef_offset

    def totals(self, coef: Tensor, output_tokens: Tensor, prompt: Tensor) -> tuple[Tensor, Tensor]:
        return decode_outputs(coef, output_tokens, prompt)

    def columns(self, first: Tensor, inputs: Tensor, products: Tensor) -> list[Tensor]:
        """Inputs of the output Gemm: the decode total and the mean pass, [B, 1] each."""
        coef = self.coefficients(first, inputs)
        total, per_token = self.totals(coef, inputs[:, 5], inputs[:, 0] + inputs[:, 1])
        return [total.unsqueeze(1), per_token.unsqueeze(1)]

    @torch.jit.unused
    def column_weights(self) -> tuple[np.ndarray, np.ndarray]:
        """(decode total, mean pass) as weights of :meth:`columns`."""
        return np.array([1.0, 0.0]), np.array([0.0, 1.0])

    @torch.jit.unused
    def product_terms(self) -> tuple[tuple[str, str, str], ...]:
        return ()


class FoldedDecode(torch.nn.Module):
    """The same function as :class:`GenericDecode`, folded for few graph nodes (module doc).

    ``head`` has one output per product: ``start`` leading rows for the baseline's products
    (zero weights, bias -inf: softplus 0, so they add nothing), then one per decode term
    (``terms``): the network head's row of the term's coefficient ("a": row 0, "c": row 1), or
    zero weights and bias ``CONST_LOGIT`` ("const"). ``columns`` multiplies their softplus with
    all the products at once (no Slice); ``coef_scale`` / ``coef_offset`` turn the softplus of
    the first "a" and "c" rows into the calibrated coefficients (the budget graph's closed
    form).
    """

    if TYPE_CHECKING:  # buffers, declared for mypy only (TorchScript rejects the annotations)
        coef_scale: Tensor
        coef_offset: Tensor
        prior: Tensor

    def __init__(
        self,
        layers: list[torch.nn.Linear],
        head: torch.nn.Linear,
        terms: tuple[tuple[tuple[str, str, str], str], ...],
        coef_scale: Tensor,
        offset_ms: float = 0.0,
        start: int = 0,
        prior: Tensor | None = None,
    ) -> None:
        super().__init__()
        if head.out_features != start + len(terms) or coef_scale.shape != (N_BASIS,):
            raise ValueError("FoldedDecode needs one head output per product")
        if [source for _, source in terms[:2]] != ["a", "c"]:
            raise ValueError("the first two decode terms must read the coefficients a and c")
        self.layers = torch.nn.ModuleList(layers)
        self.head = head
        self.terms = terms
        self.start = int(start)
        self.register_buffer("coef_scale", coef_scale.to(torch.float32).clone())
        offset = torch.zeros(N_BASIS)
        offset[0] = float(offset_ms)
        self.register_buffer("coef_offset", offset)
        if prior is None:
            prior = torch.tensor(IDENTITY_PRIOR)
        self.register_buffer("prior", prior.to(torch.float32).clone())

    @torch.jit.unused
    def reading(
        self, slots: np.ndarray, width: int, input_scale: float, start: int
    ) -> FoldedDecode:
        """A copy whose first layer reads the ``width`` columns of the shared Gemm: its inputs
        at column ``slots[i]``, scaled by ``input_scale`` (a power of two: exact), weight 0
        on every other column; its decode products start at product ``start`` (the head gets
        ``start`` leading rows that give 0)."""
        readers = [*self.layers, self.head]  # the first one reads the shared Gemm
        copies = [_copy_linear(readers[0], slots, width, input_scale)]
        copies += [_copy_linear(layer) for layer in readers[1:]]
        head = _leading_zero_rows(copies[-1], start - self.start)
        copy = FoldedDecode(
            copies[:-1],
            head,
            self.terms,
            self.coef_scale.clone(),
            float(self.coef_offset[0]),
            start,
            self.prior,
        )
        return copy.eval()

    def softplus(self, first: Tensor) -> Tensor:
        h = first
        for layer in self.layers:
            h = torch.relu(layer(h))
        return torch.nn.functional.softplus(self.head(h))

    def coefficients(self, first: Tensor, inputs: Tensor) -> Tensor:
        """Calibrated per-pass coefficients [B, N_BASIS] (ms, ms per KV_UNIT tokens)."""
        rows = self.softplus(first)[:, self.start : self.start + 2]
        prior = prior_coefficients(inputs[:, :5], self.prior)
        return rows * prior * self.coef_scale + self.coef_offset

    def totals(self, coef: Tensor, output_tokens: Tensor, prompt: Tensor) -> tuple[Tensor, Tensor]:
        return decode_outputs(coef, output_tokens, prompt)

    def columns(self, first: Tensor, inputs: Tensor, products: Tensor) -> list[Tensor]:
        """Inputs of the output Gemm: coefficient x product, [B, n products] (0 for the
        baseline's)."""
        return [self.softplus(first) * products]

    @torch.jit.unused
    def product_terms(self) -> tuple[tuple[str, str, str], ...]:
        return tuple(factors for factors, _ in self.terms)

    @torch.jit.unused
    def column_weights(self) -> tuple[np.ndarray, np.ndarray]:
        """(decode total, mean pass) as weights of :meth:`columns` (module doc)."""
        scale = self.coef_scale.double().numpy()
        offset = float(self.coef_offset[0])
        prior = self.prior.double().numpy()
        # What one unit of each factor's column is worth (module doc; 1 for "1" and "ind").
        units = {"m": M_SCALE, "q": KV_UNIT * Q_SCALE, "1": 1.0, "ind": 1.0}
        units.update(prior_factor_scales(prior.tolist()))
        total, per_pass = np.zeros(self.head.out_features), np.zeros(self.head.out_features)
        for j, (factors, source) in enumerate(self.terms, start=self.start):
            passes = factors[0] == "m"  # m: the total over the passes; ind: one pass
            unit = math.prod(units[name] for name in factors)
            if source == "a":
                # a0 multiplies the plain term; the prior's other part is in B and K.
                weight = scale[0] * (prior[0] if factors[1:] == ("1", "1") else 1.0) / unit
            elif source == "c":
                weight = scale[1] / unit
            else:
                weight = offset / (CONST_LOGIT * unit)
            (total if passes else per_pass)[j] = weight
        return total, per_pass


@dataclass(frozen=True)
class FoldedPair:
    """A folded decode network: its first layer (standardisation and input mask folded in;
    the caller runs it, with ReLU) and the rest."""

    first: torch.nn.Linear
    decode: FoldedDecode


def fold_decode_net(
    decode_net: torch.nn.Module, scale: float = 1.0, offset_ms: float = 0.0
) -> FoldedPair | None:
    """The network as a :class:`FoldedPair` (a recalibration folded in too), or None.

    Only the architecture ``toolkit.models.decode.DecodeNet`` defines is recognised
    (Linear + ReLU body, Linear head of N_BASIS outputs, softplus, ``feature_mean`` /
    ``feature_std`` / ``feature_mask`` / ``coef_scale`` buffers); anything else returns None
    and keeps the generic form.
    """
    try:
        body = list(getattr(decode_net, "body"))  # noqa: B009  (typed access to a submodule)
        head = getattr(decode_net, "head")  # noqa: B009
        mean = _buffer(decode_net, "feature_mean").to(torch.float64)
        std = _buffer(decode_net, "feature_std").to(torch.float64)
        mask = _buffer(decode_net, "feature_mask").to(torch.float64)
        coef_scale = _buffer(decode_net, "coef_scale").to(torch.float64)
        prior = _buffer(decode_net, "prior").to(torch.float64)
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
        or prior.shape != (len(IDENTITY_PRIOR),)
        or not bool((prior >= 0).all())
        or not scale > 0
    ):
        return None
    first = linears[0]
    w = first.weight.detach().to(torch.float64) * (mask / std).unsqueeze(0)  # [H, F]
    b = first.bias.detach().to(torch.float64) - w @ mean
    folded_first = torch.nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        folded_first.weight.copy_(w.to(torch.float32))
        folded_first.bias.copy_(b.to(torch.float32))
    terms = DECODE_TERMS + (OFFSET_TERMS if offset_ms != 0.0 else ())
    rows = {"a": 0, "c": 1}
    term_head = torch.nn.Linear(head.in_features, len(terms))
    with torch.no_grad():
        term_head.weight.zero_()
        for j, (_, source) in enumerate(terms):
            if source in rows:
                term_head.weight[j] = head.weight[rows[source]]
                term_head.bias[j] = head.bias[rows[source]]
            else:
                term_head.bias[j] = CONST_LOGIT
    decode = FoldedDecode(
        [_copy_linear(layer) for layer in linears[1:]],
        term_head,
        terms,
        (coef_scale * scale).to(torch.float32),
        offset_ms,
        prior=prior,
    )
    return FoldedPair(folded_first, decode.eval())


def _buffer(module: torch.nn.Module, name: str) -> Tensor:
    value = getattr(module, name)
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} is not a tensor")
    return value.detach()


def _copy_linear(
    layer: torch.nn.Module,
    slots: np.ndarray | None = None,
    width: int | None = None,
    input_scale: float = 1.0,
    extra_outputs: int = 0,
) -> torch.nn.Linear:
    """A copy of ``layer`` that reads input i from column ``slots[i]`` of ``width`` columns
    (weight 0 on the others), expects its inputs multiplied by ``input_scale``, and has
    ``extra_outputs`` more outputs with weight and bias 0."""
    if not isinstance(layer, torch.nn.Linear):
        raise TypeError(f"expected a Linear layer, got {type(layer).__name__}")
    if slots is None:
        slots = np.arange(layer.in_features)
    columns = torch.from_numpy(np.asarray(slots, dtype=np.int64))
    out = torch.nn.Linear(width or layer.in_features, layer.out_features + extra_outputs)
    with torch.no_grad():
        out.weight.zero_()
        out.bias.zero_()
        out.weight[: layer.out_features, columns] = layer.weight / input_scale
        out.bias[: layer.out_features] = layer.bias
    return out


def _leading_zero_rows(layer: torch.nn.Linear, rows: int) -> torch.nn.Linear:
    """``layer`` with ``rows`` more outputs in front whose softplus is exactly 0 (zero
    weights, bias -inf)."""
    if rows == 0:
        return layer
    out = torch.nn.Linear(layer.in_features, layer.out_features + rows)
    with torch.no_grad():
        out.weight.zero_()
        out.bias.fill_(-math.inf)
        out.weight[rows:] = layer.weight
        out.bias[rows:] = layer.bias
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


def baseline_columns(
    form: np.ndarray, limits: tuple[float, ...] = FEATURE_LIMITS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The nine linear factors of ``PhysicsBaseline.product_form()`` as first-layer columns.

    Returns ``weight`` [F, 3, 3] and ``bias`` [3, 3] (factor, product), each factor scaled
    by ``2**-e`` with ``e >= 0`` the smallest integer that keeps it <= 1 for every input in
    ``[0, limits]``, and ``compensation`` [3]: ``2**(sum of the e of a product)``, what
    each product must be multiplied by again (powers of two: the scaling changes no rounding).
    The factors must be non-negative (``PhysicsBaseline`` weights are): the clip at 0 must
    not bind either.
    """
    form = np.asarray(form, dtype=np.float64)
    n_features = len(FEATURE_NAMES)
    if form.shape != (n_features + 1, _FACTORS, _PRODUCTS) or not np.isfinite(form).all():
        raise LatkitError(f"baseline product form must be finite [6, 3, 3], got {form.shape}")
    if (form < 0).any():
        raise LatkitError("baseline product form has a negative weight: factors must be >= 0")
    a, c = form[:n_features], form[n_features]
    limit = np.asarray(limits, dtype=np.float64)[:, None, None]
    upper = c + (a * limit).sum(axis=0)  # [3, 3]: each factor's largest value
    exponent = np.ceil(np.log2(np.maximum(upper, 1.0)))
    compensation = np.exp2(exponent.sum(axis=0))
    if compensation.max() > 2.0**100:  # times a bound factor, it must stay a float32
        raise LatkitError("baseline weights too large for the exported graph's float32 scaling")
    scale = np.exp2(-exponent)
    return a * scale, c * scale, compensation


@dataclass(frozen=True)
class FirstLayer:
    """The shared first Gemm (see the module doc): ``clip(X @ weight + bias, 0, 1)``.

    The first ``3 * n_products`` columns are the product block: column ``i * n_products + j``
    holds factor i of product j (the three baseline products, then the decode products). The
    other columns hold the threshold tests (read by ``strides``) and the decode network's
    hidden units (at ``hidden_slots``).
    """

    weight: np.ndarray  # float32 [F + 1, width]
    bias: np.ndarray  # float32 [width]
    strides: np.ndarray  # float32 [width]
    n_products: int
    compensation: np.ndarray  # float64 [3]: multiplier of each baseline product
    hidden_slots: np.ndarray  # int64 [H]


def first_layer(
    table: PrefillTable,
    form: np.ndarray,
    hidden: torch.nn.Linear | None = None,
    decode_products: tuple[tuple[str, str, str], ...] = (),
    prior: Sequence[float] = IDENTITY_PRIOR,
) -> FirstLayer:
    """Lay out the threshold tests, baseline factors, decode factors and (folded form)
    hidden units over ``X = [features, output_tokens]``."""
    t_weight, t_bias, t_strides = threshold_columns(table)
    b_weight, b_bias, compensation = baseline_columns(form)
    n_features = len(table.thresholds)
    n_thresholds = t_weight.shape[1]
    n_hidden = hidden.out_features if hidden is not None else 0
    n_products = _PRODUCTS + len(decode_products)
    block = _FACTORS * n_products  # the product block leads; the rest follows it
    width = block + max(n_thresholds + n_hidden, 1)
    weight = np.zeros((n_features + 1, width), dtype=np.float32)  # the last row: N
    bias = np.zeros(width, dtype=np.float32)
    strides = np.zeros(width, dtype=np.float32)
    for i in range(_FACTORS):
        for j in range(_PRODUCTS):
            weight[:n_features, i * n_products + j] = b_weight[:, i, j]
            bias[i * n_products + j] = b_bias[i, j]
        for j, factors in enumerate(decode_products, start=_PRODUCTS):
            column_weight, column_bias = decode_factor_column(factors[i], prior)
            weight[:, i * n_products + j] = column_weight
            bias[i * n_products + j] = column_bias
    threshold_slots = np.arange(block, block + n_thresholds)
    hidden_slots = np.arange(block + n_thresholds, block + n_thresholds + n_hidden)
    weight[:n_features, threshold_slots] = t_weight
    bias[threshold_slots] = t_bias
    strides[threshold_slots] = t_strides
    if hidden is not None:
        w = hidden.weight.detach().to(torch.float64).T.numpy() * HIDDEN_SCALE
        b = hidden.bias.detach().to(torch.float64).numpy() * HIDDEN_SCALE
        weight[:n_features, hidden_slots] = w
        bias[hidden_slots] = b
    return FirstLayer(weight, bias, strides, n_products, compensation, hidden_slots)


@dataclass(frozen=True)
class OutputSpec:
    """How the outputs derive from baseline x residual factor and the decode terms.

    ``prefill_ms = prefill_scale * max(floor, baseline * residual) + prefill_offset_ms``;
    ``prefill_pXX_ms = prefill_ms * prefill_bounds[pXX]``; with ``(f_p, f_d, f_g) =
    total_bounds[pXX]``, ``total_pXX_ms = max(prefill_ms * f_p + decode_total_ms * f_d +
    decode_per_token_ms * f_g, prefill_pXX_ms)`` (``toolkit.models.bounds``; a factor may be
    +inf: that bound is +inf).
    """

    form: np.ndarray  # PhysicsBaseline.product_form(), float64 [F + 1, 3, 3]
    prefill_scale: float = 1.0
    prefill_offset_ms: float = 0.0
    prefill_bounds: dict[str, float] = field(
        default_factory=lambda: {"p50": 1.0, "p90": 1.0, "p95": 1.0}
    )
    total_bounds: dict[str, tuple[float, float, float]] = field(
        default_factory=lambda: {"p90": (1.0, 1.0, 0.0), "p95": (1.0, 1.0, 0.0)}
    )

    def __post_init__(self) -> None:
        factors = [*self.prefill_bounds.values()]
        factors += [f for triple in self.total_bounds.values() for f in triple[:2]]
        per_pass = [triple[2] for triple in self.total_bounds.values()]
        if not all(f > 0 for f in factors) or any(math.isnan(f) for f in factors):
            raise LatkitError(f"bound factors must be positive (or +inf), got {factors}")
        if not all(f >= 0 for f in per_pass):  # NaN fails too
            raise LatkitError(f"per-pass bound factors must be >= 0 (or +inf), got {per_pass}")
        if not (self.prefill_scale > 0 and math.isfinite(self.prefill_offset_ms)):
            raise LatkitError("prefill calibration must have a positive scale, finite offset")


#: Quarters of the output Gemm (see the module doc): each output is the max of its rows in them.
_QUARTERS = 4


def output_gemm(
    layer: FirstLayer, spec: OutputSpec, decode_weights: np.ndarray, per_pass: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(weight [36, G + 1 + C], bias [36, 1]) of the output Gemm; its input is
    ``[products x residual (G), floor (1), decode columns (C)]``.

    The prefill is ``max(A, F)`` with ``A`` the products' sum and ``F`` the floor, so every
    output affine in it with a positive factor is the max of that output through ``A`` and
    through ``F``. Quarter 0 holds each output through ``A``, quarter 1 through ``F``, and
    for a total bound (``total_pXX = max(prefill_ms x f_p + decode_total_ms x f_d,
    prefill_pXX)``, ``toolkit.models.bounds``) quarters 2 and 3 hold the prefill bound of the
    same level through ``A`` and ``F``; an output with fewer candidates has -inf (weight 0,
    bias -inf) in the others. The graph takes the elementwise max of the quarters.
    """
    groups, n_decode = layer.n_products, len(decode_weights)
    width = groups + 1 + n_decode

    def column(products: float = 0.0, floor: float = 0.0) -> np.ndarray:
        weights = np.zeros(width)
        weights[:_PRODUCTS] = products * layer.compensation
        weights[groups] = floor
        return weights

    scale, offset = spec.prefill_scale, spec.prefill_offset_ms
    decode_w = np.concatenate([np.zeros(groups + 1), decode_weights])
    pass_w = np.concatenate([np.zeros(groups + 1), per_pass])
    # The prefill through the products (A) and through the floor (F).
    prefill = [(column(products=scale), offset), (column(floor=scale), offset)]
    unbounded = [(np.zeros(width), math.inf)]  # an unbounded level: the constant +inf
    rows: dict[str, list[tuple[np.ndarray, float]]] = {
        "prefill_ms": prefill,
        "decode_total_ms": [(decode_w, 0.0)],
        "decode_per_token_ms": [(pass_w, 0.0)],
        "total_ms": [(w + decode_w, b) for w, b in prefill],
    }
    for level, factor in spec.prefill_bounds.items():
        rows[f"prefill_{level}_ms"] = (
            unbounded if math.isinf(factor) else [(w * factor, b * factor) for w, b in prefill]
        )
    for level, (prefill_factor, decode_factor, pass_factor) in spec.total_bounds.items():
        floor = rows[f"prefill_{level}_ms"]
        rows[f"total_{level}_ms"] = (
            unbounded
            if any(math.isinf(f) for f in (prefill_factor, decode_factor, pass_factor))
            or math.isinf(floor[0][1])
            else [
                (
                    w * prefill_factor + decode_w * decode_factor + pass_w * pass_factor,
                    b * prefill_factor,
                )
                for w, b in prefill
            ]
            + floor
        )
    unused = (np.zeros(width), -math.inf)
    quarters = [
        [rows[name][q] if q < len(rows[name]) else unused for name in GEMM_ROWS]
        for q in range(_QUARTERS)
    ]
    weight = np.stack([w for quarter in quarters for w, _ in quarter]).astype(np.float32)
    bias = np.array([[b] for quarter in quarters for _, b in quarter], dtype=np.float32)
    return weight, bias


class FusedPredictor(torch.nn.Module):
    """``forward(features [B,5] float32, output_tokens [B] float32)`` -> 9 tensors [B].

    Outputs in ``toolkit.features.OUTPUT_NAMES`` order. The decode total for any
    output_tokens is a closed form (O(1) per row), never a loop over positions.
    """

    if TYPE_CHECKING:  # buffers, declared for mypy only (TorchScript rejects the annotations)
        first_weight: Tensor
        first_bias: Tensor
        strides: Tensor
        table: Tensor
        floor: Tensor
        out_weight: Tensor
        out_bias: Tensor
        prefill_weight: Tensor
        prefill_offset: Tensor
        total_prefill_factors: Tensor
        total_decode_factors: Tensor
        total_pass_factors: Tensor
        floor_factors: Tensor
        decode: GenericDecode | FoldedDecode

    def __init__(
        self, table: PrefillTable, decode: GenericDecode | FoldedPair, spec: OutputSpec
    ) -> None:
        """``decode``: a :class:`GenericDecode`, or a :class:`FoldedPair` whose first layer
        and decode factors then share the first Gemm."""
        super().__init__()
        if table.n_cells > MAX_EXACT_CELLS:
            raise LatkitError(
                f"prefill table of {table.n_cells:,} cells is above the {MAX_EXACT_CELLS:,} "
                "a float32 row index addresses exactly; retrain with a smaller max_bin"
            )
        folded = isinstance(decode, FoldedPair)
        hidden = decode.first if isinstance(decode, FoldedPair) else None
        terms = decode.decode.product_terms() if isinstance(decode, FoldedPair) else ()
        prior = (
            decode.decode.prior.double().tolist()
            if isinstance(decode, FoldedPair)
            else list(IDENTITY_PRIOR)
        )
        layer = first_layer(table, spec.form, hidden, terms, prior)
        module: GenericDecode | FoldedDecode = (
            decode.decode.reading(
                layer.hidden_slots, layer.weight.shape[1], HIDDEN_SCALE, _PRODUCTS
            )
            if isinstance(decode, FoldedPair)
            else decode
        )
        weight, bias = output_gemm(layer, spec, *module.column_weights())
        self.n_products = layer.n_products
        self.folded = folded
        self.register_buffer("first_weight", torch.from_numpy(layer.weight))  # [F + 1, W]
        self.register_buffer("first_bias", torch.from_numpy(layer.bias))
        # [W, 1], not [W]: see the module doc.
        self.register_buffer("strides", torch.from_numpy(layer.strides.reshape(-1, 1).copy()))
        self.register_buffer("table", torch.from_numpy(np.ascontiguousarray(table.table)))
        self.register_buffer("floor", torch.from_numpy(np.ascontiguousarray(table.floor)))
        self.register_buffer("out_weight", torch.from_numpy(weight))  # [36, n + 1 + C]
        self.register_buffer("out_bias", torch.from_numpy(bias))  # [36, 1]
        # For the budget graph: the prefill rows through the products and through the floor
        # ([n + 1, 2], max of the two); per searched bound (mean, p90, p95) the total's
        # factors (f_p, f_d, f_g) and the prefill bound's factor f (total bound: max(P f_p +
        # D f_d + mean pass f_g, P f); the mean's floor 0 never binds a budget >= 0).
        prefill_rows = weight[[0, len(GEMM_ROWS)], : layer.n_products + 1].T.copy()
        self.register_buffer("prefill_weight", torch.from_numpy(prefill_rows))
        self.register_buffer("prefill_offset", torch.tensor(float(bias[0, 0])))
        levels = ("p90", "p95")
        prefill_factors = [1.0, *(spec.total_bounds[k][0] for k in levels)]
        decode_factors = [1.0, *(spec.total_bounds[k][1] for k in levels)]
        pass_factors = [0.0, *(spec.total_bounds[k][2] for k in levels)]
        floor_factors = [0.0, *(spec.prefill_bounds[k] for k in levels)]
        for name, values in (
            ("total_prefill_factors", prefill_factors),
            ("total_decode_factors", decode_factors),
            ("total_pass_factors", pass_factors),
            ("floor_factors", floor_factors),
        ):
            self.register_buffer(name, torch.tensor(values, dtype=torch.float32))
        self.decode = module

    def _parts(self, inputs: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(shared first-layer activations [B, W], products x residual factor [B, n], the
        cell's floor in ms [B, 1], products [B, n]) of ``X = [features, output_tokens]``."""
        # hardtanh(., 0, 1) exports as HardSigmoid(alpha=1, beta=0) (exporters.export).
        first = torch.nn.functional.hardtanh(
            torch.addmm(self.first_bias, inputs, self.first_weight), 0.0, 1.0
        )
        index = torch.matmul(first, self.strides).to(torch.int64)  # [B, 1]
        n = self.n_products
        products = first[:, : 3 * n].reshape(-1, 3, n).prod(1)
        return first, products * self.table[index], self.floor[index], products

    def front(self, inputs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(shared first-layer activations [B, W], [products x residual, floor] [B, n + 1],
        products [B, n]) of ``X = [features, output_tokens]`` [B, 6]."""
        first, weighted, floor, products = self._parts(inputs)
        return first, torch.cat([weighted, floor], 1), products

    def prefill(self, weighted: Tensor) -> Tensor:
        """Calibrated prefill ms [B] of :meth:`front`'s columns (the budget graph's)."""
        both = torch.matmul(weighted, self.prefill_weight)  # [B, 2]: products, floor
        return both.amax(1) + self.prefill_offset

    def forward(
        self, features: Tensor, output_tokens: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        inputs = torch.cat([features, output_tokens.unsqueeze(1)], 1)
        first, weighted, floor, products = self._parts(inputs)
        columns = self.decode.columns(first, inputs, products)
        stacked = torch.cat([weighted, floor] + columns, 1)  # noqa: RUF005 (no *list in TS)
        # [36, B] -> max of the four quarters -> [9, B]: each output one contiguous row (the
        # reshapes and unbind export as Reshape, ReduceMax, Reshape + one Split).
        quarters = torch.addmm(self.out_bias, self.out_weight, stacked.t())
        rows = quarters.reshape(4, -1).amax(0).reshape(9, -1).unbind(0)
        return (
            rows[0],
            rows[1],
            rows[2],
            rows[3],
            rows[4],
            rows[5],
            rows[6],
            rows[7],
            rows[8],
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
