"""``latkit demo``: the whole pipeline on a bundled measured sweep.

Trains the hybrid model (random split), recalibrates it to the sweep's 2-thread twin, writes
the report (``report.html``: the model scored on its held-out samples with the baselines side
by side, the figures and the recalibration curve; the same evaluation JSON and figures
beside it), scores answers longer than any trained when the bundled long-answer sweep is
there, trains it again on a sparse 3x3 grid of profiled configurations and scores the 16 per
tier it never saw (errors, bias, coverage of the bounds), exports the fused predictor (ONNX +
TorchScript, with the budget query) and answers a few controller questions with it. Every
step calls the same function as the command of the same name.

``data="small"`` (default): the ``small`` preset's sweep, whose latency is set by compute;
``data="tiny"``: the ``tiny`` preset's, faster to train on and overhead-bound (see
``data/README.md``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from toolkit.errors import LatkitError

if TYPE_CHECKING:
    from reports.evaluation import EvaluationRun

log = logging.getLogger("latkit.demo")

#: Bundled sweeps by preset: (the sweep, the same grid measured with 2 torch threads, the
#: recalibration target).
BUNDLED: dict[str, tuple[str, str]] = {
    "small": ("core_exp_small_cpu", "core_exp_small_cpu_2threads"),
    "tiny": ("core_exp_tiny_cpu", "core_exp_tiny_cpu_2threads"),
}
DEFAULT_DATA = "small"
#: Bundled sweeps of answers longer than any in the main sweep, by preset (scored by the
#: demo's model when present).
LONG_ANSWERS: dict[str, str] = {"small": "core_exp_small_cpu_long"}


def bundled_data_dir() -> Path:
    """``data/`` of the source tree latkit runs from (the bundled sweeps live there)."""
    return Path(__file__).resolve().parents[1] / "data"


@dataclass
class DemoSummary:
    work_dir: Path
    seconds: float = 0.0
    paths: dict[str, Path] = field(default_factory=dict)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)

    def text(self) -> str:
        out = ["", "=" * 72, f"latkit demo finished in {self.seconds:.0f} s", "=" * 72]
        out += self.lines
        out += ["", "Where everything went:"]
        width = max(len(k) for k in self.paths) if self.paths else 0
        out += [f"  {name:<{width}}  {path}" for name, path in self.paths.items()]
        return "\n".join(out)


def _banner(title: str) -> None:
    log.info("\n== %s %s", title, "=" * max(0, 66 - len(title)))


def _metric_line(label: str, result: Mapping[str, Any]) -> str:
    prefill, decode = result["prefill"], result.get("decode_total")
    line = f"  {label:<34} prefill MAPE {prefill['mape_pct']:6.2f}%  R² {prefill['r2']:.3f}"
    if decode:  # the trees-only baseline predicts prefill only
        line += f"   decode total MAPE {decode['mape_pct']:6.2f}%  R² {decode['r2']:.3f}"
    return line


def long_answer_lines(
    checkpoint: Path, results: Path, output_file: Path, held_out: EvaluationRun | None = None
) -> list[str]:
    """The demo's line on answers longer than any trained (``latkit evaluate`` on a sweep of
    them, its JSON written to ``output_file``). A sweep of long answers only has no in-range
    answers to compare with: ``held_out`` (the evaluation of the samples held out from the
    model's training sweep) gives them, its answers of ``IN_RANGE_MIN_TOKENS``+ tokens."""
    from reports.evaluation import run_evaluation
    from reports.long_answers import in_range_reference
    from reports.text import long_answer_line

    evaluation = run_evaluation(checkpoint, results, output_file=output_file)
    block = evaluation.get("long_answers")
    if block is None:
        return ["", f"Long answers ({results}): none longer than the model's training answers."]
    if held_out is not None and not block["in_range"]["n"]:
        block["in_range"] = in_range_reference(held_out.model, held_out.samples)
    return ["", f"Long answers ({results.name}):", "  " + long_answer_line(block)]


def run_demo(
    work_dir: str | Path = "latkit-demo",
    results_dir: str | Path | None = None,
    target_results_dir: str | Path | None = None,
    num_epochs: int = 50,
    single_network_epochs: int = 50,
    data: str = DEFAULT_DATA,
    long_results_dir: str | Path | None = None,
) -> DemoSummary:
    """Run the pipeline into ``work_dir``; returns what was written and measured.

    ``long_results_dir``: a sweep of long answers to score the model on (default: the
    bundled one of ``LONG_ANSWERS`` when it is there; skipped when there is none)."""
    from exporters.export import export_checkpoint
    from exporters.predict import predict_single
    from exporters.runtime import LatencyPredictor
    from reports.html import run_report
    from reports.knob_splits import score_split
    from reports.plots import run_plots
    from toolkit.controller import budget_table, knob_grid, request_features
    from toolkit.data import load_results
    from toolkit.recalibrate import run_recalibration
    from toolkit.training import train_model

    if data not in BUNDLED:
        raise LatkitError(f"--data {data!r}: expected one of {', '.join(BUNDLED)}")
    started = time.perf_counter()
    work = Path(work_dir)
    sweep, twin = BUNDLED[data]
    results = Path(results_dir) if results_dir is not None else bundled_data_dir() / sweep
    if not results.is_dir():
        raise LatkitError(
            f"bundled dataset not found at {results}: run latkit from its source tree "
            "(pip install -e .) or pass --results-dir"
        )
    target = (
        Path(target_results_dir) if target_results_dir is not None else bundled_data_dir() / twin
    )
    long_results = (
        Path(long_results_dir)
        if long_results_dir is not None
        else bundled_data_dir() / LONG_ANSWERS.get(data, "-")
    )
    summary = DemoSummary(work_dir=work)
    summary.paths["results (bundled measurements)"] = results

    checkpoint = work / "checkpoints" / "latency_estimator"
    _banner("train (random split)")
    train_model(results, checkpoint, split="sample", num_epochs=num_epochs, progress=False)
    summary.paths["model"] = checkpoint

    recalibration_lines: list[str] = []
    curve = None
    if target.is_dir():
        _banner("recalibrate to the 2-thread sweep")
        recalibrated = work / "checkpoints" / "latency_estimator_recalibrated_2threads"
        recalibration = run_recalibration(
            checkpoint,
            target,
            recalibrated,
            n_samples=25,
            outlier_ms=None,
            curve_ns=(10, 25, 50, 100),
        )
        summary.paths["recalibrated model"] = recalibrated
        recalibration_lines = ["", "Recalibration to the 2-thread sweep:", recalibration]
        curve = recalibrated / "recalibration_curve.json"

    _banner("report (held-out samples, with baselines; figures; recalibration curve)")
    report = run_report(
        checkpoint,
        results,
        work / "report.html",
        held_out_only=True,
        baselines=True,
        recalibration_curve=curve,
        json_file=work / "evaluation_results.json",
        figures_dir=work / "visualizations",
        single_network_epochs=single_network_epochs,
    )
    evaluation = report.evaluation
    summary.paths["report"] = report.path
    summary.paths["evaluation"] = work / "evaluation_results.json"
    summary.paths["figures"] = work / "visualizations"

    _banner("sparse grid: profile 3x3 configurations per tier, predict the other 16")
    loaded = load_results(results)
    sparse = score_split(loaded.samples, loaded.steps, "sparse", num_epochs=num_epochs)
    summary.metrics = {"sample_split": dict(evaluation), "sparse_grid": sparse.to_dict()}
    summary.lines += ["", "Held-out accuracy (the baselines were fit on the same training split):"]
    summary.lines.append(_metric_line("hybrid (physics x trees)", evaluation))
    for name, label in [
        ("trees_only", "trees-only prefill (latkit 0.2)"),
        ("lookup_table", "per-config lookup table"),
        ("linear", "linear regression"),
        ("single_network", "original single network"),
    ]:
        baseline = evaluation.get("baselines", {}).get(name)
        if baseline:
            summary.lines.append(_metric_line(label, baseline))
    coverage = evaluation.get("coverage", {})
    summary.lines.append(
        "  bounds on the held-out samples: "
        + ", ".join(
            f"{name} covers {100 * coverage[name]:.1f}%"
            for name in ("prefill_p95_ms", "total_p90_ms", "total_p95_ms")
            if coverage.get(name) is not None
        )
    )
    floor = evaluation.get("noise_floor", {})
    if floor:
        summary.lines.append(
            "  noise floor of these samples (different samples doing identical work): "
            + ", ".join(
                f"{k} {v.get('mape_pct', float('nan')):.1f}%"
                for k, v in floor.items()
                if isinstance(v, dict)
            )
        )
    summary.lines.append(
        f"  the report: {report.path} ({report.n_bytes / 1024:.0f} KB, one self-contained page)"
    )
    if long_results.is_dir():
        _banner("long answers (longer than any trained)")
        summary.lines += long_answer_lines(
            checkpoint, long_results, work / "evaluation_long_answers.json", report.run
        )
        summary.paths["evaluation (long answers)"] = work / "evaluation_long_answers.json"
    summary.lines += ["", "Sparse grid (trained on top_k 4/8/12 x blocks 8/12/16 of each tier):"]
    for label, part in (
        ("profiled configs, held-out samples", sparse.profiled),
        ("16 never-profiled configs per tier", sparse.held_out),
    ):
        if part is None:
            continue
        summary.lines.append(
            f"  {label:<36} prefill MAPE {part.prefill_mape_pct:6.2f}% (bias "
            f"{part.prefill_bias:.2f})  decode total MAPE {part.decode_total_mape_pct:6.2f}%  "
            f"total_p90 covers {100 * part.coverage['total_p90_ms']:.1f}%, total_p95 "
            f"{100 * part.coverage['total_p95_ms']:.1f}%"
        )
    sparse_checkpoint = work / "checkpoints" / "latency_estimator_sparse_grid"
    sparse.model.save(sparse_checkpoint)
    summary.paths["model (sparse grid)"] = sparse_checkpoint

    _banner("plot (sparse-grid model)")
    sparse_figures = run_plots(
        sparse_checkpoint, results, work / "visualizations_sparse_grid", held_out_only=True
    )
    summary.paths["figures (sparse grid)"] = work / "visualizations_sparse_grid"
    summary.lines.append(
        f"\n{len(sparse_figures)} figures of the sparse-grid model written "
        "(unprofiled_configs.png: its error on profiled vs never-profiled configurations)."
    )

    _banner("export")
    exported = export_checkpoint(checkpoint, work / "exported")
    for fmt, path in exported.written.items():
        summary.paths[f"predictor ({fmt})"] = path
    for fmt, path in exported.budget_written.items():
        summary.paths[f"budget query ({fmt})"] = path
    worst = max(
        (report.max_rel for reports in exported.parity.values() for _, report in reports),
        default=0.0,
    )
    summary.lines.append(f"Exported predictor agrees with Python to {worst:.1e} relative.")

    _banner("predict")
    from toolkit.models.hybrid import HybridLatencyModel

    model = HybridLatencyModel.load(checkpoint)
    summary.lines += ["", "A few configurations (64 prompt tokens, 8 output tokens):"]
    for tier, top_k, blocks in [("low", 4, 8), ("medium", 8, 12), ("high", 12, 16)]:
        single = predict_single(
            model,
            tier=tier,
            top_k=top_k,
            num_active_blocks=blocks,
            text_tokens=64,
            output_tokens=8,
        )
        summary.lines.append(single.block())

    _banner("controller answers")
    runtime = LatencyPredictor(exported.written["onnx"], on_out_of_range="flag")
    configs = knob_grid()
    features = request_features(configs, text_tokens=64)
    middle = float(np.median(runtime.predict(features, np.full(len(configs), 8))["total_ms"]))
    budget = round(middle, -1) or middle
    table = budget_table(model.predict, configs, features, budget, output_tokens=8, rank="quality")
    room = runtime.max_output_tokens(features, np.full(len(configs), budget, np.float32))
    exported_room = dict(zip([c.name for c in configs], room["max_output_tokens"], strict=True))
    agree = all(
        exported_room[row["config"]] == row["max_output_tokens"]
        for row in table.iter_rows(named=True)
    )
    feasible = table.filter(table["feasible"])
    summary.lines += [
        "",
        f"Budget {budget:.0f} ms, 64 prompt tokens, 8 expected output tokens: "
        f"{feasible.height} of {table.height} configurations fit; the most capable:",
    ]
    for row in feasible.head(3).iter_rows(named=True):
        summary.lines.append(
            f"  {row['config']:<14} total {row['total_ms']:7.1f} ms, room for "
            f"{row['max_output_tokens']} output tokens"
        )
    summary.lines.append(
        f"  (latency_budget.onnx gives the same output room for all 75: {'yes' if agree else 'NO'})"
    )

    summary.lines += recalibration_lines

    summary.seconds = time.perf_counter() - started
    return summary
