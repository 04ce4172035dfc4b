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


def _wait_for_pid(path: Path, timeout: float = 10) -> int:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return int(path.read_text())


def _status_files(cache: Path) -> list[dict[str, object]]:
    return [json.loads(path.read_text()) for path in cache.glob("local/runs/*/.rx/status.json")]


def test_a_dead_supervisor_makes_attach_say_lost_at_once(tmp_path: Path, env: dict[str, str]) -> None:
    """kill -9 of a detached run's supervisor (the OOM killer, a reboot): logs -f and attach do not wait
    forever; the run is reported lost; nothing of it keeps running or stays on the host."""
    detached = rx(tmp_path, env, "run", "-d", "--env", f"PID_FILE={env['PID_FILE']}", "ticker.py", "200", "0")
    run_id = detached.stdout.strip()
    task = _wait_for_pid(Path(env["PID_FILE"]))
    [status] = _status_files(tmp_path / "cache")
    supervisor = status["supervisor"]
    assert isinstance(supervisor, dict) and isinstance(supervisor["pid"], int)
    os.kill(supervisor["pid"], 9)
    for command in (("logs", "-f", run_id), ("attach", run_id)):
        began = time.monotonic()
        done = rx(tmp_path, env, *command, timeout=30)
        assert time.monotonic() - began < 15, command
    assert done.returncode == 3, done.stderr
    assert "supervisor" in done.stderr and "Traceback" not in done.stderr
    info = show(tmp_path, env, run_id)
    assert info["status"] == "lost" and "supervisor" in str(info["error"])
    deadline = time.monotonic() + 5
    while pid_alive(task) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(task)
    assert not list((tmp_path / "cache" / "local" / "runs").iterdir())


def test_cancel_never_signals_a_pid_that_is_another_process_now(tmp_path: Path, env: dict[str, str]) -> None:
    """The stored supervisor pid now names another process (pid reuse after the supervisor died): rx cancel
    leaves that process alone and reports the run lost."""
    detached = rx(tmp_path, env, "run", "-d", "--env", f"PID_FILE={env['PID_FILE']}", "ticker.py", "200", "0")
    run_id = detached.stdout.strip()
    _wait_for_pid(Path(env["PID_FILE"]))
    [path] = (tmp_path / "cache").glob("local/runs/*/.rx/status.json")
    status = json.loads(path.read_text())
    real = status["supervisor"]["pid"]
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        status["supervisor"]["pid"] = status["supervisor_pid"] = bystander.pid  # as if the pid were reused
        path.write_text(json.dumps(status))
        os.kill(real, 9)
        done = rx(tmp_path, env, "cancel", run_id, timeout=30)
        assert bystander.poll() is None, "rx cancel signalled a process that is not the run's supervisor"
        assert done.returncode == 3 and "supervisor" in done.stderr, done.stderr
    finally:
        bystander.kill()
        bystander.wait()


def test_a_result_the_coordinator_could_not_land_stays_on_the_host(tmp_path: Path, env: dict[str, str]) -> None:
    """The runner removes a detached run only once the coordinator acknowledged the landing: an attach that
    failed to write the result (here: a file size limit) leaves it for the next attach."""
    import resource

    (tmp_path / "big.py").write_text("open('big.bin', 'wb').write(b'x' * (4 << 20))\nprint('wrote')\n")
    detached = rx(tmp_path, env, "run", "-d", "big.py")
    run_id = detached.stdout.strip()
    limit = 1 << 20

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    refused = subprocess.run([sys.executable, "-m", "remote_exec", "attach", run_id], cwd=tmp_path, env=env,
                             text=True, capture_output=True, timeout=60, preexec_fn=small_files)
    assert refused.returncode != 0, refused.stderr
    assert list((tmp_path / "cache" / "local" / "runs").iterdir()), "the run was removed before it landed"
    again = rx(tmp_path, env, "attach", run_id)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "ws" / "runs" / run_id / "files" / "big.bin").stat().st_size == 4 << 20
    assert not list((tmp_path / "cache" / "local" / "runs").iterdir())


def test_a_secret_of_a_detached_run_is_never_written(tmp_path: Path, env: dict[str, str]) -> None:
    secret = "s3cr3t-" + os.urandom(8).hex()
    (tmp_path / "secret.py").write_text("import os, time\nprint(len(os.environ['RX_SECRET']))\ntime.sleep(1)\n")
    detached = rx(tmp_path, {**env, "RX_SECRET": secret}, "run", "-d", "--secret-env", "RX_SECRET", "secret.py")
    run_id = detached.stdout.strip()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not any(s.get("state") == "done" for s in _status_files(tmp_path / "cache")):
        time.sleep(0.1)
    for path in (tmp_path / "cache").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), f"the secret is in {path}"
    attached = rx(tmp_path, env, "attach", run_id)
    assert attached.returncode == 0 and attached.stdout.splitlines()[0] == str(len(secret)), attached.stderr
