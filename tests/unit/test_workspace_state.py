"""StateFile, ActionTracker and StatusBoard: atomic, locked read-modify-write across threads and processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import remote_exec
from remote_exec.errors import WorkspaceError
from remote_exec.workspace.state import ActionTracker, StateFile, StatusBoard, parse_time

REPO = Path(remote_exec.__file__).resolve().parent.parent


def test_read_missing_is_empty_and_update_creates(tmp_path: Path) -> None:
    state = StateFile(tmp_path / "state.json")
    assert state.read() == {}
    assert not state.exists()
    new = state.update(lambda s: s.__setitem__("a", 1))
    assert new == {"a": 1}
    assert json.loads((tmp_path / "state.json").read_text()) == {"a": 1}


def test_update_may_return_a_new_state(tmp_path: Path) -> None:
    state = StateFile(tmp_path / "state.json")
    state.update(lambda s: {"replaced": True})
    assert state.read() == {"replaced": True}


def test_a_failing_update_writes_nothing(tmp_path: Path) -> None:
    state = StateFile(tmp_path / "state.json")
    state.update(lambda s: s.__setitem__("n", 1))

    def bad(s: dict[str, object]) -> None:
        s["n"] = 2
        raise RuntimeError("changed my mind")

    with pytest.raises(RuntimeError):
        state.update(bad)
    assert state.read() == {"n": 1}
    with pytest.raises(WorkspaceError, match="cannot save"):
        state.update(lambda s: s.__setitem__("x", object()))
    assert state.read() == {"n": 1}


def test_unparseable_state_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(WorkspaceError, match="not valid JSON"):
        StateFile(tmp_path / "state.json").read()
    (tmp_path / "state.json").write_text("[1, 2]")
    with pytest.raises(WorkspaceError, match="not an object"):
        StateFile(tmp_path / "state.json").read()


def test_threads_lose_no_update(tmp_path: Path) -> None:
    path = tmp_path / "state.json"

    def work() -> None:
        state = StateFile(path)  # one instance per thread, as separate Run objects would have
        for _ in range(50):
            state.update(lambda s: s.__setitem__("n", s.get("n", 0) + 1))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert StateFile(path).read()["n"] == 400


_WORKER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from remote_exec.workspace.state import ActionTracker, StateFile

    path, worker = Path(sys.argv[1]), sys.argv[2]
    state = StateFile(path)
    tracker = ActionTracker(state)
    for i in range(50):
        state.update(lambda s: s.__setitem__("counter", s.get("counter", 0) + 1))
        with tracker.action(f"{worker}-{i}", host=worker):
            pass
""")


def test_eight_processes_fifty_updates_each_lose_none(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(path), f"w{n}"], env=env)
             for n in range(8)]
    for proc in procs:
        assert proc.wait(timeout=120) == 0
    elapsed = time.perf_counter() - started
    state = StateFile(path).read()
    assert state["counter"] == 400
    actions = state["actions"]
    assert len(actions) == 400
    assert {a["name"] for a in actions} == {f"w{n}-{i}" for n in range(8) for i in range(50)}
    assert all(a["status"] == "finished" and a["finished"] for a in actions)
    # Each worker's actions appear in its own order.
    for n in range(8):
        mine = [a["name"] for a in actions if a["host"] == f"w{n}"]
        assert mine == [f"w{n}-{i}" for i in range(50)]
    print(f"8 processes x 50 counter updates + 50 actions (1200 locked rewrites): {elapsed:.2f} s")
    assert not list(tmp_path.glob(".state.json.*.tmp"))


def test_action_records_success_and_failure(tmp_path: Path) -> None:
    tracker = ActionTracker(StateFile(tmp_path / "state.json"))
    with tracker.action("pack"):
        pass
    with pytest.raises(KeyError), tracker.action("connect", host="gpu1"):
        raise KeyError("nope")
    pack, connect = tracker.actions()
    assert pack["status"] == "finished" and pack["error"] is None
    started, finished = parse_time(pack["started"]), parse_time(pack["finished"])
    assert started is not None and finished is not None and started <= finished
    assert connect["status"] == "failed" and connect["host"] == "gpu1"
    assert connect["error"] == "KeyError: 'nope'"
    assert tracker.finished("pack") and not tracker.finished("connect") and not tracker.finished("execute")


def test_status_board(tmp_path: Path) -> None:
    board = StatusBoard(StateFile(tmp_path / "state.json"))
    board.started("a", name="train", host="gpu1")
    assert board.tasks()["a"]["status"] == "running"
    board.finished("a", ok=True)
    board.started("b", name="eval", host=None)
    board.finished("b", ok=False, error="ZeroDivisionError: division by zero")
    board.set("c", "waiting", execution_id="abc123")
    tasks = board.tasks()
    assert tasks["a"]["status"] == "done" and tasks["a"]["duration"] is not None
    assert tasks["a"]["name"] == "train" and tasks["a"]["host"] == "gpu1"
    assert tasks["b"]["status"] == "failed" and tasks["b"]["error"].startswith("ZeroDivisionError")
    assert tasks["c"] == {**tasks["c"], "status": "waiting", "execution_id": "abc123", "finished": None}
    board.set("c", "skipped")
    assert board.tasks()["c"]["finished"] is not None
    with pytest.raises(WorkspaceError, match="unknown task status"):
        board.set("c", "exploded")


def test_status_board_threads_report_concurrently(tmp_path: Path) -> None:
    state = StateFile(tmp_path / "state.json")

    def work(n: int) -> None:
        board = StatusBoard(state)
        for i in range(25):
            board.started(f"t{n}-{i}", name="f", host=f"h{n}")
            board.finished(f"t{n}-{i}", ok=i % 2 == 0, error=None if i % 2 == 0 else "boom")

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tasks = StatusBoard(state).tasks()
    assert len(tasks) == 200
    assert sum(t["status"] == "done" for t in tasks.values()) == 104
    assert sum(t["status"] == "failed" for t in tasks.values()) == 96


def test_an_update_keeps_what_another_writer_wrote_meanwhile(tmp_path: Path) -> None:
    ours, theirs = StateFile(tmp_path / "state.json"), StateFile(tmp_path / "state.json")
    ours.update(lambda state: state.update(a=1))
    theirs.update(lambda state: state.update(b=2))
    ours.update(lambda state: state.update(c=3))

    def half_done(state: dict[str, object]) -> None:
        state["d"] = 4
        raise RuntimeError("stopped halfway")

    with pytest.raises(RuntimeError):
        ours.update(half_done)
    ours.update(lambda state: state.update(e=5))
    assert StateFile(tmp_path / "state.json").read() == {"a": 1, "b": 2, "c": 3, "e": 5}
    assert json.loads((tmp_path / "state.json").read_text()) == {"a": 1, "b": 2, "c": 3, "e": 5}
