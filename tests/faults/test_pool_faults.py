"""Faults under a pool (``remote_exec.Executor``): a host paused mid-map, a slot's worker killed mid-call.

What a user must see: every result, once, in order, whatever happened to a host; the ledger records each
attempt; nothing of rx is left on a host once it is back.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from faultkit import Rig, TrialFactory, audit_remote, remote_baseline, root_sh

from remote_exec import Executor
from remote_exec.coordinator import Coordinator
from remote_exec.workspace import Workspace
from testbed import TestbedHost, pause, unpause

DATA = Path(__file__).resolve().parents[1] / "integration" / "data"
if str(DATA) not in sys.path:
    sys.path.insert(0, str(DATA))

from rxproj import pool_tasks  # noqa: E402

#: keepalive_interval x keepalive_count + 1: how long a paused host's link may stay silent.
DEAD_AFTER = 3.0
CALLS = 16
CALL_SECONDS = 0.4


@pytest.fixture
def coordinator() -> Iterator[Coordinator]:
    """A fresh coordinator as this process's (its workers end with the test)."""
    made = Coordinator()
    previous = Coordinator._current
    Coordinator._current = made
    try:
        yield made
    finally:
        made.close()
        Coordinator._current = previous


@pytest.fixture(scope="module")
def pool_host(module_host: Callable[..., TestbedHost]) -> TestbedHost:
    """A host of this module's own, to pause and to kill workers on."""
    return module_host("pool")


def entries(coordinator: Coordinator) -> dict[str, dict[str, Any]]:
    coordinator.flush()
    assert coordinator.run_id is not None
    return Workspace.resolve().run(coordinator.run_id).tasks()


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("attempt", [1, 2])
def test_pool_pause_of_one_host_mid_map(rig: Rig, pool_host: TestbedHost, coordinator: Coordinator,
                                        trial: TrialFactory, attempt: int) -> None:
    baseline = remote_baseline(pool_host)
    bound = DEAD_AFTER + CALLS * CALL_SECONDS + 5.0
    with trial("pool_pause", variant=f"{CALLS} calls of {CALL_SECONDS} s, attempt {attempt}", bound=bound) as t:
        hosts = ["rx-testbed-1", pool_host.alias]
        try:
            with Executor(hosts, keepalive_interval=1, keepalive_count=2) as pool:
                results = pool.map(pool_tasks.slow, range(CALLS), [CALL_SECONDS] * CALLS)
                first = [next(results) for _ in range(3)]
                pause(pool_host)
                paused_at = time.monotonic()
                rest = list(results)
                seconds = time.monotonic() - paused_at
                state = pool.status()["host_states"][pool_host.alias]
        finally:
            unpause(pool_host)
        values = [value for value, _ in first + rest]
        recorded = entries(coordinator)
        moved = [entry for entry in recorded.values() if len(entry.get("attempts") or []) > 1]
        t.timed(seconds)
        t.outcome = f"{len(values)} results, {len(moved)} call(s) moved; host {state}"
        t.note(lost=CALLS - len(set(values)), duplicated=len(values) - len(set(values)), moved=len(moved))
        left = audit_remote(pool_host, baseline)
        t.audit(left)
        assert values == list(range(CALLS)), values
        assert len(recorded) == CALLS and all(entry["status"] == "done" for entry in recorded.values())
        assert moved and all(entry["attempts"][-1]["host"] == "rx-testbed-1" for entry in moved)
        assert seconds <= bound, seconds
        assert left.clean, left.describe()


@pytest.mark.timeout(120)
def test_pool_worker_killed_mid_call(rig: Rig, pool_host: TestbedHost, coordinator: Coordinator,
                                     trial: TrialFactory) -> None:
    baseline = remote_baseline(pool_host)
    with trial("pool_worker_killed", variant="SIGKILL to the slot's worker", bound=10.0) as t:
        with Executor([pool_host.alias]) as pool:
            assert pool.submit(pool_tasks.slow, -1, 0.0).result(timeout=60)[0] == -1  # the slot's worker is up
            future = pool.submit(pool_tasks.slow, 7, 3.0)
            time.sleep(1.0)
            root_sh(pool_host, "pkill -KILL -u rx -f 'remote_exec.runner import main.* worker'")
            killed_at = time.monotonic()
            value, _ = future.result(timeout=60)
            seconds = time.monotonic() - killed_at
        recorded = [entry for entry in entries(coordinator).values() if len(entry.get("attempts") or []) > 1]
        t.timed(seconds)
        t.outcome = f"value {value} after {len(recorded[0]['attempts']) if recorded else 1} attempts"
        left = audit_remote(pool_host, baseline)
        t.audit(left)
        assert value == 7
        assert len(recorded) == 1 and [a["status"] for a in recorded[0]["attempts"]] == ["failed", "done"]
        # A worker killed with SIGKILL cleans nothing up: the fresh worker that took the call again swept its
        # run directory (its lock file named it).
        assert left.clean, left.describe()
