"""Accuracy on real measured data against the DESIGN.md targets and the data's noise floor.

Trains the hybrid model on the bundled sweep (``data/core_exp_tiny_cpu``, or
``--results-dir``) with the defaults, once with a random 20 % of samples held out and once
with whole configurations held out, and scores each on its held-out samples with the
baselines fit on the same training split (``latkit evaluate --baselines --held-out-only``).
The noise floor is the error a perfect model would make on the same samples, estimated
from samples that repeat identical work (``reports.evaluation.noise_floor``). Where the
data is noisier than a target, the target is 1.25x the floor (DESIGN.md).

With a second sweep of the same grid measured under another condition (default
``data/core_exp_tiny_cpu_2threads``), it also prints the recalibration curve: prefill MAPE
after affine recalibration on N target samples against a model trained on the target.

    python benchmarks/accuracy.py [--results-dir DIR] [--target-results-dir DIR]
"""

from __future__ import annotations

import argparse
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

from reports.evaluation import run_evaluation
from toolkit.demo import BUNDLED_DATASET, BUNDLED_TARGET_DATASET, bundled_data_dir
from toolkit.recalibrate import recalibration_curve
from toolkit.training import train_model

TARGETS = {"prefill": (2.0, 0.99), "decode_total": (6.0, 0.97)}


def _verdict(mape: float, r2: float, floor: float, target_mape: float, target_r2: float) -> str:
    if mape <= target_mape and r2 >= target_r2:
        return "meets the target"
    if not math.isnan(floor) and floor > target_mape:
        ratio = mape / floor
        return f"{ratio:.2f}x the noise floor ({'within' if ratio <= 1.25 else 'OUTSIDE'} 1.25x)"
    return "MISSES the target"


def report_split(label: str, result: dict[str, Any]) -> None:
    floor = result.get("noise_floor", {})
    print(f"\n{label}: {result['n_samples']} held-out samples")
    print(f"  {'output':<14}{'MAPE %':>9}{'R²':>8}{'target':>16}{'floor MAPE %':>14}  verdict")
    for key, (target_mape, target_r2) in TARGETS.items():
        metrics = result[key]
        floor_mape = float(floor.get(key, {}).get("mape_pct", math.nan))
        verdict = _verdict(metrics["mape_pct"], metrics["r2"], floor_mape, target_mape, target_r2)
        print(
            f"  {key:<14}{metrics['mape_pct']:>9.2f}{metrics['r2']:>8.3f}"
            f"{f'<={target_mape:g}%, >={target_r2:g}':>16}{floor_mape:>14.2f}  {verdict}"
        )


def report_baselines(result: dict[str, Any]) -> None:
    rows = [("hybrid", result), *result.get("baselines", {}).items()]
    print(f"\n  {'model':<16}{'prefill MAE ms':>16}{'prefill MAPE %':>16}{'decode MAE ms':>15}")
    for name, scores in rows:
        prefill, decode = scores["prefill"], scores["decode_total"]
        print(
            f"  {name:<16}{prefill['mae_ms']:>16.2f}{prefill['mape_pct']:>16.2f}"
            f"{decode['mae_ms']:>15.2f}"
        )
    single = result.get("baselines", {}).get("single_network")
    if single:
        ratio = result["prefill"]["mae_ms"] / single["prefill"]["mae_ms"]
        floor = result.get("noise_floor", {}).get("prefill", {}).get("mae_ms", math.nan)
        best = floor / single["prefill"]["mae_ms"]
        print(
            f"  hybrid / original network prefill MAE: {ratio:.2f} (issue bar <= 0.33; "
            f"a perfect model would score {best:.2f} on this data)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results-dir", type=Path, default=bundled_data_dir() / BUNDLED_DATASET)
    parser.add_argument(
        "--target-results-dir", type=Path, default=bundled_data_dir() / BUNDLED_TARGET_DATASET
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        results: dict[str, dict[str, Any]] = {}
        for split in ("sample", "config"):
            checkpoint = Path(tmp) / split
            train_model(args.results_dir, checkpoint, split=split, progress=False)
            results[split] = run_evaluation(
                checkpoint,
                args.results_dir,
                output_file=None,
                baselines=split == "sample",
                held_out_only=True,
            )
        print(f"data: {args.results_dir}")
        report_split("random split (20 % of samples held out)", results["sample"])
        report_baselines(results["sample"])
        report_split("configurations held out (never profiled)", results["config"])
        if args.target_results_dir.is_dir():
            from toolkit.data import load_results
            from toolkit.models.hybrid import HybridLatencyModel

            model = HybridLatencyModel.load(Path(tmp) / "sample")
            target = load_results(args.target_results_dir, outlier_ms=None)
            curve = recalibration_curve(model, target.samples, target.steps)
            print(f"\nrecalibration to {args.target_results_dir} (same held-out target rows):")
            print(f"  {'model':<30}{'N':>6}{'prefill MAPE %':>16}{'decode MAPE %':>15}")
            for row in curve.iter_rows(named=True):
                print(
                    f"  {row['model']:<30}{row['n_samples']:>6}{row['prefill_mape_pct']:>16.2f}"
                    f"{row['decode_total_mape_pct']:>15.2f}"
                )
            reference = curve.filter(curve["model"].str.starts_with("target"))
            at_25 = curve.filter(
                (curve["model"] == "affine recalibration") & (curve["n_samples"] == 25)
            )
            if reference.height and at_25.height:
                ratio = at_25["prefill_mape_pct"][0] / reference["prefill_mape_pct"][0]
                print(f"  N=25 prefill MAPE / target-trained: {ratio:.2f}x (target <= 2x)")


if __name__ == "__main__":
    main()
