"""Training speed on ~100k generated samples: latkit's vectorised training against a
straightforward per-sample loop over positions (the original tool's style), same process.

    python benchmarks/train_speed.py [--samples 100000] [--epochs 50] [--loop-samples 400]
                                     [--end-to-end]

Prints: seconds of the whole ``train_on_frames`` (split + trees + decode net, defaults of
``latkit train``), seconds of the decode-net epochs alone, and the per-sample-loop baseline of
the same decode objective (summed-sequence MSE + per-pass MSE, same network, same minibatch
size), timed on ``--loop-samples`` samples and extrapolated to the same number of sample-epochs.
``--end-to-end`` also writes the samples as core-exp files (``tests/synthetic.py``) and times
``toolkit.training.train_model`` on them, i.e. ``latkit train`` including loading and saving.
Target (DESIGN.md): the whole training <= 60 s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from synthetic import decode_pass_ms, prefill_ms, vision_ms

from toolkit.features import GRID_BLOCKS, GRID_TOP_K, TIERS, config_name
from toolkit.models.decode import DecodeNet, decode_basis
from toolkit.models.hybrid import auto_batch_size
from toolkit.training import train_on_frames

TIER_CROPS = {"low": (1, 3), "medium": (4, 8), "high": (9, 15)}


def generate(
    n: int, seed: int = 0, max_output_tokens: int = 24, noise: float = 0.02
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Vectorised version of ``tests/synthetic.make_samples`` physics: samples and steps frames."""
    rng = np.random.default_rng(seed)
    tier_idx = rng.integers(0, 3, n)
    low = np.array([TIER_CROPS[t][0] for t in TIERS])[tier_idx]
    high = np.array([TIER_CROPS[t][1] for t in TIERS])[tier_idx]
    crops = rng.integers(low, high + 1)
    top_k = rng.choice(GRID_TOP_K, n)
    blocks = rng.choice(GRID_BLOCKS, n)
    vision = (crops + 1) * 144
    text = rng.integers(20, 120, n)
    out_tokens = rng.integers(1, max_output_tokens + 1, n)
    passes = out_tokens - 1
    t_vision = np.array([vision_ms(int(c)) for c in range(16)])[crops] * (
        1 + noise * rng.standard_normal(n)
    )
    t_prefill = np.array(
        [
            prefill_ms(int(v), int(t), int(k), int(b))
            for v, t, k, b in zip(vision, text, top_k, blocks, strict=True)
        ]
    )
    t_prefill *= 1 + noise * rng.standard_normal(n)
    # Steps: one row per decode pass.
    owner = np.repeat(np.arange(n), passes)
    starts = np.cumsum(passes) - passes
    k = np.arange(owner.size) - np.repeat(starts, passes) + 1
    kv = vision[owner] + text[owner] + k
    # decode_pass_ms is plain numpy arithmetic: it takes arrays although annotated with ints.
    pass_ms_fn = cast(Any, decode_pass_ms)
    t_pass = pass_ms_fn(top_k[owner], blocks[owner], kv) * (
        1 + noise * rng.standard_normal(owner.size)
    )
    t_decode = np.bincount(owner, weights=t_pass, minlength=n)
    tiers = np.array(TIERS)[tier_idx]
    samples = pl.DataFrame(
        {
            "sample_key": np.arange(n),
            "dataset": "synthetic",
            "tier": tiers,
            "tier_idx": tier_idx,
            "top_k": top_k,
            "num_active_blocks": blocks,
            "config": [
                config_name(t, int(kk), int(b))
                for t, kk, b in zip(tiers, top_k, blocks, strict=True)
            ],
            "output_tokens": out_tokens,
            "n_decode_passes": passes,
            "vision_tokens": vision,
            "text_tokens": text,
            "T_prefill_total": t_vision + t_prefill,
            "T_LLM_decode": t_decode,
            "T_decode_per_token": np.where(passes > 0, t_decode / np.maximum(passes, 1), 0.0),
        }
    )
    steps = pl.DataFrame(
        {
            "sample_key": owner,
            "k": k,
            "T_decode_pass": t_pass,
            "n_runs": np.ones(owner.size, dtype=np.int64),
        }
    )
    return samples, steps


def loop_decode_epoch(samples: pl.DataFrame, steps: pl.DataFrame, batch: int) -> float:
    """One epoch of the same decode objective, the straightforward way: per sample, per position.

    Returns seconds. Same network, optimizer and minibatch size as latkit's trainer.
    """
    torch.manual_seed(0)
    torch.set_num_threads(1)  # as latkit's trainer does on the CPU (tiny ops, shared cores)
    net = DecodeNet()
    x_all = (
        samples.select(["vision_tokens", "text_tokens", "tier_idx", "top_k", "num_active_blocks"])
        .to_numpy()
        .astype(np.float32)
    )
    net.set_normalisation(x_all, 1.0)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    per_sample_steps = {
        key: group["T_decode_pass"].to_list() for (key,), group in steps.group_by(["sample_key"])
    }
    rows = list(samples.iter_rows(named=True))
    started = time.perf_counter()
    for start in range(0, len(rows), batch):
        optimizer.zero_grad()
        seq_terms, pass_terms = [], []
        for i in range(start, min(start + batch, len(rows))):
            row = rows[i]
            n = row["n_decode_passes"]
            if n <= 0:
                continue
            coef = net(torch.from_numpy(x_all[i : i + 1]))[0]
            prompt = torch.tensor(float(row["vision_tokens"] + row["text_tokens"]))
            total = torch.zeros(())
            measured = per_sample_steps.get(row["sample_key"], [])
            for k in range(1, n + 1):  # one evaluation per position, as the original did
                pass_ms = (coef * decode_basis(torch.tensor(float(k)), prompt)).sum()
                total = total + pass_ms
                if k <= len(measured):
                    pass_terms.append((pass_ms - measured[k - 1]) ** 2)
            seq_terms.append(((total - row["T_LLM_decode"]) / n) ** 2)
        if seq_terms:
            loss = torch.stack(seq_terms).mean()
            if pass_terms:
                loss = loss + torch.stack(pass_terms).mean()
            loss.backward()
            optimizer.step()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--loop-samples", type=int, default=400)
    parser.add_argument("--seed", type=int, default=3407)
    parser.add_argument(
        "--end-to-end",
        action="store_true",
        help="also time train_model (load files + train + save) on written files",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    t0 = time.perf_counter()
    samples, steps = generate(args.samples, seed=0)
    print(
        f"generated {samples.height} samples, {steps.height} decode passes "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    print(f"torch threads: {torch.get_num_threads()}")

    epoch_times: list[float] = []
    last = [time.perf_counter()]

    def on_epoch_timer(_: object) -> None:
        now = time.perf_counter()
        epoch_times.append(now - last[0])
        last[0] = now

    t0 = time.perf_counter()
    result = train_on_frames(
        samples, steps, num_epochs=args.epochs, seed=args.seed, device="cpu", log_epochs=False
    )
    whole = time.perf_counter() - t0
    metrics = result.validation_metrics
    n_train = result.n_train
    batch = auto_batch_size(n_train, None)
    history = result.model.history
    print(
        f"latkit train_on_frames (trees + decode net, {args.epochs} epochs, batch {batch}, "
        f"{n_train} train samples): {whole:.1f} s"
    )
    print(
        f"  val prefill MAPE {metrics['prefill']['mape_pct']:.2f} %, "
        f"decode total MAPE {metrics['decode_total']['mape_pct']:.2f} %, "
        f"best epoch {result.model.manifest['best_epoch']} of {len(history)}"
    )

    # Decode net alone, same settings, timed per epoch.
    from toolkit.models.decode import DecodeNet
    from toolkit.models.decode_training import build_decode_data, decode_scale_ms
    from toolkit.models.hybrid import HybridLatencyModel

    model = HybridLatencyModel(device="cpu", num_epochs=args.epochs, seed=args.seed)
    train = samples.head(n_train)
    last[0] = time.perf_counter()
    t0 = time.perf_counter()
    model.fit(
        train,
        steps.join(train.select("sample_key"), on="sample_key", how="semi"),
        on_epoch=on_epoch_timer,
    )
    fit_total = time.perf_counter() - t0
    decode_s = sum(epoch_times[1:]) + (epoch_times[0] if epoch_times else 0.0)
    # The first timer interval also includes the trees; estimate it from the other epochs.
    per_epoch = float(np.median(epoch_times[1:])) if len(epoch_times) > 1 else decode_s
    decode_s = per_epoch * args.epochs
    print(
        f"decode net alone: {per_epoch * 1000:.0f} ms/epoch, {decode_s:.1f} s for "
        f"{args.epochs} epochs (fit incl. trees {fit_total:.1f} s)"
    )
    # The decode's physics prior, fitted once before the epochs (a linear program).
    data = build_decode_data(train, None, decode_scale_ms(train))
    t0 = time.perf_counter()
    DecodeNet().set_prior(
        data.features.numpy(),
        data.mean_pass().numpy(),
        data.mean_kv_units().numpy(),
        data.passes().numpy(),
        args.seed,
    )
    print(f"decode physics prior fit: {time.perf_counter() - t0:.2f} s (part of the fit above)")

    subset = samples.head(args.loop_samples)
    sub_steps = steps.join(subset.select("sample_key"), on="sample_key", how="semi")
    loop_s = loop_decode_epoch(subset, sub_steps, batch=min(batch, args.loop_samples))
    loop_extrapolated = loop_s * (n_train / subset.height) * args.epochs
    print(
        f"per-sample loop baseline: {loop_s:.2f} s for {subset.height} samples x 1 epoch "
        f"-> {loop_extrapolated:.0f} s for {n_train} samples x {args.epochs} epochs "
        "(extrapolated)"
    )
    print(f"ratio decode objective, loop / latkit: {loop_extrapolated / decode_s:.0f}x")
    print(f"ratio loop decode alone / latkit whole training: {loop_extrapolated / whole:.0f}x")
    print(f"target whole training <= 60 s: {'MET' if whole <= 60 else 'MISSED'} ({whole:.1f} s)")
    if args.end_to_end:
        end_to_end(args.samples, args.epochs, args.seed)
    if not math.isfinite(whole):
        sys.exit(1)


def end_to_end(n: int, epochs: int, seed: int) -> None:
    """``train_model`` on written core-exp files: what ``latkit train`` does, timed."""
    import os
    import tempfile

    from synthetic import make_samples, write_results_dir

    from toolkit.training import train_model

    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("LATKIT_CACHE_DIR", str(Path(tmp) / "cache"))
        per_config = math.ceil(n / (3 * 27))  # 3 datasets x 27 configurations
        t0 = time.perf_counter()
        written = write_results_dir(Path(tmp) / "results", make_samples(per_config, seed=0))
        size = sum(p.stat().st_size for p in written) / 1e6
        print(
            f"end-to-end: wrote {per_config * 81} samples in {len(written)} files "
            f"({size:.0f} MB) in {time.perf_counter() - t0:.1f} s"
        )
        t0 = time.perf_counter()
        result = train_model(
            Path(tmp) / "results",
            Path(tmp) / "model",
            num_epochs=epochs,
            seed=seed,
            device="cpu",
            progress=False,
        )
        took = time.perf_counter() - t0
        print(
            f"end-to-end train_model (load {result.n_train + result.n_val} samples, train, "
            f"save): {took:.1f} s; target <= 60 s: {'MET' if took <= 60 else 'MISSED'}"
        )


if __name__ == "__main__":
    main()
