"""Everything a task starts is stopped with it: a child that calls setsid or double-forks (a daemon) does
not outlive the call, on the task's normal end, its timeout, a Ctrl-C, or a persistent worker's call; what
had to be stopped after the task ended is named in the result. Both ways of containing are tried where this
machine offers them: a cgroup (when the runner's cgroup v2 is writable) and the subreaper's /proc walk."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from remote_exec.runner.contain import _own_cgroup, alive, identity

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="containment is checked through /proc")

# Starts a daemon the classic way (fork, setsid, fork again): its parent exits at once, so it is
# nobody's child in the task's session or group; it writes its pid where the test finds it.
DAEMON = """
import os, sys, time
def daemon(path):
    time.sleep(0.8)  # a task that runs a moment is moved into its cgroup (where there is one) first
    if os.fork():
        while not os.path.exists(path):
            time.sleep(0.01)
        return
    os.setsid()
    if os.fork():
        os._exit(0)
    with open("/proc/self/cgroup") as stream:
        cgroup = stream.read()
    with open(path + ".tmp", "w") as stream:
        stream.write(str(os.getpid()))
    with open(path + ".cgroup", "w") as stream:
        stream.write(cgroup)
    os.rename(path + ".tmp", path)
    time.sleep(300)
    os._exit(0)
"""


def _ways() -> list[Any]:
    ways = [pytest.param("proc", id="proc-walk")]
    if _own_cgroup() is not None:
        ways.append(pytest.param("cgroup", id="cgroup"))
    return ways


@pytest.fixture(params=_ways())
def way(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """How the runner contains the task: ``cgroup`` (only where this process may make one) or ``proc``."""
    if request.param == "proc":
        monkeypatch.setenv("RX_CONTAIN", "proc")
    else:
        monkeypatch.delenv("RX_CONTAIN", raising=False)
    return str(request.param)


def _wait_for_pid(path: Path, timeout: float = 20) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return int(path.read_text())
        time.sleep(0.02)
    raise AssertionError(f"no pid in {path}")


def _gone_within(pid: int, seconds: float = 5) -> bool:
    from tests.unit.conftest import Dispatcher

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if Dispatcher.gone(pid):
            return True
        time.sleep(0.05)
    return False


def test_a_daemon_the_task_started_is_stopped_when_it_ends_and_named(dispatcher: Any, way: str) -> None:
    pid_file = dispatcher.root / "daemon.pid"
    call = dispatcher.run(DAEMON + f"daemon({str(pid_file)!r})\nprint('task done')\n")
    daemon = _wait_for_pid(pid_file)
    assert call.result.ok
    assert _gone_within(daemon), f"daemon {daemon} outlived its task ({way})"
    header = call.outcome.header
    assert header["stray_count"] == 1 and f"(pid {daemon})" in header["stray"][0], header
    assert ("/rx-unit-" in pid_file.with_suffix(".pid.cgroup").read_text()) == (way == "cgroup")


def test_a_daemon_is_stopped_with_a_task_that_times_out(dispatcher: Any, way: str) -> None:
    pid_file = dispatcher.root / "daemon.pid"
    began = time.monotonic()
    call = dispatcher.run(DAEMON + f"daemon({str(pid_file)!r})\ntime.sleep(60)\n", timeout=1.0)
    assert call.result.status == "timeout" and time.monotonic() - began < 10
    assert _gone_within(_wait_for_pid(pid_file))


def test_a_daemon_is_stopped_with_a_task_interrupted_by_ctrl_c(dispatcher: Any, way: str) -> None:
    from remote_exec.errors import Interrupted

    pid_file = dispatcher.root / "daemon.pid"

    def interrupt() -> None:
        _wait_for_pid(pid_file)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    with pytest.raises(Interrupted):
        dispatcher.run(DAEMON + f"daemon({str(pid_file)!r})\ntime.sleep(60)\n")
    assert _gone_within(_wait_for_pid(pid_file))


def test_a_keep_warm_call_leaves_no_daemon_behind(dispatcher: Any) -> None:
    pid_file = dispatcher.root / "daemon.pid"
    namespace: dict[str, Any] = {}
    exec(DAEMON, namespace)  # the same daemon, as a function the worker runs in-process

    from remote_exec.task import Task

    def start_daemon(path: str) -> str:
        namespace["daemon"](path)
        return "started"

    start_daemon.__module__ = "__main__"
    call = dispatcher.run(Task.from_function(start_daemon), (str(pid_file),), keep_warm=True)
    assert call.result.value == "started"
    daemon = _wait_for_pid(pid_file)
    assert _gone_within(daemon)
    # The daemon, named; and (on a loaded machine) its intermediate parent too, when it had not finished
    # exiting yet as the call ended.
    assert f"(pid {daemon})" in " ".join(call.outcome.header["stray"])
    assert call.outcome.header["stray_count"] in (1, 2), call.outcome.header["stray"]


def test_a_process_is_named_by_pid_and_start_time() -> None:
    mine = identity(os.getpid())
    assert alive(mine)
    assert not alive(dict(mine, start=str(int(mine["start"]) + 1)))  # the same pid, another process
    assert not alive(dict(mine, boot="another-boot"))
    assert not alive({"pid": 0})
