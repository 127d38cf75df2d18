"""Latency models: XGBoost prefill, positional decode network, and their hybrid artifact."""

from toolkit.models.decode import (
    N_BASIS,
    DecodeNet,
    decode_basis,
    decode_basis_prefix_sum,
    decode_outputs,
)
from toolkit.models.hybrid import EpochLog, HybridLatencyModel, resolve_device
from toolkit.models.prefill import QUANTILE_ALPHAS, PrefillModel

__all__ = [
    "N_BASIS",
    "QUANTILE_ALPHAS",
    "DecodeNet",
    "EpochLog",
    "HybridLatencyModel",
    "PrefillModel",
    "decode_basis",
    "decode_basis_prefix_sum",
    "decode_outputs",
    "resolve_device",
]
