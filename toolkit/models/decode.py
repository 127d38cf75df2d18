"""Decode model: per-pass time = a constant plus a slope times the KV-cache length.

Decode pass k (k = 1 .. N-1 for N output tokens) runs one token through the active blocks: it
reads the weights of the attention projections and of the ``top_k`` experts of every block
(a cost that does not depend on k) and attends over a KV cache of ``P + k`` tokens, ``P`` the
prompt (vision + text tokens): a cost linear in ``P + k``. So

    pass_ms(k) = a(config) + c(config) * (P + k) / KV_UNIT,        a, c >= 0

with ``a`` and ``c`` from a small network of the configuration (``DecodeNet``). Nothing in a
decoder makes one pass quadratic in k (latkit 0.3's basis had a k^2 term: fitted on answers
of at most ~70 tokens it was mostly noise, and it dominated past a few hundred tokens).

The physics prior: what a pass reads grows with the knobs in a known way. Every active block
reads its attention weights and the weights of ``top_k`` experts, and attends over the KV
cache; so

    a = f_a(x) (a0 + b (a1 + a2 k)),    c = f_c(x) (c0 + c1 b)        (b blocks, k top_k)

with ``a0 .. c1 >= 0`` fitted once to the samples' mean pass times (least absolute deviations,
``DecodeNet.set_prior``) and ``f_a, f_c > 0`` the network's factors, which start at 1 and
learn what the prior misses. A network alone extends its last linear pieces past the
profiled knobs and over-shoots there; with the prior it only has to carry a factor near 1.
Measured on the small sweep (``benchmarks/accuracy.py``, seeds 0-2), decode total MAPE on the
random / config / sparse / extrapolation splits went from 7.70 / 7.19 / 7.69 / 7.98 % to
7.27 / 7.07 / 7.31 / 6.87 % and the extrapolation split's bias from 0.64 to 0.59; on the
simulated precise sweep from 1.04 / 1.13 / 1.30 / 1.34 % to 1.00 / 1.02 / 1.00 / 0.99 %
(its noise floor: 1.11 %).

Where the slope comes from: ``c`` multiplies ``P + k``, and the profiled prompts span ~300
to ~2500 tokens while answers span a few tens. With ``CONFIG_INPUTS`` (the network sees only
the configuration) the prompt can change a pass's time only through that slope, so the
prompts' spread pins ``c`` down. The default, ``DEFAULT_INPUTS``, also shows the network the
text prompt's length (the vision tokens follow the tier), so that ``a`` and ``c`` may vary
with it in ways a straight line does not capture; per-pass time still grows exactly
linearly in k for every request, which is what carries a prediction past the profiled
answer lengths. Measured with the prior, decode total MAPE on the four knob splits (mean of
3 seeds; ``python benchmarks/accuracy.py --decode-inputs tier_idx,top_k,num_active_blocks``
against the default run), configuration alone / + text tokens: small sweep 6.97-7.38 /
6.87-7.31 %, tiny 23.09-23.79 / 21.95-22.63 %. The tiny sweep, measured dataset by dataset,
has per-dataset drift that the token counts stand in for. (Before the prior, all five
features erred 1.2x more on the precise sweep where top_k and blocks are extrapolated.)

The sum over passes 1..m has a closed form (the basis' prefix sum),

    sum_{k=1}^{m} [1, (P + k) / KV_UNIT] = [m, m (P + (m + 1) / 2) / KV_UNIT],

so the total over any number of passes is one dot product (O(1) in N) in training, in Python
inference and in the exported graphs alike; no loop over positions, no B x N tensor.

Everything below is TorchScript-scriptable and ONNX-exportable (only elementwise ops,
``torch.stack`` and small Linear layers).
"""

# No ``from __future__ import annotations``: TorchScript must see the buffer annotations
# of DecodeNet as real types, not strings.
import math
from typing import Final

import numpy as np
import torch
from torch import Tensor, nn

from toolkit.features import FEATURE_NAMES
from toolkit.models.quantile_fit import nonnegative_quantile_fit

#: Number of basis functions of the pass index.
N_BASIS: Final[int] = 2
#: Tokens per unit of the slope term (keeps every term O(1) for typical prompts).
KV_UNIT: Final[float] = 1024.0
#: The basis as written in artifact manifests; a model trained with another basis is refused.
BASIS_TERMS: Final[tuple[str, ...]] = ("1", "(P+k)/1024")
#: Feature columns (``FEATURE_NAMES`` indices) of a prompt's length: vision + text tokens.
PROMPT_COLUMNS: Final[tuple[int, int]] = (0, 1)
#: Feature columns of top_k and num_active_blocks (the physics prior's knobs).
TOP_K_COLUMN: Final[int] = 3
BLOCKS_COLUMN: Final[int] = 4
#: The physics prior's weights as written in manifests (module doc): the constant per pass
#: ``a = a0 + blocks (a1 + a2 top_k)`` and the slope ``c = c0 + c1 blocks``.
PRIOR_TERMS: Final[tuple[str, ...]] = ("a0", "a1", "a2", "c0", "c1")
#: The identity prior (a = c = 1 x coef_scale): the network alone.
IDENTITY_PRIOR: Final[tuple[float, ...]] = (1.0, 0.0, 0.0, 1.0, 0.0)
#: The configuration alone: the token counts then enter through the KV length alone.
CONFIG_INPUTS: Final[tuple[str, ...]] = ("tier_idx", "top_k", "num_active_blocks")
#: The features the network sees by default: the configuration and the text prompt's length
#: (see the module doc).
DEFAULT_INPUTS: Final[tuple[str, ...]] = ("text_tokens", *CONFIG_INPUTS)

# TorchScript cannot read module globals, so the functions below spell KV_UNIT as a literal.
assert KV_UNIT == 1024.0 and N_BASIS == 2 and PROMPT_COLUMNS == (0, 1)
assert (
    FEATURE_NAMES[TOP_K_COLUMN] == "top_k" and FEATURE_NAMES[BLOCKS_COLUMN] == "num_active_blocks"
)


def prior_coefficients(features: Tensor, prior: Tensor) -> Tensor:
    """The physics prior's per-pass coefficients [..., N_BASIS] of raw features [..., 5]:
    ``[a0 + b (a1 + a2 k), c0 + c1 b]`` (b blocks, k top_k; ``prior`` [5], PRIOR_TERMS)."""
    k = features[..., 3]
    b = features[..., 4]
    a = prior[0] + b * (prior[1] + prior[2] * k)
    c = prior[3] + prior[4] * b
    return torch.stack([a, c], dim=-1)


def prompt_tokens(features: Tensor) -> Tensor:
    """Prompt length P (vision + text tokens) of raw features [..., 5] -> [...]."""
    return features[..., 0] + features[..., 1]


def decode_basis(k: Tensor, prompt: Tensor) -> Tensor:
    """Basis of pass ``k`` (k >= 1) after a prompt of ``prompt`` tokens (broadcast against k):
    ``[...]`` -> ``[..., N_BASIS]``: ``[1, (P + k) / KV_UNIT]``."""
    kv = prompt + k
    return torch.stack([torch.ones_like(kv), kv / 1024.0], dim=-1)


def decode_basis_prefix_sum(m: Tensor, prompt: Tensor) -> Tensor:
    """Exact ``sum_{k=1}^{m} decode_basis(k, P)`` for integer-valued ``m``; zeros where
    m <= 0. ``[...]`` float -> ``[..., N_BASIS]``: ``[m, m (P + (m + 1) / 2) / KV_UNIT]``."""
    m = torch.clamp(m, min=0.0)
    return torch.stack([m, m * (prompt + 0.5 * (m + 1.0)) / 1024.0], dim=-1)


def decode_outputs(coef: Tensor, output_tokens: Tensor, prompt: Tensor) -> tuple[Tensor, Tensor]:
    """(decode_total_ms, decode_per_token_ms) for ``output_tokens`` N (float [B]) after
    prompts of ``prompt`` tokens [B].

    N output tokens mean N - 1 decode passes (the first token comes out of prefill);
    per-token time is the mean pass time, 0 when N <= 1.
    """
    passes = torch.clamp(output_tokens - 1.0, min=0.0)
    total = (coef * decode_basis_prefix_sum(passes, prompt)).sum(-1)
    per_token = torch.where(
        passes > 0.0, total / torch.clamp(passes, min=1.0), torch.zeros_like(total)
    )
    return total, per_token


def decode_pass_ms(coef: Tensor, k: Tensor, prompt: Tensor) -> Tensor:
    """Time of pass ``k``: coef [B, N_BASIS], prompt [B] with k [B] -> [B], or k [B, K] ->
    [B, K]."""
    if k.dim() == coef.dim():
        return (coef.unsqueeze(-2) * decode_basis(k, prompt.unsqueeze(-1))).sum(-1)
    return (coef * decode_basis(k, prompt)).sum(-1)


#: Initial coefficients as a fraction of the typical pass time: a constant pass with a little
#: growth over the KV cache (5 % per KV_UNIT tokens), so both terms get gradient.
_INIT_FRACTION: Final[tuple[float, ...]] = (1.0, 0.05)


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class DecodeNet(nn.Module):
    """Raw features [B, 5] (FEATURE_NAMES order) -> non-negative coefficients [B, N_BASIS] ms.

    A ReLU network of the configuration. Normalisation lives inside as buffers (saved with the
    weights): features are standardised with the training mean/std and multiplied by
    ``feature_mask`` (1 for the inputs the network sees, 0 for the others: the vision tokens
    by default, see the module doc), and the softplus output is scaled by ``coef_scale``, so
    the network itself only sees and emits O(1) numbers. Standardisation and mask fold into
    the first layer and ReLU into ONNX Runtime's Gemm, which keeps the exported predictor to a
    few nodes.
    """

    # Buffers (declared for type checkers; registered in __init__, saved with the weights).
    feature_mean: Tensor
    feature_std: Tensor
    feature_mask: Tensor
    coef_scale: Tensor
    prior: Tensor

    def __init__(
        self,
        n_features: int = 5,
        hidden: int = 64,
        n_layers: int = 1,
        inputs: tuple[str, ...] = DEFAULT_INPUTS,
    ) -> None:
        super().__init__()
        unknown = [name for name in inputs if name not in FEATURE_NAMES]
        if unknown or not inputs or n_features != len(FEATURE_NAMES):
            raise ValueError(f"decode inputs must be some of {FEATURE_NAMES}, got {inputs}")
        self.n_features = n_features
        self.hidden = hidden
        self.n_layers = n_layers
        self.inputs = tuple(inputs)
        layers: list[nn.Module] = []
        width = n_features
        for _ in range(n_layers):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, N_BASIS)
        mask = torch.tensor([1.0 if name in inputs else 0.0 for name in FEATURE_NAMES])
        self.register_buffer("feature_mean", torch.zeros(n_features))
        self.register_buffer("feature_std", torch.ones(n_features))
        self.register_buffer("feature_mask", mask)
        self.register_buffer("coef_scale", torch.ones(N_BASIS))
        self.register_buffer("prior", torch.tensor(IDENTITY_PRIOR, dtype=torch.float32))
        with torch.no_grad():
            self.head.weight.mul_(0.1)
            self.head.bias.copy_(
                torch.tensor([_inverse_softplus(f) for f in _INIT_FRACTION], dtype=torch.float32)
            )

    @torch.jit.unused
    def set_normalisation(self, features: np.ndarray, pass_scale_ms: float) -> None:
        """Fix the input standardisation and output scale from training data (called by fit)."""
        with torch.no_grad():
            x = torch.as_tensor(np.asarray(features, dtype=np.float32))
            mean = x.mean(0)
            std = x.std(0, unbiased=False)
            # A feature constant in the training data (one tier, one top_k) must not divide by 0.
            std = torch.where(std > 1e-6, std, torch.ones_like(std))
            self.feature_mean.copy_(mean)
            self.feature_std.copy_(std)
            self.coef_scale.fill_(float(max(pass_scale_ms, 1e-6)))

    def hidden_features(self, features: Tensor) -> Tensor:
        """Last hidden layer [B, hidden] (the head's input) of raw features [B, 5]."""
        x = (features - self.feature_mean) / self.feature_std * self.feature_mask
        return self.body(x)

    def factors(self, features: Tensor) -> Tensor:
        """The network's non-negative factors [B, N_BASIS] of the prior's coefficients."""
        return nn.functional.softplus(self.head(self.hidden_features(features)))

    def forward(self, features: Tensor) -> Tensor:
        prior = prior_coefficients(features, self.prior)
        return self.factors(features) * prior * self.coef_scale

    @torch.jit.unused
    def set_prior(
        self,
        features: np.ndarray,
        mean_pass: np.ndarray,
        kv_units: np.ndarray,
        passes: np.ndarray,
        seed: int = 0,
    ) -> bool:
        """Fit the physics prior (module doc) to each sample's mean pass time (in units of
        ``coef_scale``; ``kv_units``: its mean KV length over its passes, in KV_UNITs, as
        ``warm_start`` takes it) and start the network's factors at 1.

        Least absolute deviations with non-negative weights, each sample weighted by its
        passes: the median pass, as the decode loss aims at (CPU noise is one-sided), and the
        terms a decoder has (weights read per block and per expert, attention over the KV
        cache per block) with signs it cannot flip. Five weights need no more than
        ``quantile_fit.MAX_SAMPLES`` samples (a seeded draw above that). Returns whether the prior
        was set (False: too few samples or a term the data does not support; the identity
        prior stays).
        """
        x = np.asarray(features, dtype=np.float64)
        y = np.asarray(mean_pass, dtype=np.float64)
        kv = np.asarray(kv_units, dtype=np.float64)
        w = np.asarray(passes, dtype=np.float64)
        ok = np.isfinite(y) & (y > 0) & (w > 0)
        x, y, kv, w = x[ok], y[ok], kv[ok], w[ok]
        if y.size < 4 * len(PRIOR_TERMS):
            return False
        b, k = x[:, BLOCKS_COLUMN], x[:, TOP_K_COLUMN]
        design = np.stack([np.ones_like(b), b, b * k, kv, kv * b], axis=1)
        theta = nonnegative_quantile_fit(design, y, 0.5, weights=w, seed=seed)
        if theta is None:
            return False
        if theta[0] + theta[1] + theta[2] <= 0 or theta[3] + theta[4] <= 0:
            return False  # no constant or no slope at all: the identity prior stays
        with torch.no_grad():
            self.prior.copy_(torch.tensor(theta, dtype=torch.float32))
            self.head.bias.fill_(_inverse_softplus(1.0))
        return True

    @torch.jit.unused
    def warm_start(
        self, features: Tensor, per_pass: Tensor, kv_units: Tensor, ridge: float = 1e-2
    ) -> None:
        """Least-squares start of the constant coefficient (called by fit, before Adam).

        ``per_pass`` is each sample's mean pass time in units of ``coef_scale``, ``kv_units``
        its mean KV length over its passes in KV_UNITs. The head row of the constant term is
        set by ridge regression of softplus^-1(per_pass - initial slope x kv_units) on the
        hidden features, so the first epoch already starts from per-configuration levels
        instead of one global constant; Adam then refines both coefficients.
        """
        with torch.no_grad():
            h = self.hidden_features(features).double()
            slope = _INIT_FRACTION[1]
            target = (per_pass.double() - slope * kv_units.double()).clamp(min=0.05)
            z = target + torch.log(-torch.expm1(-target))  # inverse softplus
            h_mean, z_mean = h.mean(0), z.mean()
            hc = h - h_mean
            gram = hc.T @ hc + ridge * h.shape[0] * torch.eye(h.shape[1], dtype=h.dtype)
            weight = torch.linalg.solve(gram, hc.T @ (z - z_mean))
            self.head.weight[0].copy_(weight.to(self.head.weight.dtype))
            self.head.bias[0] = float(z_mean - h_mean @ weight)

    @torch.jit.unused
    def prior_ms(self) -> dict[str, float]:
        """The physics prior in ms (``PRIOR_TERMS``): a0 ms, a1 ms per block, a2 ms per block
        and expert; c0, c1 (per block) ms per KV_UNIT tokens of KV cache."""
        scale = self.coef_scale.double().tolist()
        per_basis = (scale[0], scale[0], scale[0], scale[1], scale[1])
        return {
            name: float(value) * unit
            for name, value, unit in zip(PRIOR_TERMS, self.prior.tolist(), per_basis, strict=True)
        }

    def hyper_params(self) -> dict[str, object]:
        return {
            "n_features": self.n_features,
            "hidden": self.hidden,
            "n_layers": self.n_layers,
            "inputs": list(self.inputs),
        }
