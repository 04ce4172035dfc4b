"""The task process a per-call runner forks before its call arrives (runner/prefork.py): it runs the call
as a task process forked afterwards would, and it never outlives a call that did not come."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from remote_exec.runner.prefork import GO_LIMIT
from remote_exec.session import Session, wire_pickles
from remote_exec.task import Execution, Task

ROOT = Path(__file__).resolve().parents[2]

#: A per-call runner as the bootstrap starts it (its protocol on its own fd, leaving when done).
RUNNER = """
import os, sys
sys.path.insert(0, sys.argv[2])
from remote_exec.runner import main
out = os.dup(1)
os.dup2(2, 1)
sys.exit(main([sys.argv[1], "serve"], out, True))
"""


def _runner(tmp_path: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", RUNNER, str(tmp_path / "cache"), str(ROOT)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_a_session_by_value_and_a_large_one_run_as_before(dispatcher: Any) -> None:
    """A function by value (its session needs pickle: the early process loads it) and a session larger
    than the go pipe takes (the early process is dropped, the task forked as before) both run."""
    scale = 3

    def scaled(data: bytes) -> int:
        return len(data) * scale

    small = dispatcher.run(Task.from_function(scaled), (b"x" * 10,))
    large = dispatcher.run(Task.from_function(scaled), (os.urandom(GO_LIMIT + 1000),))
    assert small.result.value == 30
    assert large.result.value == (GO_LIMIT + 1000) * 3


def test_the_pickle_hint_follows_the_session() -> None:
    by_reference = Task.from_function(os.getcwd)
    assert not wire_pickles(Session(task=by_reference, execution=Execution.create(by_reference, ()),
                                    run_id="r").to_wire())
    by_value = Task.from_function(lambda: 1)  # read without the C pickle module (serialization's loader)
    assert not wire_pickles(Session(task=by_value, execution=Execution.create(by_value, ()), run_id="r").to_wire())
    assert wire_pickles(Session(task=by_value, execution=Execution.create(by_value, ({1, 2}.__class__,)),
                                run_id="r").to_wire())
    assert wire_pickles(Session(task=by_reference, execution=Execution.create(by_reference, ({1, 2}.__class__,)),
                                run_id="r").to_wire())


def test_a_call_that_never_comes_leaves_no_process(tmp_path: Path) -> None:
    """The coordinator closes the channel before the call: the runner ends, and so does its early task
    process (it holds the runner's stderr: the stream ends only once both are gone)."""
    runner = _runner(tmp_path)
    time.sleep(0.5)  # the early task process is forked and waits
    started = time.monotonic()
    _, stderr = runner.communicate(b"", timeout=20)
    assert runner.returncode == 0, stderr.decode()
    assert time.monotonic() - started < 10


def test_a_killed_runner_takes_its_early_task_process_along(tmp_path: Path) -> None:
    """SIGKILL to the runner before its call came: the early task process gets the parent-death signal."""
    runner = _runner(tmp_path)
    time.sleep(0.5)
    children = Path(f"/proc/{runner.pid}/task/{runner.pid}/children").read_text().split()
    assert len(children) == 1
    runner.send_signal(signal.SIGKILL)
    runner.wait(10)
    early = int(children[0])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(early):
        time.sleep(0.02)
    assert not _alive(early)
    assert runner.stdin is not None and runner.stdout is not None and runner.stderr is not None
    runner.stdin.close()
    runner.stdout.close()
    runner.stderr.close()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stream:
            return stream.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False
