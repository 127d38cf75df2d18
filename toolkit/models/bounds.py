"""Calibrated upper bounds: split conformal prediction on log ratios.

On a calibration part of the training data (samples the model was not fitted on) every sample
gets a score, and the bound at level ``a`` is set by the finite-sample conformal quantile of
the scores: the ``ceil((n + 1) a)``-th smallest of n scores. For exchangeable data this covers
at least a fraction ``a`` of new actuals, whatever the model's errors look like; with too few
scores for a level (n < 1 / (1 - a) - 1, e.g. 19 for P95) the bound is +inf, never an
under-covering guess. The quantiles come from crepes' ``ConformalPredictiveSystem`` (a
maintained library for exactly this), fitted on the scores as residuals.

Prefill: the score is ``log(actual / predicted)`` and the bound the prediction times
``exp(q_a)``. Timing noise is multiplicative, so a ratio is the natural score, and one factor
per level keeps every bound a constant multiple of its prediction: bounds never cross (``q``
grows with ``a``) and cost one multiplication each in the exported graph.

Total (prefill + decode over the request's own output length): the two stages have their own
uncertainty, and which one dominates depends on the answer's length (a 2-token answer is all
prefill, a 400-token one nearly all decode). One factor on the sum, calibrated on training data
whose answers are short, would carry the prefill's error over to long answers. So the total's
bound weighs each stage with its own uncertainty:

    total_pXX = max(prefill x F_p^t + decode x F_d^t, prefill_pXX)

with ``F_p = exp(q_p)``, ``F_d = exp(q_d)`` each stage's own conformal factor at the level
(``q_d`` from ``log(actual / predicted)`` of the decode totals of samples with a decode pass)
and ``t`` the conformal quantile of the per-sample scores ``t_i`` (the smallest t whose bound
holds sample i, solved per sample). The guarantee is the usual one on data like the
calibration samples (a conformal score is any fixed function of a sample); what the form
changes is where the width goes: an answer much longer than any calibrated one (decode nearly
all of it) is bounded by the decode's own factor to the power t. Measured (README): on a
simulated GPU sweep, a model trained on answers of at most 61 tokens covers 95.3 % of
answers of 128-446 tokens at P95 with this form (``benchmarks/accuracy.py``, the precise
long-answer section; 92 % with one factor on the sum, measured with an earlier decode); on
data like the calibration samples both cover as nominal. On a CPU pair of sweeps measured at
different times the long answers are over-covered (README, "Long answers"): a CPU's
hiccups, which the short calibration answers carry, average out over hundreds of passes.
(``t`` is below 1 where the stages' errors are independent: a sum of the stages' own bounds
is wider than needed where both weigh.)
A total can never be below its own prefill, so neither is its bound (``total_pXX >=
prefill_pXX`` by construction); a calibration sample whose total already lies under its
prefill bound is covered whatever ``t`` is, and scores lowest.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from toolkit.features import BOUND_LEVELS

#: Levels of the prefill bounds and of the total bounds (name -> nominal coverage), from the
#: outputs' ``BOUND_LEVELS``: ``prefill_p90_ms`` -> ``"p90"``.
PREFILL_LEVELS: Final[dict[str, float]] = {
    name.split("_")[1]: level for name, level in BOUND_LEVELS.items() if name.startswith("prefill_")
}
TOTAL_LEVELS: Final[dict[str, float]] = {
    name.split("_")[1]: level for name, level in BOUND_LEVELS.items() if name.startswith("total_")
}
METHOD: Final[str] = (
    "split conformal, crepes ConformalPredictiveSystem; prefill: log(actual / predicted); "
    "total: prefill F_p^t + decode F_d^t, t = max(1, conformal quantile)"
)
#: Smallest log factor of a stage in the total's bound (a stage predicted too high, q < 0,
#: still gets a bound that grows with t).
_MIN_LOG_FACTOR: Final[float] = 1e-4


def conformal_log_quantiles(scores: np.ndarray, levels: dict[str, float]) -> dict[str, float]:
    """Finite-sample conformal quantile of ``scores`` at every level (+inf when too few)."""
    from crepes import ConformalPredictiveSystem

    values = np.asarray(scores, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {name: math.inf for name in levels}
    cps = ConformalPredictiveSystem().fit(residuals=values)
    with warnings.catch_warnings():
        # crepes warns when a level needs more scores than there are; +inf says it.
        warnings.simplefilter("ignore")
        quantiles = cps.predict(
            y_hat=np.zeros(1), higher_percentiles=[100.0 * a for a in levels.values()]
        )
    return {name: float(q) for name, q in zip(levels, np.asarray(quantiles).ravel(), strict=True)}


@dataclass(frozen=True)
class ConformalBounds:
    """Factors of the point predictions; 1.0 everywhere for a model without calibration data.

    ``prefill[level]``: the prefill bound's factor; ``total[level]``: the (prefill, decode)
    factors ``(F_p^t, F_d^t)`` of the total's bound (module doc).
    """

    prefill: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PREFILL_LEVELS, 1.0))
    total: dict[str, tuple[float, float]] = field(
        default_factory=lambda: dict.fromkeys(TOTAL_LEVELS, (1.0, 1.0))
    )
    n_calibration: int = 0
    source: str = "none"

    @classmethod
    def fit(
        cls,
        prefill_true: np.ndarray,
        prefill_pred: np.ndarray,
        decode_true: np.ndarray,
        decode_pred: np.ndarray,
        source: str = "calibration split",
    ) -> ConformalBounds:
        """Calibrate on samples the model was not fitted on (module doc)."""
        p_true = np.asarray(prefill_true, dtype=np.float64).ravel()
        p_pred = np.asarray(prefill_pred, dtype=np.float64).ravel()
        d_true = np.asarray(decode_true, dtype=np.float64).ravel()
        d_pred = np.asarray(decode_pred, dtype=np.float64).ravel()
        ok = (
            _usable(p_true, p_pred)
            & np.isfinite(d_true)
            & np.isfinite(d_pred)
            & (d_true >= 0)
            & (d_pred >= 0)
        )
        p_true, p_pred, d_true, d_pred = p_true[ok], p_pred[ok], d_true[ok], d_pred[ok]
        prefill_q = conformal_log_quantiles(np.log(p_true / p_pred), PREFILL_LEVELS)
        prefill = {name: _exp(q) for name, q in prefill_q.items()}
        passes = _usable(d_true, d_pred)
        decode_q = conformal_log_quantiles(np.log(d_true[passes] / d_pred[passes]), TOTAL_LEVELS)
        total: dict[str, tuple[float, float]] = {}
        t_floor = -math.inf
        for name, level in TOTAL_LEVELS.items():
            q_p, q_d = prefill_q[name], decode_q[name]
            if math.isinf(q_p) or math.isinf(q_d):  # too few samples to certify the level
                total[name] = (math.inf, math.inf)
                continue
            # A stage predicted too high has q < 0: its bound is at least the prediction.
            a_p, a_d = max(q_p, _MIN_LOG_FACTOR), max(q_d, _MIN_LOG_FACTOR)
            covered_by_prefill = p_true + d_true <= p_pred * prefill[name]
            scores = np.where(
                covered_by_prefill,
                _LOWEST_SCORE,
                _total_scores(p_true + d_true, p_pred, d_pred, a_p, a_d),
            )
            t = conformal_log_quantiles(scores, {name: level})[name]
            # Levels in ascending order: t never shrinks, so bounds never cross.
            t_floor = max(t_floor, t)
            total[name] = (_exp(t_floor * a_p), _exp(t_floor * a_d))
        return cls(prefill=prefill, total=total, n_calibration=int(ok.sum()), source=source)

    def apply(self, prefill_ms: np.ndarray, decode_ms: np.ndarray) -> dict[str, np.ndarray]:
        """Bound columns (``prefill_p50_ms`` ... ``total_p95_ms``) of point predictions."""
        prefill = np.asarray(prefill_ms, dtype=np.float64)
        decode = np.asarray(decode_ms, dtype=np.float64)
        out = {f"prefill_{name}_ms": prefill * factor for name, factor in self.prefill.items()}
        for name, (prefill_factor, decode_factor) in self.total.items():
            if math.isinf(prefill_factor) or math.isinf(decode_factor):
                out[f"total_{name}_ms"] = np.full(prefill.shape, math.inf)
                continue
            # A total is never below its own prefill: nor is its bound (module docstring).
            out[f"total_{name}_ms"] = np.maximum(
                prefill * prefill_factor + decode * decode_factor, out[f"prefill_{name}_ms"]
            )
        return out

    def is_unbounded(self, level: str) -> bool:
        """The total's bound at ``level`` is +inf (too few calibration samples)."""
        return any(math.isinf(f) for f in self.total[level])

    def to_dict(self) -> dict[str, Any]:
        # JSON has no infinity: an unbounded level (too few calibration samples) is null.
        return {
            "method": METHOD,
            "source": self.source,
            "n_calibration": self.n_calibration,
            "prefill": {k: _json_factor(v) for k, v in self.prefill.items()},
            "total": {
                k: {"prefill": _json_factor(p), "decode": _json_factor(d)}
                for k, (p, d) in self.total.items()
            },
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ConformalBounds:
        if not data:
            return cls()
        prefill = {k: _read_factor(data["prefill"][k]) for k in PREFILL_LEVELS}
        total = {
            k: (_read_factor(data["total"][k]["prefill"]), _read_factor(data["total"][k]["decode"]))
            for k in TOTAL_LEVELS
        }
        return cls(
            prefill=prefill,
            total=total,
            n_calibration=int(data.get("n_calibration", 0)),
            source=str(data.get("source", "")),
        )


#: Score of a sample covered whatever the factor (below every real score).
_LOWEST_SCORE = -1e6


def _total_scores(
    total: np.ndarray, prefill: np.ndarray, decode: np.ndarray, s_p: float, s_d: float
) -> np.ndarray:
    """Per sample, the t with ``prefill e^(t s_p) + decode e^(t s_d) = total`` (s > 0: one
    root, the left side increases in t): bisection on the bracket between ``L / s_p`` and
    ``L / s_d``, ``L = log(total / (prefill + decode))``, all samples at once."""
    ratio = np.log(total / (prefill + decode))
    low = np.minimum(ratio / s_p, ratio / s_d)
    high = np.maximum(ratio / s_p, ratio / s_d)
    for _ in range(64):  # the bracket halves each step: 2^-64 of its width is exact enough
        middle = 0.5 * (low + high)
        over = prefill * np.exp(middle * s_p) + decode * np.exp(middle * s_d) >= total
        high = np.where(over, middle, high)
        low = np.where(over, low, middle)
    return 0.5 * (low + high)


def _usable(true: np.ndarray, pred: np.ndarray) -> np.ndarray:
    t = np.asarray(true, dtype=np.float64).ravel()
    p = np.asarray(pred, dtype=np.float64).ravel()
    return np.asarray((t > 0) & (p > 0) & np.isfinite(t) & np.isfinite(p))


def _exp(q: float) -> float:
    return math.inf if q == math.inf else float(math.exp(q))


def _json_factor(value: float) -> float | None:
    return None if not math.isfinite(value) else float(value)


def _read_factor(value: Any) -> float:
    factor = math.inf if value is None else float(value)
    if not factor > 0:
        raise ValueError(f"bound factor {value!r} must be positive")
    return factor
