"""``latkit profile --ray``: one sweep over the ``ProfileWorker`` actors of a Ray cluster.

The driver (this process) owns the sweep: the plan, the interleaved order of its samples,
the sample journal and every file (:class:`toolkit.profiler.sweep.Sweep`, the same code as
the single-process engine). Workers only measure (they never write a file): each
``ProfileWorker`` builds the model once, then times the samples it is sent.

Task size: one sample per task, at most :data:`PIPELINE` tasks queued per worker. A sample
is the unit a file is made of, so the samples go out in exactly the interleaved order of a
single-process sweep (the load-drift protection), every worker measures every
configuration (a slower node spreads over the grid instead of aliasing with the knobs it
was given), the last samples balance over all workers, and a lost worker costs only the
samples it had queued. A task's overhead (one actor call, a few kB of timings back) is
about a millisecond: under 2 % of a tiny-preset sample on a CPU and nothing next to a
MolmoE-1B sample on a GPU. The second queued task hides the round trip to the driver.

Faults: a worker whose process dies (``RayActorError``) is replaced by a new actor in its
slot (a restart, logged); the samples it had queued go back to the front of the queue and
run on whichever worker is free first. Results are keyed by (file, sample index) and a
duplicate is ignored, so every sample lands (and is journaled) exactly once. A killed driver
leaves finished files (each written atomically) and the journal of every sample that landed:
``--resume`` continues, and only the samples that were in flight are measured again.

Ray is an optional dependency (``pip install 'latkit[ray]'``); importing this module does
not need it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch

from toolkit.errors import LatkitError
from toolkit.profiler.measure import (
    Measurer,
    SampleTask,
    TaskResult,
    canary_summary,
    set_measuring_threads,
)
from toolkit.profiler.model import TRANSFORMERS_MODULES
from toolkit.profiler.sweep import (
    ProfileReport,
    ProfileSettings,
    RaySettings,
    Sweep,
    resolve_device,
    sample_metadata,
    validate_settings,
)

log = logging.getLogger(__name__)

RAY_MISSING = "--ray needs Ray, an optional extra: pip install 'latkit[ray]'"
#: Tasks queued per worker: one running, one waiting (hides the round trip to the driver).
PIPELINE = 2
#: How long the driver waits for its first workers to build their models, or, mid-sweep,
#: for any worker at all.
STARTUP_TIMEOUT_S = 900.0


def import_ray() -> ModuleType:
    """The ``ray`` module, or a one-line LatkitError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise LatkitError(RAY_MISSING) from None
    return ray


class ProfileWorker:
    """A Ray actor (process title ``ray::ProfileWorker``): one model, many samples.

    Plain Python here; the driver wraps it with ``ray.remote`` when it runs.
    """

    def __init__(
        self,
        preset: str,
        device: str,
        dtype: str,
        seed: int,
        repeats: int,
        threads: int | None,
        canary_every: int | None,
    ) -> None:
        set_measuring_threads(torch.device(device), threads)
        self.measurer = Measurer(preset, device, dtype, seed, repeats, canary_every)

    def info(self) -> dict[str, Any]:
        """Host, pid, device name and info, torch and CUDA versions, the model."""
        return {**self.measurer.process_info(), "model": self.measurer.model_info()}

    def measure(self, task: SampleTask) -> TaskResult:
        return self.measurer.measure(task)


def worker_options(slot: int, device_type: str, threads: int | None) -> dict[str, Any]:
    """Ray options of the actor in ``slot``: a GPU each on CUDA, ``--threads`` CPUs each.

    No Ray-side restarts: the driver replaces a lost worker itself, so it knows which
    samples to re-run and can log the restart. (The tests wrap this function to give
    actors different ``runtime_env`` environments.)
    """
    options: dict[str, Any] = {"num_cpus": threads or 1, "max_restarts": 0}
    if device_type == "cuda":
        options["num_gpus"] = 1
    return options


def check_devices(infos: list[dict[str, Any]], allow_mixed: bool) -> None:
    """One device kind per results tree, unless ``--allow-mixed-devices``."""
    names = Counter(str(info["device_name"]) for info in infos)
    if len(names) > 1 and not allow_mixed:
        listed = ", ".join(f"{name} ({count} worker(s))" for name, count in names.items())
        raise LatkitError(
            f"workers report different devices: {listed}; one device kind per results tree "
            "(--allow-mixed-devices mixes them and records the device on every sample)"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


#: What Ray (2.59+) says, somewhere in the chain of a failed join, when the head uses token
#: authentication and the driver's token is missing or wrong.
_AUTH_REFUSED = ("InvalidAuthToken", "AuthenticationError", "Unauthenticated")
#: How to give a driver the head's token (the README's "Profiling on a cluster" says more).
TOKEN_HOWTO = (
    "set RAY_AUTH_MODE=token and give this process the head's token (print it on the head "
    "with `ray get-auth-token`) as RAY_AUTH_TOKEN or in ~/.ray/auth_token; every node that "
    "joins needs the same two"
)


def join_failure_hint(address: str, exc: BaseException) -> str:
    """The likely cause of a failed ``ray.init``, for the one-line error.

    A head started with ``ray start --head`` uses token authentication when it finds a token
    (Ray 2.59+: any earlier ``ray.init()`` on that machine saved one in ~/.ray/auth_token).
    ``--ray auto`` picks that token up by itself, but an explicit address never does: it
    fails with a bare "Failed to connect to Ray cluster" unless RAY_AUTH_MODE=token is set.
    """
    if address == "local":
        return ""
    chain: list[str] = []
    seen: BaseException | None = exc
    while seen is not None and len(chain) < 8:
        chain.append(f"{type(seen).__name__}: {seen}")
        seen = seen.__cause__ or seen.__context__
    text = "\n".join(chain)
    if any(marker in text for marker in _AUTH_REFUSED):
        return (
            " (the cluster uses token authentication and this driver's token is missing or "
            f"not the head's: {TOKEN_HOWTO})"
        )
    if address == "auto":
        return " (start one with `ray start --head`)"
    if "Timed out while waiting for GCS" in text:
        return f" (no Ray head answered at {address}: is it running, is the port reachable?)"
    return (
        f" (is a Ray head running at {address}? If it is, it most likely uses token "
        f"authentication, on by default since Ray 2.59: {TOKEN_HOWTO})"
    )


@contextlib.contextmanager
def _preloading_workers() -> Iterator[None]:
    """Let the Ray runtime this process starts import torch, transformers and latkit in its
    idle worker processes while it comes up (``RAY_preload_python_modules``, read by the
    raylet at start): the ProfileWorkers then start ~1.5 s sooner on a 2-core machine. A Ray
    that does not know the variable ignores it; a value set by the user is kept."""
    key = "RAY_preload_python_modules"
    if key in os.environ:
        yield
        return
    os.environ[key] = ",".join([__name__, *TRANSFORMERS_MODULES])
    try:
        yield
    finally:
        del os.environ[key]


@contextlib.contextmanager
def ray_session(
    ray: Any, address: str, num_cpus: int | None, num_gpus: int | None
) -> Iterator[str]:
    """Connect to (or start) Ray; always shut down what this call started.

    A Ray runtime that is already initialised in this process (tests, notebooks) is used as
    it is and left running. Yields how Ray came up: started, connected or reused.
    """
    if ray.is_initialized():
        yield "reused"
        return
    try:
        if address == "local":
            with _preloading_workers():
                ray.init(
                    address="local",
                    num_cpus=num_cpus,
                    num_gpus=num_gpus,
                    include_dashboard=False,
                    log_to_driver=False,
                )
        else:
            ray.init(address=address, log_to_driver=False)
    except Exception as exc:  # ConnectionError, ValueError, RuntimeError, grpc errors...
        raise LatkitError(
            f"--ray {address}: could not start or join Ray: {_first_line(exc)}"
            f"{join_failure_hint(address, exc)}"
        ) from None
    try:
        yield "started" if address == "local" else "connected"
    finally:
        ray.shutdown()


def _local_resources(settings: ProfileSettings) -> tuple[str, int, int | None]:
    """(device type, CPUs, GPUs) of a runtime started by ``--ray local``."""
    assert settings.ray is not None
    device = resolve_device(settings.device)
    cpus = os.cpu_count() or 1
    if device.type == "cuda":
        return "cuda", cpus, torch.cuda.device_count()
    per_worker = settings.threads or 1
    workers = settings.ray.workers or max(1, cpus // per_worker)
    return "cpu", workers * per_worker, None


def _cluster_plan(settings: ProfileSettings, resources: dict[str, float]) -> tuple[str, int]:
    """(device type, number of workers) on a running cluster, checked against its resources."""
    assert settings.ray is not None
    gpus = int(resources.get("GPU", 0))
    cpus = int(resources.get("CPU", 0))
    wanted = settings.ray.workers
    device_type = settings.device
    if device_type == "auto":
        device_type = "cuda" if gpus > 0 else "cpu"
    if device_type == "cuda":
        if gpus == 0:
            raise LatkitError("--device cuda: the Ray cluster has no GPU (use --device cpu)")
        workers = wanted or gpus
        if workers > gpus:
            raise LatkitError(f"--workers {workers}: the Ray cluster has {gpus} GPU(s)")
        return "cuda", workers
    per_worker = settings.threads or 1
    workers = wanted or max(1, cpus // per_worker)
    if workers * per_worker > cpus:
        raise LatkitError(
            f"--workers {workers} x --threads {per_worker} needs {workers * per_worker} CPUs; "
            f"the Ray cluster has {cpus}"
        )
    return "cpu", workers


@dataclass
class _Worker:
    """One slot's current actor (``generation`` counts its restarts)."""

    slot: int
    generation: int
    handle: Any
    info_ref: Any | None
    started: float
    info: dict[str, Any] | None = None
    inflight: list[tuple[Any, SampleTask]] = field(default_factory=list)
    canaries_ms: list[float] = field(default_factory=list)
    samples: int = 0
    state: str = "starting"

    @property
    def name(self) -> str:
        return f"w{self.slot}" + (f".{self.generation}" if self.generation else "")

    @property
    def device_name(self) -> str:
        return str(self.info["device_name"]) if self.info else "?"

    def summary(self) -> dict[str, Any]:
        info = self.info or {}
        device = info.get("device", {})
        return {
            "worker": self.name,
            "state": self.state,
            "host": info.get("host"),
            "pid": info.get("pid"),
            "device_name": info.get("device_name"),
            "device_type": device.get("type"),
            "torch_threads": device.get("torch_threads"),
            "torch": info.get("torch"),
            "cuda": info.get("cuda"),
            "samples": self.samples,
        }


class RayDriver:
    """Sends the sweep's samples to the workers, collects the results, replaces lost workers.

    ``on_result(driver)`` (tests) runs after every sample that lands.
    """

    def __init__(
        self,
        ray: Any,
        settings: ProfileSettings,
        sweep: Sweep,
        device_type: str,
        n_workers: int,
        engine: dict[str, Any],
        on_result: Callable[[RayDriver], None] | None = None,
    ) -> None:
        assert settings.ray is not None
        self.ray = ray
        self.settings = settings
        self.ray_settings: RaySettings = settings.ray
        self.sweep = sweep
        self.device_type = device_type
        self.n_workers = n_workers
        self.engine = engine
        self.on_result = on_result
        self.remote_class = ray.remote(ProfileWorker)
        self.workers: list[_Worker] = []
        self.retired: list[_Worker] = []
        self.restart_events: list[dict[str, Any]] = []
        self.results_done = 0
        self.max_restarts = max(3, 3 * n_workers)

    # --- workers -----------------------------------------------------------------------
    def _start(self, slot: int, generation: int) -> _Worker:
        settings = self.settings
        options = worker_options(slot, self.device_type, settings.threads)
        handle = self.remote_class.options(**options).remote(
            settings.preset,
            self.device_type,
            settings.dtype,
            settings.seed,
            settings.repeats,
            settings.threads,
            settings.canary_every,
        )
        return _Worker(slot, generation, handle, handle.info.remote(), self.sweep.clock())

    def start_workers(self) -> None:
        self.workers = [self._start(slot, 0) for slot in range(self.n_workers)]

    def alive(self) -> list[_Worker]:
        return [w for w in self.workers if w.state == "alive"]

    def worker_pids(self) -> list[int]:
        """Process ids of the live workers (tests kill them)."""
        return [int(w.info["pid"]) for w in self.alive() if w.info]

    def _replace(self, worker: _Worker, error: BaseException, queue: deque[SampleTask]) -> None:
        """A worker died: its queued samples go back first; a new actor takes its slot."""
        lost = [task for _ref, task in worker.inflight]
        for task in reversed(lost):
            queue.appendleft(task)
        worker.inflight.clear()
        worker.state = "lost"
        self.retired.append(worker)
        event = {
            "worker": worker.name,
            "host": (worker.info or {}).get("host"),
            "at_s": round(self.sweep.clock() - self.sweep.started, 1),
            "requeued_samples": len(lost),
            "error": _first_line(error),
        }
        self.restart_events.append(event)
        log.warning(
            "ProfileWorker %s lost (%s); %d sample(s) requeued, starting a replacement",
            worker.name,
            event["error"],
            len(lost),
        )
        if len(self.restart_events) > self.max_restarts:
            raise LatkitError(
                f"ProfileWorkers were lost {len(self.restart_events)} times (last: "
                f"{event['error']}); measured samples are kept: fix the cluster and rerun "
                "with --resume"
            )
        with contextlib.suppress(Exception):
            self.ray.kill(worker.handle)
        self.workers[worker.slot] = self._start(worker.slot, worker.generation + 1)

    def _ready(self, worker: _Worker) -> None:
        assert worker.info is not None
        check_devices(
            [w.info for w in self.workers if w.info is not None],
            self.ray_settings.allow_mixed_devices,
        )
        worker.state = "alive"
        log.info(
            "ProfileWorker %s ready on %s (%s, pid %s) after %.1f s",
            worker.name,
            worker.info.get("host"),
            worker.device_name,
            worker.info.get("pid"),
            self.sweep.clock() - worker.started,
        )

    def wait_for_workers(self) -> None:
        """Block until every first worker has built its model; then check their devices."""
        deadline = self.sweep.clock() + STARTUP_TIMEOUT_S
        ray = self.ray
        while True:
            starting = [w for w in self.workers if w.info_ref is not None]
            if not starting:
                break
            remaining = deadline - self.sweep.clock()
            if remaining <= 0:
                raise LatkitError(
                    f"{len(starting)} of {self.n_workers} ProfileWorkers did not start within "
                    f"{STARTUP_TIMEOUT_S:.0f} s (cluster resources: "
                    f"{_resources_summary(ray.cluster_resources())})"
                )
            refs = [w.info_ref for w in starting]
            ready, _ = ray.wait(refs, num_returns=1, timeout=min(remaining, 5.0))
            for ref in ready:
                worker = next(w for w in starting if w.info_ref == ref)
                worker.info_ref = None
                try:
                    worker.info = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    raise LatkitError(
                        f"ProfileWorker {worker.name} could not start: {_first_line(exc)}"
                    ) from None
        check_devices(
            [w.info for w in self.workers if w.info is not None],
            self.ray_settings.allow_mixed_devices,
        )
        for worker in self.workers:
            self._ready(worker)

    # --- the sweep ---------------------------------------------------------------------
    def run(self, bar: Any) -> bool:
        """Measure every sample of the schedule; returns whether ``--max-minutes`` stopped it."""
        ray = self.ray
        sweep = self.sweep
        queue: deque[SampleTask] = deque(
            sweep.plan[job].task(job, index) for job, index in sweep.pending()
        )
        mixed = self.ray_settings.allow_mixed_devices
        remaining = len(queue)
        last_alive = sweep.clock()
        while remaining > 0:
            if sweep.out_of_time():
                in_flight = sum(len(w.inflight) for w in self.workers)
                log.info("--max-minutes: %d sample(s) in flight are dropped", in_flight)
                return True
            if self.alive():
                last_alive = sweep.clock()
            elif sweep.clock() - last_alive > STARTUP_TIMEOUT_S:
                raise LatkitError(
                    f"no ProfileWorker could be restarted for {STARTUP_TIMEOUT_S:.0f} s "
                    f"(cluster resources: {_resources_summary(ray.cluster_resources())}); "
                    "measured samples are kept: rerun with --resume"
                )
            # Fill every live worker's pipeline, one task per worker per pass (round robin).
            filling = True
            while queue and filling:
                filling = False
                for worker in self.alive():
                    if queue and len(worker.inflight) < PIPELINE:
                        task = queue.popleft()
                        worker.inflight.append((worker.handle.measure.remote(task), task))
                        filling = True
            owners: dict[Any, _Worker] = {}
            for worker in self.workers:
                if worker.info_ref is not None:
                    owners[worker.info_ref] = worker
                for ref, _task in worker.inflight:
                    owners[ref] = worker
            if not owners:
                raise LatkitError("no ProfileWorker is left to measure on")
            ready, _ = ray.wait(list(owners), num_returns=1, timeout=1.0)
            for ref in ready:
                worker = owners[ref]
                if worker is not self.workers[worker.slot]:
                    continue  # a replaced actor's late answer
                if ref == worker.info_ref:
                    worker.info_ref = None
                    try:
                        worker.info = ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        self._replace(worker, exc, queue)
                        continue
                    self._ready(worker)
                    continue
                position = next(i for i, (r, _t) in enumerate(worker.inflight) if r == ref)
                try:
                    result: TaskResult = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:
                    task = worker.inflight[position][1]
                    raise LatkitError(
                        f"ProfileWorker {worker.name} failed on "
                        f"{sweep.plan[task.job].path.name} sample {task.index}: "
                        f"{_first_line(exc.cause or exc)}"
                    ) from None
                except ray.exceptions.RayError as exc:
                    self._replace(worker, exc, queue)
                    continue
                del worker.inflight[position]
                if result.canary_ms is not None:
                    worker.canaries_ms.append(result.canary_ms)
                metadata = sample_metadata(result, worker.device_name if mixed else None)
                if not sweep.add(result, metadata):
                    continue
                worker.samples += 1
                remaining -= 1
                self.results_done += 1
                bar.update(1)
                sweep.show_progress(bar, len(self.alive()))
                if self.on_result is not None:
                    self.on_result(self)
        return False

    def stop(self) -> None:
        for worker in self.workers:
            if worker.state in ("alive", "starting"):
                worker.state = "stopped"
            with contextlib.suppress(Exception):
                self.ray.kill(worker.handle)

    # --- the log -----------------------------------------------------------------------
    def context(self) -> dict[str, Any]:
        """``device``, ``model`` (from the first worker) and the ``engine`` and ``canary``
        sections of ``logs/run.json``."""
        everyone = [*self.retired, *self.workers]
        first = next((w.info for w in everyone if w.info is not None), {})
        engine = {
            **self.engine,
            "wall_s": round(self.sweep.clock() - self.sweep.started, 1),
            "workers": [w.summary() for w in everyone],
            "restarts": len(self.restart_events),
            "restart_events": self.restart_events,
        }
        context: dict[str, Any] = {
            "device": first.get("device", {}),
            "model": first.get("model", {}),
            "engine": engine,
        }
        if self.settings.canary_every:
            context["canary"] = {
                "every": self.settings.canary_every,
                "workers": [{"worker": w.name, **canary_summary(w.canaries_ms)} for w in everyone],
            }
        return context


def _resources_summary(resources: dict[str, float]) -> str:
    keys = [k for k in ("CPU", "GPU") if k in resources]
    return ", ".join(f"{k} {resources[k]:g}" for k in keys) or "none"


def run_profile_ray(
    settings: ProfileSettings,
    clock: Callable[[], float] = time.monotonic,
    on_result: Callable[[RayDriver], None] | None = None,
) -> ProfileReport:
    """The sweep of ``settings`` on Ray, written exactly as a single-process sweep writes it."""
    if settings.ray is None:
        raise LatkitError("settings.ray is not set: run the sweep with run_profile")
    validate_settings(settings)
    address = settings.ray.address
    ray = import_ray()
    sweep = Sweep(settings, clock)
    engine: dict[str, Any] = {
        "name": "ray",
        "ray_version": ray.__version__,
        "address": address,
        "task": f"one sample per task, up to {PIPELINE} queued per worker",
    }
    try:
        return _run(ray, settings, sweep, engine, on_result)
    finally:
        sweep.close()


def _run(
    ray: Any,
    settings: ProfileSettings,
    sweep: Sweep,
    engine: dict[str, Any],
    on_result: Callable[[RayDriver], None] | None,
) -> ProfileReport:
    assert settings.ray is not None
    address = settings.ray.address
    clock = sweep.clock
    if not sweep.pending():
        sweep.describe = lambda: {"engine": engine}
        log.info(
            "Nothing to measure: %d files exist, %d samples reused",
            sweep.skipped,
            sweep.reused,
        )
        return dataclasses.replace(sweep.finish(False), engine="ray", workers=0)
    local = _local_resources(settings) if address == "local" else ("", None, None)
    with ray_session(ray, address, local[1], local[2]) as runtime:
        log.debug("Ray %s after %.1f s", runtime, clock() - sweep.started)
        resources = {k: v for k, v in ray.cluster_resources().items() if ":" not in k}
        device_type, n_workers = _cluster_plan(settings, resources)
        nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
        engine.update(
            runtime=runtime,
            cluster_resources=resources,
            nodes=nodes,
            device_type=device_type,
            threads_per_worker=settings.threads or 1,
        )
        log.info(
            "Profiling preset %s on Ray (%s: %d node(s), %s): %d %s worker(s); "
            "%d samples of %d files to measure (%d rounds across all files), %d files "
            "already done",
            settings.preset,
            runtime,
            nodes,
            _resources_summary(resources),
            n_workers,
            device_type,
            len(sweep.pending()),
            len(sweep.plan),
            len(sweep.schedule),
            sweep.skipped,
        )
        driver = RayDriver(ray, settings, sweep, device_type, n_workers, engine, on_result)
        stopped = False
        try:
            driver.start_workers()
            driver.wait_for_workers()
            startup_s = clock() - sweep.started
            engine["startup_s"] = round(startup_s, 2)
            sweep.describe = driver.context
            sweep.write_log("running")
            with sweep.progress_bar() as bar:
                sweep.show_progress(bar, len(driver.alive()))
                stopped = driver.run(bar)
        finally:
            driver.stop()
        report = sweep.finish(stopped)
    return dataclasses.replace(
        report,
        engine="ray",
        workers=n_workers,
        restarts=len(driver.restart_events),
        startup_s=startup_s,
    )
