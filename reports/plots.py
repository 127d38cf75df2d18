"""Figures of ``latkit plot``: how a latency model's predictions compare with measurements.

Headless by construction: figures are ``matplotlib.figure.Figure`` objects rendered by the Agg
canvas, never pyplot, so no display or global backend is touched. ``render_figures`` draws
each figure once, as PNG bytes: ``make_plots`` writes them to files (atomically) and the HTML
report (``reports.html``) embeds the same bytes.

``make_plots(model, samples, steps, output_dir)`` writes:

- ``scatter_plots.png`` — prefill and decode per-token, predicted vs actual, with the diagonal
- ``error_distributions.png`` — histograms of prediction errors (prefill, decode total, per token)
- ``errors_by_tier.png``, ``errors_by_topk.png``, ``errors_by_blocks.png`` — absolute
  percentage error per knob value (prefill and decode total)
- ``decode_total_scatter.png`` — decode total predicted vs actual, coloured by passes
- ``decode_pass_curve.png`` — measured vs predicted time of decode pass k for a few
  configurations (needs the steps frame and ``predict_decode_passes``); when the data has
  answers longer than any the model was trained on, a second panel draws those long answers
  against the prediction, with the longest trained answer marked
- ``residuals_vs_output_tokens.png`` — decode residuals against the answer length
- ``calibration.png`` — nominal vs observed coverage of the prefill and total bounds (and the
  share of actuals under the point prediction at 0.5), for profiled and never-profiled
  configurations apart when the model's training data tells them apart
- ``unprofiled_configs.png`` — prefill and decode-total MAPE per configuration, sorted, bars
  coloured by whether the configuration was profiled (in the model's training data)
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import polars as pl
from matplotlib import patheffects
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from reports.evaluation import (
    per_config_table,
    profiled_mask,
    profiling_summary,
)
from reports.long_answers import long_answer_mask, trained_max_output_tokens
from reports.tables import COVERAGE_TOLERANCE
from toolkit.atomic import write_bytes_atomic
from toolkit.checkpoint import training_split
from toolkit.features import BOUND_LEVELS, TIERS, feature_matrix
from toolkit.metrics import decode_passes, regression_metrics, score_frame

log = logging.getLogger(__name__)

__all__ = [
    "FIGURE_NAMES",
    "PlotData",
    "make_plots",
    "prepare_plot_data",
    "render_figures",
    "run_plots",
]

FIGURE_NAMES: tuple[str, ...] = (
    "scatter_plots.png",
    "error_distributions.png",
    "errors_by_tier.png",
    "errors_by_topk.png",
    "errors_by_blocks.png",
    "decode_total_scatter.png",
    "decode_pass_curve.png",
    "residuals_vs_output_tokens.png",
    "calibration.png",
    "unprofiled_configs.png",
)

TIER_COLOURS: dict[str, str] = {"low": "tab:blue", "medium": "tab:orange", "high": "tab:red"}
DPI = 110


class PlotModel(Protocol):
    def predict_frame(self, samples: pl.DataFrame) -> Mapping[str, np.ndarray]: ...


class PlotData:
    """Samples, their predictions and the derived arrays every figure uses."""

    def __init__(
        self,
        samples: pl.DataFrame,
        predictions: Mapping[str, np.ndarray],
        profiled: np.ndarray | None = None,
    ) -> None:
        self.samples = samples
        self.predictions = {k: np.asarray(v, dtype=np.float64) for k, v in predictions.items()}
        #: Per sample: configuration in the model's training data (None: unknown).
        self.profiled = profiled
        self.tier = samples["tier"].to_numpy().astype(str)
        self.top_k = samples["top_k"].to_numpy()
        self.blocks = samples["num_active_blocks"].to_numpy()
        self.output_tokens = samples["output_tokens"].to_numpy()
        self.passes = decode_passes(samples)
        self.has_decode = self.passes > 0
        self.prefill_true = samples["T_prefill_total"].to_numpy().astype(np.float64)
        self.prefill_pred = np.asarray(predictions["prefill_ms"], dtype=np.float64)
        self.decode_true = samples["T_LLM_decode"].to_numpy().astype(np.float64)
        self.decode_pred = np.asarray(predictions["decode_total_ms"], dtype=np.float64)
        safe = np.maximum(self.passes, 1.0)
        self.per_token_true = np.where(self.has_decode, self.decode_true / safe, np.nan)
        self.per_token_pred = np.where(self.has_decode, self.decode_pred / safe, np.nan)


def prepare_plot_data(
    model: PlotModel,
    samples: pl.DataFrame,
    max_samples: int | None = 10000,
    seed: int = 0,
    training: pl.DataFrame | None = None,
) -> PlotData:
    """Predict on ``samples`` (a seeded random subset of ``max_samples`` when larger);
    ``training`` (default: the model's ``training_data``) tells profiled configurations."""
    if max_samples is not None and samples.height > max_samples:
        samples = samples.sample(n=max_samples, seed=seed)
    if training is None:
        training = training_split(model)
    return PlotData(samples, model.predict_frame(samples), profiled_mask(samples, training))


# -- helpers -------------------------------------------------------------------------------


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _diagonal(ax: Axes, true: np.ndarray, pred: np.ndarray) -> None:
    values = np.concatenate([true, pred])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return
    low, high = float(values.min()), float(values.max())
    pad = (high - low) * 0.03 or 1.0
    ax.plot([low - pad, high + pad], [low - pad, high + pad], "k--", lw=1, label="perfect (y = x)")
    ax.set_xlim(low - pad, high + pad)
    ax.set_ylim(low - pad, high + pad)


def _metrics_text(true: np.ndarray, pred: np.ndarray) -> str:
    m = regression_metrics(true, pred)
    return (
        f"n = {m['n']}\nMAE = {m['mae_ms']:.2f} ms\nMAPE = {m['mape_pct']:.1f} %\n"
        f"R² = {m['r2']:.3f}"
    )


def _text_box(ax: Axes, text: str) -> None:
    ax.text(
        0.03,
        0.97,
        text,
        transform=ax.transAxes,
        va="top",
        ha="left",
        fontsize=9,
        bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.85, "edgecolor": "0.7"},
    )


def _scatter_by_tier(
    ax: Axes, data: PlotData, true: np.ndarray, pred: np.ndarray, mask: np.ndarray
) -> None:
    for tier in TIERS:
        sel = mask & (data.tier == tier)
        if sel.any():
            ax.scatter(
                true[sel],
                pred[sel],
                s=10,
                alpha=0.5,
                color=TIER_COLOURS[tier],
                label=f"tier {tier}",
                edgecolors="none",
            )
    _diagonal(ax, true[mask], pred[mask])
    if mask.any():
        _text_box(ax, _metrics_text(true[mask], pred[mask]))
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)


def _no_data(ax: Axes, message: str) -> None:
    ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center", va="center", fontsize=11)
    ax.set_xticks([])
    ax.set_yticks([])


# -- figures ---------------------------------------------------------------------------------


def plot_scatter(data: PlotData) -> Figure:
    fig = Figure(figsize=(13, 6), layout="constrained")
    left, right = fig.subplots(1, 2)
    everything = np.ones(data.prefill_true.size, dtype=bool)
    _scatter_by_tier(left, data, data.prefill_true, data.prefill_pred, everything)
    left.set_title("Prefill latency (vision + LLM prefill): predicted vs actual")
    left.set_xlabel("actual prefill latency (ms)")
    left.set_ylabel("predicted prefill latency (ms)")
    if data.has_decode.any():
        _scatter_by_tier(right, data, data.per_token_true, data.per_token_pred, data.has_decode)
    else:
        _no_data(right, "no samples with decode passes")
    right.set_title("Decode latency per token (mean of one pass): predicted vs actual")
    right.set_xlabel("actual decode time per pass (ms)")
    right.set_ylabel("predicted decode time per pass (ms)")
    fig.suptitle(f"Predicted vs measured latency ({data.samples.height} samples)")
    return fig


def _histogram(ax: Axes, errors: np.ndarray, title: str, xlabel: str, colour: str) -> None:
    errors = errors[np.isfinite(errors)]
    if errors.size == 0:
        _no_data(ax, "no samples")
        ax.set_title(title)
        return
    low, high = np.percentile(errors, [0.5, 99.5])
    if high <= low:
        low, high = low - 1.0, high + 1.0
    clipped = np.clip(errors, low, high)
    ax.hist(clipped, bins=50, color=colour, alpha=0.75, edgecolor="white", linewidth=0.4)
    ax.axvline(0.0, color="k", lw=1, ls="--", label="zero error")
    mean = float(np.mean(errors))
    ax.axvline(mean, color="tab:red", lw=1.2, label=f"mean {mean:+.2f}")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("samples")
    p95 = float(np.percentile(np.abs(errors), 95))
    _text_box(
        ax,
        f"n = {errors.size}\nmedian = {np.median(errors):+.2f}\n"
        f"std = {np.std(errors):.2f}\n|err| P95 = {p95:.2f}",
    )
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)


def plot_error_distributions(data: PlotData) -> Figure:
    fig = Figure(figsize=(16, 9), layout="constrained")
    axes = fig.subplots(2, 3)
    has = data.has_decode
    prefill_err = data.prefill_pred - data.prefill_true
    decode_err = (data.decode_pred - data.decode_true)[has]
    token_err = (data.per_token_pred - data.per_token_true)[has]
    _histogram(axes[0, 0], prefill_err, "Prefill error", "predicted - actual (ms)", "tab:blue")
    _histogram(
        axes[0, 1],
        decode_err,
        "Decode total error (samples with passes)",
        "predicted - actual (ms)",
        "tab:green",
    )
    _histogram(
        axes[0, 2],
        token_err,
        "Decode per-token error",
        "predicted - actual (ms per pass)",
        "tab:purple",
    )

    def relative(err: np.ndarray, true: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(true > 0, err / true * 100.0, np.nan)

    _histogram(
        axes[1, 0],
        relative(prefill_err, data.prefill_true),
        "Prefill relative error",
        "(predicted - actual) / actual (%)",
        "tab:blue",
    )
    _histogram(
        axes[1, 1],
        relative(decode_err, data.decode_true[has]),
        "Decode total relative error",
        "(predicted - actual) / actual (%)",
        "tab:green",
    )
    _histogram(
        axes[1, 2],
        relative(token_err, data.per_token_true[has]),
        "Decode per-token relative error",
        "(predicted - actual) / actual (%)",
        "tab:purple",
    )
    fig.suptitle(
        "Distribution of prediction errors (tails beyond P0.5/P99.5 clipped into the edge bins)"
    )
    return fig


def _ape(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(true > 0, np.abs(pred - true) / true * 100.0, np.nan)


def _boxes_by(
    ax: Axes,
    keys: np.ndarray,
    order: Sequence[Any],
    values: np.ndarray,
    title: str,
    xlabel: str,
    colour: str,
) -> None:
    groups, labels = [], []
    for key in order:
        sel = (keys == key) & np.isfinite(values)
        if sel.any():
            groups.append(values[sel])
            labels.append(f"{key}\n(n={int(sel.sum())})")
    if not groups:
        _no_data(ax, "no samples")
        ax.set_title(title)
        return
    box = ax.boxplot(
        groups,
        tick_labels=labels,
        showfliers=False,
        patch_artist=True,
        medianprops={"color": "black"},
    )
    for patch in box["boxes"]:
        patch.set_facecolor(colour)
        patch.set_alpha(0.5)
    means = [float(np.mean(g)) for g in groups]
    ax.plot(range(1, len(groups) + 1), means, "D", color="tab:red", ms=6, label="mean")
    for i, mean in enumerate(means, start=1):
        ax.annotate(
            f"{mean:.1f}%",
            (i, mean),
            textcoords="offset points",
            xytext=(0, 9),
            fontsize=8,
            ha="center",
            color="tab:red",
        )
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("absolute error (% of actual)")
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3, axis="y")


def plot_errors_by(
    data: PlotData,
    keys: np.ndarray,
    order: Sequence[Any],
    knob: str,
    xlabel: str,
) -> Figure:
    fig = Figure(figsize=(13, 5.5), layout="constrained")
    left, right = fig.subplots(1, 2)
    _boxes_by(
        left,
        keys,
        order,
        _ape(data.prefill_pred, data.prefill_true),
        f"Prefill error by {knob}",
        xlabel,
        "tab:blue",
    )
    decode_ape = np.where(data.has_decode, _ape(data.decode_pred, data.decode_true), np.nan)
    _boxes_by(
        right,
        keys,
        order,
        decode_ape,
        f"Decode total error by {knob} (samples with passes)",
        xlabel,
        "tab:green",
    )
    fig.suptitle(
        f"Absolute percentage error by {knob} (boxes: quartiles, whiskers 1.5 IQR, outliers hidden)"
    )
    return fig


def plot_decode_total_scatter(data: PlotData) -> Figure:
    fig = Figure(figsize=(7.5, 6.5), layout="constrained")
    ax = fig.subplots()
    has = data.has_decode
    if has.any():
        points = ax.scatter(
            data.decode_true[has],
            data.decode_pred[has],
            c=data.passes[has],
            cmap="viridis",
            s=10,
            alpha=0.6,
            edgecolors="none",
        )
        fig.colorbar(points, ax=ax, label="decode passes (output tokens - 1)")
        _diagonal(ax, data.decode_true[has], data.decode_pred[has])
        _text_box(ax, _metrics_text(data.decode_true[has], data.decode_pred[has]))
        ax.legend(loc="lower right", fontsize=8)
    else:
        _no_data(ax, "no samples with decode passes")
    ax.set_title("Decode total latency (all passes): predicted vs actual")
    ax.set_xlabel("actual decode total (ms)")
    ax.set_ylabel("predicted decode total (ms)")
    ax.grid(alpha=0.3)
    return fig


def pick_curve_configs(samples: pl.DataFrame, steps: pl.DataFrame, n_configs: int = 4) -> list[str]:
    """Configurations for the pass curve: the longest measured sequences, spread over tiers.

    Prefers configurations whose samples reach the most passes (a curve needs length), one per
    tier first, then the next longest.
    """
    if steps.height == 0:
        return []
    per_sample = steps.group_by("sample_key").agg(pl.col("k").max().alias("max_k"))
    joined = samples.select("sample_key", "config", "tier").join(per_sample, on="sample_key")
    ranked = (
        joined.group_by("config", "tier")
        .agg(pl.col("max_k").quantile(0.75).alias("reach"), pl.len().alias("n"))
        .filter(pl.col("reach") >= 2)
        .sort(["reach", "n", "config"], descending=[True, True, False])
    )
    chosen: list[str] = []
    for tier in TIERS:
        row = ranked.filter(pl.col("tier") == tier).head(1)
        if row.height:
            chosen.append(str(row["config"][0]))
    for config in ranked["config"].to_list():
        if len(chosen) >= n_configs:
            break
        if config not in chosen:
            chosen.append(str(config))
    return chosen[:n_configs]


def _pass_curves(
    ax: Axes,
    predict_passes: Callable[[np.ndarray, np.ndarray], np.ndarray],
    samples: pl.DataFrame,
    steps: pl.DataFrame,
    configs: Sequence[str],
    min_samples_per_k: int,
) -> None:
    """Per configuration: mean measured time of pass k (dots, P10-P90 band) and the mean
    prediction over the same samples (line)."""
    colours = ["tab:blue", "tab:orange", "tab:red", "tab:green", "tab:purple", "tab:brown"]
    for i, config in enumerate(configs):
        colour = colours[i % len(colours)]
        chosen = samples.filter(pl.col("config") == config)
        config_steps = steps.join(
            chosen.select("sample_key").with_row_index("_row"), on="sample_key"
        )
        rows = config_steps["_row"].to_numpy().astype(np.int64)
        k = config_steps["k"].to_numpy().astype(np.int64)
        measured = config_steps["T_decode_pass"].to_numpy()
        max_k = int(k.max())
        ks = np.arange(1, max_k + 1, dtype=np.float32)
        predicted_all = np.asarray(predict_passes(feature_matrix(chosen), ks), dtype=np.float64)
        predicted = predicted_all[rows, k - 1]
        frame = pl.DataFrame({"k": k, "measured": measured, "predicted": predicted})
        curve = (
            frame.group_by("k")
            .agg(
                pl.len().alias("n"),
                pl.col("measured").mean().alias("m_mean"),
                pl.col("measured").quantile(0.1).alias("m_p10"),
                pl.col("measured").quantile(0.9).alias("m_p90"),
                pl.col("predicted").mean().alias("p_mean"),
            )
            .filter(pl.col("n") >= min(min_samples_per_k, chosen.height))
            .sort("k")
        )
        if curve.height == 0:
            continue
        x = curve["k"].to_numpy()
        ax.fill_between(
            x,
            curve["m_p10"].to_numpy(),
            curve["m_p90"].to_numpy(),
            color=colour,
            alpha=0.12,
            linewidth=0,
        )
        ax.plot(
            x,
            curve["m_mean"].to_numpy(),
            "o",
            color=colour,
            ms=4 if max_k <= 100 else 2,
            label=f"{config}: measured (n={chosen.height})",
        )
        ax.plot(
            x, curve["p_mean"].to_numpy(), "-", color=colour, lw=2, label=f"{config}: predicted"
        )
    ax.set_xlabel("decode pass k (KV cache = prompt + k tokens)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("time of decode pass k (ms)")
    ax.grid(alpha=0.3)


def plot_decode_pass_curve(
    model: Any,
    samples: pl.DataFrame,
    steps: pl.DataFrame | None,
    n_configs: int = 4,
    min_samples_per_k: int = 3,
) -> Figure:
    """Mean measured vs mean predicted time of pass k, per configuration.

    Both sides average over the same samples at each k (each sample predicted with its own
    features), so the two curves are directly comparable; the band is the measured P10-P90.
    Answers longer than any the model was trained on get their own panel (the growth a
    controller relies on when it plans a long answer), the longest trained answer marked.
    """
    predict_passes: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = getattr(
        model, "predict_decode_passes", None
    )
    long = long_answer_mask(model, samples)
    groups = [("", samples)] if long is None or not long.any() else []
    if not groups:
        groups = [
            ("answers within the trained length", samples.filter(~pl.Series(long))),
            ("long answers, beyond any trained", samples.filter(pl.Series(long))),
        ]
    panels = []
    if steps is not None and predict_passes is not None:
        for label, part in groups:
            configs = pick_curve_configs(part, steps, n_configs)
            if configs:
                panels.append((label, part, configs))
    title = (
        "Decode pass time vs pass index k: measured mean (dots, P10-P90 band) vs predicted "
        "(lines)\nconfig = <tier>_<top_k>_<active blocks>"
    )
    if not panels:
        fig = Figure(figsize=(12, 6.5), layout="constrained")
        ax = fig.subplots()
        _no_data(
            ax,
            "the model has no predict_decode_passes"
            if predict_passes is None
            else "no per-pass timings (T_decode_per_step) in these results",
        )
        ax.set_title("Decode pass time vs pass index")
        return fig
    assert steps is not None and predict_passes is not None
    fig = Figure(figsize=(12 if len(panels) == 1 else 17, 6.5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (label, part, configs) in zip(axes, panels, strict=True):
        _pass_curves(ax, predict_passes, part, steps, configs, min_samples_per_k)
        if label.startswith("long"):
            longest = trained_max_output_tokens(model)
            assert longest is not None
            ax.axvline(
                longest - 1,
                color="k",
                ls=":",
                lw=1.2,
                label=f"longest trained answer ({longest - 1} passes)",
            )
        if label:
            ax.set_title(label)
        ax.legend(fontsize=8, ncols=2, loc="best")
    if len(panels) == 1 and not panels[0][0]:
        axes[0].set_title(title)
    else:
        fig.suptitle(title)
    return fig


def _binned_median(x: np.ndarray, y: np.ndarray, n_bins: int = 12) -> tuple[np.ndarray, ...]:
    edges = np.unique(np.quantile(x, np.linspace(0, 1, n_bins + 1)))
    if edges.size < 2:
        return np.array([np.median(x)]), np.array([np.median(y)]), np.array([0.0]), np.array([0.0])
    idx = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, edges.size - 2)
    centres, medians, p25, p75 = [], [], [], []
    for b in range(edges.size - 1):
        sel = idx == b
        if sel.sum() >= 3:
            centres.append(float(np.median(x[sel])))
            medians.append(float(np.median(y[sel])))
            p25.append(float(np.percentile(y[sel], 25)))
            p75.append(float(np.percentile(y[sel], 75)))
    return np.array(centres), np.array(medians), np.array(p25), np.array(p75)


def plot_residuals_vs_output_tokens(data: PlotData) -> Figure:
    fig = Figure(figsize=(13, 5.5), layout="constrained")
    left, right = fig.subplots(1, 2)
    has = data.has_decode
    tokens = data.output_tokens[has].astype(np.float64)
    panels = [
        (
            left,
            (data.decode_pred - data.decode_true)[has],
            "Decode total residual",
            "predicted - actual decode total (ms)",
        ),
        (
            right,
            (data.per_token_pred - data.per_token_true)[has],
            "Decode per-token residual",
            "predicted - actual time per pass (ms)",
        ),
    ]
    for ax, residual, title, ylabel in panels:
        if not has.any():
            _no_data(ax, "no samples with decode passes")
            ax.set_title(title)
            continue
        jitter = np.random.default_rng(0).uniform(-0.25, 0.25, tokens.size)
        for tier in TIERS:
            sel = data.tier[has] == tier
            if sel.any():
                ax.scatter(
                    tokens[sel] + jitter[sel],
                    residual[sel],
                    s=8,
                    alpha=0.35,
                    color=TIER_COLOURS[tier],
                    label=f"tier {tier}",
                    edgecolors="none",
                )
        centres, medians, p25, p75 = _binned_median(tokens, residual)
        ax.fill_between(
            centres, p25, p75, color="black", alpha=0.12, linewidth=0, label="binned IQR"
        )
        ax.plot(centres, medians, "k-o", ms=4, lw=1.5, label="binned median")
        ax.axhline(0.0, color="k", lw=1, ls="--")
        ax.set_title(f"{title} vs answer length")
        ax.set_xlabel("output tokens (answer length, EOS included)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8, loc="best")
        ax.grid(alpha=0.3)
    fig.suptitle(
        "Decode residuals against output length (a trend means the pass-time growth "
        "with k is mis-modelled)"
    )
    return fig


#: Colours of profiled / never-profiled configurations (unknown: grey).
PROFILED_COLOURS: dict[str, str] = {
    "profiled": "tab:blue",
    "never profiled": "tab:orange",
    "all (profiling unknown)": "0.5",
}


def _groups(data: PlotData) -> list[tuple[str, np.ndarray]]:
    """(label, sample mask) of every non-empty group the figures compare."""
    everything = np.ones(data.samples.height, dtype=bool)
    if data.profiled is None:
        return [("all (profiling unknown)", everything)]
    groups = [("profiled", data.profiled), ("never profiled", ~data.profiled)]
    return [(label, mask) for label, mask in groups if mask.any()]


def plot_calibration(data: PlotData) -> Figure:
    """Observed vs nominal coverage of the prefill and the total bounds; the share of actuals
    under the point prediction (bias) sits at 0.5 as a hollow marker. Groups (all, profiled,
    never profiled) are nudged sideways so their markers do not hide each other; the values
    are in a table in each panel."""
    fig = Figure(figsize=(13, 6.5), layout="constrained")
    axes = fig.subplots(1, 2)
    groups = _groups(data)
    if len(groups) > 1:  # the whole set as well, in black, when it is split
        groups = [("all", np.ones(data.samples.height, dtype=bool)), *groups]
    colours = {**PROFILED_COLOURS, "all": "black"}
    nudge = 0.008
    for ax, target, title in (
        (axes[0], "prefill", "Prefill bounds (prefill_pXX_ms vs T_prefill_total)"),
        (axes[1], "total", "Total bounds (total_pXX_ms vs prefill + decode)"),
    ):
        names = [n for n in BOUND_LEVELS if n.startswith(f"{target}_") and n in data.predictions]
        ax.set_title(title)
        if not names:
            _no_data(ax, "the model predicts no bounds")
            continue
        nominal = np.array([BOUND_LEVELS[n] for n in names])
        lowest = 0.4
        ax.fill_between(
            [0.0, 1.0],
            [-COVERAGE_TOLERANCE, 1.0 - COVERAGE_TOLERANCE],
            [COVERAGE_TOLERANCE, 1.0 + COVERAGE_TOLERANCE],
            color="tab:green",
            alpha=0.12,
            linewidth=0,
            label=f"nominal ± {COVERAGE_TOLERANCE * 100:.0f} points",
        )
        ax.plot([0.0, 1.0], [0.0, 1.0], "k--", lw=1, label="observed = nominal")
        table = [["", *(f"{level:.2f}" for level in nominal), "point"]]
        for i, (label, mask) in enumerate(groups):
            part = data.samples.filter(pl.Series(mask))
            predicted = {k: v[mask] for k, v in data.predictions.items()}
            checks = score_frame(part, predicted)
            observed = np.array([checks["coverage"][n] for n in names])
            bias = float(checks["bias"].get(target, np.nan))
            colour = colours.get(label, "0.5")
            shift = (i - (len(groups) - 1) / 2) * nudge
            ax.plot(
                nominal + shift,
                observed,
                "-o",
                color=colour,
                ms=7,
                lw=1.5,
                label=f"{label} (n={int(mask.sum())})",
            )
            if np.isfinite(bias):
                ax.plot([0.5 + shift], [bias], "o", mfc="none", mec=colour, ms=10, mew=1.5)
            short = {"never profiled": "never", "all (profiling unknown)": "all"}.get(label, label)
            table.append([short, *(f"{y:.3f}" for y in observed), f"{bias:.3f}"])
            shown = np.append(observed, bias)
            shown = shown[np.isfinite(shown)]
            if shown.size:
                lowest = min(lowest, float(shown.min()) - 0.05)
        ax.plot(
            [],
            [],
            "o",
            mfc="none",
            mec="black",
            ms=10,
            mew=1.5,
            label="hollow: share <= point prediction (0.5 = unbiased)",
        )
        widths = [max(len(row[c]) for row in table) for c in range(len(table[0]))]
        text = "\n".join(
            "  ".join(cell.rjust(widths[c]) for c, cell in enumerate(row)) for row in table
        )
        ax.text(
            0.98,
            0.03,
            "observed coverage at each nominal level\n" + text,
            transform=ax.transAxes,
            ha="right",
            va="bottom",
            fontsize=8,
            family="monospace",
            bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.9, "edgecolor": "0.7"},
        )
        ax.set_xlim(0.4, 1.0)
        ax.set_ylim(max(lowest, 0.0), 1.02)
        ax.set_xticks(sorted({0.5, *BOUND_LEVELS.values()}))
        ax.set_xlabel("nominal coverage (level of the bound)")
        ax.set_ylabel("observed coverage (share of actuals <= bound)")
        ax.legend(fontsize=8, loc="upper left")
        ax.grid(alpha=0.3)
    fig.suptitle(
        "Calibration of the bounds: observed vs nominal coverage "
        f"({data.samples.height} samples; on the diagonal = calibrated)"
    )
    return fig


def _mape_bars(
    ax: Axes,
    table: Mapping[str, Mapping[str, Any]],
    key: str,
    summary: Mapping[str, Any] | None,
    target: str,
    title: str,
) -> None:
    rows = [(name, row) for name, row in table.items() if np.isfinite(row[key])]
    if not rows:
        _no_data(ax, "no samples")
        ax.set_title(title)
        return
    rows.sort(key=lambda item: -float(item[1][key]))

    def group(row: Mapping[str, Any]) -> str:
        profiled = row.get("profiled")
        if profiled is None:
            return "all (profiling unknown)"
        return "profiled" if profiled else "never profiled"

    x = np.arange(len(rows))
    colours = [PROFILED_COLOURS[group(row)] for _, row in rows]
    ax.bar(x, [float(row[key]) for _, row in rows], color=colours, width=0.8)
    handles: list[Any] = []
    for label, colour in PROFILED_COLOURS.items():
        members = [row for _, row in rows if group(row) == label]
        if not members:
            continue
        level = None
        if summary is not None:
            part = summary["profiled" if label == "profiled" else "unprofiled"].get(target)
            level = None if part is None else part.get("mape_pct")
        text = f"{label} ({len(members)} configs)"
        if level is not None and np.isfinite(level):
            ax.axhline(
                level,
                color=colour,
                ls="--",
                lw=1.5,
                zorder=3,
                path_effects=[patheffects.withStroke(linewidth=3.5, foreground="white")],
            )
            text += f": MAPE over its samples {level:.1f} %"
        handles.append(Patch(color=colour, label=text))
    ax.set_xticks(x)
    ax.set_xticklabels(
        [name for name, _ in rows], rotation=90, fontsize=7 if len(rows) <= 80 else 5
    )
    ax.set_xlim(-0.7, len(rows) - 0.3)
    ax.set_ylabel("MAPE of the configuration (%)")
    ax.set_title(title)
    ax.legend(handles=handles, fontsize=8, loc="upper right")
    ax.grid(alpha=0.3, axis="y")


def plot_unprofiled_configs(data: PlotData) -> Figure:
    """MAPE per configuration, sorted, profiled and never-profiled bars in two colours; the
    dashed lines are each group's MAPE over its samples."""
    table = per_config_table(data.samples, data.predictions, data.profiled)
    summary = (
        profiling_summary(data.samples, data.predictions, data.profiled)
        if data.profiled is not None
        else None
    )
    width = max(12.0, 0.16 * len(table) + 3.0)
    fig = Figure(figsize=(width, 10), layout="constrained")
    top, bottom = fig.subplots(2, 1)
    _mape_bars(
        top,
        table,
        "prefill_mape_pct",
        summary,
        "prefill",
        "Prefill MAPE per configuration (config = <tier>_<top_k>_<active blocks>)",
    )
    _mape_bars(
        bottom,
        table,
        "decode_total_mape_pct",
        summary,
        "decode_total",
        "Decode total MAPE per configuration (samples with decode passes)",
    )
    if data.profiled is None:
        headline = "profiled configurations unknown: the model carries no training data"
    else:
        n_never = sum(1 for row in table.values() if row["profiled"] is False)
        headline = f"{n_never} of {len(table)} configurations never profiled"
    fig.suptitle(f"Error on profiled vs never-profiled configurations ({headline})")
    return fig


def render_figures(
    model: Any,
    samples: pl.DataFrame,
    steps: pl.DataFrame | None,
    *,
    max_samples: int | None = 10000,
    seed: int = 0,
    n_curve_configs: int = 4,
    training: pl.DataFrame | None = None,
) -> dict[str, bytes]:
    """Every figure of ``FIGURE_NAMES``, drawn once, as PNG bytes (in that order).

    ``training``: the model's training data (default: its training split), which tells
    profiled configurations from never-profiled ones."""
    data = prepare_plot_data(model, samples, max_samples=max_samples, seed=seed, training=training)
    if steps is not None and data.samples.height < samples.height:
        steps = steps.join(data.samples.select("sample_key"), on="sample_key", how="semi")
    draw: dict[str, Callable[[], Figure]] = {
        "scatter_plots.png": lambda: plot_scatter(data),
        "error_distributions.png": lambda: plot_error_distributions(data),
        "errors_by_tier.png": lambda: plot_errors_by(
            data, data.tier, TIERS, "tier", "image tier (low 1-3 crops, medium 4-8, high 9-15)"
        ),
        "errors_by_topk.png": lambda: plot_errors_by(
            data,
            data.top_k,
            sorted(set(data.top_k.tolist())),
            "top_k",
            "top_k (MoE experts per token)",
        ),
        "errors_by_blocks.png": lambda: plot_errors_by(
            data,
            data.blocks,
            sorted(set(data.blocks.tolist())),
            "active blocks",
            "active decoder blocks (of 16)",
        ),
        "decode_total_scatter.png": lambda: plot_decode_total_scatter(data),
        "decode_pass_curve.png": lambda: plot_decode_pass_curve(
            model, data.samples, steps, n_configs=n_curve_configs
        ),
        "residuals_vs_output_tokens.png": lambda: plot_residuals_vs_output_tokens(data),
        "calibration.png": lambda: plot_calibration(data),
        "unprofiled_configs.png": lambda: plot_unprofiled_configs(data),
    }
    assert tuple(draw) == FIGURE_NAMES
    return {name: _png(figure()) for name, figure in draw.items()}


def write_figures(figures: Mapping[str, bytes], output_dir: str | Path) -> list[Path]:
    """Write PNG bytes of ``render_figures`` into ``output_dir`` (atomically); their paths."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, png in figures.items():
        write_bytes_atomic(out / name, png)
        paths.append(out / name)
    return paths


def make_plots(
    model: Any,
    samples: pl.DataFrame,
    steps: pl.DataFrame | None,
    output_dir: str | Path,
    *,
    max_samples: int | None = 10000,
    seed: int = 0,
    n_curve_configs: int = 4,
    training: pl.DataFrame | None = None,
) -> list[Path]:
    """Write all figures of ``FIGURE_NAMES`` into ``output_dir``; returns their paths."""
    figures = render_figures(
        model,
        samples,
        steps,
        max_samples=max_samples,
        seed=seed,
        n_curve_configs=n_curve_configs,
        training=training,
    )
    paths = write_figures(figures, output_dir)
    for path in paths:
        log.info("Wrote %s", path)
    return paths


def run_plots(
    checkpoint: str | Path,
    results_dir: str | Path,
    output_dir: str | Path,
    *,
    dataset_names: Sequence[str] | None = None,
    use_all_datasets: bool = True,
    outlier_ms: float = 60.0,
    outlier_rel: float | None = None,
    max_samples: int | None = 10000,
    seed: int = 0,
    held_out_only: bool = False,
) -> list[Path]:
    """Load the model and the samples, write the figures; the one function `latkit plot` calls.

    ``held_out_only`` drops the samples of the checkpoint's training split first (as in
    ``latkit evaluate --held-out-only``).
    """
    from reports.evaluation import load_model_and_samples
    from toolkit.errors import LatkitError

    model, loaded, samples, _ = load_model_and_samples(
        checkpoint,
        results_dir,
        dataset_names=dataset_names,
        use_all_datasets=use_all_datasets,
        outlier_ms=outlier_ms,
        outlier_rel=outlier_rel,
        held_out_only=held_out_only,
    )
    if held_out_only and samples.height == 0:
        raise LatkitError("no held-out samples left to plot")
    return make_plots(
        model,
        samples,
        loaded.steps,
        output_dir,
        max_samples=max_samples,
        seed=seed,
    )
