"""A SIMULATED GPU: a kernel-level roofline of MolmoE-1B on an H100-like device.

Nothing here is measured. This module is the physics of ``benchmarks/precise_sweep.py``, which
writes a simulated sweep in the core-exp format so that latkit can be checked on data as
precise as a GPU's (identical work repeats within ~1 %), which neither bundled CPU sweep is.
It is deliberately independent of the model (``toolkit.models``): nothing in latkit reads it.

What it simulates, per kernel (times in microseconds):

- GEMMs as a roofline with **tile and wave quantisation**: the output is cut into tiles
  (the cheapest of 128x256, 128x128 and 64x128, as a heuristic library picks), tiles run in
  waves of one tile per SM, and the time is ``max(waves x tile time, bytes / bandwidth)``
  plus a fixed launch/tail cost. A GEMM costs the same for every M inside one tile row and
  jumps at the next: stair steps in prompt length;
- the MoE as a grouped GEMM over the experts (fixed, uneven expert popularity): all experts'
  weights are read once, their tiles share the waves. Few tokens per expert: bound by
  reading the weights (flat in tokens); many: compute-bound (growing with tokens x top_k).
  The crossover lies inside the knob grid;
- prefill attention as a causal flash-attention grid of (head, 128-query block) programs, each
  walking the key blocks up to its diagonal: quadratic in the prompt, in steps of 128;
- memory-bound elementwise kernels (norms, rotary, activation, permutations), each with the
  fixed cost of a launch;
- decode passes: one token through the active blocks. Every GEMM is bound by reading its
  weights (the MoE reads the top_k experts' weights per block), attention reads the KV cache
  of ``prompt + k`` tokens: per-pass time = per-configuration constant + slope x KV length,
  as real decoders do;
- a fixed host overhead per stage (framework dispatch, synchronisation).

Vision: a ViT-L/14 (width 1024, 23 layers) over ``crops + 1`` images of 336 px (577 tokens
each), 2x2 attention pooling to 144 tokens per image and a SwiGLU projector: vision tokens
= (crops + 1) x 144. LLM: OLMoE-like blocks (d_model 2048, 16 heads of 128, QK-norm, 64
experts of SwiGLU hidden 1024, top_k routed), 16 blocks of which ``num_active_blocks`` run.
The shapes are the profiler's ``molmoe-1b`` preset (``toolkit.profiler.model``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import numpy as np

from toolkit.features import VISION_TOKENS_PER_CROP
from toolkit.profiler.model import CROP_SIZE, PATCH_SIZE, ModelPreset, get_preset

BYTES = 2  # bf16


@dataclass(frozen=True)
class Device:
    """An H100-like device (SXM: ~990 TFLOP/s dense bf16, ~3.35 TB/s HBM3, 132 SMs)."""

    name: str = "simulated H100-like roofline (not a measurement)"
    peak_tflops: float = 989.0
    hbm_tb_s: float = 3.35
    sms: int = 132
    gemm_efficiency: float = 0.80  # share of peak one busy SM reaches on a GEMM tile
    attention_efficiency: float = 0.55  # flash attention's share of peak
    hbm_efficiency: float = 0.85
    kernel_fixed_us: float = 3.0  # launch + tail of every kernel
    vision_host_us: float = 400.0
    prefill_host_us: float = 300.0
    decode_host_us: float = 150.0  # per pass: sampling, the generate loop

    @property
    def sm_flops_per_us(self) -> float:
        return self.peak_tflops * 1e6 / self.sms

    @property
    def bytes_per_us(self) -> float:
        return self.hbm_tb_s * 1e6 * self.hbm_efficiency


#: MolmoE-1B's shapes (OLMoE-1B-7B decoder, CLIP ViT-L/14 at 336 px): the profiler's preset.
MODEL: ModelPreset = get_preset("molmoe-1b")
#: ViT tokens per image: its patches and the class token.
VIT_TOKENS_PER_IMAGE = (CROP_SIZE // PATCH_SIZE) ** 2 + 1
#: Spread of the experts' popularity (log-normal sigma): real routers are uneven.
EXPERT_POPULARITY_SIGMA = 0.35


def expert_shares(model: ModelPreset) -> np.ndarray:
    """Fixed share of the routed tokens each expert gets (sums to 1)."""
    z = np.random.default_rng(20240917).standard_normal(model.num_experts)
    weights = np.exp(EXPERT_POPULARITY_SIGMA * z)
    return np.asarray(weights / weights.sum())


#: Devices a sweep can be simulated on (``precise_sweep.py --device``); the A100-like one
#: (312 TFLOP/s, 2.0 TB/s, 108 SMs) moves every crossover and step of the H100-like default.
DEVICES: dict[str, Device] = {
    "h100": Device(),
    "a100": Device(
        name="simulated A100-like roofline (not a measurement)",
        peak_tflops=312.0,
        hbm_tb_s=2.0,
        sms=108,
        kernel_fixed_us=4.0,
    ),
}

TILES: tuple[tuple[int, int], ...] = ((128, 256), (128, 128), (64, 128))


def memory_us(dev: Device, n_bytes: float) -> float:
    """A memory-bound kernel: launch + bytes at the sustained bandwidth."""
    return dev.kernel_fixed_us + n_bytes / dev.bytes_per_us


def grouped_gemm_us(dev: Device, ms: tuple[int, ...], n: int, k: int) -> float:
    """``len(ms)`` GEMMs ``[m_i, k] x [k, n]`` (distinct weights) in one kernel: their tiles
    share the waves. Roofline of the cheapest tile shape, plus the launch."""
    active = [m for m in ms if m > 0]
    if not active:
        return 0.0
    n_bytes = BYTES * (len(active) * k * n + sum(active) * (k + n))
    mem = n_bytes / dev.bytes_per_us
    best = math.inf
    for tm, tn in TILES:
        tiles = sum(math.ceil(m / tm) for m in active) * math.ceil(n / tn)
        waves = math.ceil(tiles / dev.sms)
        tile_us = 2.0 * tm * tn * k / (dev.sm_flops_per_us * dev.gemm_efficiency)
        best = min(best, max(waves * tile_us, mem))
    return dev.kernel_fixed_us + best


def gemm_us(dev: Device, m: int, n: int, k: int) -> float:
    """A dense layer ``[m, k] x [k, n]``: a grouped GEMM of one group."""
    return grouped_gemm_us(dev, (m,), n, k)


def flash_attention_us(
    dev: Device, queries: int, keys: int, heads: int, head_dim: int, causal: bool, images: int = 1
) -> float:
    """Flash attention over ``images`` independent sequences: one program per (image, head,
    128-query block), each walking 128-key blocks (up to its diagonal when causal)."""
    if queries <= 0:
        return 0.0
    q_blocks = math.ceil(queries / 128)
    k_blocks = math.ceil(keys / 128)
    per_program = [min(i + 1, k_blocks) if causal else k_blocks for i in range(q_blocks)]
    total_blocks = images * heads * sum(per_program)
    block_us = 4.0 * 128 * 128 * head_dim / (dev.sm_flops_per_us * dev.attention_efficiency)
    # Programs of unequal length: no faster than the longest, nor than perfect packing.
    compute = max(math.ceil(total_blocks / dev.sms), max(per_program)) * block_us
    n_bytes = BYTES * images * heads * head_dim * (2 * queries + 2 * keys)
    return dev.kernel_fixed_us + max(compute, n_bytes / dev.bytes_per_us)


# -- vision ----------------------------------------------------------------------------------


@cache
def vision_us(crops: int, dev: Device = Device(), model: ModelPreset = MODEL) -> float:
    """ViT + pooling + projector over ``crops + 1`` images (noise-free)."""
    images = crops + 1
    per_image = VIT_TOKENS_PER_IMAGE
    tokens = images * per_image
    w, mlp = model.vit_width, model.vit_mlp
    act = BYTES * tokens * w
    t = gemm_us(dev, tokens, w, 3 * PATCH_SIZE**2)  # patch embedding
    t += memory_us(dev, 2 * act)  # + positions
    layer = (
        memory_us(dev, 2 * act)  # layer norm
        + gemm_us(dev, tokens, 3 * w, w)
        + flash_attention_us(
            dev, per_image, per_image, model.vit_heads, w // model.vit_heads, False, images
        )
        + gemm_us(dev, tokens, w, w)
        + memory_us(dev, 3 * act)  # residual
        + memory_us(dev, 2 * act)  # layer norm
        + gemm_us(dev, tokens, mlp, w)
        + memory_us(dev, 2 * BYTES * tokens * mlp)  # GELU
        + gemm_us(dev, tokens, w, mlp)
        + memory_us(dev, 3 * act)  # residual
    )
    t += model.vit_layers * layer
    # 2x2 attention pooling of two concatenated ViT layers (2w features), then the projector.
    patches = images * (per_image - 1)
    pooled = images * VISION_TOKENS_PER_CROP
    t += memory_us(dev, BYTES * patches * 2 * w * 2)  # gather + concatenate
    t += gemm_us(dev, patches, 2 * 2 * w, 2 * w)  # keys and values
    t += gemm_us(dev, pooled, 2 * w, 2 * w)  # queries (the mean of each 2x2 window)
    t += memory_us(dev, BYTES * (patches * 4 * w + pooled * 2 * w))  # 4-key attention
    t += gemm_us(dev, pooled, 2 * model.projector_hidden, 2 * w)
    t += memory_us(dev, 3 * BYTES * pooled * model.projector_hidden)  # SiLU x gate
    t += gemm_us(dev, pooled, model.d_model, model.projector_hidden)
    return t + dev.vision_host_us


# -- LLM prefill -----------------------------------------------------------------------------


def expert_loads(tokens: int, top_k: int, model: ModelPreset) -> tuple[int, ...]:
    """Tokens routed to each expert: ``tokens x top_k`` assignments split by popularity,
    rounded by largest remainder (an expert gets at most ``tokens``)."""
    assignments = tokens * top_k
    raw = expert_shares(model) * assignments
    loads = np.minimum(np.floor(raw).astype(np.int64), tokens)
    short = assignments - int(loads.sum())
    order = np.argsort(-(raw - np.floor(raw)))
    for e in order:
        if short <= 0:
            break
        if loads[e] < tokens:
            loads[e] += 1
            short -= 1
    return tuple(int(v) for v in loads)


def moe_block_us(dev: Device, tokens: int, top_k: int, model: ModelPreset) -> float:
    """Router, top-k, permutation, the two grouped expert GEMMs and the combine."""
    d, h = model.d_model, model.expert_hidden
    routed = tokens * top_k
    loads = expert_loads(tokens, top_k, model)
    t = gemm_us(dev, tokens, model.num_experts, d)  # router logits
    t += memory_us(dev, BYTES * tokens * model.num_experts * 2)  # softmax + top-k
    t += memory_us(dev, BYTES * (tokens * d + routed * d))  # permute tokens to experts
    t += grouped_gemm_us(dev, loads, 2 * h, d)  # gate + up
    t += memory_us(dev, BYTES * routed * 3 * h)  # SiLU x up
    t += grouped_gemm_us(dev, loads, d, h)  # down
    t += memory_us(dev, BYTES * (routed * d + tokens * d))  # weighted combine
    return t


@cache
def llm_prefill_us(
    prompt_tokens: int,
    top_k: int,
    num_active_blocks: int,
    dev: Device = Device(),
    model: ModelPreset = MODEL,
) -> float:
    """The decoder over the whole prompt (``num_active_blocks`` blocks) and the first token."""
    p, d = prompt_tokens, model.d_model
    act = BYTES * p * d
    block = (
        memory_us(dev, 2 * act)  # RMSNorm
        + gemm_us(dev, p, 3 * d, d)  # QKV
        + memory_us(dev, 2 * 2 * act)  # QK-norm
        + memory_us(dev, 2 * 2 * act)  # rotary
        + memory_us(dev, 2 * act)  # write the KV cache
        + flash_attention_us(dev, p, p, model.num_heads, d // model.num_heads, True)
        + gemm_us(dev, p, d, d)  # output projection
        + memory_us(dev, 3 * act)  # residual
        + memory_us(dev, 2 * act)  # RMSNorm
        + moe_block_us(dev, p, top_k, model)
        + memory_us(dev, 3 * act)  # residual
    )
    t = memory_us(dev, act) + num_active_blocks * block  # embeddings, blocks
    t += memory_us(dev, 2 * BYTES * d) + gemm_us(dev, 1, model.vocab_size, d)  # norm, LM head
    return t + dev.prefill_host_us


# -- decode ----------------------------------------------------------------------------------


@cache
def decode_pass_line(
    top_k: int, num_active_blocks: int, dev: Device = Device(), model: ModelPreset = MODEL
) -> tuple[float, float]:
    """(constant us, us per KV-cache token) of one decode pass: pass time = a + b x KV."""
    d, h = model.d_model, model.expert_hidden
    small = BYTES * d * 4  # one token's activations: launch-bound elementwise kernels
    constant = (
        memory_us(dev, small)  # RMSNorm
        + gemm_us(dev, 1, 3 * d, d)  # QKV: reads the weights
        + 3 * memory_us(dev, small)  # QK-norm, rotary, append to the KV cache
        + dev.kernel_fixed_us  # attention's launch (its reads are the slope)
        + gemm_us(dev, 1, d, d)
        + 2 * memory_us(dev, small)  # residual, RMSNorm
        + gemm_us(dev, 1, model.num_experts, d)  # router
        + memory_us(dev, small)  # top-k
        + grouped_gemm_us(dev, (1,) * top_k, 2 * h, d)  # the top_k experts' weights
        + memory_us(dev, small)
        + grouped_gemm_us(dev, (1,) * top_k, d, h)
        + 2 * memory_us(dev, small)  # combine, residual
    ) * num_active_blocks
    constant += gemm_us(dev, 1, model.vocab_size, d) + dev.decode_host_us  # LM head, sampling
    # Attention reads K and V of every cached token in every active block.
    slope = num_active_blocks * 2 * BYTES * d / dev.bytes_per_us
    return constant, slope


def decode_pass_us(
    top_k: int, num_active_blocks: int, kv_tokens: np.ndarray, dev: Device = Device()
) -> np.ndarray:
    constant, slope = decode_pass_line(top_k, num_active_blocks, dev)
    return constant + slope * np.asarray(kv_tokens, dtype=np.float64)
