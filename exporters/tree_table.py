"""Compile the XGBoost prefill booster into one exact lookup table.

An ensemble of axis-aligned trees is piecewise constant on the grid whose cells are cut by
every split threshold the trees use. XGBoost sends a row left iff ``x < t`` with both sides in
float32, so for one feature the cell of ``x`` is

    bin_f(x) = #{thresholds t of feature f with x >= t}          (0 .. n_f)

and every tree's decision path, hence every output, is constant on a cell. The table is
filled by asking the *model itself* for one float32 representative point per cell (bin 0:
the float32 just below the first threshold; bin i: threshold i-1 exactly). Base score,
``tree_info`` routing and the target transform are therefore exact by construction, not
re-implemented.

What is compiled: the residual factor ``exp(margin)`` of the prefill model's one booster
(``PrefillModel.residual_factor``), one float32 column. The physics baseline it multiplies
is a polynomial the exported graph evaluates itself (``exporters.fused``).

At run time the lookup is a handful of ordinary tensor ops (compare, cast, multiply,
sum, gather) that TorchScript, ONNX and ONNX Runtime's CUDA provider all run.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import xgboost as xgb

from toolkit.errors import LatkitError
from toolkit.features import FEATURE_NAMES

#: Largest table we build by default: 2**22 cells x 1 float32 = 16 MiB. Beyond that the
#: exported file gets large and the fill (one model call per cell) slow.
DEFAULT_MAX_CELLS = 1 << 22
#: Hard limit: 2**24 cells (64 MiB), the most a float32 row index in the exported graph
#: addresses exactly (exporters.fused).
HARD_MAX_CELLS = 1 << 24

#: What the table holds: the prefill booster's residual factor exp(margin).
TABLE_COLUMN = "residual_factor"

# Rows per call when filling the table: bounds the memory of the representative points.
_FILL_CHUNK = 1 << 18


@dataclass(frozen=True)
class PrefillTable:
    """The compiled prefill booster.

    thresholds: per feature, the sorted unique float32 split thresholds.
    strides: int64 [n_features]; row = sum_f bin_f * strides[f].
    table: float32 [n_cells], the residual factor of each cell (``TABLE_COLUMN``).
    """

    thresholds: tuple[np.ndarray, ...]
    strides: np.ndarray
    table: np.ndarray

    @property
    def n_cells(self) -> int:
        return int(self.table.shape[0])

    def bins(self, features: np.ndarray) -> np.ndarray:
        """Cell coordinate per feature, int64 [B, F] (reference implementation in numpy)."""
        x = np.asarray(features, dtype=np.float32)
        return np.stack(
            [
                np.searchsorted(t, x[:, f], side="right").astype(np.int64)
                for f, t in enumerate(self.thresholds)
            ],
            axis=1,
        )

    def lookup(self, features: np.ndarray) -> np.ndarray:
        """Table values for ``features`` (float32 [B, F]) -> float32 [B] (numpy reference)."""
        return self.table[self.bins(features) @ self.strides]


def _tree_model(booster: xgb.Booster) -> dict:
    doc = json.loads(booster.save_raw("json"))
    gradient_booster = doc["learner"]["gradient_booster"]
    name = gradient_booster.get("name")
    if name == "gbtree":
        return gradient_booster["model"]
    if name == "dart":
        return gradient_booster["gbtree"]["model"]
    raise LatkitError(f"prefill booster uses {name!r}; only tree boosters can be exported")


def split_thresholds(
    boosters: Sequence[xgb.Booster], n_features: int = len(FEATURE_NAMES)
) -> tuple[np.ndarray, ...]:
    """Every numeric split threshold of every tree of ``boosters``, per feature, float32 sorted.

    Read from the model JSON (never the text dump, which has lost precision before).
    """
    per_feature: list[list[np.ndarray]] = [[] for _ in range(n_features)]
    for booster in boosters:
        for tree in _tree_model(booster)["trees"]:
            left = np.asarray(tree["left_children"], dtype=np.int64)
            internal = left != -1
            if not internal.any():
                continue
            split_type = np.asarray(tree.get("split_type", [0] * len(left)), dtype=np.int64)
            if (split_type[internal] != 0).any():
                raise LatkitError("prefill booster has categorical splits; they cannot be exported")
            feats = np.asarray(tree["split_indices"], dtype=np.int64)[internal]
            # JSON floats are written round-trippable for float32; parse straight to float32.
            conds = np.asarray(tree["split_conditions"], dtype=np.float64)[internal].astype(
                np.float32
            )
            if feats.max(initial=0) >= n_features:
                raise LatkitError(
                    f"prefill booster splits on feature {int(feats.max())}, expected "
                    f"{n_features} features ({', '.join(FEATURE_NAMES)})"
                )
            for f in range(n_features):
                per_feature[f].append(conds[feats == f])
    out = []
    for chunks in per_feature:
        values = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
        if not np.isfinite(values).all():
            raise LatkitError("prefill booster has a non-finite split threshold")
        out.append(np.unique(values.astype(np.float32)))
    return tuple(out)


def representative_points(thresholds: np.ndarray) -> np.ndarray:
    """One float32 value per bin of a feature: bin 0 just below t0, bin i at t_{i-1}."""
    if len(thresholds) == 0:
        return np.zeros(1, dtype=np.float32)
    below = np.nextafter(thresholds[0], np.float32(-np.inf), dtype=np.float32)
    return np.concatenate([[below], thresholds]).astype(np.float32)


def row_strides(sizes: Sequence[int]) -> np.ndarray:
    """Row-major strides of a grid with ``sizes`` bins per feature, last feature fastest;
    int64 so the index never overflows."""
    strides = np.ones(len(sizes), dtype=np.int64)
    for f in range(len(sizes) - 2, -1, -1):
        strides[f] = strides[f + 1] * sizes[f + 1]
    return strides


def compile_prefill_table(
    boosters: Sequence[xgb.Booster],
    predict: Callable[[np.ndarray], np.ndarray],
    n_features: int = len(FEATURE_NAMES),
    max_cells: int = DEFAULT_MAX_CELLS,
) -> PrefillTable:
    """Build the table of ``predict`` over the threshold grid of ``boosters``.

    ``predict`` maps float32 [n, F] to [n] (the residual factor) and must be the very
    function the Python model serves (``PrefillModel.residual_factor``), so that the base
    score and the transform are its own. Refuses grids above ``max_cells`` rather than write
    an enormous file.
    """
    if max_cells > HARD_MAX_CELLS:
        raise ValueError(f"max_cells {max_cells} above the hard limit {HARD_MAX_CELLS}")
    thresholds = split_thresholds(boosters, n_features)
    sizes = [len(t) + 1 for t in thresholds]
    n_cells = 1
    for size in sizes:
        n_cells *= size  # Python int: no overflow while we check the size
    if n_cells > max_cells:
        raise LatkitError(
            f"prefill trees would compile to {n_cells:,} table cells "
            f"(bins per feature {' x '.join(map(str, sizes))}), above the limit of "
            f"{max_cells:,}; retrain with a smaller max_bin (e.g. --max-bin 64) or raise the limit"
        )
    strides = row_strides(sizes)

    reps = [representative_points(t) for t in thresholds]
    table = np.empty(n_cells, dtype=np.float32)
    for start in range(0, n_cells, _FILL_CHUNK):
        stop = min(start + _FILL_CHUNK, n_cells)
        flat = np.arange(start, stop, dtype=np.int64)
        points = np.empty((stop - start, n_features), dtype=np.float32)
        for f in range(n_features):
            points[:, f] = reps[f][(flat // strides[f]) % sizes[f]]
        values = np.asarray(predict(points), dtype=np.float32)
        if values.shape != (stop - start,):
            raise ValueError(f"predict returned shape {values.shape}, expected [{stop - start}]")
        table[start:stop] = values
    if not (np.isfinite(table).all() and (table > 0).all()):
        raise LatkitError(
            "prefill booster gives a non-finite or non-positive residual factor on its own "
            "split grid"
        )
    return PrefillTable(thresholds=thresholds, strides=strides, table=table)


def booster_residual_fn(booster: xgb.Booster) -> Callable[[np.ndarray], np.ndarray]:
    """``predict`` for :func:`compile_prefill_table` straight from a booster trained on the
    log residual: ``exp(margin)``, as ``PrefillModel.residual_factor`` computes it. Used where
    no ``PrefillModel`` is at hand (tests)."""

    def predict(points: np.ndarray) -> np.ndarray:
        margin = np.asarray(booster.inplace_predict(points), dtype=np.float64).reshape(-1)
        return np.exp(margin)

    return predict
