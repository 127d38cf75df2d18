"""The single-process engine of ``latkit profile``: this process measures the sweep in order.

The sweep itself (settings, plan, interleaved order, files and log) is
:mod:`toolkit.profiler.sweep`, shared with the Ray engine (:mod:`toolkit.profiler.ray_runner`);
:func:`toolkit.profiler.run_profile` picks the engine.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from toolkit.errors import LatkitError
from toolkit.profiler.measure import (
    Measurer,
    canary_summary,
    device_info,
    keep_freed_memory,
    set_measuring_threads,
)
from toolkit.profiler.sweep import (
    ProfileReport,
    ProfileSettings,
    Sweep,
    resolve_device,
    sample_metadata,
    validate_settings,
)

log = logging.getLogger(__name__)


def run_profile_single_process(
    settings: ProfileSettings, clock: Callable[[], float] = time.monotonic
) -> ProfileReport:
    """Measure the sweep of ``settings`` in this process; write core-experiment files.

    ``clock`` measures elapsed time for ``--max-minutes`` and the log (tests replace it). The
    process's torch thread count and allocator settings are restored afterwards.
    """
    if settings.ray is not None:
        raise LatkitError("settings.ray is set: run the sweep with run_profile (it picks Ray)")
    validate_settings(settings)
    device = resolve_device(settings.device)
    threads_before = torch.get_num_threads()
    kept = False
    try:
        kept = set_measuring_threads(device, settings.threads)
        log.debug("glibc keeps freed memory: %s", kept)
        return _run(settings, device, clock)
    finally:
        torch.set_num_threads(threads_before)
        if kept:
            keep_freed_memory(False)


def _run(
    settings: ProfileSettings, device: torch.device, clock: Callable[[], float]
) -> ProfileReport:
    """The single-process engine: this process measures the schedule in order."""
    sweep = Sweep(settings, clock)
    try:
        return _measure(sweep, device)
    finally:
        sweep.close()


def _measure(sweep: Sweep, device: torch.device) -> ProfileReport:
    settings = sweep.settings
    pending = sweep.pending()
    log.info(
        "Profiling preset %s on %s (%s, %d thread(s)): %d samples of %d files to measure "
        "(%d rounds across all files), %d files already done",
        sweep.preset.name,
        device,
        settings.dtype,
        torch.get_num_threads(),
        len(pending),
        len(sweep.plan),
        len(sweep.schedule),
        sweep.skipped,
    )
    measurer = Measurer(
        settings.preset,
        str(device),
        settings.dtype,
        settings.seed,
        settings.repeats,
        settings.canary_every,
    )
    startup_s = sweep.clock() - sweep.started
    context = {
        "device": device_info(device),
        "model": measurer.model_info(),
        # Start-up as the Ray engine counts it: from planning until the model is built.
        "engine": {"name": "single-process", "startup_s": round(startup_s, 2)},
    }

    def describe() -> dict[str, Any]:
        if not settings.canary_every:
            return dict(context)
        summary = {"worker": "local", **canary_summary(measurer.canaries_ms)}
        return {**context, "canary": {"every": settings.canary_every, "workers": [summary]}}

    sweep.describe = describe
    sweep.write_log("running")
    stopped = False
    with sweep.progress_bar() as bar:
        for job, index in pending:
            if sweep.out_of_time():
                stopped = True
                break
            result = measurer.measure(sweep.plan[job].task(job, index))
            sweep.add(result, sample_metadata(result))
            bar.update(1)
            sweep.show_progress(bar)
    return dataclasses.replace(sweep.finish(stopped), startup_s=startup_s)
