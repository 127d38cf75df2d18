"""``latkit demo``: the whole pipeline on the bundled measured dataset.

Trains the hybrid model twice (random split, and whole configurations held out), scores
both on their held-out samples with the baselines side by side, draws the figures,
exports the fused predictor (ONNX + TorchScript, with the budget query), answers a few
controller questions with it, and recalibrates the model to the second bundled sweep
(measured with two threads instead of one). Every step calls the same function as the
command of the same name.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.errors import LatkitError

log = logging.getLogger("latkit.demo")

BUNDLED_DATASET = "core_exp_tiny_cpu"
#: The same grid measured under another condition (2 torch threads), for recalibration.
BUNDLED_TARGET_DATASET = "core_exp_tiny_cpu_2threads"


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


def _metric_line(label: str, result: dict[str, Any]) -> str:
    prefill, decode = result["prefill"], result["decode_total"]
    return (
        f"  {label:<34} prefill MAPE {prefill['mape_pct']:6.2f}%  R² {prefill['r2']:.3f}   "
        f"decode total MAPE {decode['mape_pct']:6.2f}%  R² {decode['r2']:.3f}"
    )


def run_demo(
    work_dir: str | Path = "latkit-demo",
    results_dir: str | Path | None = None,
    target_results_dir: str | Path | None = None,
    num_epochs: int = 50,
    single_network_epochs: int = 50,
) -> DemoSummary:
    """Run the pipeline into ``work_dir``; returns what was written and measured."""
    from exporters.export import export_checkpoint
    from exporters.predict import predict_single
    from exporters.runtime import LatencyPredictor
    from reports.evaluation import run_evaluation
    from reports.plots import run_plots
    from toolkit.controller import budget_table, knob_grid, request_features
    from toolkit.recalibrate import run_recalibration
    from toolkit.training import train_model

    started = time.perf_counter()
    work = Path(work_dir)
    data = Path(results_dir) if results_dir is not None else bundled_data_dir() / BUNDLED_DATASET
    if not data.is_dir():
        raise LatkitError(
            f"bundled dataset not found at {data}: run latkit from its source tree "
            "(pip install -e .) or pass --results-dir"
        )
    target = (
        Path(target_results_dir)
        if target_results_dir is not None
        else bundled_data_dir() / BUNDLED_TARGET_DATASET
    )
    summary = DemoSummary(work_dir=work)
    summary.paths["results (bundled measurements)"] = data

    checkpoints = {
        "sample": work / "checkpoints" / "latency_estimator",
        "config": work / "checkpoints" / "latency_estimator_config_split",
    }
    for split, checkpoint in checkpoints.items():
        _banner(f"train ({split} split)")
        train_model(data, checkpoint, split=split, num_epochs=num_epochs, progress=False)
        summary.paths[f"model ({split} split)"] = checkpoint

    _banner("evaluate (held-out samples, with baselines)")
    evaluation = run_evaluation(
        checkpoints["sample"],
        data,
        output_file=work / "evaluation_results.json",
        baselines=True,
        held_out_only=True,
        single_network_epochs=single_network_epochs,
    )
    summary.paths["evaluation (sample split)"] = work / "evaluation_results.json"
    _banner("evaluate (configurations never seen in training)")
    unseen = run_evaluation(
        checkpoints["config"],
        data,
        output_file=work / "evaluation_config_split.json",
        held_out_only=True,
    )
    summary.paths["evaluation (config split)"] = work / "evaluation_config_split.json"
    summary.metrics = {"sample_split": evaluation, "config_split": unseen}
    summary.lines += ["", "Held-out accuracy (the baselines were fit on the same training split):"]
    summary.lines.append(_metric_line("hybrid, random split", evaluation))
    for name, label in [
        ("lookup_table", "per-config lookup table"),
        ("linear", "linear regression"),
        ("single_network", "original single network"),
    ]:
        baseline = evaluation.get("baselines", {}).get(name)
        if baseline:
            summary.lines.append(_metric_line(label, baseline))
    summary.lines.append(_metric_line("hybrid, configs held out", unseen))
    floor = evaluation.get("noise_floor", {})
    if floor:
        summary.lines.append(
            "  noise floor of the data (different samples doing identical work): "
            + ", ".join(
                f"{k} {v.get('mape_pct', float('nan')):.1f}%"
                for k, v in floor.items()
                if isinstance(v, dict)
            )
        )

    _banner("plot")
    figures = run_plots(checkpoints["sample"], data, work / "visualizations", held_out_only=True)
    summary.paths["figures"] = work / "visualizations"
    summary.lines.append(f"\n{len(figures)} figures written.")

    _banner("export")
    exported = export_checkpoint(checkpoints["sample"], work / "exported")
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
    model_path = checkpoints["sample"]
    from toolkit.models.hybrid import HybridLatencyModel

    model = HybridLatencyModel.load(model_path)
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

    if target.is_dir():
        _banner("recalibrate to the 2-thread sweep")
        recalibrated = work / "checkpoints" / "latency_estimator_recalibrated_2threads"
        report = run_recalibration(
            checkpoints["sample"],
            target,
            recalibrated,
            n_samples=25,
            outlier_ms=None,
            curve_ns=(10, 25, 50, 100),
        )
        summary.paths["recalibrated model"] = recalibrated
        summary.lines += ["", "Recalibration to the 2-thread sweep:", report]

    summary.seconds = time.perf_counter() - started
    return summary
