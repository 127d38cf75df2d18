"""Seeded generator of core-experiment results for tests and benchmarks.

``make_samples`` draws samples whose latencies follow simple but realistic physics
(prefill grows with prompt length, top_k and active blocks; decode pass k grows with the
KV-cache length). ``write_results_dir`` writes them in the core-exp format, optionally
with the junk real result directories contain.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pytest

TIERS = ("low", "medium", "high")
TIER_CROPS = {"low": (1, 3), "medium": (4, 8), "high": (9, 15)}
DATASETS = ("coco_2014_vqa", "text_vqa", "doc_qa")
#: The timing fields of a per-sample record (the rest describes the sample).
SAMPLE_TIME_FIELDS = frozenset(
    {
        "T_vision_total",
        "T_LLM_prefill",
        "T_LLM_decode",
        "T_total",
        "T_decode_per_token",
        "T_decode_per_step",
    }
)


@dataclass
class SyntheticSample:
    dataset: str
    sample_id: int
    tier: str
    top_k: int
    num_active_blocks: int
    crops: int
    vision_tokens: int
    text_tokens: int
    output_tokens: int
    t_vision: float
    t_prefill: float
    pass_runs_ms: list[list[float]]  # [pass][run]

    @property
    def t_decode(self) -> float:
        return float(sum(float(np.mean(runs)) for runs in self.pass_runs_ms))


def decode_pass_ms(top_k: int, blocks: int, kv_len: np.ndarray | float) -> np.ndarray:
    """Noise-free time of one decode pass over a KV cache of ``kv_len`` tokens."""
    return np.asarray((1.0 + 0.12 * top_k + 0.0012 * np.asarray(kv_len)) * blocks / 16 + 0.3)


def prefill_ms(vision_tokens: int, text_tokens: int, top_k: int, blocks: int) -> float:
    tokens = vision_tokens + text_tokens
    return float(2.0 + tokens * (0.004 + 0.0011 * top_k) * blocks / 16)


def vision_ms(crops: int) -> float:
    return float(1.5 + 3.0 * (crops + 1))


def make_samples(
    n_per_config: int = 4,
    seed: int = 0,
    datasets: Sequence[str] = DATASETS,
    tiers: Sequence[str] = TIERS,
    top_ks: Sequence[int] = (4, 8, 12),
    blocks: Sequence[int] = (8, 12, 16),
    max_output_tokens: int = 24,
    runs_per_pass: int = 2,
    noise: float = 0.01,
    min_output_tokens: int = 1,
) -> list[SyntheticSample]:
    rng = np.random.default_rng(seed)
    samples: list[SyntheticSample] = []
    for dataset in datasets:
        sample_id = 0
        for tier in tiers:
            for top_k in top_ks:
                for n_blocks in blocks:
                    for _ in range(n_per_config):
                        low, high = TIER_CROPS[tier]
                        crops = int(rng.integers(low, high + 1))
                        vision_tokens = (crops + 1) * 144
                        text_tokens = int(rng.integers(20, 120))
                        output_tokens = int(rng.integers(min_output_tokens, max_output_tokens + 1))
                        prompt = vision_tokens + text_tokens
                        kv = prompt + np.arange(1, output_tokens)
                        base = decode_pass_ms(top_k, n_blocks, kv)
                        runs = base[:, None] * (
                            1 + noise * rng.standard_normal((kv.size, runs_per_pass))
                        )
                        samples.append(
                            SyntheticSample(
                                dataset=dataset,
                                sample_id=sample_id,
                                tier=tier,
                                top_k=top_k,
                                num_active_blocks=n_blocks,
                                crops=crops,
                                vision_tokens=vision_tokens,
                                text_tokens=text_tokens,
                                output_tokens=output_tokens,
                                t_vision=vision_ms(crops) * (1 + noise * rng.standard_normal()),
                                t_prefill=prefill_ms(vision_tokens, text_tokens, top_k, n_blocks)
                                * (1 + noise * rng.standard_normal()),
                                pass_runs_ms=runs.tolist(),
                            )
                        )
                        sample_id += 1
    return samples


def dense_monotone_grid(
    vision_min: float, vision_max: float = 2304.0, integers: bool = False
) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """The dense grid of the monotonicity checks: 40 seeded rows of profiled-like values
    [40, 5], and per monotone feature (column index) the values it is swept over, on,
    between and 50 % beyond the profiled ones (top_k 4-12, blocks 8-16, vision tokens
    ``vision_min``-``vision_max``); every real step given, or every integer."""
    rng = np.random.default_rng(0)
    base = np.column_stack(
        [
            rng.choice([288, 432, 864, 1296, 2016], 40),
            rng.integers(20, 120, 40),
            rng.integers(0, 3, 40),
            rng.choice([4, 8, 12], 40),
            rng.choice([8, 12, 16], 40),
        ]
    ).astype(np.float32)
    top = vision_max + 0.5 * (vision_max - vision_min)
    if integers:
        sweeps = {
            0: np.arange(0, top),
            1: np.arange(0, 401),
            3: np.arange(1, 17),
            4: np.arange(1, 21),
        }
    else:
        sweeps = {
            0: np.linspace(0, top, 97),
            1: np.linspace(0, 400, 161),
            3: np.linspace(1, 16, 61),  # every quarter step, to 50 % beyond 4-12
            4: np.linspace(1, 20, 77),  # to 50 % beyond 8-16
        }
    return base, sweeps


def sample_record(sample: SyntheticSample, with_steps: bool = True) -> dict[str, Any]:
    t_decode = sample.t_decode
    n_passes = sample.output_tokens - 1
    return {
        "sample_id": sample.sample_id,
        "tier": sample.tier,
        "top_k": sample.top_k,
        "num_active_blocks": sample.num_active_blocks,
        "output_tokens": sample.output_tokens,
        "content_tokens": max(sample.output_tokens - 1, 0),
        "ends_with_eos": True,
        "actual_num_crops": sample.crops,
        "target_vision_tokens": (sample.crops + 1) * 144,
        "actual_vision_tokens": sample.vision_tokens,
        "actual_text_tokens": sample.text_tokens,
        "total_sequence_length": sample.vision_tokens + sample.text_tokens,
        "accuracy": 0.0,
        "pred": "",
        "metadata": {"question": "q", "answers": ["a"]},
        "T_vision_total": sample.t_vision,
        "T_LLM_prefill": sample.t_prefill,
        "T_LLM_decode": t_decode,
        "T_total": sample.t_vision + sample.t_prefill + t_decode,
        "T_decode_per_token": t_decode / n_passes if n_passes > 0 else 0.0,
        "T_decode_per_step": sample.pass_runs_ms if with_steps else [],
    }


def file_name(dataset: str, tier: str, mean_crops: float, top_k: int, blocks: int) -> str:
    folder = dataset.replace("_", "-")
    return f"{folder}_imgsizetier-{tier}_crops{int(mean_crops)}_topk{top_k}_blocks{blocks}.json"


def config_document(
    records: list[dict[str, Any]], tier: str, top_k: int, blocks: int
) -> dict[str, Any]:
    def stats(key: str) -> dict[str, float]:
        values = np.array([r[key] for r in records], dtype=float)
        return {
            f"{key}_mean": float(values.mean()),
            f"{key}_std": float(values.std()),
            f"{key}_p50": float(np.percentile(values, 50)),
            f"{key}_p95": float(np.percentile(values, 95)),
            f"{key}_p99": float(np.percentile(values, 99)),
        }

    latency_stats: dict[str, float] = {}
    for key in ("T_vision_total", "T_LLM_prefill", "T_LLM_decode", "T_total", "T_decode_per_token"):
        latency_stats.update(stats(key))
    low, high = TIER_CROPS[tier]
    return {
        "tier": tier,
        "tier_range": {"min_crops": low, "max_crops": high},
        "max_crops": high,
        "top_k": top_k,
        "num_active_blocks": blocks,
        "num_total_blocks": 16,
        "active_block_indices": list(range(blocks)),
        "num_samples": len(records),
        "selected_crops_mean": float(np.mean([r["actual_num_crops"] for r in records])),
        "latency_stats": latency_stats,
        "per_sample_results": records,
    }


def write_results_dir(
    root: Path,
    samples: Sequence[SyntheticSample],
    *,
    gzip_files: bool = False,
    with_steps: bool = True,
) -> list[Path]:
    """Write one core-exp file per (dataset, configuration); returns the files written."""
    groups: dict[tuple[str, str, int, int], list[dict[str, Any]]] = {}
    for sample in samples:
        key = (sample.dataset, sample.tier, sample.top_k, sample.num_active_blocks)
        groups.setdefault(key, []).append(sample_record(sample, with_steps=with_steps))
    written: list[Path] = []
    for (dataset, tier, top_k, blocks), records in groups.items():
        document = config_document(records, tier, top_k, blocks)
        folder = root / dataset.replace("_", "-")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / file_name(dataset, tier, document["selected_crops_mean"], top_k, blocks)
        text = json.dumps(document)
        if gzip_files:
            path = path.with_name(path.name + ".gz")
            path.write_bytes(gzip.compress(text.encode()))
        else:
            path.write_text(text)
        written.append(path)
    return written


def fit_small_model(
    results_dir: Path,
    *,
    seed: int,
    n_per_config: int = 2,
    num_epochs: int = 2,
    n_estimators: int = 40,
    val_fraction: float | None = None,
    cache: bool = True,
) -> Any:
    """Write seeded synthetic results to ``results_dir`` and fit a small hybrid model on them
    in seconds (on a ``val_fraction`` train split when given). Returns the fitted model."""
    from toolkit.data import load_results
    from toolkit.models.hybrid import HybridLatencyModel
    from toolkit.training import split_samples

    write_results_dir(results_dir, make_samples(n_per_config=n_per_config, seed=seed))
    loaded = load_results(results_dir, cache=cache)
    samples = loaded.samples
    if val_fraction is not None:
        samples, _ = split_samples(samples, val_fraction=val_fraction, seed=0)
    prefill_params: dict[str, Any] = {"n_estimators": n_estimators, "nthread": 1}
    return HybridLatencyModel(
        num_epochs=num_epochs, device="cpu", prefill_params=prefill_params
    ).fit(samples, loaded.steps)


def read_result_file(path: Path) -> dict[str, Any]:
    """A core-exp result document (.json or .json.gz) as a dict."""
    raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
    doc: dict[str, Any] = json.loads(raw)
    return doc


def without_times(doc: dict[str, Any]) -> dict[str, Any]:
    """A result document without its timings: what two measurements of one sweep share."""
    out = {k: v for k, v in doc.items() if k != "latency_stats"}
    out["per_sample_results"] = [
        {k: v for k, v in s.items() if k not in SAMPLE_TIME_FIELDS}
        for s in doc["per_sample_results"]
    ]
    return out


def clock_advancing_per_sample(
    monkeypatch: pytest.MonkeyPatch, seconds: float
) -> Callable[[], float]:
    """A ``clock`` for ``run_profile`` that jumps ``seconds`` each time the profiler journals a
    measured sample (``--max-minutes`` tests stop a sweep between samples without waiting)."""
    from toolkit.profiler.journal import JournaledSample, SampleJournal

    now = [0.0]
    append = SampleJournal.append

    def slow_append(journal: SampleJournal, sample: JournaledSample) -> None:
        append(journal, sample)
        now[0] += seconds

    monkeypatch.setattr(SampleJournal, "append", slow_append)
    return lambda: now[0]
