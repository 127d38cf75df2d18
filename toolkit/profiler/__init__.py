"""``latkit profile``: measure a random-weight MolmoE-1B-shaped model, write the core-exp format.

The heavy parts (torch models from ``transformers``) are imported when a sweep starts, so
importing this package stays cheap.
"""

from toolkit.profiler.datasets import DATASETS, draw_samples, parse_datasets, parse_output_tokens
from toolkit.profiler.model import PRESETS, ModelPreset, get_preset
from toolkit.profiler.runner import (
    ProfileReport,
    ProfileSettings,
    RaySettings,
    make_ray_settings,
    parse_int_list,
    parse_tiers,
    run_profile,
)

__all__ = [
    "DATASETS",
    "PRESETS",
    "ModelPreset",
    "ProfileReport",
    "ProfileSettings",
    "RaySettings",
    "draw_samples",
    "get_preset",
    "make_ray_settings",
    "parse_datasets",
    "parse_int_list",
    "parse_output_tokens",
    "parse_tiers",
    "run_profile",
]
