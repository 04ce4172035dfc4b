"""The rx server against the testbed, on both backends: the command after the first runs in the server's
worker, and a user sees what they saw without it: output, stdin, exit status, the files the run wrote."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent / "data"
if str(DATA) not in sys.path:
    sys.path.insert(0, str(DATA))
pytest.register_assert_rewrite("remote_support")

from remote_support import HOST, Remote  # noqa: E402

from remote_exec.cli import server  # noqa: E402

pytest_plugins = ["remote_support"]


@pytest.fixture
def served(remote: Remote) -> Iterator[Path]:
    """Servers on for this test's rx commands, in a runtime directory of its own (so also its own ssh
    masters); the folder their sockets are in."""
    runtime = Path(tempfile.mkdtemp(prefix="rxs", dir="/tmp"))
    remote.env.update(XDG_RUNTIME_DIR=str(runtime), RX_SERVER="60")
    try:
        yield runtime / "rx-ssh"
    finally:
        server.stop_all(str(runtime / "rx-ssh"))
        for socket in (runtime / "rx-ssh").glob("m-*"):
            if not socket.name.endswith(".lock"):
                from remote_exec.prestart import exit_master

                exit_master(str(socket), HOST)
        shutil.rmtree(runtime, ignore_errors=True)


def test_a_second_remote_run_goes_through_the_server_and_lands_the_same(remote: Remote, served: Path) -> None:
    (remote.project / "job.py").write_text(
        "import sys, time\n"
        "data = sys.stdin.read()\n"
        "open('out.txt', 'w').write(data.upper())\n"
        "print('read', len(data), flush=True)\n"
        "print('to stderr', file=sys.stderr)\n"
        "time.sleep(2)\n"
        "sys.exit(5)\n")
    first = _rx(remote, "one\n")
    until = time.monotonic() + 30
    while time.monotonic() < until and not any(Path(s).exists() for _, s in server.servers(str(served))):
        time.sleep(0.05)
    (pid, _), = server.servers(str(served))

    client = subprocess.Popen(remote.argv("run", "--remote", HOST, "job.py"), cwd=remote.project, env=remote.env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert client.stdin is not None and client.stdout is not None
    client.stdin.write(b"second\n")
    client.stdin.close()
    line = client.stdout.readline()  # the script runs (and sleeps): who runs this command?
    running = [json.loads(path.read_text()) for path in (remote.workspace / "runs").glob("*/state.json")]
    worker = next(record["coordinator"]["pid"] for record in running if record["status"] == "running")
    parent = _parent(worker)
    out = client.stdout.read()
    assert client.stderr is not None
    err = client.stderr.read()  # (a few lines: the pipe does not fill)
    client.wait(timeout=120)
    client.stdout.close()
    client.stderr.close()

    assert worker != client.pid and parent == pid  # a worker the server forked ran the command
    assert first.returncode == 5 and first.stdout == "read 4\n" and "to stderr" in first.stderr, first.stderr
    assert client.returncode == 5, err
    assert line + out == b"read 7\n" and b"to stderr" in err
    runs = json.loads(remote.rx("runs", "--json").stdout)
    assert [run["exit_code"] for run in runs] == [5, 5]
    landed = remote.workspace / "runs" / runs[1]["run_id"] / "files" / "out.txt"
    assert landed.read_text() == "SECOND\n"


def _rx(remote: Remote, stdin: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(remote.argv("run", "--remote", HOST, "job.py"), cwd=remote.project, env=remote.env,
                          input=stdin, capture_output=True, text=True, timeout=120, check=False)


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None
