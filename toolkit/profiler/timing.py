"""Timing one sample: the vision stage, the prefill pass and every decode pass, R times."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from toolkit.features import VISION_TOKENS_PER_CROP
from toolkit.profiler.datasets import SampleSpec
from toolkit.profiler.model import CROP_SIZE, MolmoELike, new_cache


@dataclass
class SampleTiming:
    """Medians over the repeats (ms), and the raw runs that the noise floor is computed from."""

    spec: SampleSpec
    vision_runs: list[float]
    prefill_runs: list[float]
    decode_runs: list[list[float]]  # [position][run]
    total_runs: list[float]

    @property
    def vision_tokens(self) -> int:
        return (self.spec.num_crops + 1) * VISION_TOKENS_PER_CROP

    def to_sample(
        self,
        tier: str,
        top_k: int,
        num_active_blocks: int,
        metadata: dict[str, object] | None = None,
    ) -> dict[str, object]:
        """One ``per_sample_results`` entry of the core-experiment format.

        ``metadata`` (e.g. ``device``, ``speed_factor``) goes into the sample's ``metadata``.
        """
        spec = self.spec
        passes = spec.output_tokens - 1
        decode_totals = [
            sum(step[run] for step in self.decode_runs) for run in range(len(self.total_runs))
        ]
        t_decode = statistics.median(decode_totals) if passes > 0 else 0.0
        return {
            "sample_id": spec.sample_id,
            "tier": tier,
            "top_k": top_k,
            "num_active_blocks": num_active_blocks,
            "output_tokens": spec.output_tokens,
            # The drawn answer is content + EOS; EOS is "generated" as the last token.
            "content_tokens": spec.output_tokens - 1,
            "ends_with_eos": True,
            "actual_num_crops": spec.num_crops,
            "target_vision_tokens": self.vision_tokens,
            "actual_vision_tokens": self.vision_tokens,
            "actual_text_tokens": spec.text_tokens,
            "total_sequence_length": self.vision_tokens + spec.text_tokens,
            # Random weights: there is no meaningful answer to score.
            "accuracy": 0.0,
            "pred": "",
            "metadata": dict(metadata or {}),
            "T_vision_total": _ms(statistics.median(self.vision_runs)),
            "T_LLM_prefill": _ms(statistics.median(self.prefill_runs)),
            "T_LLM_decode": _ms(t_decode),
            "T_total": _ms(statistics.median(self.total_runs)),
            "T_decode_per_token": _ms(t_decode / passes) if passes > 0 else 0.0,
            "T_decode_per_step": [[_ms(v) for v in step] for step in self.decode_runs],
        }


def _ms(value: float) -> float:
    # 0.1 us resolution is far below the noise and keeps the files small.
    return round(value, 4)


class Timer:
    """Runs samples through a model and times each stage (wall clock, device synchronised)."""

    def __init__(self, model: MolmoELike, device: torch.device, dtype: torch.dtype) -> None:
        self.model = model
        self.device = device
        self.dtype = dtype
        self._generator = torch.Generator().manual_seed(1234)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _inputs(self, spec: SampleSpec) -> tuple[torch.Tensor, torch.Tensor]:
        # Random pixels and token ids: the values do not change the work, the shapes do.
        pixels = torch.randn(
            spec.num_crops + 1, 3, CROP_SIZE, CROP_SIZE, generator=self._generator
        ).to(self.device, self.dtype)
        token_ids = torch.randint(
            0, self.model.preset.vocab_size, (1, spec.text_tokens), generator=self._generator
        ).to(self.device)
        return pixels, token_ids

    @torch.inference_mode()
    def _run_once(
        self, pixels: torch.Tensor, token_ids: torch.Tensor, output_tokens: int, blocks: int
    ) -> tuple[float, float, list[float], float]:
        model = self.model
        self._sync()
        start = time.perf_counter()
        vision = model.encode_images(pixels)
        self._sync()
        after_vision = time.perf_counter()
        embeds = torch.cat([vision, model.embed_text(token_ids)], dim=1)
        cache = new_cache()
        token = model.decoder_pass(embeds, cache, blocks)
        self._sync()
        after_prefill = time.perf_counter()
        steps = []
        last = after_prefill
        # EOS is ignored: exactly output_tokens - 1 decode passes follow the prefill.
        for _ in range(output_tokens - 1):
            token = model.decoder_pass(model.embed_text(token), cache, blocks)
            self._sync()
            now = time.perf_counter()
            steps.append((now - last) * 1e3)
            last = now
        return (
            (after_vision - start) * 1e3,
            (after_prefill - after_vision) * 1e3,
            steps,
            (last - start) * 1e3,
        )

    def warm_up(self, spec: SampleSpec, num_active_blocks: int) -> None:
        """One untimed run: first-call allocations and caches must not land in a sample."""
        pixels, token_ids = self._inputs(spec)
        self._run_once(pixels, token_ids, max(spec.output_tokens, 2), num_active_blocks)

    def time_sample(self, spec: SampleSpec, num_active_blocks: int, repeats: int) -> SampleTiming:
        pixels, token_ids = self._inputs(spec)
        vision_runs: list[float] = []
        prefill_runs: list[float] = []
        total_runs: list[float] = []
        decode_runs: list[list[float]] = [[] for _ in range(spec.output_tokens - 1)]
        for _ in range(repeats):
            vision, prefill, steps, total = self._run_once(
                pixels, token_ids, spec.output_tokens, num_active_blocks
            )
            vision_runs.append(vision)
            prefill_runs.append(prefill)
            total_runs.append(total)
            for position, value in enumerate(steps):
                decode_runs[position].append(value)
        return SampleTiming(spec, vision_runs, prefill_runs, decode_runs, total_runs)
