"""The prefill model's lookup table: residual trees made monotone without constraining them.

The prefill prediction is ``baseline(x) x exp(residual(x))`` with a continuous, non-decreasing
physics baseline and a piecewise-constant residual (trees). Along a monotone feature the
product grows inside a cell and jumps by ``baseline x (exp(r_right) - exp(r_left))`` at a
split, so for real-valued inputs the product never decreases *only if the residual never
steps down*. That is what XGBoost's monotone constraints enforce, and it caps the model
where timings are stair-shaped: on a tread (tile or wave quantisation, a memory-bound MoE
flat in top_k) the latency is flat while the baseline grows, and only a residual that steps
down follows it. Measured on the simulated precise sweeps (``benchmarks/monotone_options.py``),
a monotone residual costs 1.4-2.6x the error of free trees when XGBoost constrains every tree,
1.5-3.6x when the free trees' residual table is made monotone afterwards.

So the prediction is built from two monotone pieces instead, over one grid of cells::

    prefill(x) = max(floor_ms[cell(x)], baseline(x) x factor[cell(x)])

- ``floor_ms``: the free model (baseline x exp(residual)) at each cell's lower corner, made
  non-decreasing along every monotone feature (the mean, in log, of its smallest monotone
  majorant and its largest monotone minorant). A table of milliseconds is flat on treads, so
  nothing caps it; on profiled values, which sit on lower corners, it is the free model;
- ``factor``: ``exp`` of the residual's largest monotone minorant (the residual of no cell
  is raised), which carries the baseline's growth inside cells and beyond the table.

Both pieces are non-decreasing in vision tokens, text tokens, top_k and blocks for every
real input, hence so is their max (and the calibrated bounds, constant multiples of it).

The grid: every split threshold of the trees (so each cell lies in one leaf of every tree and
the residual is exact), plus lower corners where the free model must be read off: every
profiled vision-token count, and every integer top_k / block count from the smallest profiled
value to the supported maximum (``toolkit.features.supported_range``), vision tokens beyond
the profiled ones at their typical spacing. The baseline carries the knobs, the residual its
correction; on integer knob values nobody profiled the trees would give the residual of the
lower profiled neighbour, and two options (``KnobModes``, chosen on validation data by the
prefill model) change that: ``interpolate`` (linear between the profiled neighbours) and
``extrapolate`` (beyond the largest, along the last profiled interval for one interval, then
held, never below flat).

The table is filled from the trees evaluated once per tree cell (one booster call on the trees'
own grid); the exported predictor gathers the very same float32 arrays.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

import numpy as np
import xgboost as xgb

from toolkit.errors import LatkitError
from toolkit.features import FEATURE_MINIMUM, FEATURE_NAMES, PREFILL_MONOTONE, supported_range
from toolkit.models.physics import PhysicsBaseline

#: Largest table built by default: 2**22 cells (16 MiB per float32 column). The exporter's
#: hard limit is 2**24 cells, the most a float32 row index addresses exactly.
DEFAULT_MAX_CELLS: Final[int] = 1 << 22
HARD_MAX_CELLS: Final[int] = 1 << 24
#: Features along which the prediction never decreases (the table's repaired axes).
MONOTONE_AXES: Final[tuple[int, ...]] = tuple(i for i, m in enumerate(PREFILL_MONOTONE) if m)
#: Knob features whose unprofiled integer values are interpolated between profiled ones.
KNOB_FEATURES: Final[tuple[str, ...]] = ("top_k", "num_active_blocks")
_VISION = FEATURE_NAMES.index("vision_tokens")


@dataclass(frozen=True)
class PrefillTable:
    """The table over a grid of cells.

    thresholds: per feature, the sorted unique float32 cut points. A value's bin is the number
      of cut points ``<=`` it (XGBoost sends ``x < t`` left, both sides float32).
    strides: int64 [n_features]; cell = sum_f bin_f * strides[f].
    table: float32 [n_cells], the residual factor of each cell.
    floor: float32 [n_cells], the floor in ms of each cell (zeros: none).
    """

    thresholds: tuple[np.ndarray, ...]
    strides: np.ndarray
    table: np.ndarray
    floor: np.ndarray

    @property
    def n_cells(self) -> int:
        return int(self.table.shape[0])

    def bins(self, features: np.ndarray) -> np.ndarray:
        """Cell coordinate per feature, int64 [B, F]."""
        x = np.asarray(features, dtype=np.float32)
        return np.stack(
            [
                np.searchsorted(t, x[:, f], side="right").astype(np.int64)
                for f, t in enumerate(self.thresholds)
            ],
            axis=1,
        )

    def cells(self, features: np.ndarray) -> np.ndarray:
        return self.bins(features) @ self.strides

    def lookup(self, features: np.ndarray) -> np.ndarray:
        """Residual factor of ``features`` (float32 [B, F]) -> float32 [B]."""
        return self.table[self.cells(features)]

    def predict(self, features: np.ndarray, baseline_ms: np.ndarray) -> np.ndarray:
        """``max(floor, baseline x factor)``, ms float64 [B]."""
        cells = self.cells(features)
        product = np.asarray(baseline_ms, dtype=np.float64) * self.table[cells]
        return np.maximum(self.floor[cells].astype(np.float64), product)


@dataclass(frozen=True)
class TableGrid:
    """Where the cells are cut (``thresholds``) and which knob values were profiled
    (``profiled``, for the interpolation). JSON-able, kept in the model's manifest."""

    thresholds: tuple[np.ndarray, ...]
    profiled: dict[str, tuple[float, ...]]
    #: Residual on unprofiled knob values: linear between profiled neighbours (else the lower
    #: neighbour's, as the trees give it) ...
    interpolate: bool = False
    #: ... and beyond the largest, the last interval's slope for one interval (else held).
    extrapolate: bool = False
    #: The trees' own thresholds when known (saves reading the trees again; not saved).
    tree: tuple[np.ndarray, ...] | None = None

    def with_modes(self, interpolate: bool = False, extrapolate: bool = False) -> TableGrid:
        return replace(self, interpolate=interpolate, extrapolate=extrapolate)

    def to_dict(self) -> dict[str, Any]:
        return {
            "thresholds": {
                name: [float(v) for v in t]
                for name, t in zip(FEATURE_NAMES, self.thresholds, strict=True)
            },
            "profiled": {name: list(values) for name, values in self.profiled.items()},
            "interpolate": self.interpolate,
            "extrapolate": self.extrapolate,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TableGrid:
        thresholds = tuple(
            np.asarray(data["thresholds"][name], dtype=np.float32) for name in FEATURE_NAMES
        )
        for name, t in zip(FEATURE_NAMES, thresholds, strict=True):
            if t.ndim != 1 or not np.isfinite(t).all() or (np.diff(t) <= 0).any():
                raise ValueError(f"table thresholds of {name} must be finite and increasing")
        profiled = {
            name: tuple(float(v) for v in data.get("profiled", {}).get(name, []))
            for name in KNOB_FEATURES
        }
        return cls(
            thresholds,
            profiled,
            bool(data.get("interpolate", False)),
            bool(data.get("extrapolate", False)),
        )


# -- the trees' own grid ----------------------------------------------------------------------


def _tree_model(booster: xgb.Booster) -> dict[str, Any]:
    doc = json.loads(booster.save_raw("json"))
    gradient_booster = doc["learner"]["gradient_booster"]
    name = gradient_booster.get("name")
    if name == "gbtree":
        return dict(gradient_booster["model"])
    if name == "dart":
        return dict(gradient_booster["gbtree"]["model"])
    raise LatkitError(f"prefill booster uses {name!r}; only tree boosters can be tabulated")


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


def _grid_points(values: Sequence[np.ndarray]) -> np.ndarray:
    mesh = np.meshgrid(*values, indexing="ij")
    return np.stack([m.ravel() for m in mesh], axis=1)


# -- the grid ---------------------------------------------------------------------------------


def tree_grid(booster: xgb.Booster) -> TableGrid:
    """The trees' own grid: no refinement, no interpolation. For monotone trees the table
    then predicts exactly ``baseline x exp(trees)`` (latkit 0.3's model)."""
    tree = split_thresholds([booster])
    return TableGrid(tree, {}, tree=tree)


def table_grid(booster: xgb.Booster, features: np.ndarray, refine: bool = True) -> TableGrid:
    """The cells of the table of ``booster`` fitted on ``features`` (see the module doc),
    knob modes off; without ``refine``, the trees' own grid."""
    if not refine:
        return tree_grid(booster)
    x = np.asarray(features, dtype=np.float32)
    tree = split_thresholds([booster])
    profiled = {
        name: tuple(float(v) for v in np.unique(x[:, FEATURE_NAMES.index(name)]))
        for name in KNOB_FEATURES
    }
    cuts = list(tree)
    values = np.unique(x[:, _VISION])
    _, top = supported_range("vision_tokens", float(values[0]), float(values[-1]))
    extra = list(values)
    if len(values) > 1:
        spacing = float(np.median(np.diff(values)))
        extra += list(np.arange(values[-1] + spacing, top + 0.5 * spacing, spacing))
    cuts[_VISION] = np.union1d(cuts[_VISION], np.asarray(extra, dtype=np.float32))
    for name, knob_values in profiled.items():
        f = FEATURE_NAMES.index(name)
        _, top = supported_range(name, knob_values[0], knob_values[-1])
        integers = np.arange(np.ceil(knob_values[0]), np.floor(top) + 1)
        points = np.concatenate([integers, knob_values]).astype(np.float32)
        cuts[f] = np.union1d(cuts[f], points)
    return TableGrid(tuple(c.astype(np.float32) for c in cuts), profiled, tree=tree)


# -- the table --------------------------------------------------------------------------------


def build_table(
    booster: xgb.Booster, baseline: PhysicsBaseline, grid: TableGrid, max_cells: int
) -> PrefillTable:
    """The table of ``booster`` x ``baseline`` over ``grid`` (see the module doc)."""
    sizes = [len(t) + 1 for t in grid.thresholds]
    n_cells = int(np.prod(sizes, dtype=np.float64))
    if n_cells > max_cells:
        raise LatkitError(
            f"prefill table would have {n_cells:,} cells (bins per feature "
            f"{' x '.join(map(str, sizes))}), above the limit of {max_cells:,}; "
            "retrain with a smaller max_bin"
        )
    tree = grid.tree if grid.tree is not None else split_thresholds([booster])
    residual = _residual_on_grid(booster, tree, grid.thresholds)
    # Lower corner of every bin (bin 0: the feature's smallest possible value).
    corners = [
        np.concatenate([[FEATURE_MINIMUM[name]], t]).astype(np.float64)
        for name, t in zip(FEATURE_NAMES, grid.thresholds, strict=True)
    ]
    log_baseline = np.log(baseline.predict_grid(corners))
    if grid.interpolate or grid.extrapolate:
        residual = _knob_residual(residual, log_baseline, corners, grid)
    log_floor = log_baseline + residual
    log_floor = 0.5 * (_majorant(log_floor) + _minorant(log_floor))
    factor = np.exp(_minorant(residual)).astype(np.float32).ravel()
    floor = np.exp(log_floor).astype(np.float32).ravel()
    if not (np.isfinite(factor).all() and np.isfinite(floor).all() and (factor > 0).all()):
        raise LatkitError("prefill table has a non-finite or non-positive value")
    return PrefillTable(grid.thresholds, row_strides(sizes), factor, floor)


def _residual_on_grid(
    booster: xgb.Booster, tree: tuple[np.ndarray, ...], thresholds: tuple[np.ndarray, ...]
) -> np.ndarray:
    """The trees' margin on every cell of ``thresholds`` (a refinement of the trees' own grid
    ``tree``: each cell lies in one tree cell), from one booster call per tree cell."""
    tree_points = [representative_points(t) for t in tree]
    margin = np.asarray(booster.inplace_predict(_grid_points(tree_points)), dtype=np.float64)
    margin = margin.reshape([len(p) for p in tree_points])
    # The tree cell of each refined cell: where its representative point falls.
    index = [
        np.searchsorted(t, representative_points(r), side="right")
        for t, r in zip(tree, thresholds, strict=True)
    ]
    return np.asarray(margin[np.ix_(*index)])


def _knob_residual(
    residual: np.ndarray, log_baseline: np.ndarray, corners: list[np.ndarray], grid: TableGrid
) -> np.ndarray:
    """Residual on unprofiled integer knob values (``grid.interpolate``: linear between the
    profiled neighbours; ``grid.extrapolate``: beyond the largest, the last interval's slope
    for one interval, then held, and never so low that the free model would fall below its
    value at the largest profiled value)."""
    out = residual.copy()
    for name, values in grid.profiled.items():
        if len(values) < 2:
            continue
        axis = FEATURE_NAMES.index(name)
        where = {float(v): i for i, v in enumerate(corners[axis])}
        known = np.asarray(values)
        last = np.take(out, where[values[-1]], axis)
        slope = (last - np.take(out, where[values[-2]], axis)) / (values[-1] - values[-2])
        for i, corner in enumerate(corners[axis]):
            if i == 0 or corner in values or corner < values[0]:
                continue
            at: list[Any] = [slice(None)] * out.ndim
            at[axis] = i
            if corner < values[-1] and grid.interpolate:
                high = float(known[known > corner].min())
                low = float(known[known < corner].max())
                w = (corner - low) / (high - low)
                out[tuple(at)] = (1 - w) * np.take(out, where[low], axis) + w * np.take(
                    out, where[high], axis
                )
            elif corner > values[-1] and grid.extrapolate:
                steps = min(corner - values[-1], values[-1] - values[-2])
                growth = np.take(log_baseline, i, axis) - np.take(
                    log_baseline, where[values[-1]], axis
                )
                out[tuple(at)] = np.maximum(last + steps * slope, last - growth)
    return out


def _majorant(values: np.ndarray) -> np.ndarray:
    """Smallest table >= ``values`` that never decreases along the monotone axes."""
    out = values
    for axis in MONOTONE_AXES:
        out = np.maximum.accumulate(out, axis=axis)
    return out


def _minorant(values: np.ndarray) -> np.ndarray:
    """Largest table <= ``values`` that never decreases along the monotone axes."""
    out = values
    for axis in MONOTONE_AXES:
        out = np.flip(np.minimum.accumulate(np.flip(out, axis), axis=axis), axis)
    return out
