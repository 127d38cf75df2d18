"""Linear quantile regression with non-negative coefficients, as one linear program.

Used where a few physical weights must keep their signs: the decode's physics prior (the
median pass, ``toolkit.models.decode``) and the shape of the decode's upper bound over the
number of passes (``toolkit.models.bounds``). Minimises the weighted pinball loss
``sum w_i (level u_i + (1 - level) v_i)`` subject to ``design theta + u - v = y`` and
``theta, u, v >= 0`` (u: the part of y above the fit, v: below), solved by scipy's HiGHS.
"""

from __future__ import annotations

from typing import Final

import numpy as np

#: Samples a fit uses at most (a seeded draw above that): a handful of weights needs no more,
#: the program then takes ~0.5 s, and its time grows faster than the number of samples.
MAX_SAMPLES: Final[int] = 4_000


def nonnegative_quantile_fit(
    design: np.ndarray,
    y: np.ndarray,
    level: float,
    weights: np.ndarray | None = None,
    seed: int = 0,
    max_samples: int = MAX_SAMPLES,
) -> np.ndarray | None:
    """Coefficients [p] >= 0 of the ``level`` quantile of ``y`` given ``design`` [n, p]
    (module doc), or None when the solver fails."""
    from scipy import sparse
    from scipy.optimize import linprog

    x = np.asarray(design, dtype=np.float64)
    target = np.asarray(y, dtype=np.float64)
    w = np.ones(target.size) if weights is None else np.asarray(weights, dtype=np.float64)
    if target.size > max_samples:
        keep = np.random.default_rng(seed).choice(target.size, max_samples, replace=False)
        x, target, w = x[keep], target[keep], w[keep]
    n, p = x.shape
    cost = np.concatenate([np.zeros(p), level * w, (1.0 - level) * w]) / w.sum()
    identity = sparse.identity(n, format="csr")
    equality = sparse.hstack([sparse.csr_matrix(x), identity, -identity], format="csr")
    fit = linprog(cost, A_eq=equality, b_eq=target, bounds=(0, None), method="highs")
    return np.asarray(fit.x[:p]) if fit.success else None
