"""``latkit profile``: measure a random-weight MolmoE-1B-shaped model, write the core-exp format.

:mod:`toolkit.profiler.sweep` says what a sweep is (settings, plan, files, log); two engines
measure it: :mod:`toolkit.profiler.runner` in this process and
:mod:`toolkit.profiler.ray_runner` on a Ray cluster. :func:`run_profile` picks one and imports
only that one. The heavy parts (torch models from ``transformers``) are imported when a sweep
starts, so importing this package stays cheap.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from toolkit.profiler.datasets import DATASETS, draw_samples, parse_datasets, parse_output_tokens
from toolkit.profiler.model import PRESETS, ModelPreset, get_preset
from toolkit.profiler.sweep import (
    ProfileReport,
    ProfileSettings,
    RaySettings,
    make_ray_settings,
    parse_int_list,
    parse_tiers,
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


def run_profile(
    settings: ProfileSettings, clock: Callable[[], float] = time.monotonic
) -> ProfileReport:
    """Measure the model over the knob grid and write core-experiment files into output_dir:
    on Ray with ``settings.ray``, else in this process.

    ``clock`` measures elapsed time for ``--max-minutes`` and the log (tests replace it).
    """
    if settings.ray is not None:
        from toolkit.profiler.ray_runner import run_profile_ray

        return run_profile_ray(settings, clock)
    from toolkit.profiler.runner import run_profile_single_process

    return run_profile_single_process(settings, clock)
