"""``remote_exec.Executor`` end to end over local "hosts": real runners (the ``double`` backend runs them as
local subprocesses, one workdir per host) and the testbed's fake ``nvidia-smi`` on PATH.

What a user notices: results in order, exceptions as results, a call per slot at a time in one warm worker
per slot, the GPUs a call sees, two pools never sharing a GPU, calls waiting (visibly) while foreign
processes hold every GPU, a host that fails whose calls finish elsewhere (nothing lost, nothing twice), and
the ledger's record of every attempt.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import CancelledError, as_completed, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from backend_double import TARGET as BACKEND_TARGET

from remote_exec import Executor, task
from remote_exec.backends import register, unregister
from remote_exec.config import Configuration, Remote
from remote_exec.coordinator import Coordinator
from remote_exec.errors import ConnectError, Interrupted
from remote_exec.pool import BrokenPool, GpuPolicy
from remote_exec.workspace import Workspace

REPO = Path(__file__).resolve().parents[2]
FAKE_SMI = REPO / "testbed" / "image"


@dataclass
class Hosts:
    """Local hosts ``box1`` and ``box2`` (and ``nopython``, whose interpreter is missing)."""

    root: Path
    config: Configuration
    coordinator: Coordinator
    gpus_file: Path

    def set_gpus(self, count: int, processes: list[dict[str, Any]] | None = None) -> None:
        """What the fake nvidia-smi reports (for every box: they share this machine)."""
        self.gpus_file.write_text(json.dumps({"gpus": [{} for _ in range(count)], "processes": processes or []}))

    def tasks(self) -> dict[str, dict[str, Any]]:
        """The task entries of this process's @task run."""
        self.coordinator.flush()
        run_id = self.coordinator.run_id
        assert run_id is not None
        return Workspace.resolve().run(run_id).tasks()


@pytest.fixture
def hosts(isolated: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Hosts]:
    register("double", BACKEND_TARGET)
    coordinator = Coordinator()
    monkeypatch.setattr(Coordinator, "_current", coordinator)
    monkeypatch.setenv("PATH", f"{FAKE_SMI}{os.pathsep}{os.environ['PATH']}")
    gpus_file = isolated.root / "gpus.json"
    monkeypatch.setenv("RX_FAKE_GPUS", str(gpus_file))
    config = Configuration()
    for name in ("box1", "box2"):
        config.add_remote(Remote(name=name, host=name, backend="double", python=sys.executable,
                                 workdir=str(isolated.root / name)))
    config.add_remote(Remote(name="nopython", host="nopython", backend="double",
                             python=str(isolated.root / "no-such-python"), workdir=str(isolated.root / "nopython")))
    yield Hosts(isolated.root, config, coordinator, gpus_file)
    coordinator.close()
    unregister("double")


def square(x: int) -> int:
    if x == 3:
        raise ValueError("three")
    return x * x


def where(x: int) -> tuple[int, str, int]:
    return x, os.environ.get("RX_POOL_HOST", ""), os.getpid()


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def gpu_window(seconds: float) -> tuple[str | None, float, float]:
    started = time.time()
    time.sleep(seconds)
    return os.environ.get("CUDA_VISIBLE_DEVICES"), started, time.time()


def test_map_returns_results_in_order_and_an_exception_in_its_place(hosts: Hosts) -> None:
    with Executor(["box1", "box2"], per_host=2, config=hosts.config) as pool:
        results = list(pool.map(square, range(8), return_exceptions=True))
        plain = pool.map(square, range(8))
        assert [next(plain) for _ in range(3)] == [0, 1, 4]
        with pytest.raises(ValueError, match="three") as raised:
            next(plain)
    assert results[:3] == [0, 1, 4] and results[4:] == [16, 25, 36, 49]
    assert isinstance(results[3], ValueError) and str(results[3]) == "three"
    assert "square" in str(raised.value.__cause__)  # the remote traceback travels as the cause


def test_a_slot_serves_its_calls_in_one_warm_worker(hosts: Hosts) -> None:
    config = hosts.config
    for name in ("box1", "box2"):
        remote = config.remotes[name]
        config.add_remote(Remote(name=name, host=name, backend="double", python=remote.python, workdir=remote.workdir,
                                 env={"RX_POOL_HOST": name}))
    with Executor(["box1", "box2"], config=config) as pool:
        seen = list(pool.map(where, range(40)))
    assert [x for x, _, _ in seen] == list(range(40))
    pids = {host: {pid for _, name, pid in seen if name == host} for host in ("box1", "box2")}
    assert all(len(found) <= 1 for found in pids.values()), pids  # one slot per host: one worker each


def test_futures_work_with_as_completed_wait_and_cancel(hosts: Hosts) -> None:
    with Executor(["box1"], config=hosts.config) as pool:
        futures = [pool.submit(square, n) for n in (1, 2, 3)]
        assert {f.result() if not f.exception() else "raised" for f in as_completed(futures, timeout=60)} == \
            {1, 4, "raised"}
        blocker = pool.submit(nap, 1.0)
        queued = pool.submit(square, 5)
        assert queued.cancel()  # still waiting behind the blocker on the only slot
        done, _ = wait([blocker], timeout=30)
        assert blocker in done
    with pytest.raises(CancelledError):
        queued.result()
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(square, 1)


def test_map_is_lazy_and_keeps_a_bounded_number_of_calls_in_flight(hosts: Hosts) -> None:
    made: list[int] = []

    def numbers() -> Iterator[int]:
        for n in range(10_000):
            made.append(n)
            yield n

    with Executor(["box1"], config=hosts.config, max_in_flight=5) as pool:
        results = pool.map(square, numbers())
        assert next(results) == 0
        assert len(made) <= 7, "map read far ahead of the results"
        results.close()  # type: ignore[attr-defined]


def test_the_ledger_records_each_call_with_its_host_slot_and_attempts(hosts: Hosts) -> None:
    with Executor(["box1", "box2"], config=hosts.config) as pool:
        assert list(pool.map(square, [1, 2, 2])) == [1, 4, 4]
    entries = hosts.tasks()
    assert len(entries) == 3, "a call with the same arguments as another is still a call of its own"
    for entry in entries.values():
        assert entry["status"] == "done" and entry["host"] in ("box1", "box2")
        assert entry["slot"].startswith(entry["host"] + "#") and entry["started"] and entry["finished"]
        assert "attempts" not in entry  # done at the first attempt: the entry is that attempt


def test_each_call_sees_the_gpus_its_slot_holds(hosts: Hosts) -> None:
    hosts.set_gpus(2)
    with Executor(["box1"], gpus=1, config=hosts.config) as pool:
        seen = list(pool.map(gpu_window, [0.3] * 6))
    visible = {gpu for gpu, _, _ in seen}
    assert visible == {"0", "1"}  # two GPUs: two slots, a GPU each
    for gpu in visible:
        windows = sorted((start, end) for g, start, end in seen if g == gpu)
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(windows)), "a GPU ran two calls at once"
    recorded = [entry["gpus"] for _, entry in sorted(hosts.tasks().items())]
    assert recorded == [[int(gpu)] for gpu, _, _ in seen]  # the ledger names the GPU each call saw


def test_two_pools_sharing_two_gpus_never_use_one_at_the_same_time(hosts: Hosts) -> None:
    hosts.set_gpus(2)
    other = Coordinator()  # a second coordinator, as a second process (or user of the account) would be
    results: dict[str, list[Any]] = {}

    def run(name: str, coordinator: Coordinator) -> None:
        with Executor(["box1"], per_host=2, gpus=1, config=hosts.config, coordinator=coordinator,
                      gpu_policy=GpuPolicy(interval=0.2)) as pool:
            results[name] = list(pool.map(gpu_window, [0.4] * 4))

    threads = [threading.Thread(target=run, args=(name, coordinator))
               for name, coordinator in (("a", hosts.coordinator), ("b", other))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    finally:
        other.close()
    windows = [(gpu, start, end) for found in results.values() for gpu, start, end in found]
    assert len(windows) == 8
    for gpu in ("0", "1"):
        spans = sorted((start, end) for g, start, end in windows if g == gpu)
        for a, b in itertools.pairwise(spans):
            assert a[1] <= b[0] + 0.01, f"GPU {gpu} ran calls of both pools at once"


def test_calls_wait_while_foreign_processes_hold_every_gpu(hosts: Hosts) -> None:
    foreign = subprocess.Popen(["sleep", "60"])
    try:
        hosts.set_gpus(1, [{"gpu": 0, "pid": foreign.pid, "used_memory": 4096}])
        pool = Executor(["box1"], gpus=1, config=hosts.config, gpu_policy=GpuPolicy(interval=0.2))
        future = pool.submit(gpu_window, 0.0)
        deadline = time.monotonic() + 30
        while pool.status()["slots"].get("box1#0", {}).get("state") != "waiting":
            assert time.monotonic() < deadline, pool.status()
            time.sleep(0.1)
        status = pool.status()
        assert status["queued"] == 1 and not future.done()
        assert f"pid {foreign.pid}" in status["slots"]["box1#0"]["detail"]  # it says what holds the GPU
    finally:
        foreign.kill()
        foreign.wait()
    assert future.result(timeout=30)[0] == "0"  # the foreign process ended: the call got its GPU
    pool.shutdown()


def test_a_gpu_busy_below_the_threshold_is_free(hosts: Hosts) -> None:
    foreign = subprocess.Popen(["sleep", "60"])
    try:
        hosts.set_gpus(1, [{"gpu": 0, "pid": foreign.pid, "used_memory": 100}])
        with Executor(["box1"], gpus=1, config=hosts.config, gpu_policy=GpuPolicy(foreign_mib=500)) as pool:
            assert pool.submit(gpu_window, 0.0).result(timeout=30)[0] == "0"
    finally:
        foreign.kill()
        foreign.wait()


def test_a_host_that_cannot_run_the_calls_is_lost_and_they_run_elsewhere(hosts: Hosts) -> None:
    with Executor(["nopython", "box1"], config=hosts.config) as pool:
        assert list(pool.map(square, [1, 2, 4])) == [1, 4, 16]
        assert pool.status()["host_states"]["nopython"] == "lost"
    with Executor(["nopython"], config=hosts.config) as pool:
        future = pool.submit(square, 2)
        with pytest.raises(BrokenPool, match="not found") as broken:
            future.result(timeout=60)
    assert broken.value.exit_code == 255


def test_a_call_whose_host_froze_finishes_elsewhere_once(hosts: Hosts) -> None:
    """box1's worker is stopped (SIGSTOP: its link goes silent, as a paused host's does) while it runs a
    call: the call runs again on box2; every result arrives exactly once."""
    frozen: list[int] = []

    def freeze_box1_worker() -> None:
        for channel in hosts.coordinator.workers.channels():
            placement = channel.placement or {}
            if str(placement.get("slot", "")).startswith("box1") and not frozen:
                # the worker leads its own process group (its guardian, the process ssh started, stays in
                # the caller's: here, pytest's own)
                pid = int(placement["pid"])
                os.killpg(pid, signal.SIGSTOP)
                frozen.append(pid)

    def slow(x: int) -> int:
        time.sleep(0.3)
        return x

    try:
        with Executor(["box1", "box2"], config=hosts.config, keepalive_interval=0.5, keepalive_count=2) as pool:
            results = pool.map(slow, range(12))
            first = [next(results) for _ in range(2)]
            freeze_box1_worker()
            rest = list(results)
    finally:
        for pid in frozen:
            try:
                os.killpg(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    assert frozen and first + rest == list(range(12))
    entries = hosts.tasks()
    assert len(entries) == 12 and all(entry["status"] == "done" for entry in entries.values())
    retried = [entry for entry in entries.values() if len(entry.get("attempts") or []) > 1]
    assert retried, "no call was running on the frozen host"
    for entry in retried:
        first_try, last_try = entry["attempts"][0], entry["attempts"][-1]
        assert first_try["host"] == "box1" and first_try["status"] == "failed"
        assert last_try["host"] == "box2" and last_try["status"] == "done"


def test_a_task_exception_is_retried_only_when_retry_on_says_so(hosts: Hosts) -> None:
    marker = hosts.root / "flaky-count"

    def flaky(path: str) -> str:
        count = int(Path(path).read_text()) if Path(path).exists() else 0
        Path(path).write_text(str(count + 1))
        if count == 0:
            raise ConnectionResetError("the first try fails")
        return "second try"

    with Executor(["box1"], config=hosts.config) as pool, pytest.raises(ConnectionResetError):
        pool.submit(flaky, str(marker)).result(timeout=60)
    marker.unlink()
    with Executor(["box1"], config=hosts.config, retry_on=(ConnectionResetError,)) as pool:
        assert pool.submit(flaky, str(marker)).result(timeout=60) == "second try"


def test_task_map_and_submit(hosts: Hosts) -> None:
    double = task(remote="box1", config=hosts.config)(lambda x: 2 * x)
    assert list(double.map(range(5), hosts=["box1", "box2"], config=hosts.config)) == [0, 2, 4, 6, 8]
    add = task(hosts=["box1", "box2"], config=hosts.config)(lambda a, b: a + b)
    assert list(add.map([(1, 2), (3, 4)], star=True, config=hosts.config)) == [3, 7]
    assert add.submit(5, b=6).result(timeout=60) == 11
    assert len(hosts.coordinator.pools) == 1  # the process keeps one pool per set of hosts for submit


def test_interrupting_the_pool_stops_its_running_calls(hosts: Hosts) -> None:
    marker = hosts.root / "still-running"

    def long(path: str) -> None:
        time.sleep(5)
        Path(path).write_text("the call was not stopped")

    pool = Executor(["box1", "box2"], config=hosts.config)
    futures = [pool.submit(long, str(marker)) for _ in range(3)]
    deadline = time.monotonic() + 30
    while pool.status()["running"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    started = time.monotonic()
    pool.shutdown(wait=True, cancel_futures=True, interrupt=True)
    assert time.monotonic() - started < 4.5
    outcomes = [type(f.exception()) if not f.cancelled() else CancelledError for f in futures]
    assert sorted(o.__name__ for o in outcomes) == ["CancelledError", "Interrupted", "Interrupted"]
    time.sleep(5.5)
    assert not marker.exists()


def test_configuration_mistakes_are_one_line_errors(hosts: Hosts) -> None:
    from remote_exec.errors import ConfigError

    with pytest.raises(ConfigError, match="at least one host"):
        Executor([], config=hosts.config)
    with pytest.raises(ConfigError, match="named twice"):
        Executor(["box1", "box1"], config=hosts.config)
    assert issubclass(BrokenPool, RuntimeError)  # concurrent.futures.BrokenExecutor, as a broken pool is there
    assert issubclass(Interrupted, KeyboardInterrupt) and issubclass(ConnectError, Exception)


def test_a_scheduler_remote_takes_the_calls_as_one_job_array(hosts: Hosts) -> None:
    from scheduler_double import TARGET as QUEUE
    from scheduler_double import QueueLauncher

    from remote_exec.launchers import register_launcher, unregister_launcher

    register_launcher("queue", QUEUE)
    QueueLauncher.reset()
    try:
        hosts.config.add_remote(Remote(name="cluster", host="cluster", backend="double", scheduler="queue",
                                       python=sys.executable, workdir=str(hosts.root / "shared")))
        with Executor(["cluster"], per_host=3, config=hosts.config) as pool:
            results = list(pool.map(square, range(6), return_exceptions=True))
        requests = list(QueueLauncher.requests.values())
    finally:
        QueueLauncher.reset()
        unregister_launcher("queue")
    assert results[:3] == [0, 1, 4] and isinstance(results[3], ValueError) and results[4:] == [16, 25]
    assert [(request.array, request.parallel) for request in requests] == [(6, 3)]  # one array, 3 at once
    entries = hosts.tasks()
    assert len(entries) == 6 and all(entry["host"] == "cluster" for entry in entries.values())


def test_a_call_whose_arguments_cannot_travel_fails_alone(hosts: Hosts) -> None:
    from remote_exec.errors import SerializationError

    def first(item: Any) -> Any:
        return item[0]

    with Executor(["box1"], config=hosts.config) as pool:
        results = list(pool.map(first, [(1,), (threading.Lock(),), (3,)], return_exceptions=True))
        again = pool.submit(first, (threading.Lock(),))
        with pytest.raises(SerializationError, match="cannot serialize the arguments"):
            again.result(timeout=30)
    assert results[0] == 1 and results[2] == 3
    assert isinstance(results[1], SerializationError)


def test_a_frozen_host_does_not_hold_the_pool_up_at_shutdown(hosts: Hosts) -> None:
    """Both slots of box1 freeze while one runs a call: the call finishes on box2, and the pool shuts down
    without waiting on box1's idle slot (its channel is dropped with the host)."""
    frozen: list[int] = []

    def slow(x: int) -> int:
        time.sleep(0.3)
        return x

    try:
        pool = Executor(["box1", "box2"], per_host=2, config=hosts.config, keepalive_interval=0.5,
                        keepalive_count=2)
        results = pool.map(slow, range(12))
        first = [next(results) for _ in range(4)]
        for channel in hosts.coordinator.workers.channels():
            if str((channel.placement or {}).get("slot", "")).startswith("box1"):
                # the worker leads its own process group (its guardian, the process ssh started, stays in
                # the caller's: here, pytest's own)
                pid = int((channel.placement or {})["pid"])
                os.killpg(pid, signal.SIGSTOP)
                frozen.append(pid)
        rest = list(results)
        started = time.monotonic()
        pool.shutdown()
        took = time.monotonic() - started
    finally:
        for pid in frozen:
            try:
                os.killpg(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    assert len(frozen) == 2 and first + rest == list(range(12))
    assert took < 5, f"shutdown waited {took:.1f} s on the frozen host"
