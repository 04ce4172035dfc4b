"""Run directories on the host: each names its runner; the sweep removes those whose runner died, keeps the
others, and gives a detached run's directory its days to be collected."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from remote_exec.runner.rundir import DETACHED_KEEP_DAYS, RunStatus, make_run_dir, owner_token, rmtree, sweep_runs


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(done.stdout)


def test_the_sweep_removes_the_directories_of_dead_runners_only(tmp_path: Path) -> None:
    cache = str(tmp_path)
    mine = make_run_dir(cache, {"run_id": "live"}, private=False)
    dead = Path(cache, "runs", f"gone-{owner_token().replace(str(os.getpid()), str(_dead_pid()), 1)}-0000aaaa")
    (dead / "deep").mkdir(parents=True)
    (dead / "deep" / "data.bin").write_bytes(b"x" * 1000)
    kept = make_run_dir(cache, {"run_id": "kept"})
    RunStatus(kept, keep=True).update()
    Path(kept).rename(Path(cache, "runs", dead.name.replace("gone", "kept")))
    foreign = Path(cache, "runs", "not-an-rx-name")  # whose owner cannot be told: left alone
    foreign.mkdir()
    removed = sweep_runs(cache)
    assert removed == [dead.name]
    assert sorted(os.listdir(Path(cache, "runs"))) == sorted([Path(mine).name, dead.name.replace("gone", "kept"),
                                                              "not-an-rx-name"])
    assert sweep_runs(cache) == []  # at most once a minute


def test_a_detached_run_waits_for_attach_while_its_supervisor_lives_and_for_days_after(tmp_path: Path) -> None:
    from remote_exec.runner.contain import identity

    cache = str(tmp_path)
    running = make_run_dir(cache, {"run_id": "running"})
    RunStatus(running, state="running", detached=True, supervisor=identity(os.getpid())).update()
    done = make_run_dir(cache, {"run_id": "done"})
    RunStatus(done, state="done", detached=True, supervisor=identity(os.getpid())).update()
    lost = make_run_dir(cache, {"run_id": "lost"})
    RunStatus(lost, state="running", detached=True, supervisor={"pid": _dead_pid(), "start": "1"}).update()
    old = time.time() - (DETACHED_KEEP_DAYS + 1) * 86400
    os.utime(os.path.join(lost, ".rx"), (old, old))
    assert sweep_runs(cache) == [os.path.basename(lost)]
    assert sweep_runs(cache, now=time.time() + (DETACHED_KEEP_DAYS + 1) * 86400) == [os.path.basename(done)]
    assert os.path.isdir(running)


def test_rmtree_removes_what_the_task_made_unreadable(tmp_path: Path) -> None:
    root = tmp_path / "run"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "f").write_text("x")
    (root / "ro").mkdir()
    (root / "ro" / "g").write_text("y")
    os.chmod(root / "a", 0)
    os.chmod(root / "ro", 0o500)
    rmtree(str(root))
    assert not root.exists()
    rmtree(str(root))  # already gone: nothing to do


def test_the_sweep_ends_what_is_left_in_a_dead_runners_cgroup(tmp_path: Path) -> None:
    """Where a cgroup held the task, whatever a killed runner left in it is stopped by the sweep."""
    from remote_exec.runner.contain import _own_cgroup

    parent = _own_cgroup()
    if parent is None:
        import pytest

        pytest.skip("no writable cgroup v2 here")
    cache = str(tmp_path)
    name = f"gone-{owner_token().replace(str(os.getpid()), str(_dead_pid()), 1)}-0000bbbb"
    os.makedirs(os.path.join(cache, "runs", name))
    group = os.path.join(parent, f"rx-{name}")
    os.mkdir(group)
    left = subprocess.Popen(["sleep", "60"])
    with open(os.path.join(group, "cgroup.procs"), "w") as stream:
        stream.write(str(left.pid))
    assert sweep_runs(cache) == [name]
    assert left.wait(5) == -9 and not os.path.exists(group)
