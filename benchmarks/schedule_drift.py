"""How much of a sweep's per-dataset timing is only the time each dataset was measured at.

For every results directory given: each dataset's samples against the reference dataset's
(``--reference``, default coco_caption) of the same configuration (tier, top_k, blocks), as
the median over configurations of (median of the dataset's samples / median of the
reference's), for

- the decode pass (``T_decode_per_token``; samples with at least one decode pass), and
- the vision encoder per image crop (``T_vision_total / (crops + 1)``), which no dataset
  changes: where it moves with the decode pass, the machine's speed over time does.

A sweep measured dataset after dataset shows ratios far from 1.0 in both; one measured in
rounds across all files (``latkit profile`` since the schedule change) should not.

    python benchmarks/schedule_drift.py data/core_exp_small_cpu data/core_exp_tiny_cpu
"""

from __future__ import annotations

import argparse
from pathlib import Path

import polars as pl

from toolkit.data import load_results


def dataset_ratios(results_dir: Path, reference: str) -> pl.DataFrame:
    """Per dataset: median over configurations of its median over the reference's."""
    samples = load_results(results_dir, use_all_datasets=True, outlier_ms=1e9, cache=False).samples
    config = ["tier", "top_k", "num_active_blocks"]
    per_config = (
        samples.with_columns(
            vision_per_crop=pl.col("T_vision_total") / (pl.col("actual_num_crops") + 1),
            decode_pass=pl.when(pl.col("n_decode_passes") > 0).then(pl.col("T_decode_per_token")),
        )
        .group_by(["dataset", *config])
        .agg(pl.col("decode_pass").median(), pl.col("vision_per_crop").median())
    )
    base = per_config.filter(pl.col("dataset") == reference).select(
        *config,
        pl.col("decode_pass").alias("ref_decode"),
        pl.col("vision_per_crop").alias("ref_vision"),
    )
    if base.is_empty():
        raise SystemExit(f"{results_dir}: no {reference} samples to compare against")
    return (
        per_config.join(base, on=config)
        .group_by("dataset")
        .agg(
            decode_pass=(pl.col("decode_pass") / pl.col("ref_decode")).median(),
            vision_per_crop=(pl.col("vision_per_crop") / pl.col("ref_vision")).median(),
            configs=pl.len(),
        )
        .sort("dataset")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_dirs", nargs="+", type=Path)
    parser.add_argument("--reference", default="coco_caption")
    args = parser.parse_args()
    for results_dir in args.results_dirs:
        table = dataset_ratios(results_dir, args.reference)
        print(f"\n{results_dir} (each configuration's {args.reference} samples = 1.0)")
        print(f"{'dataset':<16} {'decode pass':>12} {'vision/crop':>12} {'configs':>8}")
        for row in table.iter_rows(named=True):
            print(
                f"{row['dataset']:<16} {row['decode_pass']:>11.2f}x "
                f"{row['vision_per_crop']:>11.2f}x {row['configs']:>8}"
            )
        others = table.filter(pl.col("dataset") != args.reference)
        if not others.is_empty():
            print(
                f"other datasets: decode pass {others['decode_pass'].min():.2f}-"
                f"{others['decode_pass'].max():.2f}x, vision per crop "
                f"{others['vision_per_crop'].min():.2f}-{others['vision_per_crop'].max():.2f}x"
            )


if __name__ == "__main__":
    main()
