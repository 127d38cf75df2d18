"""The physics-shaped prefill baseline: a non-negative linear model of the work.

A prefill runs the vision encoder over every crop, then ``n`` decoder blocks over the
``P = vision_tokens + text_tokens`` prompt tokens; each block does attention projections
(~P), attention itself (~P^2) and ``top_k`` experts per token (~P k). In milliseconds::

    baseline(x) = w0 + w1 V + n (w2 + w3 k) + n P (w4 + w5 k + w6 P)

with every ``w >= 0`` (P in thousands of tokens, V = vision tokens in thousands). Non-negative
weights on non-negative, non-decreasing terms make the baseline non-decreasing in every
feature but the tier (which does not enter), on and between profiled values and beyond them:
unlike trees, it keeps growing where nothing was profiled.

The prefill model multiplies it by trees fitted on the log residual (see
``toolkit.models.prefill``). Why this form: trees alone give an unprofiled knob value the
latency of its lower neighbour (biased low exactly where a controller needs it); measured on
both bundled sweeps, the product keeps unprofiled configurations as accurate as profiled ones.

The weights are fitted by non-negative least squares on *relative* error (every row divided
by its target), the score the model is judged by. The baseline is a sum of three products of
linear forms (``product_form``), which is how the exported graph evaluates it in a few nodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from toolkit.features import FEATURE_NAMES

#: Names of the terms, in weight order (P, V in thousands of tokens).
TERM_NAMES: Final[tuple[str, ...]] = ("1", "V", "n", "n*k", "n*P", "n*P*k", "n*P^2")
#: Tokens per unit in the terms: thousands keep every term O(1..100).
TOKENS_UNIT: Final[float] = 1000.0

_V, _T, _K, _N = (
    FEATURE_NAMES.index(name)
    for name in ("vision_tokens", "text_tokens", "top_k", "num_active_blocks")
)


def _terms(
    vision: np.ndarray, text: np.ndarray, top_k: np.ndarray, blocks: np.ndarray
) -> list[np.ndarray]:
    """The terms (``TERM_NAMES`` order) of broadcastable feature arrays."""
    v = vision / TOKENS_UNIT
    p = (vision + text) / TOKENS_UNIT
    k, n = top_k, blocks
    one = np.ones(np.broadcast_shapes(v.shape, p.shape, k.shape, n.shape))
    return [one, v, n, n * k, n * p, n * p * k, n * p * p]


def physics_terms(features: np.ndarray) -> np.ndarray:
    """Terms [B, 7] (``TERM_NAMES`` order, float64) of raw features [B, 5]."""
    x = np.asarray(features, dtype=np.float64)
    return np.stack(_terms(x[:, _V], x[:, _T], x[:, _K], x[:, _N]), axis=1)


@dataclass(frozen=True)
class PhysicsBaseline:
    """``weights`` (ms per term, >= 0, ``TERM_NAMES`` order); all-zero but ``w0`` is a
    constant baseline (trees alone, the latkit 0.2 model)."""

    weights: tuple[float, ...]

    @classmethod
    def constant(cls, value_ms: float = 1.0) -> PhysicsBaseline:
        return cls(weights=(float(value_ms),) + (0.0,) * (len(TERM_NAMES) - 1))

    @classmethod
    def fit(cls, features: np.ndarray, target_ms: np.ndarray) -> PhysicsBaseline:
        """Non-negative least squares on relative error; a constant when the terms cannot
        explain anything (e.g. a single configuration)."""
        from scipy.optimize import nnls

        y = np.asarray(target_ms, dtype=np.float64).ravel()
        terms = physics_terms(features)
        ok = np.isfinite(y) & (y > 0)
        y, terms = y[ok], terms[ok]
        if y.size == 0:
            return cls.constant()
        design = terms / y[:, None]
        # Column scaling: NNLS is scale-sensitive in its tolerance, the solution is not.
        scale = np.abs(design).max(axis=0)
        scale[scale == 0] = 1.0
        solution, _ = nnls(design / scale, np.ones_like(y), maxiter=50 * design.shape[1])
        weights = solution / scale
        # A strictly positive floor keeps the baseline (and its log) defined for any input.
        weights[0] = max(weights[0], 1e-3 * float(np.min(y)))
        return cls(weights=tuple(float(w) for w in weights))

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Baseline ms, float64 [B]."""
        return physics_terms(features) @ np.asarray(self.weights, dtype=np.float64)

    def predict_grid(self, values: list[np.ndarray]) -> np.ndarray:
        """Baseline ms on the grid of every combination of per-feature ``values``
        (``FEATURE_NAMES`` order), float64 of shape ``[len(v) for v in values]``."""
        axes = []
        for f, v in enumerate(values):
            shape = [1] * len(values)
            shape[f] = len(v)
            axes.append(np.asarray(v, dtype=np.float64).reshape(shape))
        terms = _terms(axes[_V], axes[_T], axes[_K], axes[_N])
        out = np.zeros(np.broadcast_shapes(*(a.shape for a in axes)))
        for weight, term in zip(self.weights, terms, strict=True):
            out = out + weight * term
        return out

    @property
    def is_constant(self) -> bool:
        return not any(self.weights[1:])

    def scaled(self, factor: float) -> PhysicsBaseline:
        return PhysicsBaseline(weights=tuple(w * factor for w in self.weights))

    def product_form(self) -> np.ndarray:
        """The baseline as ``sum_j prod_i (features @ A[:, i, j] + c[i, j])``.

        Returns float64 [6, 3, 3]: rows 0-4 are ``A`` (feature weights), row 5 is ``c``; axis 1
        is the factor (three per product), axis 2 the product. Products:
        ``1 * 1 * (w0 + w1 V)``, ``n * 1 * (w2 + w3 k)``, ``n * P * (w4 + w5 k + w6 P)``.
        """
        w0, w1, w2, w3, w4, w5, w6 = self.weights
        u = 1.0 / TOKENS_UNIT
        form = np.zeros((len(FEATURE_NAMES) + 1, 3, 3))
        const = len(FEATURE_NAMES)
        # product 0: 1 * 1 * (w0 + w1 V)
        form[const, 0, 0] = 1.0
        form[const, 1, 0] = 1.0
        form[const, 2, 0] = w0
        form[_V, 2, 0] = w1 * u
        # product 1: n * 1 * (w2 + w3 k)
        form[_N, 0, 1] = 1.0
        form[const, 1, 1] = 1.0
        form[const, 2, 1] = w2
        form[_K, 2, 1] = w3
        # product 2: n * P * (w4 + w5 k + w6 P)
        form[_N, 0, 2] = 1.0
        form[_V, 1, 2] = u
        form[_T, 1, 2] = u
        form[const, 2, 2] = w4
        form[_K, 2, 2] = w5
        form[_V, 2, 2] = w6 * u
        form[_T, 2, 2] = w6 * u
        return form

    def to_dict(self) -> dict[str, Any]:
        return {"terms": list(TERM_NAMES), "weights": list(self.weights)}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> PhysicsBaseline:
        if not data:
            return cls.constant()
        if list(data.get("terms", [])) != list(TERM_NAMES):
            raise ValueError(f"physics terms {data.get('terms')} are not {list(TERM_NAMES)}")
        weights = tuple(float(w) for w in data["weights"])
        if len(weights) != len(TERM_NAMES) or not all(np.isfinite(weights)) or min(weights) < 0:
            raise ValueError("physics weights must be 7 finite non-negative numbers")
        return cls(weights=weights)


def evaluate_product_form(form: np.ndarray, features: np.ndarray) -> np.ndarray:
    """Reference evaluation of :meth:`PhysicsBaseline.product_form` (what the graph does)."""
    x = np.asarray(features, dtype=np.float64)
    factors = np.einsum("bf,fij->bij", x, form[:-1]) + form[-1][None]
    return factors.prod(axis=1).sum(axis=1)
