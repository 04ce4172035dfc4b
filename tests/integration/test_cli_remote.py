"""``rx check``, ``rx hosts`` and a missing remote interpreter against the testbed, on both backends."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from testbed import Testbed
from testbed.pytest_plugin import SSHCommand

DATA = Path(__file__).resolve().parent / "data"
if str(DATA) not in sys.path:
    sys.path.insert(0, str(DATA))
pytest.register_assert_rewrite("remote_support")

from remote_support import HOST, REPO, Remote  # noqa: E402

pytest_plugins = ["remote_support"]

MISSING = "/nonexistent/python3"


def remote_python_version(ssh: SSHCommand) -> str:
    done = ssh(HOST, "python3 -c 'import platform; print(platform.python_version())'")
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_check_reports_backend_round_trip_python_and_free_disk(remote: Remote, ssh: SSHCommand) -> None:
    version = remote_python_version(ssh)

    text = remote.rx("check", HOST)
    report = remote.json("check", HOST)

    assert text.returncode == 0, text.stderr
    assert f"{HOST} ok via {remote.backend}" in text.stdout
    assert re.search(r"round trip \d+(\.\d+)? ms", text.stdout), text.stdout
    assert re.search(rf"python\s+{re.escape(version)} ", text.stdout), text.stdout
    assert re.search(r"free disk\s+\d+(\.\d+)? GiB", text.stdout), text.stdout
    assert report["host"] == HOST
    assert report["backend"] == remote.backend
    assert report["python"] == version
    assert report["hostname"] == HOST
    assert 0 < report["rtt_ms"] < 5000
    assert report["free_bytes"] > 0
    assert report["workdir"] == "/home/rx/.cache/remote_exec"


def test_hosts_lists_the_testbed_aliases_from_ssh_config(testbed: Testbed, tmp_path: Path) -> None:
    # Backend-independent: rx hosts only reads ssh_config and [tool.rx.remotes].
    env = {**os.environ, "RX_SSH_CONFIG": str(testbed.ssh_config), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "remote_exec", "hosts", "--json"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60, check=False)

    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    aliases = re.findall(r"^Host\s+(\S+)\s*$", testbed.ssh_config.read_text(), flags=re.MULTILINE)
    assert {"rx-testbed-1", "rx-testbed-2"} <= set(aliases)
    assert [row["name"] for row in rows] == aliases
    assert {row["source"] for row in rows} == {"ssh_config"}


def test_a_missing_interpreter_is_one_line_and_exit_3(remote: Remote) -> None:
    remote.copy_script("exit_with.py")

    done = remote.rx("run", "--remote", HOST, "--python", MISSING, "exit_with.py", "0")
    checked = remote.rx("check", HOST, "--python", MISSING)

    for result in (done, checked):
        assert result.returncode == 3, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert f"{MISSING} not found on {HOST}" in lines[0]
    assert done.stdout == ""
    info = remote.latest()
    assert (info["status"], info["exit_code"]) == ("failed", 3)
    assert f"{MISSING} not found on {HOST}" in info["error"]


def test_rx_run_starts_its_runner_from_its_raw_command_line(remote: Remote) -> None:
    """A plain ``rx run --remote HOST SCRIPT`` line starts the script's runner before the line is parsed (and
    before typer is imported); the run takes that one. ``--python`` is read too: that runner is started with
    it (one that did not fit the parsed run would be stopped and another started: tests/unit/test_runner_ahead)."""
    remote.copy_script("exit_with.py")

    plain = remote.rx("-vv", "run", "--remote", HOST, "exit_with.py", "0")
    other = remote.rx("-vv", "run", "--remote", HOST, "--python", "/usr/bin/python3", "exit_with.py", "0")

    for done in (plain, other):
        assert done.returncode == 0, done.stderr
        assert "the runner started from the command line fits this run" in done.stderr, done.stderr
        assert "the call takes the runner started ahead" in done.stderr
        assert "does not fit" not in done.stderr
    assert remote.latest()["status"] == "finished"


def test_rx_run_takes_the_runner_it_started_while_recording_the_run(remote: Remote) -> None:
    """The runner starts while the run is recorded; the call takes that one rather than starting another
    (its connect still counted in the run's phases)."""
    remote.copy_script("exit_with.py")

    # (--connect-timeout: no head start from the raw command line, see the test above)
    done = remote.rx("-vv", "run", "--connect-timeout", "20", "--remote", HOST, "exit_with.py", "0")

    assert done.returncode == 0, done.stderr
    assert "the call takes the runner started ahead" in done.stderr, done.stderr
    assert "does not fit" not in done.stderr and "from the command line" not in done.stderr
    actions = {action["name"]: action for action in remote.latest()["actions"]}
    assert actions["connect"]["status"] == "finished" and actions["execute"]["status"] == "finished"
    # its times are when it connected, not when the call took it
    assert actions["connect"]["started"] < actions["connect"]["finished"] <= actions["execute"]["started"]
