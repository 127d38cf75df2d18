"""Prefill model: a physics-shaped baseline times gradient-boosted trees on its residual.

Target: ``T_prefill_total`` (vision encoder + LLM prefill) in ms. Prediction::

    prefill_ms(x) = max(floor_ms[cell(x)], baseline(x) x factor[cell(x)])

the monotone table (``toolkit.models.prefill_table``) of ``baseline(x) x exp(trees(x))``:

- ``baseline``: :class:`~toolkit.models.physics.PhysicsBaseline`, a non-negative linear model
  of the work (prompt tokens x blocks, x top_k, attention, vision tokens, ...), fitted on
  relative error. It carries the model between and beyond profiled knob values.
- ``booster``: XGBoost on ``log(y) - log(baseline(x))`` (squared error on the log: the score
  is relative error and timing noise is multiplicative). Trees learn what the baseline misses
  on profiled configurations; the table interpolates their residual between profiled knob
  values and makes the product never decrease in vision tokens, text tokens, top_k and
  blocks *without constraining the trees* (why: ``prefill_table``'s docstring).
- ``structure="trees"``: the baseline is the constant 1 ms, i.e. trees alone on log(ms), the
  latkit 0.2 model as it was (monotone constraints, depth 6, no capacity search, no
  interpolation; kept for ``evaluate --baselines`` as ``trees_only``).

**Capacity chosen by the data** (``capacity_search=True``, the default): the trees' depth,
monotone constraints and regularisation (``CAPACITY_CANDIDATES``; rounds by early stopping)
and the table's knob modes (``prefill_table``: interpolate the residual between profiled
knob values, extrapolate it beyond them) are chosen on data the trees are not fitted on: the
validation split (held-out samples of profiled configurations) and two configuration-held-out
folds (every configuration with the second-largest, resp. the largest, profiled top_k or
block count is removed from the training rows and predicted, as a never-profiled
configuration would be; they judge interpolation, resp. extrapolation). The candidate with the
lowest mean MAPE over the folds wins, and a knob mode is on where it wins its fold, but
either must beat the default (latkit 0.3's trees, modes off) by ``SIGNIFICANCE`` standard
errors of the paired difference: on noisy CPU sweeps the validation scores of similar
candidates differ by noise, and picking noise costs accuracy. The choice and every
candidate's scores are kept in ``capacity`` (the manifest). Why a search: precise (GPU-like,
~1 % noise) sweeps need free trees (constraints cap them at 1.4-2.6x the free error), while
on noisy CPU sweeps free, deeper trees fit the noise. Above ``SEARCH_MAX_ROWS`` training rows
the search runs on a seeded subsample and the chosen candidate is refitted on all rows.

Design choices kept from latkit 0.2, each for a reason:
- ``max_bin <= 128`` and only the five features: the exporter compiles the table, whose cells
  are cut at every split threshold, which must stay few.
- Early stopping on a validation split (an internal seeded 10 % split when the caller gives
  none); the saved booster is cut at its best iteration.
- ``nthread=1`` by default: these trees are small and on a shared machine OpenMP threads that
  spin-wait for a busy core made training 10x slower (measured: 20k rows, 2 loaded cores,
  12 s with one thread, 169 s with two). Pass None for all cores.
- ``base_score`` is fixed to the median of the residual: one explicit scalar instead of
  XGBoost's estimate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Self

import numpy as np
import xgboost as xgb

from toolkit.errors import LatkitError
from toolkit.features import FEATURE_NAMES, PREFILL_MONOTONE
from toolkit.models.physics import PhysicsBaseline
from toolkit.models.prefill_table import (
    DEFAULT_MAX_CELLS,
    KNOB_FEATURES,
    PrefillTable,
    TableGrid,
    build_table,
    table_grid,
    tree_grid,
)

TARGET_TRANSFORMS: Final[tuple[str, ...]] = ("log",)
STRUCTURES: Final[tuple[str, ...]] = ("physics", "trees")
#: The settings the capacity search chooses among (each overrides the constructor's), in
#: order of preference on a tie. The first is latkit 0.3's trees.
CAPACITY_CANDIDATES: Final[tuple[dict[str, Any], ...]] = (
    {"monotone_constraints": True, "max_depth": 6, "min_child_weight": 1.0},
    {"monotone_constraints": True, "max_depth": 3, "min_child_weight": 1.0},
    {"monotone_constraints": False, "max_depth": 3, "min_child_weight": 1.0},
    {"monotone_constraints": False, "max_depth": 6, "min_child_weight": 1.0},
    {"monotone_constraints": False, "max_depth": 6, "min_child_weight": 20.0},
)
#: Standard errors (of the paired difference in absolute relative error on the validation
#: rows) by which a candidate or a knob mode must beat the default to be chosen.
SIGNIFICANCE: Final[float] = 2.0
#: Rows the capacity search fits on at most (a seeded subsample above; the chosen candidate
#: is then refitted on every row).
SEARCH_MAX_ROWS: Final[int] = 20_000


def _as_features(features: np.ndarray) -> np.ndarray:
    array = np.ascontiguousarray(np.asarray(features, dtype=np.float32))
    if array.ndim != 2 or array.shape[1] != len(FEATURE_NAMES):
        raise ValueError(f"features must be [B, {len(FEATURE_NAMES)}], got {array.shape}")
    return array


def _mape_pct(errors: dict[str, np.ndarray]) -> dict[str, float]:
    """MAPE, %, of each fold's absolute relative errors."""
    return {name: float(100.0 * values.mean()) for name, values in errors.items()}


class PrefillModel:
    """Physics baseline x XGBoost on the log residual, through a monotone table (module doc)."""

    booster: xgb.Booster
    table: PrefillTable

    def __init__(
        self,
        *,
        structure: str = "physics",
        target_transform: str = "log",
        n_estimators: int = 2000,
        learning_rate: float = 0.1,
        max_depth: int = 6,
        max_bin: int = 128,
        min_child_weight: float = 1.0,
        reg_lambda: float = 1.0,
        monotone_constraints: bool = True,
        capacity_search: bool = True,
        knob_interpolation: bool = True,
        early_stopping_rounds: int = 40,
        min_delta: float = 1e-5,
        max_cells: int = DEFAULT_MAX_CELLS,
        device: str = "cpu",
        seed: int = 3407,
        nthread: int | None = 1,
    ) -> None:
        """``max_depth``, ``min_child_weight`` and ``monotone_constraints`` are used as given
        only without ``capacity_search`` (or with ``structure="trees"``)."""
        if structure not in STRUCTURES:
            raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}")
        if target_transform not in TARGET_TRANSFORMS:
            raise ValueError(f"target_transform must be one of {TARGET_TRANSFORMS}")
        if max_bin > 256:
            raise ValueError("max_bin must stay <= 256 (the exporter compiles thresholds)")
        self.structure = structure
        self.target_transform = target_transform
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.max_depth = max_depth
        self.max_bin = max_bin
        self.min_child_weight = min_child_weight
        self.reg_lambda = reg_lambda
        self.monotone_constraints = monotone_constraints
        self.capacity_search = capacity_search
        self.knob_interpolation = knob_interpolation
        self.early_stopping_rounds = early_stopping_rounds
        self.min_delta = min_delta
        self.max_cells = max_cells
        self.device = device
        self.seed = seed
        self.nthread = nthread
        self.base_score: float = 0.0
        self.best_iteration: int = -1
        self.baseline = PhysicsBaseline.constant()
        #: What the capacity search chose and every candidate's validation scores.
        self.capacity: dict[str, Any] = {}
        self.grid: TableGrid | None = None

    # -- parameters ---------------------------------------------------------------------
    def get_params(self) -> dict[str, Any]:
        """Constructor parameters (JSON-able), recorded in the artifact manifest."""
        return {
            "structure": self.structure,
            "target_transform": self.target_transform,
            "n_estimators": self.n_estimators,
            "learning_rate": self.learning_rate,
            "max_depth": self.max_depth,
            "max_bin": self.max_bin,
            "min_child_weight": self.min_child_weight,
            "reg_lambda": self.reg_lambda,
            "monotone_constraints": self.monotone_constraints,
            "capacity_search": self.capacity_search,
            "knob_interpolation": self.knob_interpolation,
            "early_stopping_rounds": self.early_stopping_rounds,
            "min_delta": self.min_delta,
            "max_cells": self.max_cells,
            "device": self.device,
            "seed": self.seed,
            "nthread": self.nthread,
        }

    @property
    def _searching(self) -> bool:
        return self.capacity_search and self.structure == "physics"

    def _own_settings(self) -> dict[str, Any]:
        return {
            "monotone_constraints": self.monotone_constraints,
            "max_depth": self.max_depth,
            "min_child_weight": self.min_child_weight,
        }

    def _params(self, settings: dict[str, Any], base_score: float) -> dict[str, Any]:
        params: dict[str, Any] = {
            "tree_method": "hist",
            "device": self.device,
            "eta": self.learning_rate,
            "max_depth": settings["max_depth"],
            "max_bin": self.max_bin,
            "min_child_weight": settings["min_child_weight"],
            "lambda": self.reg_lambda,
            "base_score": base_score,
            "seed": self.seed,
            "verbosity": 0,
            "objective": "reg:squarederror",
            "eval_metric": "rmse",
        }
        if settings["monotone_constraints"]:
            params["monotone_constraints"] = "(" + ",".join(map(str, PREFILL_MONOTONE)) + ")"
        if self.nthread is not None:
            params["nthread"] = self.nthread
        return params

    # -- fit ----------------------------------------------------------------------------
    def fit(
        self,
        features: np.ndarray,
        target: np.ndarray,
        val_features: np.ndarray | None = None,
        val_target: np.ndarray | None = None,
    ) -> Self:
        """Fit the baseline, choose the trees' capacity, fit them on its log residual (early
        stopping on (val_features, val_target)) and build the table."""
        x = _as_features(features)
        y = np.asarray(target, dtype=np.float64).ravel()
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{x.shape[0]} feature rows but {y.shape[0]} targets")
        keep = np.isfinite(y) & (y > 0)
        x, y = x[keep], y[keep]
        if x.shape[0] < 2:
            raise LatkitError("prefill model: fewer than 2 samples with a positive T_prefill_total")
        rng = np.random.default_rng(self.seed)
        if val_features is None or val_target is None or len(val_target) == 0:
            # No validation split given: hold out a seeded 10 % for early stopping only.
            order = rng.permutation(x.shape[0])
            n_val = max(1, x.shape[0] // 10)
            vx, vy = x[order[:n_val]], y[order[:n_val]]
            x, y = x[order[n_val:]], y[order[n_val:]]
        else:
            vx = _as_features(val_features)
            vy = np.asarray(val_target, dtype=np.float64).ravel()
            vkeep = np.isfinite(vy) & (vy > 0)
            vx, vy = vx[vkeep], vy[vkeep]
            if vx.shape[0] == 0:
                vx, vy = x, y
        self.baseline = self._fit_baseline(x, y)
        self.base_score = float(np.median(self._residual(self.baseline, x, y)))
        physics = self.structure == "physics"
        settings = self._own_settings()
        modes = {"interpolate": self.knob_interpolation and physics}
        modes["extrapolate"] = modes["interpolate"]
        booster = None
        if self._searching:
            settings, modes, booster = self._search(x, y, vx, vy)
        else:
            self.capacity = {"searched": False, "chosen": {**settings, **modes}}
        if booster is None:
            booster = self._train(settings, self.baseline, x, y, vx, vy)
        self.booster = booster
        self.best_iteration = self.booster.num_boosted_rounds() - 1
        self.grid = table_grid(self.booster, x, refine=physics).with_modes(**modes)
        self.table = build_table(self.booster, self.baseline, self.grid, self.max_cells)
        return self

    def _fit_baseline(self, x: np.ndarray, y: np.ndarray) -> PhysicsBaseline:
        return (
            PhysicsBaseline.fit(x, y) if self.structure == "physics" else PhysicsBaseline.constant()
        )

    @staticmethod
    def _residual(baseline: PhysicsBaseline, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.log(y) - np.log(baseline.predict(x))

    def _train(
        self,
        settings: dict[str, Any],
        baseline: PhysicsBaseline,
        x: np.ndarray,
        y: np.ndarray,
        vx: np.ndarray,
        vy: np.ndarray,
    ) -> xgb.Booster:
        """Trees on the log residual of ``baseline``, early stopping on (vx, vy), predicting
        on the CPU from numpy whatever device trained them."""
        names = list(FEATURE_NAMES)
        train = xgb.QuantileDMatrix(
            x, self._residual(baseline, x, y), max_bin=self.max_bin, feature_names=names
        )
        val = xgb.QuantileDMatrix(
            vx,
            self._residual(baseline, vx, vy),
            ref=train,
            max_bin=self.max_bin,
            feature_names=names,
        )
        stopper = xgb.callback.EarlyStopping(
            rounds=self.early_stopping_rounds, min_delta=self.min_delta, save_best=True
        )
        booster = xgb.train(
            self._params(settings, self.base_score),
            train,
            num_boost_round=self.n_estimators,
            evals=[(val, "val")],
            callbacks=[stopper],
            verbose_eval=False,
        )
        booster.set_param({"device": "cpu"})
        return booster

    def _search(
        self, x: np.ndarray, y: np.ndarray, vx: np.ndarray, vy: np.ndarray
    ) -> tuple[dict[str, Any], dict[str, bool], xgb.Booster | None]:
        """(chosen settings, knob modes, the chosen booster fitted on all of x, or None when
        it must be refitted because the search ran on a subsample); fills ``capacity``.

        Folds: ``sample`` (the validation rows) and ``config`` (configurations with an
        interior knob value held out) score every candidate, with interpolation on where it
        wins the ``config`` fold; the chosen candidate then fits ``extrap`` (the largest knob
        values held out), which decides extrapolation. (Scoring candidates on ``extrap`` too
        was tried: on a sparse grid it extrapolates two profiled steps, which smooth
        constrained trees do better, and it then picked them where free trees were 1.3x
        better on every split measured.) A choice other than the default (latkit 0.3's trees,
        modes off) must win by ``SIGNIFICANCE`` standard errors of the paired difference: on
        noisy CPU sweeps the validation scores of similar candidates differ by noise, and
        picking noise costs accuracy.
        """
        rng = np.random.default_rng([self.seed, 17])
        sx, sy, svx, svy = x, y, vx, vy
        subsampled = x.shape[0] > SEARCH_MAX_ROWS
        if subsampled:
            pick = rng.choice(x.shape[0], SEARCH_MAX_ROWS, replace=False)
            sx, sy = x[pick], y[pick]
            vpick = rng.choice(vx.shape[0], min(vx.shape[0], SEARCH_MAX_ROWS // 4), replace=False)
            svx, svy = vx[vpick], vy[vpick]
        folds = {"config": knob_fold(sx, -2), "extrap": knob_fold(sx, -1)}
        results: list[dict[str, Any]] = []
        errors: list[dict[str, np.ndarray]] = []
        boosters = []
        for settings in CAPACITY_CANDIDATES:
            booster = self._train(settings, self.baseline, sx, sy, svx, svy)
            ape = {"sample": self._errors(booster, self.baseline, sx, svx, svy, {})}
            modes = {"interpolate": False, "extrapolate": False}
            held = self._knob_fold_errors(settings, folds["config"], sx, sy, svx, svy)
            if held is not None:
                off, on = held
                modes["interpolate"] = bool(self.knob_interpolation and _wins(on, off))
                ape["config"] = on if modes["interpolate"] else off
            errors.append(ape)
            results.append(
                {
                    "settings": dict(settings),
                    "knob_modes": modes,
                    "rounds": booster.num_boosted_rounds(),
                    "validation_mape_pct": _mape_pct(ape),
                    "score": float(np.mean(list(_mape_pct(ape).values()))),
                }
            )
            boosters.append(booster)
        best = int(np.argmin([r["score"] for r in results]))
        if best != 0 and not _wins(errors[best], errors[0]):
            best = 0
        chosen = results[best]
        settings, modes = dict(chosen["settings"]), dict(chosen["knob_modes"])
        scores = dict(chosen["validation_mape_pct"])
        held = self._knob_fold_errors(settings, folds["extrap"], sx, sy, svx, svy, "extrapolate")
        if held is not None:
            off, on = held
            modes["extrapolate"] = bool(self.knob_interpolation and _wins(on, off))
            scores["extrap"] = _mape_pct({"": on if modes["extrapolate"] else off})[""]
        validation: dict[str, Any] = {"sample": {"rows": int(svx.shape[0])}}
        for name, fold in folds.items():
            if fold is not None and name in scores:
                validation[name] = {"held_out": fold.values, "rows": int(fold.held_rows(sx).sum())}
        self.capacity = {
            "searched": True,
            "chosen": {**settings, **modes},
            "chosen_scores": scores,
            "validation": {
                **validation,
                "search_rows": int(sx.shape[0]),
                "significance_se": SIGNIFICANCE,
            },
            "candidates": results,
        }
        return settings, modes, None if subsampled else boosters[best]

    def _knob_fold_errors(
        self,
        settings: dict[str, Any],
        fold: KnobFold | None,
        x: np.ndarray,
        y: np.ndarray,
        vx: np.ndarray,
        vy: np.ndarray,
        mode: str = "interpolate",
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Errors on the held-out configurations of ``fold`` of a baseline and trees fitted
        without them (early stopping neither sees them), knob ``mode`` off and on; None when
        the fold cannot be formed."""
        if fold is None or not fold.usable(x, vx):
            return None
        fx, fy = fold.kept(x, y)
        fvx, fvy = fold.kept(vx, vy)
        hx, hy = fold.held(x, y)
        baseline = self._fit_baseline(fx, fy)
        booster = self._train(settings, baseline, fx, fy, fvx, fvy)
        off = self._errors(booster, baseline, fx, hx, hy, {})
        return off, self._errors(booster, baseline, fx, hx, hy, {mode: True})

    def _errors(
        self,
        booster: xgb.Booster,
        baseline: PhysicsBaseline,
        fitted_on: np.ndarray,
        x: np.ndarray,
        y: np.ndarray,
        modes: dict[str, bool],
    ) -> np.ndarray:
        """Absolute relative errors of the table of ``booster`` (as ``fit`` would build it,
        with knob ``modes``) on (x, y)."""
        grid = table_grid(booster, fitted_on).with_modes(**modes)
        table = build_table(booster, baseline, grid, self.max_cells)
        return np.asarray(np.abs(table.predict(x, baseline.predict(x)) - y) / y)

    # -- predict ------------------------------------------------------------------------
    def residual_factor(self, features: np.ndarray) -> np.ndarray:
        """The table's residual factor, float64 [B] (what multiplies the baseline)."""
        x = _as_features(features)
        if x.shape[0] == 0:
            return np.zeros(0)
        return self.table.lookup(x).astype(np.float64)

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Mean prefill time, ms, float64 [B]: ``max(floor, baseline x factor)``."""
        x = _as_features(features)
        if x.shape[0] == 0:
            return np.zeros(0)
        return self.table.predict(x, self.baseline.predict(x))

    def fitted_state(self) -> dict[str, Any]:
        """What ``load`` needs besides the booster and the baseline (JSON-able)."""
        return {
            "table": self.grid.to_dict() if self.grid is not None else None,
            "capacity": self.capacity,
        }

    # -- persistence (file name chosen by the artifact; XGBoost's own UBJSON format) -----
    def save(self, directory: str | Path, mean_file: str = "prefill.ubj") -> None:
        self.booster.save_model(str(Path(directory) / mean_file))

    @classmethod
    def load(
        cls,
        directory: str | Path,
        params: dict[str, Any],
        baseline: dict[str, Any] | None,
        mean_file: str = "prefill.ubj",
        fitted: dict[str, Any] | None = None,
    ) -> PrefillModel:
        """``fitted``: :meth:`fitted_state` of the saved model; without it (latkit 0.3
        artifacts) the table is the trees' own grid, which for their monotone trees predicts
        exactly what latkit 0.3 did."""
        directory = Path(directory)
        known = {k: v for k, v in params.items() if k in cls().get_params()}
        model = cls(**known)
        model.baseline = PhysicsBaseline.from_dict(baseline)
        model.booster = _load_booster(directory / mean_file)
        model.best_iteration = model.booster.num_boosted_rounds() - 1
        config = json.loads(model.booster.save_config())
        model.base_score = float(
            str(config["learner"]["learner_model_param"]["base_score"]).strip("[]").split(",")[0]
        )
        state = dict(fitted or {})
        model.capacity = dict(state.get("capacity") or {})
        if state.get("table"):
            model.grid = TableGrid.from_dict(state["table"])
        else:
            model.grid = tree_grid(model.booster)
        model.table = build_table(model.booster, model.baseline, model.grid, model.max_cells)
        return model


def capacity_summary(capacity: dict[str, Any]) -> str:
    """One line on the trees' capacity: what was chosen and, when searched, its validation
    MAPE on held-out samples and held-out configurations."""
    chosen = capacity.get("chosen") or {}
    if not chosen:
        return "prefill trees: n/a"
    kind = "monotone" if chosen.get("monotone_constraints") else "free"
    text = f"prefill trees: {kind}, depth {chosen.get('max_depth')}"
    if chosen.get("min_child_weight", 1.0) != 1.0:
        text += f", min_child_weight {chosen['min_child_weight']:g}"
    modes = [mode for mode in ("interpolate", "extrapolate") if chosen.get(mode)]
    text += f", knob residual {' + '.join(modes) if modes else 'as the trees give it'}"
    if not capacity.get("searched"):
        return text + " (as configured)"
    labels = {
        "sample": "held-out samples",
        "config": "held-out configurations",
        "extrap": "held-out largest knob values",
    }
    scores = capacity.get("chosen_scores", {})
    parts = [f"{scores[k]:.2f} % on {label}" for k, label in labels.items() if k in scores]
    n = len(capacity.get("candidates", []))
    return text + f" (chosen of {n} on validation MAPE: " + ", ".join(parts) + ")"


@dataclass(frozen=True)
class KnobFold:
    """Configurations held out by knob value: a row is held when any of its knobs takes the
    value given for it."""

    values: dict[str, float]

    def held_rows(self, features: np.ndarray) -> np.ndarray:
        held = np.zeros(features.shape[0], dtype=bool)
        for name, value in self.values.items():
            held |= features[:, FEATURE_NAMES.index(name)] == value
        return held

    def kept(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        keep = ~self.held_rows(x)
        return x[keep], y[keep]

    def held(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        held = self.held_rows(x)
        return x[held], y[held]

    def usable(self, x: np.ndarray, vx: np.ndarray) -> bool:
        held = self.held_rows(x)
        return bool(held.any() and (~held).sum() >= 2 and (~self.held_rows(vx)).any())


def knob_fold(features: np.ndarray, rank: int) -> KnobFold | None:
    """Per knob with at least three profiled values, the one at ``rank`` in sorted order
    (-2: the second-largest, an interior value, as the "config" knob split holds out; -1:
    the largest, as "extrap" does); None when no knob has three."""
    values = {}
    for name in KNOB_FEATURES:
        profiled = np.unique(features[:, FEATURE_NAMES.index(name)])
        if len(profiled) >= 3:
            values[name] = float(profiled[rank])
    return KnobFold(values) if values else None


def _wins(errors: np.ndarray | dict[str, np.ndarray], reference: Any) -> bool:
    """Whether ``errors`` beat ``reference`` (per fold, paired rows) by more than
    ``SIGNIFICANCE`` standard errors of the mean difference (the mean over folds)."""
    mine = errors if isinstance(errors, dict) else {"": errors}
    theirs = reference if isinstance(reference, dict) else {"": reference}
    gains = [theirs[k] - mine[k] for k in mine]
    gain = float(np.mean([g.mean() for g in gains]))
    variance = sum(float(g.var(ddof=1)) / len(g) for g in gains if len(g) > 1)
    return bool(gain > SIGNIFICANCE * np.sqrt(variance) / len(gains))


def _load_booster(path: Path) -> xgb.Booster:
    booster = xgb.Booster()
    try:
        booster.load_model(str(path))
    except xgb.core.XGBoostError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unreadable"
        raise LatkitError(f"{path}: not a readable XGBoost model ({first})") from None
    if booster.num_features() != len(FEATURE_NAMES):
        raise LatkitError(
            f"{path}: model has {booster.num_features()} features, expected {len(FEATURE_NAMES)}"
        )
    booster.set_param({"device": "cpu"})
    return booster
