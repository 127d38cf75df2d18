"""Print the physics of a measured sweep: how prefill and decode grow with each knob.

    python data/physics.py data/core_exp_tiny_cpu
    python data/physics.py data/core_exp_small_cpu_long data/core_exp_small_cpu

With answers of more than 100 passes it also prints the per-pass time along the answer; with
a second sweep, how fast the first one's passes ran against the second's on the same
configurations, datasets and positions (passes 1-40): the machine between two sweeps.

Ratios are geometric means, over the other two knobs, of per-configuration medians.
"""

from __future__ import annotations

import logging
import sys

import numpy as np
import polars as pl

from toolkit.data import load_results


def knob_ratio(
    per_config: pl.DataFrame, column: str, knob: str, low: object, high: object
) -> tuple[float, float, float]:
    others = [k for k in ("tier", "top_k", "num_active_blocks") if k != knob]
    pairs = per_config.filter(pl.col(knob) == low).join(
        per_config.filter(pl.col(knob) == high), on=others, suffix="_high"
    )
    ratios = (pairs[f"{column}_high"] / pairs[column]).to_numpy()
    return float(np.exp(np.log(ratios).mean())), float(ratios.min()), float(ratios.max())


def main(results_dir: str) -> None:
    logging.basicConfig(level=logging.WARNING)
    loaded = load_results(results_dir, outlier_ms=None)
    samples, steps = loaded.samples, loaded.steps
    print(
        f"{samples.height} samples, {steps.height} decode passes, "
        f"{samples['config'].n_unique()} configurations, skipped {loaded.skipped}"
    )
    decoding = pl.col("n_decode_passes") > 0
    per_config = samples.group_by("tier", "top_k", "num_active_blocks").agg(
        pl.col("T_prefill_total").median().alias("prefill_total"),
        pl.col("T_LLM_prefill").median().alias("llm_prefill"),
        pl.col("T_decode_per_token").filter(decoding).median().alias("decode_pass"),
    )
    print(f"{'effect':<20}{'prefill total':>22}{'LLM prefill':>22}{'decode pass':>22}")
    for label, knob, low, high in [
        ("top_k 12 vs 4", "top_k", 4, 12),
        ("16 blocks vs 8", "num_active_blocks", 8, 16),
        ("tier high vs low", "tier", "low", "high"),
    ]:
        cells = []
        for column in ("prefill_total", "llm_prefill", "decode_pass"):
            mean, lo, hi = knob_ratio(per_config, column, knob, low, high)
            cells.append(f"{mean:.2f}x ({lo:.2f}-{hi:.2f})")
        print(f"{label:<20}" + "".join(f"{c:>22}" for c in cells))
    print("\nmedians at top_k 8, 16 blocks, by tier:")
    print(
        samples.filter((pl.col("top_k") == 8) & (pl.col("num_active_blocks") == 16))
        .group_by("tier")
        .agg(
            pl.col("vision_tokens").median(),
            pl.col("T_vision_total").median(),
            pl.col("T_prefill_total").median(),
        )
        .sort("vision_tokens")
    )
    print("\nmedians by top_k and by blocks (all samples):")
    for knob in ("top_k", "num_active_blocks"):
        print(
            samples.group_by(knob)
            .agg(
                pl.col("T_LLM_prefill").median(),
                pl.col("T_decode_per_token").filter(decoding).median().alias("decode_pass"),
            )
            .sort(knob)
        )
    passes = steps.join(
        samples.select("sample_key", "tier", "top_k", "num_active_blocks", "total_sequence_length"),
        on="sample_key",
    ).with_columns((pl.col("total_sequence_length") + pl.col("k")).alias("kv"))
    config = ["tier", "top_k", "num_active_blocks"]
    centred = passes.with_columns(
        (pl.col("T_decode_pass").log() - pl.col("T_decode_pass").log().mean().over(config)).alias(
            "y"
        ),
        (pl.col("kv") - pl.col("kv").mean().over(config)).alias("x"),
    )
    slope = float((centred["x"] * centred["y"]).sum() / (centred["x"] ** 2).sum())
    print(
        f"\nwithin a configuration, a decode pass grows {100 * (np.exp(1000 * slope) - 1):.1f} % "
        "per 1000 tokens of KV cache"
    )
    relative = passes.with_columns(
        (pl.col("T_decode_pass") / pl.col("T_decode_pass").first().over("sample_key")).alias("rel")
    )
    print("decode pass time relative to the sample's first pass, by position k:")
    print(
        relative.with_columns(
            pl.when(pl.col("k") <= 1)
            .then(pl.lit("1"))
            .when(pl.col("k") <= 5)
            .then(pl.lit("2-5"))
            .when(pl.col("k") <= 20)
            .then(pl.lit("6-20"))
            .otherwise(pl.lit("21+"))
            .alias("k_bin")
        )
        .group_by("k_bin")
        .agg(pl.col("rel").median(), pl.len())
        .sort("k_bin")
    )
    if int(samples["n_decode_passes"].max() or 0) > 100:
        along_the_answer(steps)


#: Windows of pass positions for the profile along long answers.
WINDOWS = ((1, 40), (41, 100), (101, 200), (201, 300), (301, 10**6))


def along_the_answer(steps: pl.DataFrame) -> None:
    """Per sample, the mean pass time of each window of positions over that of its passes
    1-40 (median over samples, windows of at least 10 passes); the first pass over the
    sample's median pass; a straight line's slope through each sample's passes."""
    per_sample = steps.sort("sample_key", "k").group_by("sample_key", maintain_order=True)
    first40 = (
        steps.filter(pl.col("k") <= 40)
        .group_by("sample_key")
        .agg(pl.col("T_decode_pass").mean().alias("first40"))
    )
    print("\nper-pass time along the answer, x the sample's passes 1-40 (median over samples):")
    for low, high in WINDOWS:
        window = (
            steps.filter(pl.col("k").is_between(low, high))
            .group_by("sample_key")
            .agg(pl.col("T_decode_pass").mean().alias("mean"), pl.len().alias("n"))
            .filter(pl.col("n") >= 10)
            .join(first40, on="sample_key")
        )
        if window.height:
            ratio = (window["mean"] / window["first40"]).median()
            last = min(high, int(steps["k"].max()))
            print(f"  passes {low}-{last}: {ratio:.3f} ({window.height} samples)")
    shape = per_sample.agg(
        (pl.col("T_decode_pass").first() / pl.col("T_decode_pass").median()).alias("first"),
        (pl.cov("k", "T_decode_pass") / pl.col("k").var() / pl.col("T_decode_pass").median()).alias(
            "slope"
        ),
    )
    print(
        f"  first pass / the sample's median pass: {shape['first'].median():.3f}; a straight "
        f"line through a sample's passes rises {100 * 1000 * shape['slope'].median():.1f} % "
        "per 1000 passes (median over samples)"
    )


def compare_sweeps(results_dir: str, reference_dir: str) -> None:
    """Median pass time of passes 1-40 per (dataset, configuration) in both sweeps; the
    geometric mean (min-max) of the first's over the reference's."""
    keys = ["dataset", "tier", "top_k", "num_active_blocks"]

    def early_passes(directory: str) -> pl.DataFrame:
        loaded = load_results(directory, outlier_ms=None)
        return (
            loaded.steps.filter(pl.col("k") <= 40)
            .join(loaded.samples.select("sample_key", *keys), on="sample_key")
            .group_by(keys)
            .agg(pl.col("T_decode_pass").median().alias("pass_ms"))
        )

    both = early_passes(results_dir).join(early_passes(reference_dir), on=keys, suffix="_ref")
    ratio = (both["pass_ms"] / both["pass_ms_ref"]).to_numpy()
    print(
        f"\n{results_dir} against {reference_dir}, passes 1-40 of the same {both.height} "
        f"(dataset, configuration) pairs: {np.exp(np.log(ratio).mean()):.2f}x "
        f"({ratio.min():.2f}-{ratio.max():.2f})"
    )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "data/core_exp_tiny_cpu")
    if len(sys.argv) > 2:
        compare_sweeps(sys.argv[1], sys.argv[2])
