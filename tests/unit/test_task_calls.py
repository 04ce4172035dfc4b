"""Each ``@task`` call is its own record, also with the same arguments; ``keep_warm`` calls from many
threads run side by side; a persistent worker that dies says how, as a per-call run does."""

from __future__ import annotations

import os
import signal
import threading
import time
import warnings
from typing import Any

import pytest

from remote_exec import Configuration, SubprocessAdvice, task
from remote_exec.coordinator import Coordinator
from remote_exec.errors import RunnerError
from remote_exec.workspace import Workspace


@pytest.fixture
def sub(isolated: Any) -> Configuration:
    """A configuration whose chain ``sub`` runs tasks in a subprocess."""
    return Configuration().add_chain("sub", [SubprocessAdvice()])


def _tasks(isolated: Any) -> dict[str, dict[str, Any]]:
    Coordinator.current().flush()
    (run,) = Workspace(isolated.workspace).runs()
    return run.tasks()


def test_calls_with_the_same_arguments_are_each_their_own_record(sub: Configuration, isolated: Any) -> None:
    double = task(chain="sub", config=sub)(lambda x: 2 * x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert [double(4), double(4), double(5)] == [8, 8, 10]
        tasks = _tasks(isolated)
    assert not [w for w in caught if "Duplicate name" in str(w.message)], [str(w.message) for w in caught]
    assert len(tasks) == 3 and all(entry["status"] == "done" for entry in tasks.values()), tasks
    first, second, third = sorted(tasks, key=lambda key: tasks[key]["started"])
    assert second == f"{first}-2" and tasks[first]["execution_id"] == tasks[second]["execution_id"]
    assert tasks[third]["execution_id"] != tasks[first]["execution_id"]
    (run,) = Workspace(isolated.workspace).runs()
    assert all(run.call_record(f"sessions/{key}.session") for key in tasks)


def _nap(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def test_keep_warm_calls_from_threads_run_side_by_side_each_recorded(sub: Configuration, isolated: Any) -> None:
    nap = task(chain="sub", config=sub, keep_warm=True)(_nap)
    nap(0.0)  # one worker warm
    pids: list[int] = []
    lock = threading.Lock()

    def two_calls() -> None:
        for _ in range(2):
            pid = nap(0.5)
            with lock:
                pids.append(pid)

    started = time.monotonic()
    threads = [threading.Thread(target=two_calls) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    seconds = time.monotonic() - started
    assert len(pids) == 16
    assert len(set(pids)) == 4, pids  # MAX_WORKERS_PER_HOST workers, each reused
    assert seconds < 16 * 0.5 / 2, seconds  # one after another would take 8 s
    tasks = _tasks(isolated)
    assert len(tasks) == 17 and all(entry["status"] == "done" for entry in tasks.values())


def _kill_own_process() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_killed_keep_warm_worker_is_reported_like_a_killed_task(sub: Configuration, isolated: Any) -> None:
    killed = task(chain="sub", config=sub, keep_warm=True)(_kill_own_process)
    with pytest.raises(RunnerError, match="killed by SIGKILL") as raised:
        killed()
    assert raised.value.reason == "signal"
    assert "connection was lost" not in str(raised.value)
    nap = task(chain="sub", config=sub, keep_warm=True)(_nap)
    assert nap(0.0) != os.getpid()  # the next call gets a fresh worker
    entries = sorted(_tasks(isolated).values(), key=lambda entry: entry["started"])
    assert entries[0]["status"] == "failed" and entries[0]["result_status"] == "signal", entries[0]
    assert entries[0]["exit_code"] == 137
