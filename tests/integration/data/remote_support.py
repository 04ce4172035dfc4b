"""Fixtures and helpers for the remote-execution integration tests (a pytest plugin).

The test modules put this folder on ``sys.path`` and load this module with ``pytest_plugins``. Every test
that uses :func:`remote` runs once per backend (``openssh``, ``paramiko``) against the session testbed,
with its own workspace, archive cache and project folder as the current directory:

    def test_something(remote: Remote) -> None:
        done = remote.rx("run", "--remote", HOST, "script.py")
"""

from __future__ import annotations

import gc
import json
import os
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from testbed import Testbed, TestbedHost, exec_root

__all__ = [
    "BACKENDS",
    "DATA",
    "HOST",
    "REPO",
    "SCRIPTS",
    "Remote",
    "Streamed",
    "backend_name",
    "closed_port",
    "fresh_workdir",
    "remote",
    "settle_background_reapers",
    "silent_listener",
]

DATA = Path(__file__).resolve().parent
SCRIPTS = DATA / "scripts"
REPO = DATA.parents[2]
HOST = "rx-testbed-1"
BACKENDS = ("openssh", "paramiko")
#: Seconds any single rx command of these tests may take before it counts as hung.
RX_TIMEOUT = 90.0


@dataclass(frozen=True)
class Streamed:
    """An rx process whose stdout was read line by line as it came.

    Attributes:
        returncode: The exit status.
        lines: ``(seconds since start, line without its newline)`` for each stdout line, in order.
        stderr: Everything on stderr.
        duration: Seconds from start to exit.
    """

    returncode: int
    lines: list[tuple[float, bytes]]
    stderr: str
    duration: float


@dataclass
class Remote:
    """One test's view of the testbed for one backend.

    Attributes:
        testbed: The session testbed.
        backend: ``openssh`` or ``paramiko`` (also in ``RX_BACKEND``).
        project: The current directory: a fresh project folder.
        workspace: ``RX_WORKSPACE``.
        cache: ``RX_CACHE_DIR`` (the local archive cache).
        env: The environment rx subprocesses get (the test's, plus PYTHONPATH to this checkout).
    """

    testbed: Testbed
    backend: str
    project: Path
    workspace: Path
    cache: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def host(self) -> TestbedHost:
        """The testbed host behind :data:`HOST`."""
        return self.testbed.host(0)

    def copy_script(self, name: str, as_name: str | None = None) -> Path:
        """Copy ``scripts/<name>`` into the project (as ``as_name``); return the copy's path."""
        target = self.project / (as_name or name)
        shutil.copyfile(SCRIPTS / name, target)
        return target

    def argv(self, *args: str) -> list[str]:
        """The command line of ``rx ARGS`` (``python -m remote_exec``)."""
        return [sys.executable, "-m", "remote_exec", *args]

    def rx(
        self,
        *args: str,
        timeout: float = RX_TIMEOUT,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``rx ARGS`` in the project folder and return it finished (output decoded as UTF-8)."""
        done = subprocess.run(
            self.argv(*args),
            cwd=self.project,
            env={**self.env, **(env or {})},
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        return subprocess.CompletedProcess(
            done.args, done.returncode, done.stdout.decode("utf-8", "replace"), done.stderr.decode("utf-8", "replace")
        )

    def rx_streamed(self, *args: str, timeout: float = RX_TIMEOUT) -> Streamed:
        """Run ``rx ARGS`` and timestamp each stdout line when it arrives."""
        started = time.monotonic()
        lines: list[tuple[float, bytes]] = []
        errors: list[bytes] = []
        with subprocess.Popen(self.argv(*args), cwd=self.project, env=self.env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) as process:
            assert process.stdout is not None and process.stderr is not None
            stderr = process.stderr
            reader = threading.Thread(target=lambda: errors.append(stderr.read()), daemon=True)
            reader.start()
            try:
                for line in iter(process.stdout.readline, b""):
                    lines.append((time.monotonic() - started, line.rstrip(b"\n")))
                returncode = process.wait(timeout=timeout)
            finally:
                if process.poll() is None:
                    process.kill()
                reader.join(10)
        duration = time.monotonic() - started
        return Streamed(returncode, lines, b"".join(errors).decode("utf-8", "replace"), duration)

    def json(self, *args: str) -> Any:
        """``rx ARGS --json`` parsed; fails the test if rx fails."""
        done = self.rx(*args, "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def latest(self) -> dict[str, Any]:
        """``rx show latest --json``."""
        info: dict[str, Any] = self.json("show", "latest")
        return info

    def run_dir(self, run_id: str) -> Path:
        """The local directory of run ``run_id``."""
        return self.workspace / "runs" / run_id

    def files_of(self, run_id: str) -> dict[str, bytes]:
        """The files a run pulled back: relative POSIX path -> content."""
        root = self.run_dir(run_id) / "files"
        if not root.is_dir():
            return {}
        return {
            path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()
        }


@pytest.fixture(params=BACKENDS)
def backend_name(request: pytest.FixtureRequest) -> str:
    """Each backend in turn."""
    name: str = request.param
    return name


def settle_background_reapers(timeout: float = 15.0) -> None:
    """Wait for the threads that reap finished runner processes after ``@task`` calls, then collect garbage.

    rx ends each call's runner in a background thread; waiting here keeps anything that thread does (or
    leaves behind) inside the test that made the call.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not [thread for thread in threading.enumerate() if thread.name.endswith("(_reap)")]:
            break
        time.sleep(0.05)
    gc.collect()


@pytest.fixture
def remote(
    testbed: Testbed, backend_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Remote]:
    """The environment of one test: testbed ssh_config, backend, workspace, cache, project folder (a project:
    it holds a pyproject.toml, so runs happen in snapshots of it)."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "pyproject.toml").write_text('[project]\nname = "rx-test-project"\nversion = "0"\n')
    workspace = tmp_path / "ws"
    cache = tmp_path / "cache"
    monkeypatch.setenv("RX_SSH_CONFIG", str(testbed.ssh_config))
    monkeypatch.setenv("RX_BACKEND", backend_name)
    monkeypatch.setenv("RX_WORKSPACE", str(workspace))
    monkeypatch.setenv("RX_CACHE_DIR", str(cache))
    monkeypatch.delenv("RX_DEBUG", raising=False)
    monkeypatch.chdir(project)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONIOENCODING"] = "utf-8"
    env.pop("COLUMNS", None)
    yield Remote(testbed=testbed, backend=backend_name, project=project, workspace=workspace, cache=cache, env=env)
    settle_background_reapers()


@pytest.fixture
def fresh_workdir(testbed: Testbed) -> Iterator[str]:
    """A remote workdir (``~/...``) of this test alone, so it starts without any archive; removed after."""
    name = f".cache/rx-test-{secrets.token_hex(6)}"
    yield f"~/{name}"
    exec_root(testbed.host(0), f"rm -rf {shlex.quote('/home/rx/' + name)}")


def closed_port() -> int:
    """A port on 127.0.0.1 nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.fixture
def silent_listener() -> Iterator[int]:
    """A port on 127.0.0.1 that completes TCP handshakes and then says nothing, like a hung host."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener.getsockname()[1]


def write_ssh_config(path: Path, testbed: Testbed, entries: Sequence[tuple[str, str, int]]) -> Path:
    """An ssh_config with one block per ``(alias, hostname, port)``, using the testbed's key."""
    blocks = []
    for alias, hostname, port in entries:
        blocks.append(
            f"Host {alias}\n    HostName {hostname}\n    Port {port}\n    User rx\n"
            f'    IdentityFile "{testbed.identity_file}"\n    IdentitiesOnly yes\n'
            f'    UserKnownHostsFile "{path.parent / "known_hosts"}"\n'
            "    StrictHostKeyChecking accept-new\n    LogLevel ERROR\n"
        )
    path.write_text("\n".join(blocks), encoding="utf-8")
    return path
