"""Prefill model: gradient-boosted trees on the five configuration features.

Target: ``T_prefill_total`` (vision encoder + LLM prefill) in ms. Two boosters share the
feature order ``FEATURE_NAMES`` and the target transform:

- ``booster``: the mean head (squared error).
- ``quantile_booster``: one booster with three outputs for the 0.5, 0.9 and 0.95 quantiles
  (pinball loss as a custom objective, see ``fit`` for why not ``reg:quantileerror``; the saved
  model has an identity link like the mean head), sorted after prediction so they never cross.

Design choices, each for a reason:
- ``target_transform="log"`` (default): the score is relative error (MAPE), and prefill spans
  an order of magnitude across tiers; squared error on log(ms) weighs every sample by its
  relative error. Quantiles commute with a monotone transform, so the quantile heads use the
  same transform. Prediction = exp(margin); the manifest records the transform.
- Monotone constraints ``PREFILL_MONOTONE``: prefill cannot shrink when a prompt gets longer,
  or top_k / active blocks grow. exp() and sorting heads keep that property.
- ``max_bin <= 128`` and only the five features: the exporter compiles the trees into a
  lookup over the distinct split thresholds, which must stay few.
- Early stopping on a validation split (an internal seeded 10 % split when the caller gives
  none); the saved boosters are cut at their best iteration, so the file holds exactly the
  trees that predict.
- ``nthread=1`` by default: these trees are small (5 features, <= 128 bins) and on a shared
  machine OpenMP threads that spin-wait for a busy core made training 10x slower (measured:
  20k rows, 2 loaded cores, 12 s with one thread, 169 s with two). Pass None for all cores.
- ``base_score`` is fixed to the median of the transformed target: one explicit scalar that
  an exporter reads from the model config instead of re-deriving XGBoost's estimate.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final, Self

import numpy as np
import xgboost as xgb

from toolkit.errors import LatkitError
from toolkit.features import FEATURE_NAMES, PREFILL_MONOTONE

QUANTILE_ALPHAS: Final[tuple[float, ...]] = (0.5, 0.9, 0.95)
TARGET_TRANSFORMS: Final[tuple[str, ...]] = ("identity", "log")


def _as_features(features: np.ndarray) -> np.ndarray:
    array = np.ascontiguousarray(np.asarray(features, dtype=np.float32))
    if array.ndim != 2 or array.shape[1] != len(FEATURE_NAMES):
        raise ValueError(f"features must be [B, {len(FEATURE_NAMES)}], got {array.shape}")
    return array


class PrefillModel:
    """XGBoost prefill regressor with P50/P90/P95 heads (see the module docstring)."""

    booster: xgb.Booster
    quantile_booster: xgb.Booster

    def __init__(
        self,
        *,
        target_transform: str = "log",
        n_estimators: int = 2000,
        learning_rate: float = 0.1,
        max_depth: int = 6,
        max_bin: int = 128,
        min_child_weight: float = 1.0,
        reg_lambda: float = 1.0,
        early_stopping_rounds: int = 40,
        min_delta: float = 1e-5,
        quantile_n_estimators: int = 400,
        quantile_max_rows: int = 20_000,
        device: str = "cpu",
        seed: int = 3407,
        nthread: int | None = 1,
    ) -> None:
        if target_transform not in TARGET_TRANSFORMS:
            raise ValueError(f"target_transform must be one of {TARGET_TRANSFORMS}")
        if max_bin > 256:
            raise ValueError("max_bin must stay <= 256 (the exporter compiles thresholds)")
        self.target_transform = target_transform
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.max_depth = max_depth
        self.max_bin = max_bin
        self.min_child_weight = min_child_weight
        self.reg_lambda = reg_lambda
        self.early_stopping_rounds = early_stopping_rounds
        self.min_delta = min_delta
        self.quantile_n_estimators = quantile_n_estimators
        self.quantile_max_rows = quantile_max_rows
        self.device = device
        self.seed = seed
        self.nthread = nthread
        self.base_score: float = 0.0
        self.best_iteration: int = -1
        self.quantile_best_iteration: int = -1

    # -- parameters ---------------------------------------------------------------------
    def get_params(self) -> dict[str, Any]:
        """Constructor parameters (JSON-able), recorded in the artifact manifest."""
        return {
            "target_transform": self.target_transform,
            "n_estimators": self.n_estimators,
            "learning_rate": self.learning_rate,
            "max_depth": self.max_depth,
            "max_bin": self.max_bin,
            "min_child_weight": self.min_child_weight,
            "reg_lambda": self.reg_lambda,
            "early_stopping_rounds": self.early_stopping_rounds,
            "min_delta": self.min_delta,
            "quantile_n_estimators": self.quantile_n_estimators,
            "quantile_max_rows": self.quantile_max_rows,
            "device": self.device,
            "seed": self.seed,
            "nthread": self.nthread,
        }

    def _forward(self, y: np.ndarray) -> np.ndarray:
        return np.log(y) if self.target_transform == "log" else y

    def _inverse(self, margin: np.ndarray) -> np.ndarray:
        margin = np.asarray(margin, dtype=np.float64)
        return np.exp(margin) if self.target_transform == "log" else margin

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

    # -- fit ----------------------------------------------------------------------------
    def fit(
        self,
        features: np.ndarray,
        target: np.ndarray,
        val_features: np.ndarray | None = None,
        val_target: np.ndarray | None = None,
    ) -> Self:
        """Fit both boosters; early stopping on (val_features, val_target)."""
        x = _as_features(features)
        y = np.asarray(target, dtype=np.float64).ravel()
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{x.shape[0]} feature rows but {y.shape[0]} targets")
        keep = np.isfinite(y) & (y > 0 if self.target_transform == "log" else True)
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
            vkeep = np.isfinite(vy) & (vy > 0 if self.target_transform == "log" else True)
            vx, vy = vx[vkeep], vy[vkeep]
            if vx.shape[0] == 0:
                vx, vy = x, y
        ty, tvy = self._forward(y), self._forward(vy)
        self.base_score = float(np.median(ty))

        train = xgb.QuantileDMatrix(x, ty, max_bin=self.max_bin, feature_names=list(FEATURE_NAMES))
        val = xgb.QuantileDMatrix(
            vx, tvy, ref=train, max_bin=self.max_bin, feature_names=list(FEATURE_NAMES)
        )
        self.booster = self._train(
            self._params(objective="reg:squarederror", eval_metric="rmse"),
            train,
            val,
            self.n_estimators,
        )
        self.best_iteration = self.booster.num_boosted_rounds() - 1

        # Quantile heads: XGBoost's quantile objective re-fits leaf values by a per-leaf
        # quantile search, several times the cost of the mean head; a seeded subsample of
        # quantile_max_rows rows estimates P50-P95 just as well and keeps training fast.
        if x.shape[0] > self.quantile_max_rows:
            pick = np.sort(rng.choice(x.shape[0], self.quantile_max_rows, replace=False))
            qx, qy = x[pick], ty[pick]
        else:
            qx, qy = x, ty
        # One booster, three outputs (one tree per output and round). The pinball loss is a
        # custom objective rather than XGBoost's reg:quantileerror: that objective re-fits
        # leaf values after each tree ("adaptive" leaves) without the monotone constraints,
        # and measured heads then decreased along vision_tokens. With the plain gradient
        # (hessian 1) every tree obeys the constraints, so every head is monotone.
        alphas = np.asarray(QUANTILE_ALPHAS)
        qtrain = xgb.QuantileDMatrix(
            qx,
            np.repeat(qy[:, None], len(alphas), axis=1),
            max_bin=self.max_bin,
            feature_names=list(FEATURE_NAMES),
        )
        qval = xgb.QuantileDMatrix(
            vx,
            np.repeat(tvy[:, None], len(alphas), axis=1),
            ref=qtrain,
            max_bin=self.max_bin,
            feature_names=list(FEATURE_NAMES),
        )
        self.quantile_booster = self._train(
            self._params(
                objective="reg:squarederror",
                num_target=len(alphas),
                multi_strategy="one_output_per_tree",
                disable_default_eval_metric=1,
            ),
            qtrain,
            qval,
            self.quantile_n_estimators,
            obj=_pinball_objective(alphas),
            custom_metric=_pinball_metric(alphas),
        )
        self.quantile_best_iteration = self.quantile_booster.num_boosted_rounds() - 1
        return self

    def _train(
        self,
        params: dict[str, Any],
        train: xgb.DMatrix,
        val: xgb.DMatrix,
        rounds: int,
        obj: Any = None,
        custom_metric: Any = None,
    ) -> xgb.Booster:
        stopper = xgb.callback.EarlyStopping(
            rounds=self.early_stopping_rounds, min_delta=self.min_delta, save_best=True
        )
        booster = xgb.train(
            params,
            train,
            num_boost_round=rounds,
            evals=[(val, "val")],
            obj=obj,
            custom_metric=custom_metric,
            callbacks=[stopper],
            verbose_eval=False,
        )
        # Predict on the CPU from numpy whatever device trained it (no device-mismatch copies).
        booster.set_param({"device": "cpu"})
        return booster

    # -- predict ------------------------------------------------------------------------
    def predict(self, features: np.ndarray) -> np.ndarray:
        """Mean prefill time, ms, float64 [B]."""
        x = _as_features(features)
        if x.shape[0] == 0:
            return np.zeros(0)
        return self._inverse(self.booster.inplace_predict(x))

    def predict_quantiles(self, features: np.ndarray) -> np.ndarray:
        """P50, P90, P95 prefill time, ms, float64 [B, 3], sorted so they never cross."""
        x = _as_features(features)
        if x.shape[0] == 0:
            return np.zeros((0, len(QUANTILE_ALPHAS)))
        margin = np.asarray(self.quantile_booster.inplace_predict(x)).reshape(
            x.shape[0], len(QUANTILE_ALPHAS)
        )
        return np.sort(self._inverse(margin), axis=1)

    # -- persistence (file names chosen by the artifact; XGBoost's own UBJSON format) ----
    def save(
        self,
        directory: str | Path,
        mean_file: str = "prefill.ubj",
        quantile_file: str = "prefill_quantiles.ubj",
    ) -> None:
        directory = Path(directory)
        self.booster.save_model(str(directory / mean_file))
        self.quantile_booster.save_model(str(directory / quantile_file))

    @classmethod
    def load(
        cls,
        directory: str | Path,
        params: dict[str, Any],
        mean_file: str = "prefill.ubj",
        quantile_file: str = "prefill_quantiles.ubj",
    ) -> PrefillModel:
        directory = Path(directory)
        known = {k: v for k, v in params.items() if k in cls().get_params()}
        model = cls(**known)
        model.booster = _load_booster(directory / mean_file)
        model.quantile_booster = _load_booster(directory / quantile_file)
        model.best_iteration = model.booster.num_boosted_rounds() - 1
        model.quantile_best_iteration = model.quantile_booster.num_boosted_rounds() - 1
        config = json.loads(model.booster.save_config())
        model.base_score = float(
            str(config["learner"]["learner_model_param"]["base_score"]).strip("[]").split(",")[0]
        )
        return model


def _pinball_objective(alphas: np.ndarray) -> Any:
    """Gradient of the pinball (quantile) loss per output, hessian 1: [n, len(alphas)]."""

    def objective(predt: np.ndarray, data: xgb.DMatrix) -> tuple[np.ndarray, np.ndarray]:
        label = data.get_label().reshape(predt.shape)
        grad = (predt >= label).astype(np.float64) - alphas[None, :]
        return grad, np.ones_like(grad)

    return objective


def _pinball_metric(alphas: np.ndarray) -> Any:
    def metric(predt: np.ndarray, data: xgb.DMatrix) -> tuple[str, float]:
        label = data.get_label().reshape(predt.shape)
        diff = label - predt
        loss = np.maximum(alphas[None, :] * diff, (alphas[None, :] - 1.0) * diff)
        return "pinball", float(loss.mean())

    return metric


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
