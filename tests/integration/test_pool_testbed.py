"""The pool against real sshd hosts, on both backends: ``Executor.map`` results in order with exceptions as
results, a host paused mid-map whose calls finish elsewhere (nothing lost, nothing twice), two coordinators
sharing two fake GPUs never on one GPU at once, calls queued while foreign processes hold every GPU, a
sweep's ``rx rerun --failed``, and Ctrl-C stopping every host's calls with no process left behind."""

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
from pathlib import Path
from typing import Any

import pytest

from remote_exec import Executor
from remote_exec.coordinator import Coordinator
from remote_exec.pool import GpuPolicy
from remote_exec.workspace import Workspace
from testbed import TestbedHost, exec_root, pause, set_gpus, start_foreign_process, unpause

DATA = Path(__file__).resolve().parent / "data"
if str(DATA) not in sys.path:
    sys.path.insert(0, str(DATA))
pytest.register_assert_rewrite("remote_support")

from remote_support import REPO, Remote  # noqa: E402
from rxproj import pool_tasks  # noqa: E402
from rxproj.errors import BadInput  # noqa: E402

pytest_plugins = ["remote_support"]

HOSTS = ["rx-testbed-1", "rx-testbed-2"]


@pytest.fixture
def pool_remote(remote: Remote) -> Iterator[Remote]:
    """The remote fixture; this process's coordinator is a fresh one, closed (workers ended) after the test."""
    coordinator = Coordinator()
    previous = Coordinator._current
    Coordinator._current = coordinator
    try:
        yield remote
    finally:
        coordinator.close()
        Coordinator._current = previous


def remote_processes(host: TestbedHost, needle: str) -> list[str]:
    """The host's processes of user rx whose command line holds ``needle`` (sshd's own excluded)."""
    code, listing = exec_root(host, "ps -eo user=,args=")
    assert code == 0, listing
    return [line for line in listing.splitlines()
            if line.split(None, 1)[0] == "rx" and needle in line and "sshd" not in line.split(None, 1)[1][:6]]


def task_entries() -> dict[str, dict[str, Any]]:
    coordinator = Coordinator.current()
    coordinator.flush()
    assert coordinator.run_id is not None
    return Workspace.resolve().run(coordinator.run_id).tasks()


def test_map_gives_results_in_order_and_exceptions_in_their_place(pool_remote: Remote) -> None:
    with Executor(HOSTS, per_host=2) as pool:
        results = list(pool.map(pool_tasks.square, range(10), return_exceptions=True))
    assert [r if isinstance(r, BaseException) else r[0] for r in results] == \
        [0, 1, 4, results[3], 16, 25, 36, 49, 64, 81]
    assert isinstance(results[3], BadInput) and results[3].value == 3
    assert "three is not allowed" in str(results[3]) and "pool_tasks.py" in str(results[3].__cause__)
    assert {r[1] for r in results if not isinstance(r, BaseException)} <= set(HOSTS)
    entries = task_entries()
    assert len(entries) == 10 and sorted(e["status"] for e in entries.values()).count("done") == 9


def test_a_host_paused_mid_map_has_its_calls_finish_elsewhere(pool_remote: Remote,
                                                             dedicated_host: TestbedHost) -> None:
    hosts = ["rx-testbed-1", dedicated_host.alias]
    try:
        with Executor(hosts, keepalive_interval=1, keepalive_count=2) as pool:
            results = pool.map(pool_tasks.slow, range(16), [0.4] * 16)
            first = [next(results) for _ in range(4)]
            pause(dedicated_host)
            rest = list(results)
            state = pool.status()["host_states"][dedicated_host.alias]
    finally:
        unpause(dedicated_host)
    values = [x for x, _ in first + rest]
    assert values == list(range(16)), "a result was lost or came twice"
    assert state in ("down", "lost")
    entries = task_entries()
    assert len(entries) == 16 and all(entry["status"] == "done" for entry in entries.values())
    moved = [entry for entry in entries.values() if len(entry.get("attempts") or []) > 1]
    assert moved, "no call was running on the paused host"
    for entry in moved:
        assert entry["attempts"][0]["host"] == dedicated_host.alias and entry["attempts"][0]["status"] == "failed"
        assert entry["attempts"][-1]["host"] == "rx-testbed-1" and entry["attempts"][-1]["status"] == "done"
        assert entry["host"] == "rx-testbed-1"


COORDINATOR = """
import json, sys
from remote_exec import Executor, GpuPolicy
from rxproj import pool_tasks
with Executor([sys.argv[1]], per_host=2, gpus=1, gpu_policy=GpuPolicy(interval=0.5)) as pool:
    print(json.dumps(list(pool.map(pool_tasks.gpu_window, [0.6] * 6))))
"""


def test_two_coordinators_sharing_two_gpus_never_overlap(pool_remote: Remote, dedicated_host: TestbedHost) -> None:
    set_gpus(dedicated_host, 2)
    env = {**pool_remote.env, "PYTHONPATH": os.pathsep.join([str(REPO), str(DATA)])}
    procs = [subprocess.Popen([sys.executable, "-c", COORDINATOR, dedicated_host.alias], cwd=pool_remote.project,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        outputs.append(json.loads(out))
    windows = [(gpu, start, end) for output in outputs for gpu, start, end, _ in output]
    assert len(windows) == 12 and {gpu for gpu, _, _ in windows} == {"0", "1"}
    for gpu in ("0", "1"):
        spans = sorted((start, end) for g, start, end in windows if g == gpu)
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert end <= start, f"GPU {gpu} ran two calls at once"


def test_calls_wait_while_foreign_processes_hold_every_gpu(pool_remote: Remote,
                                                          dedicated_host: TestbedHost) -> None:
    foreign = start_foreign_process(dedicated_host)
    set_gpus(dedicated_host, 1, [{"gpu": 0, "pid": foreign, "used_memory": 8192}])
    pool = Executor([dedicated_host.alias], gpus=1, gpu_policy=GpuPolicy(interval=0.5))
    try:
        future = pool.submit(pool_tasks.gpu_window, 0.1)
        deadline = time.monotonic() + 60
        while pool.status()["slots"].get(f"{dedicated_host.alias}#0", {}).get("state") != "waiting":
            assert time.monotonic() < deadline, pool.status()
            time.sleep(0.2)
        time.sleep(1.5)
        status = pool.status()
        assert not future.done() and status["queued"] == 1
        assert f"pid {foreign}" in status["slots"][f"{dedicated_host.alias}#0"]["detail"]
        exec_root(dedicated_host, f"kill {foreign}")
        gpu, _, _, _ = future.result(timeout=60)
        assert gpu == "0"
    finally:
        pool.shutdown(cancel_futures=True)


SWEEP = ["--lr", ":::", "0.1", "0.01", "--seed", ":::", "1", "2"]


def test_a_sweep_reruns_only_its_failed_combinations(pool_remote: Remote, testbed: Any) -> None:
    pool_remote.copy_script("sweep_train.py")
    for host in testbed.hosts[:2]:
        exec_root(host, "touch /tmp/rx-fail-2 && chmod 666 /tmp/rx-fail-2")
    try:
        done = pool_remote.rx("map", "--no-progress", "-r", HOSTS[0], "-r", HOSTS[1], "sweep_train.py", *SWEEP,
                              timeout=180)
        assert done.returncode == 1, done.stderr
        assert sorted(line.split(" gpu=")[0] for line in done.stdout.splitlines()) == sorted(
            f"[lr={lr} seed={seed}] lr={lr} seed={seed}" for lr in ("0.1", "0.01") for seed in (1, 2))
        first = pool_remote.latest()
        assert first["kind"] == "sweep" and first["status"] == "failed"
        failed = sorted(key for key, entry in first["tasks"].items() if entry["status"] == "failed")
        assert failed == ["0001", "0003"] and all(first["tasks"][k]["exit_code"] == 5 for k in failed)
    finally:
        for host in testbed.hosts[:2]:
            exec_root(host, "rm -f /tmp/rx-fail-2")
    again = pool_remote.rx("rerun", "latest", "--failed", timeout=180)
    assert again.returncode == 0, again.stderr
    assert sorted(line.split(" gpu=")[0] for line in again.stdout.splitlines()) == [
        "[lr=0.01 seed=2] lr=0.01 seed=2", "[lr=0.1 seed=2] lr=0.1 seed=2"]
    rerun = pool_remote.latest()
    assert rerun["parent"] == first["run_id"] and rerun["status"] == "finished"
    assert sorted(k for k, e in rerun["tasks"].items() if e.get("merged_from")) == ["0000", "0002"]
    for key in failed:
        child = rerun["tasks"][key]["run"]
        assert pool_remote.files_of(child)["metrics.txt"].endswith(b" 2\n")


def test_ctrl_c_stops_every_hosts_calls(pool_remote: Remote, testbed: Any) -> None:
    """Four runs going on two hosts (two slots each), then SIGINT to rx map: it exits 130, records the sweep
    cancelled, and leaves no rx process on either host (the runs are forked from their slot's worker, so
    every one of them shows as the runner's command line)."""
    pool_remote.copy_script("sweep_train.py")
    argv = pool_remote.argv("map", "--no-progress", "-r", HOSTS[0], "-r", HOSTS[1], "--per-host", "2",
                            "sweep_train.py", "--sleep", "120", "--seed", ":::", "1", "2", "3", "4", "5", "6")
    started: list[bytes] = []
    with subprocess.Popen(argv, cwd=pool_remote.project, env=pool_remote.env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as rx:
        try:
            assert rx.stdout is not None
            reader = threading.Thread(target=lambda: started.extend(iter(rx.stdout.readline, b"")), daemon=True)
            reader.start()
            deadline = time.monotonic() + 90
            while len(started) < 4:
                assert time.monotonic() < deadline, f"the runs did not start: {started}"
                assert rx.poll() is None, rx.communicate()
                time.sleep(0.2)
            assert all(len(remote_processes(host, "remote_exec")) >= 2 for host in testbed.hosts[:2])
            rx.send_signal(signal.SIGINT)
            _, stderr = rx.communicate(timeout=60)
        finally:
            if rx.poll() is None:
                rx.kill()
    assert rx.returncode == 130, stderr
    deadline = time.monotonic() + 20
    while True:
        left = {host.alias: remote_processes(host, "remote_exec") for host in testbed.hosts[:2]}
        if not any(left.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not any(left.values()), f"orphans left on the hosts: {left}"
    sweep = pool_remote.latest()
    assert sweep["status"] == "cancelled" and sweep["exit_code"] == 130
    assert {entry["status"] for entry in sweep["tasks"].values()} == {"cancelled"}


def test_hosts_status_shows_a_pools_slots_and_gpus(pool_remote: Remote, dedicated_host: TestbedHost) -> None:
    set_gpus(dedicated_host, 2)
    with Executor([dedicated_host.alias], gpus=1) as pool:
        assert [gpu for gpu, _, _, _ in pool.map(pool_tasks.gpu_window, [0.0, 0.0])]
        facts = pool_remote.json("hosts", "--status", dedicated_host.alias)
        text = pool_remote.rx("hosts", "--status", dedicated_host.alias).stdout
    (host,) = facts
    held = [lock for lock in host["locks"] if lock["kind"] == "gpu"]
    assert len(held) == 2 and all(lock["mine"] for lock in held)
    assert "this workspace" in text and f"{dedicated_host.alias} (" in text
