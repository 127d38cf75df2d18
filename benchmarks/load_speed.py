"""Loader speed: latkit's Polars loader vs a json.load + Python-dict loader, same run.

Generates ~100k samples over ~700 core-exp files in a temporary directory, then times
both loaders on the same files (best of N, after one warm-up read so the OS page cache
is warm for both). latkit is timed twice: cold (``cache=False``: every file parsed) and
warm (the Parquet cache of parsed folders that train/evaluate/plot/export reuse; each
load still validates every record). Target (DESIGN.md): >= 5x faster than the baseline.

    python benchmarks/load_speed.py [--samples-per-file 148] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from _common import best_of
from synthetic import make_samples, write_results_dir

from toolkit.data import load_results

DATASETS = [
    "coco_2014_vqa",
    "coco_caption",
    "doc_qa",
    "mmmu",
    "okvqa",
    "science_qa_img",
    "st_qa",
    "tally_qa",
    "text_vqa",
]


def baseline_load(results_dir: Path, outlier_ms: float = 60.0) -> dict[str, Any]:
    """The original tools' way: json.load each file, loop over samples in Python."""
    features: list[list[float]] = []
    prefill: list[float] = []
    decode: list[float] = []
    passes: list[int] = []
    step_times: list[list[float]] = []
    skipped = 0
    for folder in sorted(p for p in results_dir.iterdir() if p.is_dir() and p.name != "logs"):
        for path in sorted(folder.glob("*.json")):
            with open(path) as handle:
                try:
                    document = json.load(handle)
                except ValueError:
                    continue
            for sample in document.get("per_sample_results", []):
                try:
                    tier = sample.get("tier", document["tier"])
                    row = [
                        float(sample["actual_vision_tokens"]),
                        float(sample["actual_text_tokens"]),
                        float({"low": 0, "medium": 1, "high": 2}[tier]),
                        float(sample.get("top_k", document["top_k"])),
                        float(sample.get("num_active_blocks", document["num_active_blocks"])),
                    ]
                    t_prefill = float(sample["T_vision_total"]) + float(sample["T_LLM_prefill"])
                    t_decode = float(sample["T_LLM_decode"])
                except (KeyError, TypeError, ValueError):
                    skipped += 1
                    continue
                if not (math.isfinite(t_prefill) and math.isfinite(t_decode)) or t_prefill <= 0:
                    skipped += 1
                    continue
                per_step = sample.get("T_decode_per_step") or []
                n_passes = len(per_step) if per_step else int(sample["output_tokens"]) - 1
                if n_passes > 0 and t_decode / n_passes > outlier_ms:
                    skipped += 1
                    continue
                features.append(row)
                prefill.append(t_prefill)
                decode.append(t_decode)
                passes.append(n_passes)
                step_times.append([sum(runs) / len(runs) for runs in per_step])
    return {
        "features": np.asarray(features, dtype=np.float32),
        "prefill": np.asarray(prefill),
        "decode": np.asarray(decode),
        "passes": np.asarray(passes),
        "steps": step_times,
        "skipped": skipped,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples-per-file", type=int, default=148)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.disable(logging.INFO)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        samples = make_samples(
            n_per_config=args.samples_per_file,
            seed=0,
            datasets=DATASETS,
            top_ks=(4, 6, 8, 10, 12),
            blocks=(8, 10, 12, 14, 16),
            max_output_tokens=16,
        )
        files = write_results_dir(root, samples)
        size_mb = sum(p.stat().st_size for p in files) / 1e6
        print(f"Generated {len(samples)} samples in {len(files)} files ({size_mb:.0f} MB)")

        cache = root / "cache"
        ours = load_results(root, progress=False, cache=cache)
        theirs = baseline_load(root)
        assert ours.n_samples == len(theirs["prefill"]), (ours.n_samples, len(theirs["prefill"]))
        assert np.allclose(
            np.sort(ours.samples["T_prefill_total"].to_numpy()), np.sort(theirs["prefill"])
        )

        cold = best_of(lambda: load_results(root, progress=False, cache=False), args.repeats)
        warm = best_of(lambda: load_results(root, progress=False, cache=cache), args.repeats)
        base = best_of(lambda: baseline_load(root), args.repeats)
    print(f"{'loader':<40}{'best s':>10}{'median s':>10}{'speed-up':>10}")
    for name, (best, median) in [
        ("baseline (json.load + Python dicts)", base),
        ("latkit cold (Polars parse + validate)", cold),
        ("latkit warm (Parquet cache + validate)", warm),
    ]:
        print(f"{name:<40}{best:>10.3f}{median:>10.3f}{base[0] / best:>9.1f}x")
    for name, (best, _) in [("cold", cold), ("warm", warm)]:
        ratio = base[0] / best
        verdict = "meets" if ratio >= 5 else "misses"
        print(f"{name} speed-up {ratio:.1f}x: {verdict} the >= 5x target")


if __name__ == "__main__":
    main()
