"""HybridLatencyModel: physics x trees prefill + decode network, one artifact directory.

Prefill is learned by :class:`PrefillModel` (a physics baseline times trees on its residual).
Decode is learned by :class:`DecodeNet`: per-pass time = a(config) + c(config) x KV length,
whose total over any number of passes is a closed form (``toolkit.models.decode``); its
training engine (packing, losses, epochs) is ``toolkit.models.decode_training``. The bounds
are split-conformal factors calibrated on samples the models were not fitted on
(``toolkit.models.bounds``). ``fit`` learns, ``predict`` is pure, ``save``/``load`` write and
read one verified artifact directory (``toolkit.models.artifact``; nothing is unpickled).
"""

from __future__ import annotations

import copy
import datetime as _dt
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

import numpy as np
import polars as pl
import torch
import xgboost as xgb
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from toolkit import __version__
from toolkit.errors import LatkitError
from toolkit.features import (
    FEATURE_NAMES,
    OUTPUT_NAMES,
    OUTPUT_TOKENS_MULTIPLE,
    feature_matrix,
    impossible_inputs,
    supported_output_tokens,
    supported_range,
)
from toolkit.metrics import jsonable, score_frame
from toolkit.models.artifact import (
    DECODE_FILE,
    FORMAT,
    TRAINING_DATA_FILE,
    read_verified_manifest,
    write_artifact,
)
from toolkit.models.bounds import ConformalBounds
from toolkit.models.calibration import Calibration
from toolkit.models.decode import (
    BASIS_TERMS,
    DEFAULT_INPUTS,
    IDENTITY_PRIOR,
    KV_UNIT,
    N_BASIS,
    DecodeNet,
    decode_outputs,
    decode_pass_ms,
    prompt_tokens,
)
from toolkit.models.decode_training import (
    SUM_LOSSES,
    DecodeTraining,
    EpochLog,
    auto_batch_size,
    build_decode_data,
    decode_scale_ms,
    fit_decode_net,
)
from toolkit.models.prefill import PrefillModel

log = logging.getLogger(__name__)

#: Columns kept in ``training_data.parquet`` (baselines of ``evaluate`` refit on them).
TRAINING_DATA_COLUMNS: tuple[str, ...] = (
    *FEATURE_NAMES,
    "tier",
    "config",
    "dataset",
    "output_tokens",
    "n_decode_passes",
    "T_prefill_total",
    "T_LLM_decode",
    "T_decode_per_token",
)
_REQUIRED_COLUMNS: tuple[str, ...] = (
    *FEATURE_NAMES,
    "output_tokens",
    "n_decode_passes",
    "T_prefill_total",
    "T_LLM_decode",
)
__all__ = ["EpochLog", "HybridLatencyModel", "auto_batch_size", "resolve_device"]


def resolve_device(device: str) -> str:
    """``auto``: ``cuda`` when torch sees a GPU, else ``cpu``; ``cuda`` without a GPU: error."""
    name = device.strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise LatkitError(f"--device {device}: no CUDA device is visible to torch")
        return name
    if name == "cpu":
        return "cpu"
    raise LatkitError(f"--device {device!r}: expected auto, cpu or cuda")


def _finite_float(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _fmt_values(values: np.ndarray) -> str:
    unique = np.unique(values)
    shown = ", ".join(f"{v:g}" for v in unique[:3])
    return shown + (f" (and {len(unique) - 3} more)" if len(unique) > 3 else "")


def _num_total_blocks(samples: pl.DataFrame) -> int | None:
    """The profiled model's block count as its result files state it (the largest, should
    they differ), or None when they do not say."""
    if "num_total_blocks" not in samples.columns:
        return None
    value = samples["num_total_blocks"].max()
    return int(value) if isinstance(value, int | float) else None


def predicted_passes(output_tokens: np.ndarray) -> np.ndarray:
    """Decode passes of a prediction, float64: N output tokens take N - 1 (the first comes
    with the prefill)."""
    return np.clip(np.asarray(output_tokens, dtype=np.float64) - 1.0, 0.0, None)


def _stage_pairs(
    samples: pl.DataFrame, pred: dict[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(prefill actual, prefill predicted, decode actual, decode predicted, decode passes of
    the prediction) of a frame."""
    return (
        samples["T_prefill_total"].to_numpy().astype(np.float64),
        pred["prefill_ms"],
        samples["T_LLM_decode"].to_numpy().astype(np.float64),
        pred["decode_total_ms"],
        predicted_passes(samples["output_tokens"].to_numpy()),
    )


def _check_columns(frame: pl.DataFrame, what: str) -> None:
    missing = [c for c in _REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise LatkitError(f"{what} frame lacks columns: {', '.join(missing)}")


class HybridLatencyModel:
    """Prefill trees + decode network. ``fit`` learns, ``predict`` is pure, ``save``/``load``."""

    prefill: PrefillModel
    decode_net: DecodeNet
    manifest: dict[str, Any]

    def __init__(
        self,
        *,
        device: str = "auto",
        seed: int = 3407,
        num_epochs: int = 50,
        batch_size: int | None = None,
        lr: float = 1e-2,
        hidden: int = 64,
        # One hidden layer: as accurate as two on the bundled sweeps (within the seed-to-seed
        # spread) and one node less in the exported graph (~0.4 µs of a batch-1 query).
        n_layers: int = 1,
        step_weight: float = 1.0,
        prefill_weight: float = 2.0,
        decode_weight: float = 1.0,
        prefill_params: dict[str, Any] | None = None,
        cpu_threads: int | None = 1,
        sum_loss: str = "log_abs",
        calibration_fraction: float = 0.2,
        decode_inputs: tuple[str, ...] | list[str] = DEFAULT_INPUTS,
    ) -> None:
        self.device = device
        self.seed = seed
        self.num_epochs = num_epochs
        self.batch_size = batch_size
        self.lr = lr
        self.hidden = hidden
        self.n_layers = n_layers
        self.step_weight = step_weight
        self.prefill_weight = prefill_weight
        self.decode_weight = decode_weight
        self.prefill_params = dict(prefill_params or {})
        self.cpu_threads = cpu_threads
        if sum_loss not in SUM_LOSSES:
            raise ValueError(f"sum_loss must be one of {', '.join(SUM_LOSSES)}, got {sum_loss!r}")
        self.sum_loss = sum_loss
        if not 0.0 < calibration_fraction < 1.0:
            raise ValueError(f"calibration_fraction must be in (0, 1), got {calibration_fraction}")
        self.calibration_fraction = calibration_fraction
        self.decode_inputs = tuple(decode_inputs)
        self.decode_net = DecodeNet(hidden=hidden, n_layers=n_layers, inputs=self.decode_inputs)
        self.manifest = {}
        self.training_data: pl.DataFrame | None = None
        self.history: list[EpochLog] = []
        # Identity unless ``latkit recalibrate`` moved the model to another machine.
        self.calibration = Calibration()
        # Conformal factors of the bounds (identity until fit calibrates them).
        self.bounds = ConformalBounds()
        self._decode_scale_ms = 1.0
        self._decode_counts: dict[str, int] = {}

    def get_params(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "seed": self.seed,
            "num_epochs": self.num_epochs,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "hidden": self.hidden,
            "n_layers": self.n_layers,
            "step_weight": self.step_weight,
            "prefill_weight": self.prefill_weight,
            "decode_weight": self.decode_weight,
            "prefill_params": dict(self.prefill_params),
            "cpu_threads": self.cpu_threads,
            "sum_loss": self.sum_loss,
            "calibration_fraction": self.calibration_fraction,
            "decode_inputs": list(self.decode_inputs),
        }

    # -- fit ----------------------------------------------------------------------------
    def fit(
        self,
        samples: pl.DataFrame,
        steps: pl.DataFrame | None = None,
        *,
        val_samples: pl.DataFrame | None = None,
        val_steps: pl.DataFrame | None = None,
        on_epoch: Callable[[EpochLog], None] | None = None,
        progress: bool = False,
    ) -> Self:
        """Fit the prefill model (early stopping on ``val_samples``), then the decode net,
        then calibrate the bounds.

        The calibration part is a seeded ``calibration_fraction`` of ``samples``: the models
        are fitted on the rest, so the calibration scores are honest, and ``val_samples``
        (early stopping, reported validation metrics, ``evaluate --held-out-only``) never
        touch the bounds. ``training_data`` keeps both parts, with a ``role`` column ("fit"
        or "calibration"). ``on_epoch`` is called after every decode epoch; ``progress``
        shows a tqdm bar on stderr. The decode weights of the epoch with the lowest
        validation loss are kept.
        """
        _check_columns(samples, "training samples")
        if samples.height == 0:
            raise LatkitError("no training samples")
        if val_samples is not None and val_samples.height > 0:
            _check_columns(val_samples, "validation samples")
        samples, calibration_samples = self._calibration_split(samples)
        has_val = val_samples is not None and val_samples.height > 0
        device = resolve_device(self.device)

        x = feature_matrix(samples)
        y_prefill = samples["T_prefill_total"].to_numpy().astype(np.float64)
        vx = feature_matrix(val_samples) if has_val and val_samples is not None else None
        vy = (
            val_samples["T_prefill_total"].to_numpy().astype(np.float64)
            if has_val and val_samples is not None
            else None
        )
        params = {"seed": self.seed, **self.prefill_params, "device": device}
        self.prefill = PrefillModel(**params).fit(x, y_prefill, vx, vy)
        prefill_term = self._prefill_rel_mse(x, y_prefill)
        eval_x, eval_y = (vx, vy) if vx is not None and vy is not None else (x, y_prefill)
        prefill_mae = float(np.mean(np.abs(self.prefill.predict(eval_x) - eval_y)))

        self._fit_decode(
            samples,
            steps,
            val_samples if has_val else None,
            val_steps,
            device,
            prefill_term,
            prefill_mae,
            on_epoch,
            progress,
        )

        self.bounds = ConformalBounds()
        if calibration_samples.height:
            pred = self.predict_frame(calibration_samples)
            self.bounds = ConformalBounds.fit(*_stage_pairs(calibration_samples, pred))
        present = [c for c in TRAINING_DATA_COLUMNS if c in samples.columns]
        self.training_data = pl.concat(
            [
                samples.select(present).with_columns(pl.lit("fit").alias("role")),
                calibration_samples.select(present).with_columns(
                    pl.lit("calibration").alias("role")
                ),
            ]
        )
        self.manifest = self._describe(samples, val_samples if has_val else None)
        self.manifest["training_summary"]["n_calibration"] = calibration_samples.height
        return self

    def _calibration_split(self, samples: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
        """(fit samples, calibration samples); see ``fit``."""
        if samples.height < 10:
            # Too few to spare any: uncalibrated bounds (factors 1), said in the manifest.
            return samples, samples.head(0)
        rng = np.random.default_rng([self.seed, 29])
        pick = np.zeros(samples.height, dtype=bool)
        n_cal = max(1, round(samples.height * self.calibration_fraction))
        pick[rng.permutation(samples.height)[:n_cal]] = True
        mask = pl.Series(pick)
        return samples.filter(~mask), samples.filter(mask)

    def _prefill_rel_mse(self, x: np.ndarray, y: np.ndarray) -> float:
        ok = y > 0
        if not ok.any():
            return 0.0
        rel = (self.prefill.predict(x[ok]) - y[ok]) / y[ok]
        return float(np.mean(rel * rel))

    def _decode_training(self) -> DecodeTraining:
        return DecodeTraining(
            hidden=self.hidden,
            n_layers=self.n_layers,
            inputs=self.decode_inputs,
            seed=self.seed,
            num_epochs=self.num_epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            step_weight=self.step_weight,
            sum_loss=self.sum_loss,
            prefill_weight=self.prefill_weight,
            decode_weight=self.decode_weight,
            cpu_threads=self.cpu_threads,
        )

    def _fit_decode(
        self,
        samples: pl.DataFrame,
        steps: pl.DataFrame | None,
        val_samples: pl.DataFrame | None,
        val_steps: pl.DataFrame | None,
        device: str,
        prefill_term: float,
        prefill_mae: float,
        on_epoch: Callable[[EpochLog], None] | None,
        progress: bool,
    ) -> None:
        scale = decode_scale_ms(samples)
        train = build_decode_data(samples, steps, scale)
        val = build_decode_data(val_samples, val_steps, scale) if val_samples is not None else None
        self._decode_scale_ms = scale
        self._decode_counts = {
            "train_samples": train.n,
            "train_steps": train.n_steps,
            "val_samples": val.n if val else 0,
            "val_steps": val.n_steps if val else 0,
        }
        self.decode_net, self.history = fit_decode_net(
            self._decode_training(),
            train,
            val,
            scale,
            feature_matrix(samples),
            device,
            prefill_term=prefill_term,
            prefill_mae_ms=prefill_mae,
            on_epoch=on_epoch,
            progress=progress,
        )

    # -- predict ------------------------------------------------------------------------
    def predict(self, features: np.ndarray, output_tokens: np.ndarray) -> dict[str, np.ndarray]:
        """All predictions for B configurations, ms, float64 [B] each (see the contract)."""
        x = np.ascontiguousarray(np.asarray(features, dtype=np.float32))
        if x.ndim != 2 or x.shape[1] != len(FEATURE_NAMES):
            raise ValueError(f"features must be [B, {len(FEATURE_NAMES)}], got {x.shape}")
        tokens = np.asarray(output_tokens, dtype=np.float32).reshape(-1)
        if tokens.shape[0] != x.shape[0]:
            raise ValueError(f"{x.shape[0]} feature rows but {tokens.shape[0]} output_tokens")
        problems = impossible_inputs(x, tokens)
        if problems:
            raise LatkitError("impossible input: " + "; ".join(problems))
        cal = self.calibration
        prefill = cal.prefill(self.prefill.predict(x))
        with torch.no_grad():
            x_tensor = torch.from_numpy(x)
            total, _ = decode_outputs(
                self.decode_net(x_tensor), torch.from_numpy(tokens), prompt_tokens(x_tensor)
            )
        passes = predicted_passes(tokens)
        decode_total = cal.decode_total(total.numpy().astype(np.float64), passes)
        per_token = np.where(passes > 0, decode_total / np.maximum(passes, 1.0), 0.0)
        total = prefill + decode_total
        out = {
            "prefill_ms": prefill,
            "decode_total_ms": decode_total,
            "decode_per_token_ms": per_token,
            "total_ms": total,
        }
        out.update(self.bounds.apply(prefill, decode_total, per_token))
        return {name: out[name] for name in OUTPUT_NAMES}

    def supported_ranges(self) -> dict[str, tuple[float, float]]:
        """Per feature, the range answered without an extrapolation flag: the training range
        widened by ``EXTRAPOLATION_MARGIN`` (``toolkit.features.supported_range``)."""
        ranges = self.manifest.get("training_summary", {}).get("feature_ranges", {})
        return {
            name: supported_range(name, *ranges[name]) for name in FEATURE_NAMES if name in ranges
        }

    def supported_output_tokens(self) -> float:
        """Largest output length answered without an extrapolation flag (a stated multiple
        of the longest trained answer, ``toolkit.features.OUTPUT_TOKENS_MULTIPLE``); inf for a
        manifest without the training range."""
        tokens = self.manifest.get("training_summary", {}).get("output_tokens_range")
        return supported_output_tokens(tokens[1]) if tokens else math.inf

    @property
    def num_total_blocks(self) -> int | None:
        """Decoder blocks of the profiled model (from the training data), when recorded."""
        value = self.manifest.get("training_summary", {}).get("num_total_blocks")
        return int(value) if value is not None else None

    def extrapolation(
        self, features: np.ndarray, output_tokens: np.ndarray | None = None
    ) -> tuple[np.ndarray, list[str]]:
        """(bool [B]: row lies beyond the supported range, one message per such input)."""
        x = np.asarray(features, dtype=np.float64)
        flags = np.zeros(x.shape[0], dtype=bool)
        messages = []
        training = self.manifest.get("training_summary", {}).get("feature_ranges", {})
        for name, (low, high) in self.supported_ranges().items():
            values = x[:, FEATURE_NAMES.index(name)]
            beyond = (values < low) | (values > high)
            if beyond.any():
                flags |= beyond
                lo, hi = training[name]
                messages.append(
                    f"warning: {name} {_fmt_values(values[beyond])} is beyond the training range "
                    f"{lo:g}-{hi:g} by more than the supported margin ({low:g}-{high:g}); "
                    "the prediction is an extrapolation"
                )
        if output_tokens is not None:
            tokens = np.asarray(output_tokens, dtype=np.float64).ravel()
            limit = self.supported_output_tokens()
            beyond = tokens > limit
            if beyond.any():
                flags |= beyond
                longest = self.manifest["training_summary"]["output_tokens_range"][1]
                messages.append(
                    f"warning: output_tokens {_fmt_values(tokens[beyond])} is beyond "
                    f"{OUTPUT_TOKENS_MULTIPLE:g}x the longest trained answer ({longest:g} "
                    f"tokens, supported up to {limit:g}); the decode prediction is an "
                    "extrapolation"
                )
        return flags, messages

    def answer_budget(self, text_tokens: int, budget_ms: float, **options: Any) -> pl.DataFrame:
        """Which configurations fit ``budget_ms`` for one request, ranked, with output room.

        Options as ``toolkit.controller.answer_budget`` (vision_tokens, output_tokens,
        configs, safety, bound, rank, max_tokens).
        """
        from toolkit.controller import answer_budget

        options.setdefault("supported_output_tokens", self.supported_output_tokens())
        return answer_budget(self.predict, text_tokens, budget_ms, **options)

    def max_output_tokens(
        self, features: np.ndarray, budget_ms: float | np.ndarray, bound: str = "mean"
    ) -> np.ndarray:
        """Largest output length per row with prefill + decode total <= budget (0: none)."""
        from toolkit.controller import max_output_tokens

        return max_output_tokens(self.predict, features, budget_ms, bound=bound)

    def with_calibration(
        self, calibration: Calibration, bounds: ConformalBounds | None = None
    ) -> HybridLatencyModel:
        """A copy that predicts through ``calibration`` (see ``toolkit.models.calibration``)
        and, when given, with re-calibrated ``bounds``."""
        calibrated = copy.copy(self)
        calibrated.calibration = calibration
        calibrated.manifest = {**self.manifest, "calibration": calibration.to_dict()}
        if bounds is not None:
            calibrated.bounds = bounds
            calibrated.manifest["bounds"] = bounds.to_dict()
        return calibrated

    def uncalibrated(self) -> HybridLatencyModel:
        """A copy with the identity calibration: the model as it was trained (bounds too)."""
        trained = ConformalBounds.from_dict(self.manifest.get("trained_bounds"))
        return self.with_calibration(Calibration(), trained if self.manifest else None)

    def predict_frame(self, samples: pl.DataFrame) -> dict[str, np.ndarray]:
        return self.predict(feature_matrix(samples), samples["output_tokens"].to_numpy())

    def predict_decode_passes(self, features: np.ndarray, ks: np.ndarray) -> np.ndarray:
        """Time of decode passes ``ks`` (1-based), ms: ks [K] or [B, K] -> [B, K] float64."""
        x = torch.from_numpy(np.ascontiguousarray(np.asarray(features, dtype=np.float32)))
        k = torch.as_tensor(np.asarray(ks, dtype=np.float32))
        if k.dim() == 1:
            k = k.unsqueeze(0).expand(x.shape[0], -1)
        with torch.no_grad():
            out = decode_pass_ms(self.decode_net(x), k, prompt_tokens(x))
        return self.calibration.decode_pass(out.numpy().astype(np.float64))

    # -- description --------------------------------------------------------------------
    def _describe(self, samples: pl.DataFrame, val: pl.DataFrame | None) -> dict[str, Any]:
        x = feature_matrix(samples)
        summary: dict[str, Any] = {
            "n_train": samples.height,
            "n_val": val.height if val is not None else 0,
            "split": None,
            "seed": self.seed,
            "datasets": sorted(samples["dataset"].unique().to_list())
            if "dataset" in samples.columns
            else [],
            "feature_ranges": {
                name: [float(x[:, i].min()), float(x[:, i].max())]
                for i, name in enumerate(FEATURE_NAMES)
            },
            "output_tokens_range": [
                int(samples["output_tokens"].to_numpy().min()),
                int(samples["output_tokens"].to_numpy().max()),
            ],
            "configs": int(samples["config"].n_unique()) if "config" in samples.columns else None,
            "num_total_blocks": _num_total_blocks(samples),
            "decode": dict(self._decode_counts),
        }
        best = [h for h in self.history if h.best]
        manifest: dict[str, Any] = {
            "created_utc": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "versions": {
                "latkit": __version__,
                "xgboost": xgb.__version__,
                "torch": torch.__version__.split("+")[0],
            },
            "feature_names": list(FEATURE_NAMES),
            "target_transform": self.prefill.target_transform,
            "prefill": {
                "params": self.prefill.get_params(),
                "base_score": self.prefill.base_score,
                "n_trees": self.prefill.booster.num_boosted_rounds(),
                "baseline": self.prefill.baseline.to_dict(),
                # The table's grid and the capacity search's choice and scores.
                **self.prefill.fitted_state(),
            },
            "bounds": self.bounds.to_dict(),
            # The bounds as training calibrated them (recalibration replaces "bounds").
            "trained_bounds": self.bounds.to_dict(),
            "n_basis": N_BASIS,
            "decode_basis": {"terms": list(BASIS_TERMS), "kv_unit": KV_UNIT},
            "decode_net": self.decode_net.hyper_params(),
            # Informative: the weights themselves travel in the decode file's prior buffer.
            "decode_prior_ms": self.decode_net.prior_ms(),
            "decode_scale_ms": self._decode_scale_ms,
            "model_params": self.get_params(),
            "training_summary": summary,
            "best_epoch": best[-1].epoch if best else None,
            "history": [
                {
                    "epoch": h.epoch,
                    "loss": _finite_float(h.loss),
                    "val_loss": _finite_float(h.val_loss),
                    "decode_total_mae_ms": _finite_float(h.decode_total_mae_ms),
                }
                for h in self.history
            ],
            "validation_metrics": self.evaluate(val) if val is not None else {},
        }
        return manifest

    def evaluate(self, samples: pl.DataFrame) -> dict[str, Any]:
        """Metrics of every output against a samples frame (JSON-able, NaN -> null): the
        scoring of ``latkit evaluate`` (``toolkit.metrics.score_frame``)."""
        scores: dict[str, Any] = jsonable(score_frame(samples, self.predict_frame(samples)))
        return scores

    # -- persistence --------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """Write the artifact directory atomically (temp dir, then rename)."""
        if not hasattr(self.prefill, "booster"):
            raise LatkitError("model is not fitted; nothing to save")
        training_data = self.training_data if self.training_data is not None else pl.DataFrame()

        def write_files(tmp: Path) -> None:
            self.prefill.save(tmp)
            state = {
                k: v.detach().cpu().contiguous() for k, v in self.decode_net.state_dict().items()
            }
            save_file(state, str(tmp / DECODE_FILE), metadata={"format": FORMAT})
            training_data.write_parquet(tmp / TRAINING_DATA_FILE)

        write_artifact(directory, write_files, self.manifest)

    @classmethod
    def load(cls, directory: str | Path) -> HybridLatencyModel:
        """Load a verified artifact; a corrupt, truncated or foreign one raises LatkitError."""
        directory = Path(directory)
        manifest = read_verified_manifest(directory)
        where = directory / "manifest.json"
        if manifest.get("feature_names") != list(FEATURE_NAMES):
            raise LatkitError(
                f"{where}: feature_names {manifest.get('feature_names')} differ "
                f"from this latkit's {list(FEATURE_NAMES)}"
            )
        basis = manifest.get("decode_basis") or {}
        if manifest.get("n_basis") != N_BASIS or basis.get("terms") != list(BASIS_TERMS):
            raise LatkitError(
                f"{where}: decode basis {basis.get('terms')} is not this latkit's "
                f"{list(BASIS_TERMS)}; retrain the model with this latkit"
            )
        try:
            params = dict(manifest["model_params"])
            model = cls(**params)
            prefill_params = dict(manifest["prefill"]["params"])
            net = DecodeNet(**manifest["decode_net"])
        except (KeyError, TypeError, ValueError) as exc:
            raise LatkitError(f"{where}: incomplete manifest ({exc})") from None
        model.prefill = PrefillModel.load(
            directory,
            prefill_params,
            manifest["prefill"].get("baseline"),
            fitted=manifest["prefill"],
        )
        model.prefill.target_transform = str(manifest.get("target_transform", "log"))
        try:
            state = load_file(str(directory / DECODE_FILE))
            # Artifacts written before the physics prior carry the network alone, which is
            # what the identity prior computes.
            state.setdefault("prior", torch.tensor(IDENTITY_PRIOR, dtype=torch.float32))
            net.load_state_dict(state, strict=True)
        except (SafetensorError, RuntimeError, OSError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unreadable"
            raise LatkitError(f"{directory / DECODE_FILE}: bad decode weights ({first})") from None
        model.decode_net = net.eval()
        model._decode_scale_ms = float(manifest.get("decode_scale_ms", 1.0))
        try:
            model.training_data = pl.read_parquet(directory / TRAINING_DATA_FILE)
        except Exception as exc:  # polars raises several error types for a bad file
            raise LatkitError(f"{directory / TRAINING_DATA_FILE}: unreadable ({exc})") from None
        try:
            model.calibration = Calibration.from_dict(manifest.get("calibration"))
            model.bounds = ConformalBounds.from_dict(manifest.get("bounds"))
        except (KeyError, TypeError, ValueError) as exc:
            raise LatkitError(f"{where}: bad calibration or bounds block ({exc})") from None
        model.manifest = manifest
        return model
