"""One measuring process: the model built once, then sample after sample (and the canary).

:class:`Measurer` is what both engines run: the single-process sweep in its own process, and
each Ray ``ProfileWorker`` actor in its. The driver of a sweep sends :class:`SampleTask` s and
gets :class:`TaskResult` s back; both are small picklable records.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import socket
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from toolkit.profiler.datasets import SampleSpec
from toolkit.profiler.model import build_model, get_preset
from toolkit.profiler.timing import SampleTiming, Timer

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

#: When set in a measuring process's environment, replaces the device name it reports. The
#: tests simulate a cluster of mixed GPUs with it (set per Ray actor through
#: ``runtime_env={"env_vars": {...}}``); it also lets a site label its devices.
DEVICE_NAME_ENV = "LATKIT_DEVICE_NAME"

#: The canary: one fixed sample (a low-tier image, a short prompt, 3 decode passes) at the
#: preset's default top_k and all blocks, timed ``CANARY_REPEATS`` times (median of the
#: totals). Fixed work, so any change of its time is a change of the machine's speed.
CANARY_SPEC = SampleSpec(sample_id=-1, num_crops=1, text_tokens=16, output_tokens=4)
CANARY_REPEATS = 3
_CANARY_CONFIG = -1


@dataclass(frozen=True)
class SampleTask:
    """One sample to measure: sample ``index`` of the file ``job`` of the sweep's plan."""

    job: int
    index: int
    config: int  # index of the configuration: the warm-up key
    top_k: int
    blocks: int
    spec: SampleSpec
    warm_spec: SampleSpec  # what the configuration's first run warms up with


@dataclass(frozen=True)
class TaskResult:
    job: int
    index: int
    timing: SampleTiming
    #: This process's canary time against its first one (None without ``--canary-every``).
    speed_factor: float | None
    #: A canary timed just before this sample (ms), else None.
    canary_ms: float | None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def device_info(device: torch.device) -> dict[str, Any]:
    """What ``logs/run.json`` says about the measuring device (call it in that process)."""
    info: dict[str, Any] = {
        "type": device.type,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        info["gpu_name"] = torch.cuda.get_device_name(device)
    return info


def device_name(device: torch.device) -> str:
    """The name that decides whether two processes measure the same kind of device."""
    override = os.environ.get(DEVICE_NAME_ENV)
    if override:
        return override
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def keep_freed_memory(keep: bool = True) -> bool:
    """Ask glibc to keep freed memory instead of returning it to the OS (Linux only).

    Without it every prefill maps its large activations afresh and pays page faults in the
    kernel (a third of the CPU time of a tiny-model sweep, and most of its noise); a CUDA
    run has its caching allocator for that. ``keep=False`` restores glibc's default
    thresholds. Returns whether the setting took.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        # glibc caps the mmap threshold at 32 MiB on 64-bit systems; 128 KiB is its default.
        mmap_ok = libc.mallopt(m_mmap_threshold, (32 << 20) if keep else (128 << 10))
        trim_ok = libc.mallopt(m_trim_threshold, (1 << 30) if keep else (128 << 10))
        return bool(mmap_ok) and bool(trim_ok)
    except (OSError, AttributeError):
        return False


def set_measuring_threads(device: torch.device, threads: int | None) -> bool:
    """torch threads (and, on a CPU, glibc's allocator) for measuring; returns whether glibc
    keeps freed memory now (undo with ``keep_freed_memory(False)``)."""
    if device.type == "cpu":
        # One thread by default: fewer contended cores give steadier timings, and the
        # thread count is a measurement condition of its own.
        torch.set_num_threads(threads or 1)
        return keep_freed_memory(True)
    if threads:
        torch.set_num_threads(threads)
    return False


class Measurer:
    """Builds the model once; then times each sample it is given, warming each configuration
    up on first use, and every ``canary_every`` samples re-times the canary."""

    def __init__(
        self,
        preset: str,
        device: str,
        dtype: str,
        seed: int,
        repeats: int,
        canary_every: int | None = None,
    ) -> None:
        self.preset = get_preset(preset)
        self.device = torch.device(device)
        self.repeats = repeats
        self.canary_every = canary_every
        self.model = build_model(self.preset, self.device, DTYPES[dtype], seed=seed)
        self.timer = Timer(self.model, self.device, DTYPES[dtype])
        self._warmed: set[int] = set()
        self._since_canary = 0
        self.canaries_ms: list[float] = []

    @property
    def speed_factor(self) -> float | None:
        """Latest canary time / first canary time (> 1: the process runs slower than then)."""
        if not self.canaries_ms:
            return None
        return self.canaries_ms[-1] / self.canaries_ms[0]

    def _warm(self, key: int, spec: SampleSpec, blocks: int) -> None:
        if key not in self._warmed:
            self.timer.warm_up(spec, blocks)
            self._warmed.add(key)

    def time_canary(self) -> float:
        self.model.set_top_k(self.preset.default_top_k)
        blocks = self.preset.num_layers
        self._warm(_CANARY_CONFIG, CANARY_SPEC, blocks)
        timing = self.timer.time_sample(CANARY_SPEC, blocks, CANARY_REPEATS)
        value = statistics.median(timing.total_runs)
        self.canaries_ms.append(value)
        self._since_canary = 0
        return value

    def measure(self, task: SampleTask) -> TaskResult:
        canary = None
        if self.canary_every and (not self.canaries_ms or self._since_canary >= self.canary_every):
            canary = self.time_canary()
        self.model.set_top_k(task.top_k)
        self._warm(task.config, task.warm_spec, task.blocks)
        timing = self.timer.time_sample(task.spec, task.blocks, self.repeats)
        self._since_canary += 1
        return TaskResult(task.job, task.index, timing, self.speed_factor, canary)

    def model_info(self) -> dict[str, Any]:
        return {
            "preset": self.preset.to_dict(),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "experts_implementation": self.model.config._experts_implementation,
            "attention_implementation": "sdpa",
        }

    def process_info(self) -> dict[str, Any]:
        """Host, process, device and versions of this measuring process."""
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "device_name": device_name(self.device),
            "device": device_info(self.device),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
        }


def canary_summary(canaries_ms: Sequence[float]) -> dict[str, Any]:
    """A process's canaries: the first (ms) and the speed factors against it."""
    if not canaries_ms:
        return {"canaries": 0}
    factors = [value / canaries_ms[0] for value in canaries_ms]
    return {
        "canaries": len(canaries_ms),
        "first_ms": round(canaries_ms[0], 4),
        "speed_factor_median": round(statistics.median(factors), 4),
        "speed_factor_min": round(min(factors), 4),
        "speed_factor_max": round(max(factors), 4),
        "speed_factor_last": round(factors[-1], 4),
    }
