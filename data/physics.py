"""Print the physics of a measured sweep: how prefill and decode grow with each knob.

    python data/physics.py data/core_exp_tiny_cpu

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


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "data/core_exp_tiny_cpu")
