"""Decode model: per-pass time = config coefficients . fixed basis of the pass index k.

A decode pass k (k = 1 .. N-1 for N output tokens) attends over a KV cache of
``prompt + k`` tokens, so its time grows with k. We write the time of pass k as

    pass_ms(k) = sum_j coef_j(config) * basis_j(k)

with a fixed basis whose prefix sums have exact closed forms. The total over any number
of passes is then one dot product (O(1) in N) in training, in Python inference and in the
exported graphs alike; no loop over positions and no B x N tensor anywhere.

Basis (K0 = 64 passes), chosen so that the prefix sums are plain powers:

    b_j(k) = K0 * ((k / K0)^(j+1) - ((k - 1) / K0)^(j+1)),      j = 0, 1, 2
           = 1,  (2k - 1) / K0,  (3k^2 - 3k + 1) / K0^2
    sum_{k=1}^{m} b_j(k) = K0 * (m / K0)^(j+1)                   (telescoping)

b_0 is the constant cost of a pass (weights, prompt-length attention), b_1 the linear
growth of attention over the growing KV cache, b_2 mild curvature on long answers. Every
b_j is positive and non-decreasing for k >= 1 and the coefficients are non-negative
(softplus), so the predicted pass time is positive and never decreases with k. Because
the prefix sums are powers of m, the exported predictor evaluates them with one Pow node
(``exporters.fused``).

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

#: Number of basis functions of the pass index.
N_BASIS: Final[int] = 3
#: Scale of k in the basis (keeps every term O(1) for typical answers).
K0: Final[float] = 64.0
#: The basis as written in artifact manifests; a model trained with another basis is refused.
BASIS_TERMS: Final[tuple[str, ...]] = ("1", "(2k-1)/K0", "(3k^2-3k+1)/K0^2")

# TorchScript cannot read module globals, so the functions below spell K0 = 64 as a literal.
assert K0 == 64.0 and N_BASIS == 3


def decode_basis(k: Tensor) -> Tensor:
    """Basis of pass ``k`` (k >= 1, float): ``[...]`` -> ``[..., N_BASIS]``."""
    return torch.stack(
        [torch.ones_like(k), (2.0 * k - 1.0) / 64.0, (3.0 * k * k - 3.0 * k + 1.0) / 4096.0],
        dim=-1,
    )


def decode_basis_prefix_sum(m: Tensor) -> Tensor:
    """Exact ``sum_{k=1}^{m} decode_basis(k)`` for integer-valued ``m``; zeros where m <= 0.

    ``[...]`` float -> ``[..., N_BASIS]``: ``[m, m^2 / K0, m^3 / K0^2]``.
    """
    m = torch.clamp(m, min=0.0)
    return torch.stack([m, m * m / 64.0, m * m * m / 4096.0], dim=-1)


def decode_outputs(coef: Tensor, output_tokens: Tensor) -> tuple[Tensor, Tensor]:
    """(decode_total_ms, decode_per_token_ms) for ``output_tokens`` N (float [B]).

    N output tokens mean N - 1 decode passes (the first token comes out of prefill);
    per-token time is the mean pass time, 0 when N <= 1.
    """
    passes = torch.clamp(output_tokens - 1.0, min=0.0)
    total = (coef * decode_basis_prefix_sum(passes)).sum(-1)
    per_token = torch.where(
        passes > 0.0, total / torch.clamp(passes, min=1.0), torch.zeros_like(total)
    )
    return total, per_token


def decode_pass_ms(coef: Tensor, k: Tensor) -> Tensor:
    """Time of pass ``k``: coef [B, N_BASIS] with k [B] -> [B], or k [B, K] -> [B, K]."""
    basis = decode_basis(k)
    if k.dim() == coef.dim():
        return (coef.unsqueeze(-2) * basis).sum(-1)
    return (coef * basis).sum(-1)


#: Initial coefficient of each basis function, as a fraction of the typical pass time:
#: start from "constant time per pass" with a little growth so every term gets gradient.
_INIT_FRACTION: Final[tuple[float, ...]] = (1.0, 0.05, 0.02)


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class DecodeNet(nn.Module):
    """Raw features [B, 5] (FEATURE_NAMES order) -> non-negative basis coefficients [B, N_BASIS] ms.

    A ReLU network. Normalisation lives inside as buffers (saved with the weights): features
    are standardised with the training mean/std, and the softplus output is scaled by
    ``coef_scale`` (the typical pass time of the training data), so the network itself only
    sees and emits O(1) numbers. Standardisation folds into the first layer and ReLU into
    ONNX Runtime's Gemm, which is what keeps the exported predictor to a few nodes; on the
    bundled measurements this form is as accurate as a SiLU network on log-scaled token
    counts (the earlier design), within the seed-to-seed spread.
    """

    # Buffers (declared for type checkers; registered in __init__, saved with the weights).
    feature_mean: Tensor
    feature_std: Tensor
    coef_scale: Tensor

    def __init__(self, n_features: int = 5, hidden: int = 64, n_layers: int = 1) -> None:
        super().__init__()
        self.n_features = n_features
        self.hidden = hidden
        self.n_layers = n_layers
        layers: list[nn.Module] = []
        width = n_features
        for _ in range(n_layers):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, N_BASIS)
        self.register_buffer("feature_mean", torch.zeros(n_features))
        self.register_buffer("feature_std", torch.ones(n_features))
        self.register_buffer("coef_scale", torch.ones(N_BASIS))
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
        x = (features - self.feature_mean) / self.feature_std
        return self.body(x)

    def forward(self, features: Tensor) -> Tensor:
        return nn.functional.softplus(self.head(self.hidden_features(features))) * self.coef_scale

    @torch.jit.unused
    def warm_start(self, features: Tensor, per_pass: Tensor, ridge: float = 1e-2) -> None:
        """Least-squares start of the constant coefficient (called by fit, before Adam).

        ``per_pass`` is each sample's mean pass time in units of ``coef_scale``. The head row
        of the constant basis term is set by ridge regression of softplus^-1(per_pass) on the
        hidden features, so the first epoch already starts from per-configuration levels
        instead of one global constant; Adam then refines every coefficient. Without it the
        original learning rate (1e-3) needed far more than 50 epochs on small data sets.
        """
        with torch.no_grad():
            h = self.hidden_features(features).double()
            target = per_pass.double().clamp(min=1e-3)
            # Growth terms start at their small initial share; the constant takes the rest.
            target = (target - sum(_INIT_FRACTION[1:]) * 0.5).clamp(min=0.05)
            z = target + torch.log(-torch.expm1(-target))  # inverse softplus
            h_mean, z_mean = h.mean(0), z.mean()
            hc = h - h_mean
            gram = hc.T @ hc + ridge * h.shape[0] * torch.eye(h.shape[1], dtype=h.dtype)
            weight = torch.linalg.solve(gram, hc.T @ (z - z_mean))
            self.head.weight[0].copy_(weight.to(self.head.weight.dtype))
            self.head.bias[0] = float(z_mean - h_mean @ weight)

    def hyper_params(self) -> dict[str, int]:
        return {"n_features": self.n_features, "hidden": self.hidden, "n_layers": self.n_layers}
