"""``latkit profile --ray``: the same sweep as one process, exactly once through lost workers
and a killed driver, one device kind per results tree.

Ray starts once for the module (2 CPUs, like CI's machine); every sweep reuses it with 2
``ProfileWorker`` actors of 1 thread each, on the tiny preset. Skipped where Ray is not
installed (``pip install 'latkit[ray]'``; CI installs it).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from synthetic import (
    clock_advancing_per_sample,
    read_result_file,
    without_times,
)

from toolkit.cli import main
from toolkit.errors import LatkitError
from toolkit.profiler import ProfileSettings, RaySettings, run_profile
from toolkit.profiler import ray_runner as ray_runner_module
from toolkit.profiler.journal import JournaledSample, parse_sample_line
from toolkit.profiler.measure import DEVICE_NAME_ENV
from toolkit.profiler.ray_runner import RayDriver, run_profile_ray

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'latkit[ray]'")

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """One local Ray runtime (2 CPUs) for the module; the sweeps reuse it and leave it up."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield str(ray.get_runtime_context().gcs_address)
    finally:
        ray.shutdown()


def _settings(out: Path, on_ray: bool = True, **overrides: Any) -> ProfileSettings:
    settings = ProfileSettings(
        output_dir=out,
        datasets=["tally_qa", "doc_qa"],
        tiers=["low"],
        top_k=[4, 12],
        blocks=[8],
        samples_per_config=2,
        repeats=1,
        seed=5,
        progress=False,
        ray=RaySettings("local", workers=2) if on_ray else None,
    )
    for key, value in overrides.items():
        setattr(settings, key, value)
    return settings


def _files(root: Path) -> dict[str, dict[str, Any]]:
    return {
        f"{p.parent.name}/{p.name}": read_result_file(p)
        for p in sorted(root.glob("*/*"))
        if p.parent.name != "logs" and p.name.endswith((".json", ".json.gz"))
    }


def _keys(root: Path) -> Counter[tuple[str, str, int, int]]:
    """(dataset, tier, top_k, blocks, sample_id) of every sample on disk, counted."""
    keys: Counter[tuple[str, str, int, int]] = Counter()
    for name, doc in _files(root).items():
        for sample in doc["per_sample_results"]:
            keys[(name.split("/")[0], doc["tier"], doc["top_k"], sample["sample_id"])] += 1
            assert sample["num_active_blocks"] == doc["num_active_blocks"]
    return keys


def _journaled(root: Path) -> list[JournaledSample]:
    """The samples of a results tree's journal: its complete lines after the header (a line
    cut off by a killed driver has no newline yet)."""
    lines = (root / "logs" / "samples.jsonl").read_text().split("\n")[1:-1]
    return [parse_sample_line(line) for line in lines]


def _run_log(root: Path) -> dict[str, Any]:
    log: dict[str, Any] = json.loads((root / "logs" / "run.json").read_text())
    return log


#: ``latkit`` of this checkout, run in a fresh process.
CLI = [sys.executable, "-c", "from toolkit.cli import main; main()"]
#: What decides how a process authenticates to a Ray cluster (left out unless a test sets it).
RAY_AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")


def _process_env(keep_ray_auth: bool = True, **extra: str) -> dict[str, str]:
    """The environment of a child process: this checkout first on its path, plus ``extra``.

    ``keep_ray_auth=False`` leaves out this process's Ray authentication and address
    settings (``ray.init`` of the module's runtime sets RAY_AUTH_MODE=token here, which a
    driver joining that runtime by address needs)."""
    env = {k: v for k, v in os.environ.items() if keep_ray_auth or k not in RAY_AUTH_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *sys.path])
    return {**env, **extra}


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def test_ray_sweep_writes_what_one_process_writes(ray_address: str, tmp_path: Path) -> None:
    """The same files as one process, --output-tokens included (the same drawn lengths)."""
    lengths = (2, 6)
    single = run_profile(_settings(tmp_path / "single", on_ray=False, output_tokens=lengths))
    titles: list[str] = []

    def look(driver: RayDriver) -> None:
        if not titles:
            titles.extend(_cmdline(pid) for pid in driver.worker_pids())

    report = run_profile_ray(_settings(tmp_path / "ray", output_tokens=lengths), on_result=look)
    assert (report.engine, report.workers, report.restarts) == ("ray", 2, 0)
    assert report.files_written == single.files_written == 4
    assert report.startup_s > 0

    one, many = _files(tmp_path / "single"), _files(tmp_path / "ray")
    assert sorted(one) == sorted(many)  # same names: same drawn crops
    for name in one:
        # Same fields, sample ids, token counts and crops; only the times differ.
        assert without_times(one[name]) == without_times(many[name]), name
        assert set(many[name]["latency_stats"]) == set(one[name]["latency_stats"])
    keys = _keys(tmp_path / "ray")
    assert keys == _keys(tmp_path / "single") and set(keys.values()) == {1}
    drawn = [s["output_tokens"] for doc in many.values() for s in doc["per_sample_results"]]
    assert len(drawn) == 8 and all(2 <= n <= 6 for n in drawn)

    assert len(titles) == 2 and all(t.startswith("ray::ProfileWorker") for t in titles), titles
    log = _run_log(tmp_path / "ray")
    assert log["status"] == "complete" and log["settings"]["output_tokens"] == [2, 6]
    engine = log["engine"]
    assert engine["name"] == "ray" and engine["cluster_resources"]["CPU"] == 2
    assert engine["restarts"] == 0 and engine["startup_s"] > 0 and engine["wall_s"] > 0
    assert len(engine["workers"]) == 2
    for worker in engine["workers"]:
        assert worker["host"] and worker["device_name"] and worker["torch"]
        assert "cuda" in worker and worker["torch_threads"] == 1
    assert sum(w["samples"] for w in engine["workers"]) == 8
    assert log["device"]["type"] == "cpu" and log["model"]["parameters"] > 0


def test_sigkilled_worker_costs_nothing(ray_address: str, tmp_path: Path) -> None:
    """A ProfileWorker process killed mid-sweep: its samples run again elsewhere, and land in
    the files and the driver's journal once."""
    killed: list[tuple[int, str]] = []
    journaled: list[list[JournaledSample]] = []

    def kill_one(driver: RayDriver) -> None:
        if not killed and driver.results_done >= 2:
            pid = driver.worker_pids()[0]
            killed.append((pid, _cmdline(pid)))
            os.kill(pid, signal.SIGKILL)
        journaled.append(_journaled(tmp_path))  # removed when the sweep completes

    settings = _settings(tmp_path, samples_per_config=3)
    report = run_profile_ray(settings, on_result=kill_one)
    assert killed and killed[0][1].startswith("ray::ProfileWorker")
    assert report.restarts == 1 and not report.stopped_early
    assert report.files_written == 4 and report.samples_measured == 12

    keys = _keys(tmp_path)
    assert len(keys) == 12 and set(keys.values()) == {1}
    assert keys == _keys_of_single_plan(tmp_path / "plan", settings)
    last = journaled[-1]
    assert len(last) == 12 and len({(s.key, s.index) for s in last}) == 12
    assert not (tmp_path / "logs" / "samples.jsonl").exists()
    engine = _run_log(tmp_path)["engine"]
    assert engine["restarts"] == 1
    event = engine["restart_events"][0]
    assert event["requeued_samples"] >= 1 and event["worker"] == "w0"
    states = {w["worker"]: w["state"] for w in engine["workers"]}
    assert states["w0"] == "lost" and states["w0.1"] == "stopped"


def _keys_of_single_plan(
    out: Path, settings: ProfileSettings
) -> Counter[tuple[str, str, int, int]]:
    """The keys a single-process sweep of the same settings writes (drawn, not timed)."""
    from toolkit.profiler.sweep import plan_jobs
    from toolkit.profiler.writer import dataset_dir_name

    plan, _ = plan_jobs(settings, out)
    return Counter(
        (dataset_dir_name(job.dataset), job.tier, job.top_k, spec.sample_id)
        for job in plan
        for spec in job.specs
    )


def test_resume_after_killed_driver(ray_address: str, tmp_path: Path) -> None:
    """SIGKILL the driver (a CLI process on the module's cluster) in its second round: whole
    files only remain, the journal holds every sample that landed, and --resume measures
    only the samples that were in flight or not sent yet, each sample once."""
    out = tmp_path / "res"
    args = [
        "profile",
        "--output-dir",
        str(out),
        "--datasets",
        "tally_qa,coco_caption,doc_qa",
        "--tiers",
        "low",
        "--top-k",
        "4,12",
        "--blocks",
        "8,16",
        "--samples-per-config",
        "2",
        "--repeats",
        "1",
        "--seed",
        "5",
        "--no-progress",
    ]
    driver = subprocess.Popen(
        [*CLI, *args, "--ray", ray_address, "--workers", "2"],
        env=_process_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    journal = out / "logs" / "samples.jsonl"
    deadline = time.monotonic() + 180
    try:
        # 12 files of 2 samples: the first round measures one sample of each, so the files
        # are written in the second round.
        while not journal.exists() or journal.read_text().count("\n") < 1 + 15:
            assert driver.poll() is None, driver.stderr.read().decode() if driver.stderr else ""
            assert time.monotonic() < deadline, "the driver journaled 15 samples in 180 s"
            time.sleep(0.02)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
    before = _files(out)
    assert _run_log(out)["status"] == "running"
    assert 1 <= len(before) < 12, "no file, or every file, written when the driver was killed"
    assert all(doc["num_samples"] == 2 for doc in before.values())  # whole files only
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*-*/*.json")}
    assert len(stamps) == len(before)
    journaled = _journaled(out)
    assert len({(s.key, s.index) for s in journaled}) == len(journaled) >= 15
    unwritten = [s for s in journaled if not (out / f"{s.key}.json").exists()]

    settings = _settings(
        out,
        datasets=["tally_qa", "coco_caption", "doc_qa"],
        blocks=[8, 16],
        resume=True,
    )
    report = run_profile(settings)
    assert report.files_skipped == len(before)
    assert report.files_written == 12 - len(before)
    assert report.samples_reused == len(unwritten)
    assert report.samples_measured == 24 - 2 * len(before) - len(unwritten)
    assert all(p.stat().st_mtime_ns == stamp for p, stamp in stamps.items())
    keys = _keys(out)
    assert len(keys) == 24 and set(keys.values()) == {1}
    assert _run_log(out)["status"] == "complete" and not journal.exists()


def test_max_minutes_stops_between_samples_and_resume_finishes(
    ray_address: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--max-minutes on Ray: a fake clock jumps 10 s per sample the driver journals, so with a
    1-minute budget the driver stops after 6 of the 8 samples (the samples still in flight
    on the workers are dropped, never journaled); --resume on Ray measures only the rest."""
    settings = _settings(tmp_path, max_minutes=1.0)
    with monkeypatch.context() as patch:
        report = run_profile_ray(settings, clock=clock_advancing_per_sample(patch, 10.0))
    assert report.stopped_early and report.samples_measured == 6
    journaled = _journaled(tmp_path)
    assert len({(s.key, s.index) for s in journaled}) == len(journaled) == 6
    # The files whose two samples are in, and only those (two, unless the workers' results
    # landed out of the schedule's order).
    complete = {key for key, count in Counter(s.key for s in journaled).items() if count == 2}
    first = _files(tmp_path)
    assert {name.removesuffix(".json") for name in first} == complete
    assert report.files_written == len(complete) and report.files_remaining == 4 - len(complete)
    log = _run_log(tmp_path)
    assert log["status"].startswith("stopped: --max-minutes")
    assert log["engine"]["name"] == "ray"

    rest = run_profile_ray(_settings(tmp_path, resume=True))
    assert (rest.files_skipped, rest.files_written) == (len(complete), 4 - len(complete))
    assert (rest.samples_reused, rest.samples_measured) == (6 - 2 * len(complete), 2)
    assert not rest.stopped_early
    keys = _keys(tmp_path)
    assert keys == _keys_of_single_plan(tmp_path / "plan", settings)
    assert set(keys.values()) == {1}


def test_mixed_devices_refused_unless_allowed(
    ray_address: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two simulated GPU kinds: each actor gets its own LATKIT_DEVICE_NAME through Ray's
    runtime_env, which the worker reports as its device name."""
    options = ray_runner_module.worker_options

    def simulated(slot: int, device_type: str, threads: int | None) -> dict[str, Any]:
        env = {DEVICE_NAME_ENV: f"Simulated GPU {'AB'[slot % 2]}"}
        return {**options(slot, device_type, threads), "runtime_env": {"env_vars": env}}

    monkeypatch.setattr(ray_runner_module, "worker_options", simulated)
    refused = tmp_path / "refused"
    with pytest.raises(LatkitError, match=r"different devices.*--allow-mixed-devices"):
        run_profile(_settings(refused, datasets=["tally_qa"]))
    assert not _files(refused)

    allowed = tmp_path / "allowed"
    mixed = RaySettings("local", workers=2, allow_mixed_devices=True)
    report = run_profile(_settings(allowed, datasets=["tally_qa"], ray=mixed))
    assert report.files_written == 2
    devices = Counter(
        sample["metadata"]["device"]
        for doc in _files(allowed).values()
        for sample in doc["per_sample_results"]
    )
    assert set(devices) == {"Simulated GPU A", "Simulated GPU B"} and devices.total() == 4

    # No outlier rule: on a loaded machine a tiny decode pass can exceed the default 60 ms.
    inspect = ["inspect", "--results-dir", str(allowed), "--outlier-ms", "1e9"]
    result = CliRunner().invoke(main, [*inspect, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["samples_per_device"] == dict(devices)
    text = CliRunner().invoke(main, inspect).stdout
    assert "Samples per device" in text and "Simulated GPU" in text


# --- joining a cluster by address (a head that the test starts itself) -----------------------


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _session_pids(session_id: int) -> list[int]:
    """The live processes of a session (the head's ``ray start`` and everything it started)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == session_id:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _stop_head(head: subprocess.Popen[bytes]) -> None:
    """Stop a ``ray start --head --block`` and every process of its session, and nothing else
    (``ray stop`` would stop every Ray on the machine)."""
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)  # --block: the head drains and stops what it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait(timeout=30)
    deadline = time.monotonic() + 10
    while _session_pids(head.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in _session_pids(head.pid):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def token_head() -> Iterator[tuple[str, str]]:
    """A Ray head started with ``ray start --head`` and token authentication: its own token,
    temp dir and ports, in a session of its own. Yields (address, token); stops the head and
    every process it started however the test ends."""
    if not sys.platform.startswith("linux"):
        pytest.skip("finds the head's processes through /proc (Linux)")
    token = secrets.token_hex(16)
    # Short: Ray's socket paths under it must stay within 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="latkit-ray-", dir="/tmp"))
    port, dashboard, agent, agent_grpc, runtime_env, metrics = _free_ports(6)
    command = [
        *[sys.executable, "-m", "ray.scripts.scripts", "start", "--head"],
        *[f"--port={port}", "--num-cpus=1", "--include-dashboard=false"],
        *[f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent}"],
        *[f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}"],
        *[f"--metrics-export-port={metrics}", f"--temp-dir={temp_dir}"],
        *["--disable-usage-stats", "--block"],
    ]
    log_path = temp_dir / "head.log"
    with log_path.open("wb") as head_log:
        head = subprocess.Popen(
            command,
            env=_process_env(False, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token),
            stdout=head_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        address_file = temp_dir / "ray_current_cluster"  # written once the head is up
        deadline = time.monotonic() + 120
        address = ""
        # Not written atomically: the file can exist, still empty, for a moment.
        while not re.fullmatch(r"\S+:\d+", address):
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"`ray start --head` did not come up:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
            with contextlib.suppress(FileNotFoundError):
                address = address_file.read_text().strip()
        yield address, token
    finally:
        _stop_head(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_join_by_address_with_token_authentication(
    token_head: tuple[str, str], tmp_path: Path
) -> None:
    """``--ray HOST:PORT`` against a head with token authentication: without the token the
    join fails in one line that names the cause; with RAY_AUTH_MODE=token and the head's
    token it measures the sweep on the head's worker."""
    address, token = token_head
    out = tmp_path / "joined"
    args = [*CLI, "profile", "--ray", address, "--output-dir", str(out), "--no-progress"]
    args += ["--datasets", "tally_qa", "--tiers", "low", "--top-k", "4", "--blocks", "8"]
    args += ["--samples-per-config", "1", "--repeats", "1"]

    # One connection attempt instead of Ray's twenty (a second each).
    refused = subprocess.run(
        args,
        env=_process_env(False, RAY_gcs_server_port_wait_time_s="1"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2, refused.stderr[-3000:]
    errors = [line for line in refused.stderr.splitlines() if line.startswith("Error:")]
    assert errors == [
        f"Error: --ray {address}: could not start or join Ray: Failed to connect to Ray "
        f"cluster at {address} (the cluster uses token authentication and this driver's "
        f"token is missing or not the head's: {ray_runner_module.TOKEN_HOWTO})"
    ], refused.stderr[-3000:]
    assert "Traceback" not in refused.stderr and not _files(out)

    joined = subprocess.run(
        args,
        env=_process_env(False, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert joined.returncode == 0, joined.stderr[-3000:]
    assert "profile done on Ray (1 workers, 0 restarts" in joined.stdout
    (name,) = _files(out)
    assert name.startswith("tally-qa/tally-qa_imgsizetier-low_")
    engine = _run_log(out)["engine"]
    assert (engine["runtime"], engine["address"], engine["nodes"]) == ("connected", address, 1)
    (worker,) = engine["workers"]
    assert worker["samples"] == 1 and worker["state"] == "stopped"
