"""Latency models: physics x XGBoost prefill, positional decode network, conformal bounds, and
their hybrid artifact."""

from toolkit.models.bounds import ConformalBounds
from toolkit.models.decode import (
    N_BASIS,
    DecodeNet,
    decode_basis,
    decode_basis_prefix_sum,
    decode_outputs,
)
from toolkit.models.hybrid import EpochLog, HybridLatencyModel, resolve_device
from toolkit.models.physics import PhysicsBaseline
from toolkit.models.prefill import PrefillModel

__all__ = [
    "N_BASIS",
    "ConformalBounds",
    "DecodeNet",
    "EpochLog",
    "HybridLatencyModel",
    "PhysicsBaseline",
    "PrefillModel",
    "decode_basis",
    "decode_basis_prefix_sum",
    "decode_outputs",
    "resolve_device",
]
