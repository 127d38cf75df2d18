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

    total_pXX = max(prefill x F_p^t + decode x F_d^u + u g x mean_pass, prefill_pXX),
    u = max(t, 1)

with ``F_p = exp(q_p)`` the prefill's own conformal factor at the level, ``mean_pass`` the
predicted decode total over its m passes, and ``t`` the conformal quantile of the per-sample
scores ``t_i`` (the smallest t whose bound holds sample i, solved per sample). ``t`` comes
out below 1 where the stages' errors are independent (a sum of the stages' own bounds is
wider than needed where both weigh); the decode's part keeps at least its own width
(``u``), since an answer much longer than any calibrated one is nearly all decode and has
no prefill error to offset it. The decode's
part, ``F_d = 1 + alpha`` and ``g``, is its width over the number of passes: the level's
quantile regression of ``actual / predicted - 1`` on ``alpha + g / m`` (non-negative, one
linear program). A decode total is a sum of m passes: what one pass's timing adds (a CPU's
hiccup, a slow step) averages out as m grows, what the whole answer shares (the model's
error for the configuration, the machine's state) does not. On a CPU sweep the first is
large: answers of a few passes scatter far more than answers of fifty, and a single factor,
calibrated on short answers, over-covers long ones. ``alpha`` is the width left as m grows,
``g / m`` what is on top of it at m passes. The ``1 / m`` term is kept only where it
predicts the quantile better than a constant out of sample (5 seeded folds of the
calibration samples, pinball loss): with data of one stage-wide noise (a GPU's) a fit with
``g >= 0`` would still find some g in the scatter and shrink ``alpha``, which then
under-covers long answers. Nor is the decay extrapolated past the calibrated lengths:
``alpha`` is at least what the longest tenth of the calibration answers needed beyond their
``g / m``, since an answer longer than any calibrated one also carries the model's error
over length, which no calibration answer shows (with the decode's part shrunk by t < 1,
simulated long answers were covered 88.4 % at P95 with this floor and 88.7 % without it,
against 95.3 % with one factor; 93.6 % with u). Without the term the decode's factor is its
conformal quantile, as before. The
per-pass term costs no node in the exported graph: the mean pass is one of its columns.

The guarantee is the usual one on data like the calibration samples (a conformal score is any
fixed function of a sample); what the form changes is where the width goes: an answer much
longer than any calibrated one (decode nearly all of it) is bounded by ``F_d^t``, the width
that does not average out. Measured coverage on long answers, simulated and CPU: README
"Long answers" (``benchmarks/accuracy.py``).
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
from toolkit.models.quantile_fit import nonnegative_quantile_fit

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
    "total: prefill F_p^t + decode F_d^u + u g mean pass, u = max(t, 1), decode shape by "
    "quantile regression over passes, t = conformal quantile"
)
#: Smallest log factor of a stage in the total's bound (a stage predicted too high, q < 0,
#: still gets a bound that grows with t).
_MIN_LOG_FACTOR: Final[float] = 1e-4
#: Distinct pass counts the decode's width over passes is fitted on at least; with fewer (all
#: answers of one length) the 1 / m term is not identifiable and the width is one factor.
_MIN_PASS_COUNTS: Final[int] = 3
#: Folds of the out-of-sample test that keeps the decode's 1 / m term only where it predicts.
_SHAPE_FOLDS: Final[int] = 5
#: The longest calibration answers (at least this many, else the longest tenth) whose width
#: beyond the per-pass term floors the width of longer answers.
_MIN_LONGEST: Final[int] = 20


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
    total: dict[str, tuple[float, float, float]] = field(
        default_factory=lambda: dict.fromkeys(TOTAL_LEVELS, (1.0, 1.0, 0.0))
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
        passes: np.ndarray | None = None,
        source: str = "calibration split",
    ) -> ConformalBounds:
        """Calibrate on samples the model was not fitted on (module doc). ``passes``: each
        sample's decode passes (None: no per-pass term, the decode's width is one factor)."""
        p_true = np.asarray(prefill_true, dtype=np.float64).ravel()
        p_pred = np.asarray(prefill_pred, dtype=np.float64).ravel()
        d_true = np.asarray(decode_true, dtype=np.float64).ravel()
        d_pred = np.asarray(decode_pred, dtype=np.float64).ravel()
        m = (
            np.zeros(p_true.size)
            if passes is None
            else np.asarray(passes, dtype=np.float64).ravel()
        )
        ok = (
            _usable(p_true, p_pred)
            & np.isfinite(d_true)
            & np.isfinite(d_pred)
            & (d_true >= 0)
            & (d_pred >= 0)
            & np.isfinite(m)
        )
        p_true, p_pred, d_true, d_pred, m = p_true[ok], p_pred[ok], d_true[ok], d_pred[ok], m[ok]
        prefill_q = conformal_log_quantiles(np.log(p_true / p_pred), PREFILL_LEVELS)
        prefill = {name: _exp(q) for name, q in prefill_q.items()}
        # The mean pass of each prediction: the per-pass term's unit.
        mean_pass = np.where(m >= 1, d_pred / np.maximum(m, 1.0), 0.0)
        has_decode = _usable(d_true, d_pred)
        shapes = _decode_shapes(d_true[has_decode], d_pred[has_decode], m[has_decode])
        total: dict[str, tuple[float, float, float]] = {}
        t_floor = -math.inf
        for name, level in TOTAL_LEVELS.items():
            q_p, shape = prefill_q[name], shapes[name]
            if math.isinf(q_p) or shape is None:  # too few samples to certify the level
                total[name] = (math.inf, math.inf, math.inf)
                continue
            # A stage predicted too high has q < 0: its bound is at least the prediction.
            a_p, (a_d, g) = max(q_p, _MIN_LOG_FACTOR), shape
            covered_by_prefill = p_true + d_true <= p_pred * prefill[name]
            scores = np.where(
                covered_by_prefill,
                _LOWEST_SCORE,
                _total_scores(p_true + d_true, p_pred, d_pred, mean_pass, a_p, a_d, g),
            )
            t = conformal_log_quantiles(scores, {name: level})[name]
            # Levels in ascending order (and shapes that grow with them): t never shrinks,
            # so bounds never cross.
            t_floor = max(t_floor, t)
            # The decode's part never below its own width (u = max(t, 1), module doc).
            u = max(t_floor, 1.0)
            total[name] = (_exp(t_floor * a_p), _exp(u * a_d), u * g)
        return cls(prefill=prefill, total=total, n_calibration=int(ok.sum()), source=source)

    def apply(
        self, prefill_ms: np.ndarray, decode_ms: np.ndarray, mean_pass_ms: np.ndarray
    ) -> dict[str, np.ndarray]:
        """Bound columns (``prefill_p50_ms`` ... ``total_p95_ms``) of point predictions
        (``mean_pass_ms``: the decode total over its passes, 0 without a pass)."""
        prefill = np.asarray(prefill_ms, dtype=np.float64)
        decode = np.asarray(decode_ms, dtype=np.float64)
        mean_pass = np.asarray(mean_pass_ms, dtype=np.float64)
        out = {f"prefill_{name}_ms": prefill * factor for name, factor in self.prefill.items()}
        for name, (prefill_factor, decode_factor, pass_factor) in self.total.items():
            if self.is_unbounded(name):
                out[f"total_{name}_ms"] = np.full(prefill.shape, math.inf)
                continue
            # A total is never below its own prefill: nor is its bound (module docstring).
            out[f"total_{name}_ms"] = np.maximum(
                prefill * prefill_factor + decode * decode_factor + mean_pass * pass_factor,
                out[f"prefill_{name}_ms"],
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
                k: {"prefill": _json_factor(p), "decode": _json_factor(d), "pass": _json_factor(g)}
                for k, (p, d, g) in self.total.items()
            },
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ConformalBounds:
        if not data:
            return cls()
        prefill = {k: _read_factor(data["prefill"][k]) for k in PREFILL_LEVELS}
        # Artifacts saved before the per-pass term have no "pass": 0, their bound as saved.
        total = {
            k: (
                _read_factor(data["total"][k]["prefill"]),
                _read_factor(data["total"][k]["decode"]),
                _read_factor(data["total"][k].get("pass", 0.0), allow_zero=True),
            )
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
    total: np.ndarray,
    prefill: np.ndarray,
    decode: np.ndarray,
    mean_pass: np.ndarray,
    s_p: float,
    s_d: float,
    g: float,
) -> np.ndarray:
    """Per sample, the smallest t with ``prefill e^(t s_p) + decode e^(u s_d) + u g mean_pass
    >= total``, ``u = max(t, 1)`` (s > 0, g >= 0; the left side increases in t). Below
    t = 1 only the prefill's part moves: a closed form, and the lowest score where the
    decode's part alone (with any prefill) already covers the total; above, bisection
    between 1 and ``log(total / (prefill + decode)) / min(s_p, s_d)``, where the left side
    is at least the total."""
    decode_part = decode * math.exp(s_d) + g * mean_pass
    at_one = prefill * math.exp(s_p) + decode_part
    with np.errstate(divide="ignore", invalid="ignore"):
        below = np.log((total - decode_part) / prefill) / s_p
    below = np.where(total > decode_part, below, _LOWEST_SCORE)
    low = np.ones_like(total)
    high = np.maximum(np.log(total / (prefill + decode)) / min(s_p, s_d), 1.0)
    for _ in range(64):  # the bracket halves each step: 2^-64 of its width is exact enough
        middle = 0.5 * (low + high)
        bound = prefill * np.exp(middle * s_p) + decode * np.exp(middle * s_d)
        over = bound + middle * g * mean_pass >= total
        high = np.where(over, middle, high)
        low = np.where(over, low, middle)
    return np.where(total <= at_one, below, 0.5 * (low + high))


def _decode_shapes(
    decode_true: np.ndarray, decode_pred: np.ndarray, passes: np.ndarray
) -> dict[str, tuple[float, float] | None]:
    """Per total level, the decode's width over its number of passes m: ``(a_d, g)`` with
    ``decode e^(a_d) + g mean_pass`` the level's quantile of the actual decode, i.e.
    ``actual / predicted - 1 <= alpha + g / m`` with ``a_d = log(1 + alpha)`` (module doc).
    None where too few samples certify the level (as the conformal quantile says)."""
    log_ratio = np.log(decode_true / decode_pred)
    quantiles = conformal_log_quantiles(log_ratio, TOTAL_LEVELS)
    with_passes = passes >= 1
    m, excess = passes[with_passes], np.expm1(log_ratio[with_passes])
    fits_over_passes = np.unique(m).size >= _MIN_PASS_COUNTS
    shapes: dict[str, tuple[float, float] | None] = {}
    floor = (0.0, 0.0)  # each level's shape at least the lower one's: bounds never cross
    for name, level in TOTAL_LEVELS.items():
        if math.isinf(quantiles[name]):
            shapes[name] = None
            continue
        fit = _width_over_passes(m, excess, level) if fits_over_passes else None
        if fit is None:  # one factor, as without passes: the level's quantile of the ratio
            alpha, g = math.expm1(max(quantiles[name], _MIN_LOG_FACTOR)), 0.0
        else:
            alpha, g = fit
        alpha, g = max(alpha, floor[0]), max(g, floor[1])
        floor = (alpha, g)
        shapes[name] = (max(math.log1p(alpha), _MIN_LOG_FACTOR), g)
    return shapes


def _width_over_passes(
    passes: np.ndarray, excess: np.ndarray, level: float
) -> tuple[float, float] | None:
    """``(alpha, g)``: the ``level`` quantile of ``excess`` as ``alpha + g / passes``, or None
    where that predicts the quantile no better than a constant out of sample: the summed
    pinball loss over ``_SHAPE_FOLDS`` seeded folds, each fitted on the others. Without that
    test, data whose width does not shrink with the passes (a GPU's stage-wide noise) would
    still get some g > 0 from its scatter (g cannot go below 0) and an alpha too small for
    long answers."""
    design = np.stack([np.ones_like(passes), 1.0 / passes], axis=1)
    folds = np.random.default_rng(0).permutation(passes.size) % _SHAPE_FOLDS
    loss = {"constant": 0.0, "over passes": 0.0}
    for fold in range(_SHAPE_FOLDS):
        train, test = folds != fold, folds == fold
        for name, columns in (("constant", design[:, :1]), ("over passes", design)):
            fit = nonnegative_quantile_fit(columns[train], excess[train], level)
            if fit is None:
                return None
            residual = excess[test] - columns[test] @ fit
            loss[name] += float(np.sum(residual * (level - (residual < 0))))
    if loss["over passes"] >= loss["constant"]:
        return None
    fit = nonnegative_quantile_fit(design, excess, level)
    if fit is None:
        return None
    alpha, g = float(fit[0]), float(fit[1])
    # The decay is trusted within the calibrated lengths only: past them, the width stays at
    # least what the longest calibrated answers needed beyond their per-pass term (an answer
    # longer than any calibrated one also carries the model's error over length, which no
    # calibration answer shows). Without this floor, simulated long answers were covered
    # 88.7 % at P95 (95.3 % with one factor).
    longest = np.argsort(passes, kind="stable")[-max(passes.size // 10, _MIN_LONGEST) :]
    left = excess[longest] - g / passes[longest]
    floor = conformal_log_quantiles(left, {"level": level})["level"]
    return (max(alpha, floor) if math.isfinite(floor) else alpha), g


def _usable(true: np.ndarray, pred: np.ndarray) -> np.ndarray:
    t = np.asarray(true, dtype=np.float64).ravel()
    p = np.asarray(pred, dtype=np.float64).ravel()
    return np.asarray((t > 0) & (p > 0) & np.isfinite(t) & np.isfinite(p))


def _exp(q: float) -> float:
    return math.inf if q == math.inf else float(math.exp(q))


def _json_factor(value: float) -> float | None:
    return None if not math.isfinite(value) else float(value)


def _read_factor(value: Any, allow_zero: bool = False) -> float:
    factor = math.inf if value is None else float(value)
    if not (factor > 0 or (allow_zero and factor == 0)):
        raise ValueError(f"bound factor {value!r} must be positive")
    return factor
