"""The workspace's lock between processes (``flock``): exclusive across processes, released when its holder
dies, reentrant within one object."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from remote_exec.workspace.oslock import LockTimeout, ProcessLock

HOLD = """
import sys, time
from remote_exec.workspace.oslock import ProcessLock
lock = ProcessLock(sys.argv[1])
lock.acquire(5)
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def _holder(path: Path, seconds: float) -> subprocess.Popen[str]:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path), str(seconds)], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout is not None
    with holder.stdout:
        assert holder.stdout.readline() == "held\n"
    return holder


def test_another_process_waits_and_times_out(tmp_path: Path) -> None:
    path = tmp_path / ".state.json.lock"
    holder = _holder(path, 30)
    try:
        lock = ProcessLock(path)
        began = time.monotonic()
        with pytest.raises(LockTimeout):
            lock.acquire(0.3)
        assert 0.25 < time.monotonic() - began < 5
        with pytest.raises(LockTimeout):
            lock.acquire(0)
        assert not lock.held
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_holder_releases_the_lock(tmp_path: Path) -> None:
    path = tmp_path / ".state.json.lock"
    holder = _holder(path, 30)
    holder.kill()
    holder.wait()
    lock = ProcessLock(path)
    lock.acquire(2)
    assert lock.held
    lock.release()
    assert not lock.held


def test_a_waiter_gets_the_lock_once_the_holder_lets_go(tmp_path: Path) -> None:
    path = tmp_path / ".state.json.lock"
    holder = _holder(path, 0.4)
    try:
        lock = ProcessLock(path)
        lock.acquire(10)
        assert lock.held
        lock.release()
    finally:
        holder.wait()


def test_reentrant_within_one_object(tmp_path: Path) -> None:
    lock = ProcessLock(tmp_path / "x.lock")
    lock.acquire(0)
    lock.acquire(0)
    lock.release()
    assert lock.held  # the outer hold remains
    lock.release()
    assert not lock.held
    other = ProcessLock(tmp_path / "x.lock")
    other.acquire(0)
    other.release()
