"""Detached runs on the local backend: they outlive rx, are followed, collected and cancelled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = """
import os, sys, time
open(os.environ["PID_FILE"], "w").write(str(os.getpid()))
for i in range(int(sys.argv[1])):
    print("tick", i, flush=True)
    time.sleep(0.3)
open("result.txt", "w").write("done")
print("bye")
sys.exit(int(sys.argv[2]))
"""


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    environment = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    environment.update(RX_WORKSPACE=str(tmp_path / "ws"), RX_CACHE_DIR=str(tmp_path / "cache"),
                       PID_FILE=str(tmp_path / "task.pid"),
                       PYTHONPATH=os.pathsep.join(filter(None, [root, environment.get("PYTHONPATH")])))
    (tmp_path / "ticker.py").write_text(SCRIPT)
    return environment


def rx(tmp_path: Path, env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "remote_exec", *args], cwd=tmp_path, env=env, text=True,
                          capture_output=True, timeout=timeout)


def show(tmp_path: Path, env: dict[str, str], run_id: str) -> dict[str, object]:
    result = rx(tmp_path, env, "show", run_id, "--json")
    assert result.returncode == 0, result.stderr
    info: dict[str, object] = json.loads(result.stdout)
    return info


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_detached_run_outlives_rx_and_attach_collects_it(tmp_path: Path, env: dict[str, str]) -> None:
    started = time.monotonic()
    detached = rx(tmp_path, env, "run", "--detach", "--env", f"PID_FILE={env['PID_FILE']}", "ticker.py", "8", "3")
    assert detached.returncode == 0, detached.stderr
    assert time.monotonic() - started < 20
    run_id = detached.stdout.strip()
    assert run_id and "rx attach" in detached.stderr
    # rx has exited, yet the run is running (not lost) and its task is alive.
    info = show(tmp_path, env, run_id)
    assert info["status"] == "running"
    deadline = time.monotonic() + 10
    while not Path(env["PID_FILE"]).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pid_alive(int(Path(env["PID_FILE"]).read_text()))
    attached = rx(tmp_path, env, "attach", run_id)
    assert attached.returncode == 3, attached.stderr  # the script's own exit code
    assert "tick 0" in attached.stdout and "bye" in attached.stdout
    info = show(tmp_path, env, run_id)
    assert info["status"] == "failed" and info["exit_code"] == 3
    assert (tmp_path / "ws" / "runs" / run_id / "files" / "result.txt").read_text() == "done"
    assert b"tick 7" in (tmp_path / "ws" / "runs" / run_id / "stdout.log").read_bytes()
    # The host keeps nothing once the run is collected.
    runs_dir = tmp_path / "cache" / "local" / "runs"
    assert not list(runs_dir.iterdir())


def test_logs_follow_streams_a_detached_run_until_it_ends(tmp_path: Path, env: dict[str, str]) -> None:
    detached = rx(tmp_path, env, "run", "-d", "--env", f"PID_FILE={env['PID_FILE']}", "ticker.py", "4", "0")
    run_id = detached.stdout.strip()
    followed = rx(tmp_path, env, "logs", "-f", run_id)
    assert followed.returncode == 0, followed.stderr
    assert [line for line in followed.stdout.splitlines() if line.startswith("tick")] == [
        f"tick {i}" for i in range(4)]
    assert "rx attach" in followed.stderr
    assert show(tmp_path, env, run_id)["status"] == "running"  # followed, not yet collected
    assert rx(tmp_path, env, "attach", run_id).returncode == 0
    assert show(tmp_path, env, run_id)["status"] == "finished"


def test_cancel_stops_the_task_and_records_it(tmp_path: Path, env: dict[str, str]) -> None:
    detached = rx(tmp_path, env, "run", "-d", "--env", f"PID_FILE={env['PID_FILE']}", "ticker.py", "200", "0")
    run_id = detached.stdout.strip()
    deadline = time.monotonic() + 10
    while not Path(env["PID_FILE"]).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = int(Path(env["PID_FILE"]).read_text())
    cancelled = rx(tmp_path, env, "cancel", run_id)
    assert cancelled.returncode == 130, cancelled.stderr
    deadline = time.monotonic() + 5
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(pid)
    info = show(tmp_path, env, run_id)
    assert info["status"] == "cancelled"
    assert rx(tmp_path, env, "attach", run_id).returncode == 130  # nothing left to attach: says so


def test_attach_refuses_a_run_that_was_not_detached(tmp_path: Path, env: dict[str, str]) -> None:
    assert rx(tmp_path, env, "run", "--env", f"PID_FILE={env['PID_FILE']}", "ticker.py", "1", "0").returncode == 0
    result = rx(tmp_path, env, "attach", "latest")
    assert result.returncode == 3
    assert "not started with --detach" in result.stderr and "Traceback" not in result.stderr
