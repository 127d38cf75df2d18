"""Per-dataset prompt and answer lengths, and seeded draws of the samples a profile measures.

The lengths resemble the nine datasets of the core experiment as MolmoE-1B sees them: the
prompt text is the chat template plus the question (plus answer options or context for
multiple-choice sets); the output counts generated tokens including EOS. Short-answer VQA
sets answer in a few tokens, captions in tens of tokens.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from toolkit.errors import LatkitError
from toolkit.features import TIER_CROP_RANGE, TIERS


@dataclass(frozen=True)
class LengthDist:
    """A log-normal length, rounded and clipped to ``[low, high]``."""

    median: float
    sigma: float
    low: int
    high: int

    def draw(self, rng: np.random.Generator) -> int:
        value = round(self.median * float(np.exp(self.sigma * rng.standard_normal())))
        return min(max(value, self.low), self.high)


@dataclass(frozen=True)
class DatasetProfile:
    name: str
    prompt_tokens: LengthDist  # text tokens of the prompt (template + question)
    answer_tokens: LengthDist  # content tokens of the answer; output = answer + EOS


DATASETS: dict[str, DatasetProfile] = {
    profile.name: profile
    for profile in (
        # Short VQA answers ("yes", "2", "red"); questions of about ten words.
        DatasetProfile("coco_2014_vqa", LengthDist(17, 0.25, 10, 40), LengthDist(1.3, 0.45, 1, 6)),
        # A fixed captioning prompt; captions of one or two sentences.
        DatasetProfile("coco_caption", LengthDist(12, 0.1, 9, 16), LengthDist(22, 0.35, 8, 60)),
        # Document questions; extractive answers (names, numbers, dates).
        DatasetProfile("doc_qa", LengthDist(24, 0.35, 12, 70), LengthDist(3.5, 0.6, 1, 20)),
        # Exam questions with options and context; a letter or a short phrase.
        DatasetProfile("mmmu", LengthDist(90, 0.6, 25, 400), LengthDist(2.0, 0.7, 1, 16)),
        # Open-knowledge VQA; a word or two.
        DatasetProfile("okvqa", LengthDist(18, 0.25, 10, 40), LengthDist(1.8, 0.5, 1, 8)),
        # Question, lecture context and lettered choices; the answer is one option.
        DatasetProfile("science_qa_img", LengthDist(60, 0.45, 25, 250), LengthDist(1.5, 0.5, 1, 6)),
        # Scene-text questions; the answer is text read off the image.
        DatasetProfile("st_qa", LengthDist(18, 0.25, 10, 40), LengthDist(2.5, 0.55, 1, 12)),
        # "How many ...?": a count.
        DatasetProfile("tally_qa", LengthDist(15, 0.2, 10, 30), LengthDist(1.0, 0.3, 1, 3)),
        # Text in natural images; short transcriptions.
        DatasetProfile("text_vqa", LengthDist(18, 0.25, 10, 40), LengthDist(2.5, 0.6, 1, 12)),
    )
}


#: Seeds the stream of ``--output-tokens`` draws apart from the dataset's own draws.
_OVERRIDE = 1


@dataclass(frozen=True)
class SampleSpec:
    """What one profiled sample feeds the model (all drawn, nothing measured)."""

    sample_id: int
    num_crops: int
    text_tokens: int
    output_tokens: int  # includes EOS; the first comes out of the prefill pass


def parse_datasets(names: str | None) -> list[str]:
    if not names:
        return list(DATASETS)
    chosen = [name.strip().replace("-", "_") for name in names.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in DATASETS]
    if unknown:
        raise LatkitError(
            f"unknown dataset(s) {', '.join(unknown)}: expected some of {', '.join(DATASETS)}"
        )
    return list(dict.fromkeys(chosen))


def parse_output_tokens(text: str | None) -> tuple[int, int] | None:
    """``--output-tokens LO-HI`` as (LO, HI); None keeps the datasets' own answer lengths."""
    if text is None:
        return None
    parts = text.split("-")
    try:
        if len(parts) != 2:
            raise ValueError
        low, high = int(parts[0]), int(parts[1])
    except ValueError:
        raise LatkitError(
            f"--output-tokens {text!r}: expected LO-HI, two integers (e.g. 128-448)"
        ) from None
    return check_output_tokens((low, high))


def check_output_tokens(bounds: tuple[int, int]) -> tuple[int, int]:
    low, high = bounds
    if low < 1 or low > high:
        raise LatkitError(
            f"--output-tokens {low}-{high}: needs 1 <= LO <= HI (output tokens count the "
            "first one, which comes out of the prefill pass)"
        )
    return low, high


def _stable_id(name: str) -> int:
    # Python's hash() is salted per process; crc32 keeps draws identical across runs.
    return zlib.crc32(name.encode("utf-8"))


def draw_samples(
    dataset: str,
    tier: str,
    top_k: int,
    num_active_blocks: int,
    count: int,
    seed: int,
    first_sample_id: int,
    output_tokens: tuple[int, int] | None = None,
) -> list[SampleSpec]:
    """The samples of one (dataset, configuration), drawn from a seed of exactly these keys.

    A configuration's draws do not depend on which other configurations run, so ``--resume``
    and partial sweeps measure the same samples a full sweep would. ``output_tokens``
    (``--output-tokens LO-HI``) replaces the dataset's answer lengths by uniform draws in
    ``[LO, HI]`` from a stream of their own: images and prompts stay those of the default
    draws, so a long-answer sweep differs from the default one in its answers only.
    """
    if tier not in TIER_CROP_RANGE:
        raise LatkitError(f"unknown tier {tier!r}: expected one of {', '.join(TIERS)}")
    profile = DATASETS[dataset]
    low, high = TIER_CROP_RANGE[tier]
    rng = np.random.default_rng(
        [seed, _stable_id(dataset), TIERS.index(tier), top_k, num_active_blocks]
    )
    override_rng = np.random.default_rng(
        [seed, _stable_id(dataset), TIERS.index(tier), top_k, num_active_blocks, _OVERRIDE]
    )
    samples = []
    for i in range(count):
        num_crops = int(rng.integers(low, high + 1))
        text_tokens = profile.prompt_tokens.draw(rng)
        # Drawn even when overridden, so that the next sample's image and prompt stay put.
        drawn_output = profile.answer_tokens.draw(rng) + 1
        if output_tokens is not None:
            drawn_output = int(override_rng.integers(output_tokens[0], output_tokens[1] + 1))
        samples.append(
            SampleSpec(
                sample_id=first_sample_id + i,
                num_crops=num_crops,
                text_tokens=text_tokens,
                output_tokens=drawn_output,
            )
        )
    return samples
