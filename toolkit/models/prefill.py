"""Prefill model: a physics-shaped baseline times gradient-boosted trees on its residual.

Target: ``T_prefill_total`` (vision encoder + LLM prefill) in ms. Prediction::

    prefill_ms(x) = baseline(x) * exp(trees(x))

- ``baseline``: :class:`~toolkit.models.physics.PhysicsBaseline`, a non-negative linear model
  of the work (prompt tokens x blocks, x top_k, attention, vision tokens, ...), fitted on
  relative error. It carries the model between and beyond profiled knob values.
- ``booster``: XGBoost on ``log(y) - log(baseline(x))`` (squared error on the log: the score
  is relative error and timing noise is multiplicative), with the monotone constraints
  ``PREFILL_MONOTONE``. Trees learn what the baseline misses on profiled configurations and
  are constant beyond the last split, so away from the data the baseline's shape rules.
- ``structure="trees"``: the baseline is the constant 1 ms, i.e. trees alone on log(ms), the
  latkit 0.2 model (kept for ``evaluate --baselines`` as ``trees_only``).

Both factors are positive and non-decreasing in every feature but the tier, so their product
is too. Bounds (P50/P90/P95) are not trees any more: ``HybridLatencyModel`` calibrates them by
split conformal prediction (``toolkit.models.bounds``).

Design choices kept from latkit 0.2, each for a reason:
- ``max_bin <= 128`` and only the five features: the exporter compiles the trees into a
  lookup over the distinct split thresholds, which must stay few.
- Early stopping on a validation split (an internal seeded 10 % split when the caller gives
  none); the saved booster is cut at its best iteration.
- ``nthread=1`` by default: these trees are small and on a shared machine OpenMP threads that
  spin-wait for a busy core made training 10x slower (measured: 20k rows, 2 loaded cores,
  12 s with one thread, 169 s with two). Pass None for all cores.
- ``base_score`` is fixed to the median of the residual: one explicit scalar that an exporter
  reads from the model config instead of re-deriving XGBoost's estimate.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final, Self

import numpy as np
import xgboost as xgb

from toolkit.errors import LatkitError
from toolkit.features import FEATURE_NAMES, PREFILL_MONOTONE
from toolkit.models.physics import PhysicsBaseline

TARGET_TRANSFORMS: Final[tuple[str, ...]] = ("log",)
STRUCTURES: Final[tuple[str, ...]] = ("physics", "trees")


def _as_features(features: np.ndarray) -> np.ndarray:
    array = np.ascontiguousarray(np.asarray(features, dtype=np.float32))
    if array.ndim != 2 or array.shape[1] != len(FEATURE_NAMES):
        raise ValueError(f"features must be [B, {len(FEATURE_NAMES)}], got {array.shape}")
    return array


class PrefillModel:
    """Physics baseline x XGBoost on the log residual (see the module docstring)."""

    booster: xgb.Booster

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
        early_stopping_rounds: int = 40,
        min_delta: float = 1e-5,
        device: str = "cpu",
        seed: int = 3407,
        nthread: int | None = 1,
    ) -> None:
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
        self.early_stopping_rounds = early_stopping_rounds
        self.min_delta = min_delta
        self.device = device
        self.seed = seed
        self.nthread = nthread
        self.base_score: float = 0.0
        self.best_iteration: int = -1
        self.baseline = PhysicsBaseline.constant()

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
            "early_stopping_rounds": self.early_stopping_rounds,
            "min_delta": self.min_delta,
            "device": self.device,
            "seed": self.seed,
            "nthread": self.nthread,
        }

    def _params(self, **extra: Any) -> dict[str, Any]:
        params: dict[str, Any] = {
            "tree_method": "hist",
            "device": self.device,
            "eta": self.learning_rate,
            "max_depth": self.max_depth,
            "max_bin": self.max_bin,
            "min_child_weight": self.min_child_weight,
            "lambda": self.reg_lambda,
            "monotone_constraints": "(" + ",".join(str(c) for c in PREFILL_MONOTONE) + ")",
            "base_score": self.base_score,
            "seed": self.seed,
            "verbosity": 0,
        }
        if self.nthread is not None:
            params["nthread"] = self.nthread
        params.update(extra)
        return params

    def _residual(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.log(y) - np.log(self.baseline.predict(x))

    # -- fit ----------------------------------------------------------------------------
    def fit(
        self,
        features: np.ndarray,
        target: np.ndarray,
        val_features: np.ndarray | None = None,
        val_target: np.ndarray | None = None,
    ) -> Self:
        """Fit the baseline, then the trees on its log residual; early stopping on
        (val_features, val_target)."""
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
        self.baseline = (
            PhysicsBaseline.fit(x, y) if self.structure == "physics" else PhysicsBaseline.constant()
        )
        ty, tvy = self._residual(x, y), self._residual(vx, vy)
        self.base_score = float(np.median(ty))

        train = xgb.QuantileDMatrix(x, ty, max_bin=self.max_bin, feature_names=list(FEATURE_NAMES))
        val = xgb.QuantileDMatrix(
            vx, tvy, ref=train, max_bin=self.max_bin, feature_names=list(FEATURE_NAMES)
        )
        stopper = xgb.callback.EarlyStopping(
            rounds=self.early_stopping_rounds, min_delta=self.min_delta, save_best=True
        )
        self.booster = xgb.train(
            self._params(objective="reg:squarederror", eval_metric="rmse"),
            train,
            num_boost_round=self.n_estimators,
            evals=[(val, "val")],
            callbacks=[stopper],
            verbose_eval=False,
        )
        # Predict on the CPU from numpy whatever device trained it (no device-mismatch copies).
        self.booster.set_param({"device": "cpu"})
        self.best_iteration = self.booster.num_boosted_rounds() - 1
        return self

    # -- predict ------------------------------------------------------------------------
    def residual_factor(self, features: np.ndarray) -> np.ndarray:
        """``exp(trees(x))``, float64 [B]: what the exporter compiles into its table."""
        x = _as_features(features)
        if x.shape[0] == 0:
            return np.zeros(0)
        return np.exp(np.asarray(self.booster.inplace_predict(x), dtype=np.float64))

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Mean prefill time, ms, float64 [B]: baseline x residual factor."""
        x = _as_features(features)
        if x.shape[0] == 0:
            return np.zeros(0)
        return self.baseline.predict(x) * self.residual_factor(x)

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
    ) -> PrefillModel:
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
        return model


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
