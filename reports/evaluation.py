"""One evaluation of a latency model on profiled samples; text, JSON and HTML are its views.

``evaluate_model`` computes it: an ``Evaluation`` (a typed dict, JSON-able through
``jsonable``) with every metric, bias and coverage (``toolkit.metrics.score_frame``), the
per-configuration table, profiled vs never-profiled configurations, the noise floor, the
verdicts, long answers (``reports.long_answers``), the warnings a user must see, the
baselines side by side and what the model card shows. ``run_evaluation`` is what
``latkit evaluate`` and ``latkit report`` call: load the checkpoint and the samples, evaluate,
write the JSON. The views: ``write_evaluation`` (JSON, NaN as null), ``reports.text``
(terminal), ``reports.html`` (the report page); they compute nothing of their own.

Beyond accuracy: ``coverage`` (share of actuals at or below each bound output, against its
nominal level) and ``bias`` (share of actuals at or below the point prediction, 0.5 =
unbiased), and every configuration marked ``profiled`` or not (in the model's training data
or not), with the never-profiled configurations scored apart (``profiling``): DESIGN.md's
"configs never profiled" and "safe bounds" targets.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol, TypedDict

import numpy as np
import polars as pl

from reports.baselines import (
    BASELINE_NAMES,
    LinearBaseline,
    LookupTableBaseline,
    OriginalSingleNetwork,
    TreesOnlyPrefill,
    baseline_training_samples,
)
from reports.long_answers import LongAnswers, long_answer_summary
from toolkit.atomic import write_json_atomic
from toolkit.checkpoint import load_model, training_split
from toolkit.errors import LatkitError
from toolkit.features import config_name, feature_matrix
from toolkit.metrics import FrameScores, decode_passes, jsonable, score_frame
from toolkit.training import CONFIG_KEYS
from toolkit.versions import installed_versions

if TYPE_CHECKING:
    from toolkit.data import LoadResult

log = logging.getLogger(__name__)

#: The packages an evaluation records the versions of.
RECORDED_PACKAGES = ("latkit", "numpy", "polars", "xgboost", "torch", "matplotlib")

__all__ = [
    "METRIC_KEYS",
    "ConfigRow",
    "Evaluation",
    "EvaluationRun",
    "NoiseFloor",
    "Predictor",
    "Verdict",
    "drop_training_samples",
    "evaluate_checkpoint",
    "evaluate_model",
    "fit_baselines",
    "jsonable",
    "noise_floor",
    "per_config_table",
    "profiled_mask",
    "profiling_summary",
    "run_evaluation",
    "verdicts",
    "write_evaluation",
]

#: Keys of each metric block, in the order the JSON and the tables show them.
METRIC_KEYS: tuple[str, ...] = ("n", "mae_ms", "rmse_ms", "mape_pct", "r2", "rel_error_pct")

#: Columns a samples frame needs for scoring.
REQUIRED_COLUMNS: tuple[str, ...] = (
    "tier",
    "top_k",
    "num_active_blocks",
    "T_prefill_total",
    "T_LLM_decode",
)

#: DESIGN.md's MAPE targets (%) on real held-out data.
DESIGN_TARGETS_PCT: Final[dict[str, float]] = {"prefill": 2.0, "decode_total": 6.0}
#: Where the data's own noise is above a design target, the target is this many times the
#: noise floor (DESIGN.md: "the target is the floor"; README: 1.25x).
FLOOR_FACTOR: Final[float] = 1.25
#: The floor judges only when it comes from at least this many groups of identical work.
MIN_FLOOR_GROUPS: Final[int] = 10
#: Warn when the outlier rules removed more than this share of the valid samples (as the
#: loader does when it loads them).
OUTLIER_WARN_SHARE: Final[float] = 0.03


class ConfigRow(TypedDict):
    """One configuration of the per-configuration table."""

    count: int
    prefill_mae_ms: float
    decode_total_mae_ms: float
    prefill_mape_pct: float
    decode_total_mape_pct: float
    profiled: bool | None


class NoiseFloor(TypedDict):
    """The error a perfect model would make (from samples that repeat identical work)."""

    n: int
    n_groups: int
    mae_ms: float
    mape_pct: float


class Verdict(TypedDict):
    """Is a MAPE within target? The target: the design target, or ``FLOOR_FACTOR`` x the
    noise floor where the data is noisier than the design target allows."""

    mape_pct: float
    threshold_pct: float
    design_target_pct: float
    noise_floor_pct: float
    noise_floor_groups: int  # groups of identical work the floor comes from
    basis: str  # "noise floor" or "design target"
    ok: bool


class EvaluationWarning(TypedDict):
    kind: str  # training_samples, extrapolated, outliers, long_answers, unreadable_files
    message: str


class Evaluation(FrameScores, total=False):
    """What ``evaluate_model`` computes (and ``latkit evaluate --output-file`` writes): the
    model's scores (``score_frame``) and the rest below."""

    created_utc: str
    n_samples: int
    n_filtered_outliers: int
    per_config: dict[str, ConfigRow]
    n_configs: int
    n_decode_passes_range: list[int]
    noise_floor: dict[str, NoiseFloor]
    verdict: dict[str, Verdict]
    profiling: dict[str, Any]
    long_answers: LongAnswers
    n_training_samples_scored: int | None
    warnings: list[EvaluationWarning]
    data: dict[str, Any]
    model: dict[str, Any]
    versions: dict[str, str]
    baselines: dict[str, dict[str, Any]]
    baselines_train_samples: int
    n_dropped_training_samples: int
    checkpoint: str
    results_dir: str
    datasets: list[str]


class Predictor(Protocol):
    """Anything with ``predict_frame`` (the hybrid model, the baselines)."""

    def predict_frame(self, samples: pl.DataFrame) -> Mapping[str, np.ndarray]: ...


def _check_columns(samples: pl.DataFrame, what: str) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in samples.columns]
    if missing:
        raise LatkitError(f"{what} lacks column(s): {', '.join(missing)}")


def _config_frame(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.select(
        pl.col("tier").cast(pl.Utf8),
        pl.col("top_k").cast(pl.Int64),
        pl.col("num_active_blocks").cast(pl.Int64),
    )


def profiled_mask(samples: pl.DataFrame, training: pl.DataFrame | None) -> np.ndarray | None:
    """Per sample: is its configuration (tier, top_k, num_active_blocks) in ``training`` (the
    model's training data)? None when ``training`` is None or lacks those columns."""
    if training is None or not set(CONFIG_KEYS) <= set(training.columns):
        return None
    profiled = _config_frame(training).unique().with_columns(pl.lit(True).alias("_profiled"))
    joined = _config_frame(samples).join(
        profiled, on=list(CONFIG_KEYS), how="left", maintain_order="left"
    )
    return joined["_profiled"].fill_null(False).to_numpy().astype(bool)


def _ape(pred: np.ndarray, true: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Absolute percentage error where ``keep`` and the actual is positive, else NaN."""
    ok = keep & (true > 0)
    return np.where(ok, np.abs(pred - true) / np.where(ok, true, 1.0) * 100.0, np.nan)


def per_config_table(
    samples: pl.DataFrame,
    predictions: Mapping[str, np.ndarray],
    profiled: np.ndarray | None = None,
) -> dict[str, ConfigRow]:
    """``{"<tier>_<k>_<blocks>": {count, prefill_mae_ms, decode_total_mae_ms,
    prefill_mape_pct, decode_total_mape_pct, profiled}}``, by count.

    The decode columns cover the configuration's samples with at least one decode pass (NaN
    when it has none). ``profiled`` (see ``profiled_mask``) is None when unknown. Ties in count
    keep the configuration names in sorted order.
    """
    passes = decode_passes(samples)
    prefill_true = samples["T_prefill_total"].to_numpy().astype(np.float64)
    decode_true = samples["T_LLM_decode"].to_numpy().astype(np.float64)
    prefill_pred = np.asarray(predictions["prefill_ms"], dtype=np.float64)
    decode_pred = np.asarray(predictions["decode_total_ms"], dtype=np.float64)
    everything = np.ones(samples.height, dtype=bool)
    frame = pl.DataFrame(
        {
            "tier": samples["tier"].cast(pl.Utf8),
            "top_k": samples["top_k"].cast(pl.Int64),
            "blocks": samples["num_active_blocks"].cast(pl.Int64),
            "prefill_err": np.abs(prefill_pred - prefill_true),
            "decode_err": np.where(passes > 0, np.abs(decode_pred - decode_true), np.nan),
            "prefill_ape": _ape(prefill_pred, prefill_true, everything),
            "decode_ape": _ape(decode_pred, decode_true, passes > 0),
            "profiled": everything if profiled is None else np.asarray(profiled, dtype=bool),
        }
    ).with_columns(pl.col("decode_err", "prefill_ape", "decode_ape").fill_nan(None))
    grouped = frame.group_by("tier", "top_k", "blocks").agg(
        pl.len().alias("count"),
        pl.col("prefill_err").mean().alias("prefill_mae_ms"),
        pl.col("decode_err").mean().alias("decode_total_mae_ms"),
        pl.col("prefill_ape").mean().alias("prefill_mape_pct"),
        pl.col("decode_ape").mean().alias("decode_total_mape_pct"),
        pl.col("profiled").first(),
    )

    def number(value: Any) -> float:
        return math.nan if value is None else float(value)

    table: dict[str, ConfigRow] = {}
    for row in grouped.iter_rows(named=True):
        table[config_name(row["tier"], row["top_k"], row["blocks"])] = ConfigRow(
            count=int(row["count"]),
            prefill_mae_ms=float(row["prefill_mae_ms"]),
            decode_total_mae_ms=number(row["decode_total_mae_ms"]),
            prefill_mape_pct=number(row["prefill_mape_pct"]),
            decode_total_mape_pct=number(row["decode_total_mape_pct"]),
            profiled=None if profiled is None else bool(row["profiled"]),
        )
    return dict(sorted(table.items(), key=lambda item: (-item[1]["count"], item[0])))


def _mape_ratio(unprofiled: Mapping[str, Any], profiled: Mapping[str, Any]) -> float:
    never, seen = unprofiled.get("mape_pct", math.nan), profiled.get("mape_pct", math.nan)
    ok = all(isinstance(v, float) and math.isfinite(v) for v in (never, seen)) and seen > 0
    return float(never / seen) if ok else math.nan


def profiling_summary(
    samples: pl.DataFrame, predictions: Mapping[str, np.ndarray], profiled: np.ndarray
) -> dict[str, Any]:
    """Metrics of the profiled and of the never-profiled configurations separately.

    ``profiled`` / ``unprofiled``: ``n_configs``, ``n_samples``, the ``prefill`` and
    ``decode_total`` metric blocks, ``bias`` and ``coverage`` (as ``score_frame``);
    ``mape_ratio``: never-profiled MAPE / profiled MAPE of prefill and decode total (DESIGN.md
    targets 1.10x interpolation, 1.15x sparse grid, 1.25x beyond the grid; NaN when a side is
    empty).
    """
    out: dict[str, Any] = {}
    for name, keep in (("profiled", profiled), ("unprofiled", ~profiled)):
        part = samples.filter(pl.Series(keep))
        part_pred = {k: np.asarray(v)[keep] for k, v in predictions.items()}
        scores = score_frame(part, part_pred)
        block: dict[str, Any] = {
            "n_configs": int(_config_frame(part).unique().height),
            "n_samples": int(part.height),
        }
        block.update({k: v for k, v in scores.items() if k in ("prefill", "decode_total")})
        block["bias"] = scores["bias"]
        if scores["coverage"]:
            block["coverage"] = scores["coverage"]
        out[name] = block
    out["mape_ratio"] = {
        target: _mape_ratio(out["unprofiled"][target], out["profiled"][target])
        for target in ("prefill", "decode_total")
        if target in out["profiled"]
    }
    return out


#: Samples with equal values here did identical work (same knobs, same prompt length);
#: decode adds the number of passes. Their spread is measurement noise.
_PREFILL_WORK: tuple[str, ...] = (
    "tier",
    "top_k",
    "num_active_blocks",
    "vision_tokens",
    "text_tokens",
)
_DECODE_WORK: tuple[str, ...] = (*_PREFILL_WORK, "n_decode_passes")


def _repeat_noise(frame: pl.DataFrame, keys: Sequence[str], target: str) -> NoiseFloor:
    """Error of a perfect model, estimated from repeated measurements of identical work.

    For each sample in a group of n >= 2 identical ones, the error of the mean of the others
    (leave-one-out) has variance sigma² x n / (n - 1); scaling it by sqrt((n - 1) / n) leaves
    an estimate of the noise itself, i.e. of what a model that knew the true mean would miss
    by on this data.
    """
    keys = [k for k in keys if k in frame.columns]
    grouped = (
        frame.select([*keys, target])
        .with_columns(
            pl.len().over(keys).alias("_n"), pl.col(target).sum().over(keys).alias("_sum")
        )
        .filter(pl.col("_n") >= 2)
    )
    if grouped.height == 0:
        return NoiseFloor(n=0, n_groups=0, mae_ms=math.nan, mape_pct=math.nan)
    n = grouped["_n"].to_numpy().astype(np.float64)
    value = grouped[target].to_numpy().astype(np.float64)
    loo = (grouped["_sum"].to_numpy() - value) / (n - 1)
    error = np.abs(value - loo) * np.sqrt((n - 1) / n)
    positive = value > 0
    return NoiseFloor(
        n=int(grouped.height),
        n_groups=int(grouped.select(keys).unique().height),
        mae_ms=float(error.mean()),
        mape_pct=float(np.mean(error[positive] / value[positive]) * 100)
        if positive.any()
        else math.nan,
    )


def noise_floor(samples: pl.DataFrame) -> dict[str, NoiseFloor]:
    """Measurement-noise floor of ``prefill``, ``decode_total``, ``decode_per_token`` and
    ``total``.

    No model can beat it on these samples; where it is above the design targets, the target
    is the floor. Computed from samples that repeat identical work (see ``_repeat_noise``).
    """
    if not set(_PREFILL_WORK) <= set(samples.columns):
        return {}
    passes = decode_passes(samples)
    work = samples.with_columns(
        pl.Series("n_decode_passes", passes),
        pl.Series("_per_token", samples["T_LLM_decode"].to_numpy() / np.maximum(passes, 1.0)),
        (pl.col("T_prefill_total") + pl.col("T_LLM_decode")).alias("_total"),
    )
    decode = work.filter(pl.Series(passes > 0))
    return {
        "prefill": _repeat_noise(samples, _PREFILL_WORK, "T_prefill_total"),
        "decode_total": _repeat_noise(decode, _DECODE_WORK, "T_LLM_decode"),
        "decode_per_token": _repeat_noise(decode, _DECODE_WORK, "_per_token"),
        "total": _repeat_noise(work, _DECODE_WORK, "_total"),
    }


def fit_baselines(
    train_samples: pl.DataFrame,
    train_steps: pl.DataFrame | None = None,
    *,
    single_network_epochs: int = 50,
    seed: int = 3407,
    device: str = "cpu",
    prefill_params: Mapping[str, Any] | None = None,
) -> dict[str, Predictor]:
    """The baselines, fit on the same training samples, keyed as in the JSON.

    ``prefill_params``: ``PrefillModel`` parameters of the trees-only prefill (the evaluated
    model's own, so that only the structure differs); its structure, seed and device are the
    baseline's.
    """
    _check_columns(train_samples, "training data")
    models: dict[str, Predictor] = {}
    started = time.perf_counter()
    models["lookup_table"] = LookupTableBaseline().fit(train_samples, train_steps)
    models["linear"] = LinearBaseline().fit(train_samples, train_steps)
    network = OriginalSingleNetwork(epochs=single_network_epochs, seed=seed, device=device)
    models["single_network"] = network.fit(train_samples, train_steps)
    trees = TreesOnlyPrefill(seed=seed, device=device, prefill_params=prefill_params)
    models["trees_only"] = trees.fit(train_samples, train_steps)
    log.info(
        "Fit baselines on %d training samples in %.1f s (single network: %d epochs)",
        train_samples.height,
        time.perf_counter() - started,
        single_network_epochs,
    )
    return models


def _passes_range(samples: pl.DataFrame) -> list[int]:
    passes = decode_passes(samples)
    return [int(passes.min()), int(passes.max())] if passes.size else [0, 0]


def _prefill_params(model: Any) -> dict[str, Any] | None:
    """The ``PrefillModel`` parameters of a hybrid model (None for anything else)."""
    get_params = getattr(getattr(model, "prefill", None), "get_params", None)
    return dict(get_params()) if callable(get_params) else None


def verdicts(
    scores: Mapping[str, Any], floor: Mapping[str, Mapping[str, Any]]
) -> dict[str, Verdict]:
    """Prefill and decode total MAPE against their target: DESIGN.md's, or ``FLOOR_FACTOR`` x
    the noise floor of the same samples where the data is noisier than that allows (no model
    beats the floor, so judging below it would fail a perfect model). A floor estimated from
    fewer than ``MIN_FLOOR_GROUPS`` groups of identical work is too uncertain to lower the
    bar: the design target judges then."""
    out: dict[str, Verdict] = {}
    for target, design in DESIGN_TARGETS_PCT.items():
        block = scores.get(target)
        if block is None:
            continue
        mape = float(block["mape_pct"])
        noise = floor.get(target) or {}
        floor_pct = float(noise.get("mape_pct", math.nan))
        groups = int(noise.get("n_groups", 0))
        noisy = (
            math.isfinite(floor_pct)
            and groups >= MIN_FLOOR_GROUPS
            and FLOOR_FACTOR * floor_pct > design
        )
        threshold = FLOOR_FACTOR * floor_pct if noisy else design
        out[target] = Verdict(
            mape_pct=mape,
            threshold_pct=threshold,
            design_target_pct=design,
            noise_floor_pct=floor_pct,
            noise_floor_groups=groups,
            basis="noise floor" if noisy else "design target",
            ok=math.isfinite(mape) and mape <= threshold,
        )
    return out


def _training_overlap(samples: pl.DataFrame, training: pl.DataFrame | None) -> int | None:
    """How many of ``samples`` are in the model's training split (None: cannot tell)."""
    if training is None or not {"T_prefill_total", "T_LLM_decode"} <= set(training.columns):
        return None
    return drop_training_samples(samples, training)[1]


def _warnings(
    model: Any,
    samples: pl.DataFrame,
    n_training_scored: int | None,
    long_answers: LongAnswers | None,
    data: LoadResult | None,
) -> list[EvaluationWarning]:
    """What a reader must not miss: scores on training data, extrapolated inputs, a large
    outlier share, answers longer than any trained, files that could not be read."""
    found: list[EvaluationWarning] = []
    if n_training_scored:
        found.append(
            EvaluationWarning(
                kind="training_samples",
                message=f"{n_training_scored} of the {samples.height} scored samples are in "
                "the model's training split (fitted or calibrated on): the errors and coverage "
                "on them are optimistic. Pass --held-out-only to score only samples the model "
                "never saw.",
            )
        )
    extrapolation = getattr(model, "extrapolation", None)
    if callable(extrapolation):
        flags, messages = extrapolation(
            feature_matrix(samples), samples["output_tokens"].to_numpy()
        )
        if np.any(flags):
            details = "; ".join(m.removeprefix("warning: ") for m in messages)
            found.append(
                EvaluationWarning(
                    kind="extrapolated",
                    message=f"{int(np.sum(flags))} of the {samples.height} samples lie beyond "
                    f"the range the model was trained on: {details}",
                )
            )
    if data is not None:
        valid = data.samples.height + data.n_filtered_outliers
        if valid and data.n_filtered_outliers / valid > OUTLIER_WARN_SHARE:
            found.append(
                EvaluationWarning(
                    kind="outliers",
                    message=f"the outlier rules removed {data.n_filtered_outliers} of {valid} "
                    f"valid samples ({100 * data.n_filtered_outliers / valid:.1f} %, more than "
                    f"{100 * OUTLIER_WARN_SHARE:.0f} %): --outlier-ms suits the original H100 "
                    "data; on other hardware raise it or use --outlier-rel.",
                )
            )
        if data.files_failed:
            found.append(
                EvaluationWarning(
                    kind="unreadable_files",
                    message=f"{len(data.files_failed)} result file(s) could not be parsed and "
                    "were skipped (`latkit inspect` lists them).",
                )
            )
    if long_answers is not None:
        found.append(
            EvaluationWarning(
                kind="long_answers",
                message=f"{long_answers['n_samples']} samples have answers longer than the "
                f"longest the model was trained on ({long_answers['trained_max_output_tokens']} "
                "output tokens): their decode is extrapolated (see the long-answer summary).",
            )
        )
    return found


def _model_card(model: Any) -> dict[str, Any]:
    """What the model's manifest says about it: when it was made, with which versions, on
    which data, and its recalibration."""
    manifest = getattr(model, "manifest", None) or {}
    keys = ("created_utc", "versions", "training_summary", "calibration")
    return {key: manifest[key] for key in keys if key in manifest}


def _data_card(data: LoadResult | None) -> dict[str, Any]:
    """What the loader read and skipped, by reason."""
    if data is None:
        return {}
    return {
        "datasets": list(data.datasets),
        "n_files": data.n_files,
        "n_loaded_samples": data.samples.height,
        "skipped": dict(data.skipped),
        "files_skipped": dict(data.files_skipped),
        "n_files_failed": len(data.files_failed),
    }


def evaluate_model(
    model: Predictor,
    samples: pl.DataFrame,
    steps: pl.DataFrame | None = None,
    *,
    baselines: bool = False,
    train_samples: pl.DataFrame | None = None,
    train_steps: pl.DataFrame | None = None,
    data: LoadResult | None = None,
    single_network_epochs: int = 50,
    seed: int = 3407,
    device: str = "cpu",
    fitted_baselines: Mapping[str, Predictor] | None = None,
    model_training: pl.DataFrame | None = None,
) -> Evaluation:
    """The evaluation of ``model`` on ``samples`` (module doc; every view renders it).

    ``steps`` (per-pass timings) give the long answers their growth error. ``data`` (what
    the loader read) gives the outlier count, the skipped records and the data card. With
    ``baselines=True`` the baselines are fit on ``train_samples`` (or ``fitted_baselines`` are
    used as they are) and scored on the same ``samples``.

    ``model_training`` (default: the model's training split) is the data the model was
    fitted on: a configuration in it is ``profiled``, the ``profiling`` block scores the
    profiled and the never-profiled configurations separately (for the model and each
    baseline), and a warning counts the scored samples that are in it. Without it,
    ``profiled`` is None and there is no ``profiling`` block.
    """
    _check_columns(samples, "evaluation samples")
    if samples.height == 0:
        raise LatkitError("no samples to evaluate")
    if model_training is None:
        model_training = training_split(model)
    profiled = profiled_mask(samples, model_training)
    predictions = {k: np.asarray(v) for k, v in model.predict_frame(samples).items()}
    scores = score_frame(samples, predictions)
    floor = noise_floor(samples)
    long_answers = long_answer_summary(model, samples, steps, predictions)
    n_training_scored = _training_overlap(samples, model_training)
    result: Evaluation = {
        "created_utc": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "n_samples": int(samples.height),
        "n_filtered_outliers": data.n_filtered_outliers if data is not None else 0,
        **scores,
        "per_config": per_config_table(samples, predictions, profiled),
        "n_configs": int(samples.select(*CONFIG_KEYS).unique().height),
        "n_decode_passes_range": _passes_range(samples),
        "noise_floor": floor,
        "verdict": verdicts(scores, floor),
        "n_training_samples_scored": n_training_scored,
        "warnings": _warnings(model, samples, n_training_scored, long_answers, data),
        "data": _data_card(data),
        "model": _model_card(model),
        "versions": installed_versions(RECORDED_PACKAGES),
    }
    if long_answers is not None:
        result["long_answers"] = long_answers
    if profiled is not None:
        result["profiling"] = profiling_summary(samples, predictions, profiled)
    if baselines:
        if fitted_baselines is None:
            if train_samples is None or train_samples.height == 0:
                raise LatkitError(
                    "--baselines needs training data: the checkpoint has no "
                    "training_data.parquet; pass --train-results-dir"
                )
            train_samples = baseline_training_samples(train_samples, seed)
            fitted_baselines = fit_baselines(
                train_samples,
                train_steps,
                single_network_epochs=single_network_epochs,
                seed=seed,
                device=device,
                prefill_params=_prefill_params(model),
            )
        result["baselines"] = _score_baselines(fitted_baselines, samples, profiled)
        if train_samples is not None:
            result["baselines_train_samples"] = int(train_samples.height)
    return result


def _score_baselines(
    fitted: Mapping[str, Predictor], samples: pl.DataFrame, profiled: np.ndarray | None
) -> dict[str, dict[str, Any]]:
    """The baselines block: each baseline's scores (no bounds, hence no coverage)."""
    block: dict[str, dict[str, Any]] = {}
    for name in BASELINE_NAMES:
        if name not in fitted:
            continue
        baseline = fitted[name]
        predicted = baseline.predict_frame(samples)
        scores: dict[str, Any] = {
            k: v for k, v in score_frame(samples, predicted).items() if k != "coverage"
        }
        if profiled is not None:
            scores["profiling"] = profiling_summary(samples, predicted, profiled)
        if isinstance(baseline, LookupTableBaseline):
            scores["n_fallback_samples"] = int(baseline.unseen_mask(samples).sum())
        if isinstance(baseline, OriginalSingleNetwork):
            scores["epochs"] = baseline.epochs
        block[name] = scores
    return block


def write_evaluation(path: str | Path, result: Mapping[str, Any]) -> None:
    """The JSON view: write the evaluation atomically, NaN as null."""
    write_json_atomic(path, jsonable(result))


# -- loading ----------------------------------------------------------------------------------


#: Columns that identify a sample of the training split (its measured times are unique).
_IDENTITY_COLUMNS: tuple[str, ...] = (
    "dataset",
    "vision_tokens",
    "text_tokens",
    "top_k",
    "num_active_blocks",
    "output_tokens",
    "T_prefill_total",
    "T_LLM_decode",
)


def drop_training_samples(
    samples: pl.DataFrame, training: pl.DataFrame
) -> tuple[pl.DataFrame, int]:
    """``samples`` without those of the training split; returns (kept, number dropped).

    The artifact stores no sample ids, so a sample is matched on its dataset, features,
    length and measured times: float times round-trip exactly through parquet, and two
    distinct samples with identical times to the last bit do not occur in practice.
    """
    keys = [c for c in _IDENTITY_COLUMNS if c in samples.columns and c in training.columns]
    if not {"T_prefill_total", "T_LLM_decode"} <= set(keys):
        raise LatkitError("training data lacks T_prefill_total/T_LLM_decode: cannot match samples")
    right = (
        training.select(keys)
        .with_columns([pl.col(c).cast(samples.schema[c]) for c in keys])
        .unique()
    )
    kept = samples.join(right, on=keys, how="anti", nulls_equal=True)
    return kept, samples.height - kept.height


def held_out_samples(
    model: Any, checkpoint: str | Path, samples: pl.DataFrame
) -> tuple[pl.DataFrame, int]:
    """``samples`` without the checkpoint's training split, and how many were dropped."""
    training = training_split(model)
    if training is None:
        raise LatkitError(
            f"{Path(checkpoint) / 'training_data.parquet'} holds no samples: "
            "cannot tell which samples were held out"
        )
    kept, dropped = drop_training_samples(samples, training)
    log.info(
        "Held-out only: dropped %d samples of the training split, %d left", dropped, kept.height
    )
    return kept, dropped


def load_model_and_samples(
    checkpoint: str | Path,
    results_dir: str | Path,
    *,
    dataset_names: Sequence[str] | None,
    use_all_datasets: bool,
    outlier_ms: float,
    outlier_rel: float | None,
    held_out_only: bool,
) -> tuple[Any, LoadResult, pl.DataFrame, int]:
    """(model, the loaded results, the samples to score, how many training samples were
    dropped): what ``latkit evaluate``, ``plot`` and ``report`` start from."""
    from toolkit.data import load_results

    model = load_model(checkpoint)
    loaded = load_results(
        results_dir,
        dataset_names=list(dataset_names) if dataset_names else None,
        use_all_datasets=use_all_datasets,
        outlier_ms=outlier_ms,
        outlier_rel=outlier_rel,
    )
    samples = loaded.samples
    n_dropped = 0
    if held_out_only:
        samples, n_dropped = held_out_samples(model, checkpoint, samples)
    return model, loaded, samples, n_dropped


@dataclass(frozen=True)
class EvaluationRun:
    """An evaluation with what it was computed from (the report draws its figures from the
    same model and samples)."""

    evaluation: Evaluation
    model: Any
    samples: pl.DataFrame  # the scored samples
    steps: pl.DataFrame | None  # their per-pass timings (and those of the other loaded ones)


def evaluate_checkpoint(
    checkpoint: str | Path,
    results_dir: str | Path,
    *,
    dataset_names: Sequence[str] | None = None,
    use_all_datasets: bool = True,
    outlier_ms: float = 60.0,
    outlier_rel: float | None = None,
    baselines: bool = False,
    train_results_dir: str | Path | None = None,
    held_out_only: bool = False,
    single_network_epochs: int = 50,
    seed: int = 3407,
    device: str = "cpu",
) -> EvaluationRun:
    """Load the model and the samples and evaluate (``run_evaluation`` without the writing).

    ``held_out_only`` drops the samples of the checkpoint's training split first, so a model
    evaluated on the directory it was trained from is scored on data it never fit.
    """
    from toolkit.data import load_results

    model, loaded, samples, n_dropped_training = load_model_and_samples(
        checkpoint,
        results_dir,
        dataset_names=dataset_names,
        use_all_datasets=use_all_datasets,
        outlier_ms=outlier_ms,
        outlier_rel=outlier_rel,
        held_out_only=held_out_only,
    )
    if held_out_only and samples.height == 0:
        raise LatkitError(
            f"no held-out samples: every sample of {results_dir} is in the model's training split"
        )
    train_samples: pl.DataFrame | None = None
    train_steps: pl.DataFrame | None = None
    if baselines:
        if train_results_dir is not None:
            train = load_results(
                train_results_dir,
                use_all_datasets=True,
                outlier_ms=outlier_ms,
                outlier_rel=outlier_rel,
            )
            train_samples, train_steps = train.samples, train.steps
            log.info(
                "Baselines: training data from %s (%d samples)",
                train_results_dir,
                train_samples.height,
            )
        else:
            train_samples = training_split(model)
            if train_samples is None:
                raise LatkitError(
                    f"{Path(checkpoint) / 'training_data.parquet'} holds no samples: "
                    "pass --train-results-dir to fit the baselines"
                )
            log.info(
                "Baselines: training data from the checkpoint (%d samples)", train_samples.height
            )
    result = evaluate_model(
        model,
        samples,
        loaded.steps,
        baselines=baselines,
        train_samples=train_samples,
        train_steps=train_steps,
        data=loaded,
        single_network_epochs=single_network_epochs,
        seed=seed,
        device=device,
    )
    if held_out_only:
        result["n_dropped_training_samples"] = n_dropped_training
    result["checkpoint"] = str(checkpoint)
    result["results_dir"] = str(results_dir)
    result["datasets"] = list(loaded.datasets)
    return EvaluationRun(result, model, samples, loaded.steps)


def run_evaluation(
    checkpoint: str | Path,
    results_dir: str | Path,
    *,
    output_file: str | Path | None = "evaluation_results.json",
    **options: Any,
) -> Evaluation:
    """What ``latkit evaluate`` does: ``evaluate_checkpoint`` (same options), then write the
    JSON to ``output_file`` (unless None); returns the evaluation."""
    result = evaluate_checkpoint(checkpoint, results_dir, **options).evaluation
    if output_file is not None:
        write_evaluation(output_file, result)
    return result
