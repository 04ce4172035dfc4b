"""Detached runs on the testbed, on both backends: ``rx run --detach`` returns at once and the run goes on
on the host; ``rx logs -f`` follows it from there; ``rx attach`` collects exit code, output and files
exactly as an attached run would; ``rx cancel`` stops its whole process group. Nothing stays on the host
once a run is collected."""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from testbed import exec_root

DATA = Path(__file__).resolve().parent / "data"
if str(DATA) not in sys.path:
    sys.path.insert(0, str(DATA))
pytest.register_assert_rewrite("remote_support")

from remote_support import HOST, Remote  # noqa: E402

pytest_plugins = ["remote_support"]

RUNS_UNDER = "/home/rx/.cache/remote_exec/runs"

TICKER = """\
import os, sys, time
print("cwd", os.getcwd(), flush=True)
for index in range(int(sys.argv[1])):
    print("tick", index, flush=True)
    time.sleep(0.5)
print("to stderr", file=sys.stderr, flush=True)
with open("result.txt", "w") as stream:
    stream.write("done {token}")
os.makedirs("sub", exist_ok=True)
with open("sub/data.bin", "wb") as stream:
    stream.write(bytes(range(256)))
print("bye", flush=True)
sys.exit(int(sys.argv[2]))
"""

# Prints its second line only once the file named by its argument exists on the host.
GATED = """\
import os, sys, time
print("tick 0", flush=True)
deadline = time.monotonic() + 60
while not os.path.exists(sys.argv[1]) and time.monotonic() < deadline:
    time.sleep(0.05)
print("tick 1", flush=True)
print("to stderr", file=sys.stderr, flush=True)
"""

SLEEPER = """\
import subprocess, time
subprocess.Popen(["sleep", "61.{token}"])
print("task started", flush=True)
time.sleep(60)
print("task finished", flush=True)
"""


def detach(remote: Remote, *args: str) -> str:
    """``rx run --detach --remote HOST ARGS``; the run id it printed."""
    started = time.monotonic()
    done = remote.rx("run", "--detach", "--remote", HOST, *args)
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 20
    run_id = done.stdout.strip()
    assert re.fullmatch(r"[\w-]+", run_id), done.stdout
    assert f"rx logs -f {run_id}" in done.stderr and f"rx attach {run_id}" in done.stderr, done.stderr
    return run_id


def remote_runs(remote: Remote) -> list[str]:
    """The run directories on the host."""
    code, listing = exec_root(remote.host, f"ls -A1 {RUNS_UNDER} 2>/dev/null; true")
    assert code == 0, listing
    return listing.split()


def remote_has(remote: Remote, needle: str) -> bool:
    """A process of the user rx whose command line holds ``needle`` runs on the host."""
    code, listing = exec_root(remote.host, "ps -eo user=,args=")
    assert code == 0, listing
    return any(line.startswith("rx ") and needle in line for line in listing.splitlines())


def wait_for(condition: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def test_a_detached_run_goes_on_without_rx_and_attach_collects_it(remote: Remote) -> None:
    token = secrets.token_hex(4)
    (remote.project / "ticker.py").write_text(TICKER.format(token=token))
    before = set(remote_runs(remote))

    run_id = detach(remote, "ticker.py", "6", "3")

    shown = remote.json("show", run_id)
    assert shown["status"] == "running" and shown["remote"] == HOST
    assert shown["coordinator"] is None and shown["detached"]["host"] == HOST
    listed = {run["run_id"]: run for run in remote.json("runs")}
    assert listed[run_id]["status"] == "running"
    # The run lives on the host in a run directory of its own, with nobody connected.
    assert len(set(remote_runs(remote)) - before) == 1
    attached = remote.rx("attach", run_id)
    assert attached.returncode == 3, attached.stderr  # the script's own exit status
    lines = attached.stdout.splitlines()
    assert lines[0].startswith(f"cwd {RUNS_UNDER}/")
    assert lines[1:] == [f"tick {index}" for index in range(6)] + ["bye"]
    assert "to stderr" in attached.stderr
    assert f"run {run_id} failed, exit 3" in attached.stderr
    info = remote.json("show", run_id)
    assert (info["status"], info["exit_code"]) == ("failed", 3)
    assert remote.files_of(run_id) == {"result.txt": f"done {token}".encode(), "sub/data.bin": bytes(range(256))}
    run_dir = remote.run_dir(run_id)
    assert (run_dir / "stdout.log").read_text() == attached.stdout
    assert (run_dir / "stderr.log").read_text() == "to stderr\n"
    assert set(remote_runs(remote)) == before
    # Collected: attaching again says so and gives the same exit status.
    again = remote.rx("attach", run_id)
    assert again.returncode == 3 and "nothing to attach" in again.stderr


def test_detach_json_prints_the_run_record(remote: Remote) -> None:
    (remote.project / "ticker.py").write_text(TICKER.format(token="json"))

    done = remote.rx("run", "--detach", "--json", "--remote", HOST, "ticker.py", "1", "0")

    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["status"] == "running" and info["detached"]["host"] == HOST
    assert remote.rx("attach", info["run_id"]).returncode == 0
    assert remote.json("show", info["run_id"])["status"] == "finished"


def test_logs_follow_streams_from_the_host_and_attach_collects_each_line_once(remote: Remote) -> None:
    go = f"/tmp/rx-go-{secrets.token_hex(4)}"
    (remote.project / "gated.py").write_text(GATED)
    run_id = detach(remote, "gated.py", go)
    lines: list[str] = []
    follower = subprocess.Popen(remote.argv("logs", "-f", run_id), cwd=remote.project, env=remote.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    watchdog = threading.Timer(60, follower.kill)
    watchdog.start()
    try:
        assert follower.stdout is not None
        for raw in iter(follower.stdout.readline, b""):
            lines.append(raw.decode().rstrip("\n"))
            if lines[-1] == "tick 0":
                # The task prints its next line only now: what follows can only have come live.
                code, output = exec_root(remote.host, f"touch {go}")
                assert code == 0, output
        stderr = follower.communicate()[1].decode()
    finally:
        watchdog.cancel()
        if follower.poll() is None:
            follower.kill()
        follower.wait()
        exec_root(remote.host, f"rm -f {go}")

    assert follower.returncode == 0, stderr
    assert lines == ["tick 0", "tick 1"], lines
    assert f"rx attach {run_id}" in stderr
    assert remote.json("show", run_id)["status"] == "running"  # followed, not collected
    stderr_only = remote.rx("logs", "-f", "--stderr", run_id)
    assert stderr_only.returncode == 0 and stderr_only.stdout == "to stderr\n", stderr_only

    attached = remote.rx("attach", run_id)

    assert attached.returncode == 0, attached.stderr
    assert (remote.run_dir(run_id) / "stdout.log").read_text() == "tick 0\ntick 1\n"
    assert remote.json("show", run_id)["status"] == "finished"


def test_cancel_stops_the_process_group_and_collects_what_is_left(remote: Remote) -> None:
    token = str(secrets.randbelow(10**6))
    (remote.project / "sleeper.py").write_text(SLEEPER.format(token=token))
    before = set(remote_runs(remote))
    run_id = detach(remote, "sleeper.py")
    assert wait_for(lambda: remote_has(remote, f"sleep 61.{token}"), 20), "the task never started"

    started = time.monotonic()
    cancelled = remote.rx("cancel", run_id)

    assert cancelled.returncode == 130, cancelled.stderr
    assert time.monotonic() - started < 15
    # The task got SIGINT first, as from a terminal's Ctrl-C: its own KeyboardInterrupt traceback, no rx one.
    assert "KeyboardInterrupt" in cancelled.stderr
    assert cancelled.stderr.count("Traceback") == cancelled.stderr.count("\nKeyboardInterrupt"), cancelled.stderr
    assert wait_for(lambda: not remote_has(remote, f"sleep 61.{token}"), 5), "the task's child survived"
    info = remote.json("show", run_id)
    assert (info["status"], info["exit_code"]) == ("cancelled", 130)
    log = (remote.run_dir(run_id) / "stdout.log").read_text()
    assert "task started" in log and "task finished" not in log
    assert set(remote_runs(remote)) == before
    again = remote.rx("cancel", run_id)
    assert again.returncode == 0 and "already cancelled" in again.stderr


def test_attach_refuses_a_run_that_was_not_detached(remote: Remote) -> None:
    (remote.project / "ticker.py").write_text(TICKER.format(token="plain"))
    assert remote.rx("run", "--remote", HOST, "ticker.py", "1", "0").returncode == 0

    refused = remote.rx("attach", "latest")

    assert refused.returncode == 3
    assert "not started with --detach" in refused.stderr and "Traceback" not in refused.stderr
