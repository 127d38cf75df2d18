"""Does the drift canary lower the noise floor? The same sweep twice, compared sample by sample.

Runs one sweep twice with the same seed and ``--canary-every N`` (same drawn samples, so
every sample is measured once in each run), then compares the two measurements of each
sample: the run-to-run spread ``|ln(a / b)|`` of the prefill total and of the decode time
per pass, raw and divided by each sample's ``metadata.speed_factor`` (also centred on the
median log ratio, which takes out a constant speed difference between the runs). Dividing helps only
if the spread drops: the machine drifted, and the canary saw it. It costs
``3 / N`` extra runs per sample.

    python benchmarks/canary_drift.py [--canary-every 6] [--samples-per-config 3]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.profiler import ProfileSettings, run_profile


def samples_by_key(root: Path) -> dict[tuple[str, int], dict[str, Any]]:
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for path in root.glob("*/*.json"):
        if path.parent.name == "logs":
            continue
        for sample in json.loads(path.read_text())["per_sample_results"]:
            out[(path.name, sample["sample_id"])] = sample
    return out


def spread(a: np.ndarray, b: np.ndarray) -> str:
    """Median and p90 of |ln(a/b)|, and the same around the median log ratio (what is left
    once a constant speed difference between the two runs is taken out)."""
    ratio = np.log(a / b)
    values = np.abs(ratio) * 100
    centred = np.abs(ratio - np.median(ratio)) * 100
    return (
        f"median {np.median(values):5.2f} %, p90 {np.percentile(values, 90):5.2f} %; "
        f"centred: median {np.median(centred):5.2f} %, p90 {np.percentile(centred, 90):5.2f} %"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--datasets", default="coco_2014_vqa,coco_caption")
    parser.add_argument("--samples-per-config", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--canary-every", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    runs = []
    with tempfile.TemporaryDirectory(prefix="latkit-canary-") as tmp:
        for name in ("a", "b"):
            settings = ProfileSettings(
                output_dir=Path(tmp) / name,
                preset=args.preset,
                device="cpu",
                datasets=args.datasets.split(","),
                top_k=[4, 12],
                blocks=[8, 16],
                samples_per_config=args.samples_per_config,
                repeats=args.repeats,
                seed=args.seed,
                progress=False,
                canary_every=args.canary_every,
            )
            start = time.perf_counter()
            run_profile(settings)
            elapsed = time.perf_counter() - start
            canary = json.loads((settings.output_dir / "logs" / "run.json").read_text())["canary"]
            runs.append((samples_by_key(settings.output_dir), canary["workers"][0], elapsed))
    (a, canary_a, time_a), (b, canary_b, time_b) = runs
    keys = sorted(a)
    assert keys == sorted(b)

    def column(run: dict[tuple[str, int], dict[str, Any]], field: str, correct: bool) -> np.ndarray:
        values = []
        for key in keys:
            sample = run[key]
            value = (
                float(sample[field])
                if field != "prefill"
                else (float(sample["T_vision_total"]) + float(sample["T_LLM_prefill"]))
            )
            values.append(value / sample["metadata"]["speed_factor"] if correct else value)
        return np.asarray(values)

    decode = [i for i, key in enumerate(keys) if a[key]["output_tokens"] > 1]
    print(
        f"load {os.getloadavg()[0]:.2f}; preset {args.preset}, {len(keys)} samples per run, "
        f"--repeats {args.repeats}, --canary-every {args.canary_every}; "
        f"runs took {time_a:.1f} s and {time_b:.1f} s"
    )
    for label, canary in (("a", canary_a), ("b", canary_b)):
        print(
            f"run {label}: {canary['canaries']} canaries, speed factor "
            f"{canary['speed_factor_min']:.3f}-{canary['speed_factor_max']:.3f} "
            f"(median {canary['speed_factor_median']:.3f})"
        )
    for title, field, rows in (
        ("prefill total", "prefill", list(range(len(keys)))),
        ("decode per pass", "T_decode_per_token", decode),
    ):
        raw = spread(column(a, field, False)[rows], column(b, field, False)[rows])
        fixed = spread(column(a, field, True)[rows], column(b, field, True)[rows])
        print(f"{title}, run-to-run |ln(a/b)| over {len(rows)} samples:")
        print(f"  raw:                      {raw}")
        print(f"  divided by speed factor:  {fixed}")


if __name__ == "__main__":
    main()
