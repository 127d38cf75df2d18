"""The prefill model's table, as the exporter compiles it into the graph.

An ensemble of axis-aligned trees is piecewise constant on the grid whose cells are cut by
every split threshold the trees use. XGBoost sends a row left iff ``x < t`` with both sides in
float32, so for one feature the cell of ``x`` is

    bin_f(x) = #{thresholds t of feature f with x >= t}          (0 .. n_f)

The prefill model (``toolkit.models.prefill_table``) predicts through exactly such a table:
per cell a residual factor and a floor in ms, on a grid that refines the trees' own. The
exporter takes the model's very arrays (:func:`table_from_prefill`), so the graph and the
Python model read the same float32 numbers: parity is exact by construction.

:func:`compile_prefill_table` tabulates any booster's residual factor on its own grid
(no floor), filled by asking the *model itself* for one float32 representative point per cell
(bin 0: the float32 just below the first threshold; bin i: threshold i-1 exactly); tests use
it to check the threshold machinery on raw boosters.

At run time the lookup is a handful of ordinary tensor ops (compare, cast, multiply,
sum, gather) that TorchScript, ONNX and ONNX Runtime's CUDA provider all run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import xgboost as xgb

from toolkit.errors import LatkitError
from toolkit.features import FEATURE_NAMES
from toolkit.models.prefill_table import (
    DEFAULT_MAX_CELLS,
    HARD_MAX_CELLS,
    PrefillTable,
    representative_points,
    row_strides,
    split_thresholds,
)

__all__ = [
    "DEFAULT_MAX_CELLS",
    "HARD_MAX_CELLS",
    "TABLE_COLUMN",
    "PrefillTable",
    "booster_residual_fn",
    "compile_prefill_table",
    "representative_points",
    "row_strides",
    "split_thresholds",
    "table_from_prefill",
]

#: What the table holds: the residual factor (and a floor in ms) of the prefill model.
TABLE_COLUMN = "residual_factor"

# Rows per call when filling the table: bounds the memory of the representative points.
_FILL_CHUNK = 1 << 18


def table_from_prefill(prefill: Any, max_cells: int = DEFAULT_MAX_CELLS) -> PrefillTable:
    """The prefill model's own table; refused above ``max_cells`` cells."""
    if max_cells > HARD_MAX_CELLS:
        raise ValueError(f"max_cells {max_cells} above the hard limit {HARD_MAX_CELLS}")
    table: PrefillTable = prefill.table
    if table.n_cells > max_cells:
        sizes = [len(t) + 1 for t in table.thresholds]
        raise LatkitError(
            f"prefill table has {table.n_cells:,} cells (bins per feature "
            f"{' x '.join(map(str, sizes))}), above the limit of {max_cells:,}; retrain "
            "with a smaller max_bin (e.g. --max-bin 64) or raise the limit"
        )
    return table


def compile_prefill_table(
    boosters: Sequence[xgb.Booster],
    predict: Callable[[np.ndarray], np.ndarray],
    n_features: int = len(FEATURE_NAMES),
    max_cells: int = DEFAULT_MAX_CELLS,
) -> PrefillTable:
    """Build the table of ``predict`` over the threshold grid of ``boosters`` (no floor).

    ``predict`` maps float32 [n, F] to [n] (a residual factor). Refuses grids above
    ``max_cells`` rather than write an enormous file.
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
    return PrefillTable(thresholds, strides, table, np.zeros_like(table))


def booster_residual_fn(booster: xgb.Booster) -> Callable[[np.ndarray], np.ndarray]:
    """``predict`` for :func:`compile_prefill_table` straight from a booster trained on the
    log residual: ``exp(margin)``. Used where no ``PrefillModel`` is at hand (tests)."""

    def predict(points: np.ndarray) -> np.ndarray:
        margin = np.asarray(booster.inplace_predict(points), dtype=np.float64).reshape(-1)
        return np.exp(margin)

    return predict
