"""Query an exported latency predictor from Python with only numpy and onnxruntime.

    latkit export --checkpoint checkpoints/latency_estimator --output-dir exported/
    python examples/python_runtime.py exported/latency_predictor.onnx

``exporters/runtime.py`` imports nothing else from latkit: a controller can vendor that one
file. This script shows the keyword form, the array form, range flags and the per-call cost.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from exporters.runtime import LatencyPredictor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="latency_predictor.onnx written by `latkit export`")
    args = parser.parse_args()

    predictor = LatencyPredictor(args.model, on_out_of_range="flag")
    print(predictor, predictor.providers)

    # One configuration, by name: vision tokens default from the tier when omitted.
    out = predictor.predict(
        tier="medium",
        top_k=8,
        num_active_blocks=12,
        vision_tokens=1008,
        text_tokens=60,
        output_tokens=64,
    )
    print("Config: tier=medium, top_k=8, blocks=12")
    print(
        f"  T_prefill_total: {out['prefill_ms'][0]:.2f}ms "
        f"(P90 {out['prefill_p90_ms'][0]:.2f}ms, P95 {out['prefill_p95_ms'][0]:.2f}ms)"
    )
    print(f"  T_decode_total: {out['decode_total_ms'][0]:.2f}ms")
    print(f"  T_decode_per_token_avg: {out['decode_per_token_ms'][0]:.2f}ms/token")
    print(
        f"  T_total (estimated): {out['total_ms'][0]:.2f}ms"
        f"{'  [outside the supported range]' if out['out_of_range'][0] else ''}"
    )
    # The calibrated bounds of the whole answer: what a latency budget should be held against.
    print(
        f"  T_total bounds: P90 {out['total_p90_ms'][0]:.2f}ms, P95 {out['total_p95_ms'][0]:.2f}ms"
    )

    # Every knob setting of a request at once: a controller picks the cheapest that fits.
    tiers, top_ks, blocks = np.meshgrid([0, 1, 2], [4, 6, 8, 10, 12], [8, 10, 12, 14, 16])
    grid = predictor.predict(
        tier=tiers.ravel(),
        top_k=top_ks.ravel(),
        num_active_blocks=blocks.ravel(),
        text_tokens=60,
        output_tokens=64,
    )
    best = int(np.argmin(grid["total_ms"]))
    print(
        f"{len(grid['total_ms'])} configurations; fastest: tier={int(tiers.ravel()[best])}, "
        f"top_k={int(top_ks.ravel()[best])}, blocks={int(blocks.ravel()[best])}: "
        f"{grid['total_ms'][best]:.2f}ms"
    )
    # A budget held against the calibrated P95 of the whole answer (64 output tokens): here
    # the grid's median P95 total, so that about half of the configurations fit.
    budget = float(np.median(grid["total_p95_ms"]))
    features = predictor.features_from_kwargs(
        tier=tiers.ravel(), top_k=top_ks.ravel(), num_active_blocks=blocks.ravel(), text_tokens=60
    )
    fits = predictor.feasible(features, budget, output_tokens=64, bound="p95")
    room = predictor.max_output_tokens(features, np.full(len(features), budget, np.float32))
    print(
        f"{int(fits.sum())} of {len(fits)} configurations fit {budget:.0f} ms at P95; "
        f"the most output any allows at P95: {int(room['max_output_tokens_p95'].max())} tokens"
    )

    # Per-call cost of the hot path (inputs already validated float32 arrays).
    x = np.array([[1008, 60, 1, 8, 12]], dtype=np.float32)
    n = np.array([64], dtype=np.float32)
    for _ in range(1000):
        predictor.run(x, n)
    times = []
    for _ in range(5000):
        start = time.perf_counter_ns()
        predictor.run(x, n)
        times.append(time.perf_counter_ns() - start)
    print(f"batch-1 query: {statistics.median(times) / 1e3:.1f} us (median of 5000)")


if __name__ == "__main__":
    main()
