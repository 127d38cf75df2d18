"""A random-weight model with MolmoE-1B's architecture, built from ``transformers`` classes.

Vision: a CLIP ViT over 336 px crops (patch 14 -> 24 x 24 patches), 2 x 2 attention pooling
to 144 tokens per crop, and a SwiGLU projector to the decoder width. Decoder: OLMoE blocks
(``OlmoeDecoderLayer``: attention + 64-expert top-k MoE) with a KV cache.

Nothing is downloaded: the weights are random, so the latency is faithful to the architecture
and the token counts, while the text the model would produce is meaningless.

The three knobs of the adaptive controller map onto the model like this:

- tier -> number of crops -> ``(crops + 1) * 144`` vision tokens in the prompt;
- top_k -> ``router.top_k`` of every MoE block (the experts each token runs through);
- num_active_blocks -> only the first ``n`` decoder blocks run. Their ``layer_idx`` are
  ``0 .. n - 1``, so the KV cache (one entry per layer index) stays consistent across the
  prefill and decode passes without re-indexing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from toolkit.errors import LatkitError
from toolkit.features import VISION_TOKENS_PER_CROP

#: Crops are square images of this side, cut into patches of ``PATCH_SIZE``.
CROP_SIZE = 336
PATCH_SIZE = 14
#: 24 x 24 patches per crop, pooled 2 x 2 into 12 x 12 = 144 tokens.
_PATCHES_PER_SIDE = CROP_SIZE // PATCH_SIZE
_POOL = 2
assert (_PATCHES_PER_SIDE // _POOL) ** 2 == VISION_TOKENS_PER_CROP
#: The decoder's context: prompt (vision + text tokens) plus answer.
MAX_POSITIONS = 8192


@dataclass(frozen=True)
class ModelPreset:
    """Dimensions of the vision encoder, projector and decoder."""

    name: str
    # decoder (OLMoE)
    d_model: int
    num_layers: int
    num_heads: int
    num_experts: int
    default_top_k: int
    expert_hidden: int
    vocab_size: int
    # vision (CLIP ViT)
    vit_width: int
    vit_heads: int
    vit_mlp: int
    vit_layers: int
    # projector hidden width (SwiGLU)
    projector_hidden: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, ModelPreset] = {
    # MolmoE-1B: OLMoE-1B-7B decoder, ViT-L/14 @ 336 (Molmo uses 23 of its 24 layers).
    "molmoe-1b": ModelPreset(
        name="molmoe-1b",
        d_model=2048,
        num_layers=16,
        num_heads=16,
        num_experts=64,
        default_top_k=8,
        expert_hidden=1024,
        vocab_size=50304,
        vit_width=1024,
        vit_heads=16,
        vit_mlp=4096,
        vit_layers=23,
        projector_hidden=4096,
    ),
    # Wide enough that arithmetic, not per-op overhead, sets a CPU's latency (d_model 128,
    # 4 heads, expert hidden 128, a 2-layer ViT of width 128), small enough that a full
    # 75-configuration sweep of 9 datasets x 3 samples x 2 repeats takes about an hour on
    # one thread. Same structure as the others (16 blocks, 64 experts, top-k, 144 tokens
    # per crop, KV cache, 50k vocabulary). See data/README.md for what it measured.
    "small": ModelPreset(
        name="small",
        d_model=128,
        num_layers=16,
        num_heads=4,
        num_experts=64,
        default_top_k=8,
        expert_hidden=128,
        vocab_size=50304,
        vit_width=128,
        vit_heads=4,
        vit_mlp=512,
        vit_layers=2,
        projector_hidden=256,
    ),
    # Small enough that the full 75-configuration sweep (3 repeats, 3375 samples) runs in
    # about 25 minutes on one thread of a slow, shared CPU, while keeping what shapes the
    # latency: 16 decoder blocks, 64 experts with top-k routing, 144 tokens per crop (so up to
    # ~2300-token prompts), a growing KV cache, a 50k vocabulary. Widths are scaled down
    # 64-128x and the ViT keeps 1 of its 23 layers: on a CPU the attention (tokens^2 x width)
    # and per-op overheads weigh more than in the real model.
    "tiny": ModelPreset(
        name="tiny",
        d_model=16,
        num_layers=16,
        num_heads=1,
        num_experts=64,
        default_top_k=8,
        expert_hidden=16,
        vocab_size=50304,
        vit_width=16,
        vit_heads=1,
        vit_mlp=64,
        vit_layers=1,
        projector_hidden=32,
    ),
}


def get_preset(name: str) -> ModelPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise LatkitError(
            f"unknown preset {name!r}: expected one of {', '.join(sorted(PRESETS))}"
        ) from None


#: The transformers modules the model imports when it is built (a Ray worker can load them
#: before it is needed: ``toolkit.profiler.ray_runner``).
TRANSFORMERS_MODULES: tuple[str, ...] = (
    "transformers.models.clip.modeling_clip",
    "transformers.models.olmoe.modeling_olmoe",
    "transformers.masking_utils",
    "transformers.integrations.moe",
)

#: Name under which :func:`_routed_experts_forward` is registered with transformers.
EXPERTS_IMPLEMENTATION = "latkit_routed"

#: Below this many (token, expert) pairs the experts run as one gathered batched matmul.
_GATHER_MAX_PAIRS = 64


def _routed_experts_forward(
    self: Any, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """OLMoE experts forward whose work is proportional to tokens x top_k.

    transformers' eager loop pays a Python round trip per routed expert with tensor-valued
    indices; on a CPU that overhead hides the top_k and decode-position effects we want to
    measure. Here a decode pass (few tokens) gathers exactly the routed experts' weights and
    runs one batched matmul: like the real memory-bound kernel, it reads ``top_k`` experts'
    weights. A prefill uses transformers' grouped-GEMM implementation.
    """
    num_tokens, hidden_dim = hidden_states.shape
    top_k = top_k_index.shape[-1]
    flat_ids = top_k_index.reshape(-1)
    flat_weights = top_k_weights.reshape(-1, 1).to(hidden_states.dtype)
    if num_tokens * top_k <= _GATHER_MAX_PAIRS:
        token_idx = torch.arange(num_tokens, device=hidden_states.device).repeat_interleave(top_k)
        x = hidden_states[token_idx].unsqueeze(-1)  # [pairs, d, 1]
        gate_up = torch.bmm(self.gate_up_proj[flat_ids], x).squeeze(-1)  # [pairs, 2h]
        gate, up = gate_up.chunk(2, dim=-1)
        act = (self.act_fn(gate) * up).unsqueeze(-1)
        pair_out = torch.bmm(self.down_proj[flat_ids], act).squeeze(-1) * flat_weights
        return pair_out.reshape(num_tokens, top_k, hidden_dim).sum(dim=1)
    # Prefill: transformers' dropless grouped GEMM (pairs sorted by expert, one grouped
    # matmul). Its work follows the actual (token, expert) pairs even when random weights
    # route most vision tokens to the same few experts; a padded per-expert batch would not.
    from transformers.integrations.moe import grouped_mm_experts_forward

    grouped: torch.Tensor = grouped_mm_experts_forward(
        self, hidden_states, top_k_index, top_k_weights
    )
    return grouped


def _register_experts_implementation() -> None:
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(EXPERTS_IMPLEMENTATION, _routed_experts_forward)


class _AttentionPool2x2(nn.Module):
    """Molmo-style pooling: each 2 x 2 patch window becomes one token, queried by its mean."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        # patches: [images, 576, width] -> windows [images * 144, 4, width]
        n, _, width = patches.shape
        side = _PATCHES_PER_SIDE
        grid = patches.reshape(n, side // _POOL, _POOL, side // _POOL, _POOL, width)
        windows = grid.permute(0, 1, 3, 2, 4, 5).reshape(-1, _POOL * _POOL, width)
        query = windows.mean(dim=1, keepdim=True)
        pooled, _ = self.attn(query, windows, windows, need_weights=False)
        return pooled.reshape(n, VISION_TOKENS_PER_CROP, width)


class _Projector(nn.Module):
    """SwiGLU MLP from the ViT width to the decoder width."""

    def __init__(self, width: int, hidden: int, d_model: int) -> None:
        super().__init__()
        self.gate = nn.Linear(width, hidden, bias=False)
        self.up = nn.Linear(width, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


class MolmoELike(nn.Module):
    """Vision encoder + projector + OLMoE decoder, driven stage by stage by the profiler."""

    def __init__(
        self, preset: ModelPreset, experts_implementation: str = EXPERTS_IMPLEMENTATION
    ) -> None:
        super().__init__()
        # Imported here so that ``latkit --help`` does not pay for importing transformers.
        from transformers import CLIPVisionConfig, CLIPVisionModel, OlmoeConfig
        from transformers.models.olmoe.modeling_olmoe import (
            OlmoeDecoderLayer,
            OlmoeRMSNorm,
            OlmoeRotaryEmbedding,
        )

        _register_experts_implementation()
        self.preset = preset
        # PyTorch's fused attention on every device (a typed kwarg of no config signature).
        sdpa: dict[str, Any] = {"attn_implementation": "sdpa"}
        vit_config = CLIPVisionConfig(
            hidden_size=preset.vit_width,
            intermediate_size=preset.vit_mlp,
            num_hidden_layers=preset.vit_layers,
            num_attention_heads=preset.vit_heads,
            image_size=CROP_SIZE,
            patch_size=PATCH_SIZE,
            **sdpa,
        )
        self.vit = CLIPVisionModel(vit_config)
        self.pool = _AttentionPool2x2(preset.vit_width, preset.vit_heads)
        self.projector = _Projector(preset.vit_width, preset.projector_hidden, preset.d_model)

        config = OlmoeConfig(
            vocab_size=preset.vocab_size,
            hidden_size=preset.d_model,
            intermediate_size=preset.expert_hidden,
            num_hidden_layers=preset.num_layers,
            num_attention_heads=preset.num_heads,
            num_key_value_heads=preset.num_heads,
            num_experts=preset.num_experts,
            num_experts_per_tok=preset.default_top_k,
            max_position_embeddings=MAX_POSITIONS,
            **sdpa,
        )
        # Routed experts only: a decode pass runs exactly top_k experts per block, as in the
        # real model's kernels (see _routed_experts_forward).
        config._experts_implementation = experts_implementation
        self.config = config
        self.embed_tokens = nn.Embedding(preset.vocab_size, preset.d_model)
        self.layers = nn.ModuleList(
            [OlmoeDecoderLayer(config, layer_idx=i) for i in range(preset.num_layers)]
        )
        self.norm = OlmoeRMSNorm(preset.d_model, eps=config.rms_norm_eps)
        self.rotary_emb = OlmoeRotaryEmbedding(config=config)
        self.lm_head = nn.Linear(preset.d_model, preset.vocab_size, bias=False)
        self.eval()

    @torch.no_grad()
    def init_random(self, seed: int = 0) -> None:
        """Small random values everywhere, drawn on the parameters' own device.

        Parameters that transformers creates with ``torch.empty`` (the 3-D expert tensors)
        would otherwise hold garbage, possibly NaN or denormals that slow a CPU down.
        """
        generators: dict[torch.device, torch.Generator] = {}
        for param in self.parameters():
            if param.dim() < 2:
                continue
            if param.device not in generators:
                generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
            noise = torch.randn(
                param.shape,
                generator=generators[param.device],
                device=param.device,
                dtype=torch.float32,
            )
            param.copy_(noise.mul_(0.02))

    # --- knobs -------------------------------------------------------------------------
    def set_top_k(self, top_k: int) -> None:
        if not 1 <= top_k <= self.preset.num_experts:
            raise LatkitError(f"top_k {top_k} out of range 1-{self.preset.num_experts}")
        for layer in self.layers:
            block: Any = layer
            block.mlp.gate.top_k = top_k

    def check_blocks(self, num_active_blocks: int) -> None:
        if not 1 <= num_active_blocks <= self.preset.num_layers:
            raise LatkitError(
                f"num_active_blocks {num_active_blocks} out of range 1-{self.preset.num_layers}"
            )

    # --- stages ------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[crops + 1, 3, 336, 336] -> [1, (crops + 1) * 144, d_model] vision embeddings."""
        hidden = self.vit(pixel_values=pixel_values).last_hidden_state[:, 1:, :]  # drop CLS
        pooled = self.pool(hidden)
        return self.projector(pooled).reshape(1, -1, self.preset.d_model)

    @torch.no_grad()
    def embed_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(token_ids)

    @torch.no_grad()
    def decoder_pass(
        self, inputs_embeds: torch.Tensor, cache: Any, num_active_blocks: int
    ) -> torch.Tensor:
        """One decoder forward (prefill or one decode pass); returns the next token ids [1, 1].

        Greedy argmax: EOS does not exist for this model, so the caller decides the length.
        """
        logits = self.lm_head(self.decoder_hidden(inputs_embeds, cache, num_active_blocks))
        return logits.argmax(dim=-1)

    @torch.no_grad()
    def decoder_hidden(
        self, inputs_embeds: torch.Tensor, cache: Any, num_active_blocks: int
    ) -> torch.Tensor:
        """Final-norm hidden state of the last position [1, 1, d] after the first n blocks.

        The new keys/values of blocks ``0 .. n - 1`` are appended to ``cache``.
        """
        from transformers.masking_utils import create_causal_mask

        past = cache.get_seq_length()
        length = inputs_embeds.shape[1]
        position_ids = torch.arange(past, past + length, device=inputs_embeds.device)[None, :]
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=None,
            cache=cache,
            position_ids=position_ids,
        )
        hidden = inputs_embeds
        position_embeddings = self.rotary_emb(hidden, position_ids)
        for layer in self.layers[:num_active_blocks]:
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=True,
                position_embeddings=position_embeddings,
            )
        return self.norm(hidden[:, -1:, :])


def new_cache() -> Any:
    """An empty KV cache; layers are created lazily for layer indices 0 .. n - 1."""
    from transformers import DynamicCache

    return DynamicCache()


def build_model(
    preset: ModelPreset, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> MolmoELike:
    """Construct directly on ``device`` in ``dtype``: MolmoE-1B's ~7B parameters would take
    28 GB as float32 on the host before moving."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = MolmoELike(preset)
    finally:
        torch.set_default_dtype(previous)
    model.init_random(seed)
    return model.to(device=device, dtype=dtype)
