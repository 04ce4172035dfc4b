"""Fixtures and helpers for the Slurm tests (a pytest plugin): a project whose ``[tool.rx.remotes.cluster]``
is the Docker Slurm testbed's login node, and ways to drive ``rx`` and the cluster from a test.

    def test_something(cluster: Cluster) -> None:
        done = cluster.rx("run", "--remote", "cluster", "script.py")
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from testbed import SlurmCluster

__all__ = ["REPO", "Cluster", "cluster", "slurm_backend"]

REPO = Path(__file__).resolve().parents[3]
#: Seconds any single rx command of these tests may take before it counts as hung.
RX_TIMEOUT = 120.0


@dataclass
class Cluster:
    """One test's view of the Slurm testbed.

    Attributes:
        slurm: The session's cluster (containers, ssh_config).
        project: The current directory: a project whose remote ``cluster`` is the login node.
        workspace: ``RX_WORKSPACE``.
        env: The environment rx subprocesses get.
    """

    slurm: SlurmCluster
    project: Path
    workspace: Path
    env: dict[str, str] = field(default_factory=dict)
    started: list[subprocess.Popen[str]] = field(default_factory=list)

    def write(self, name: str, text: str) -> Path:
        """Write ``text`` (dedented) into the project as ``name``."""
        path = self.project / name
        path.write_text(textwrap.dedent(text))
        return path

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "remote_exec", *args]

    def rx(self, *args: str, timeout: float = RX_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """Run ``rx ARGS`` in the project and return it finished."""
        return subprocess.run(self.argv(*args), cwd=self.project, env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def python(self, script: str, *args: str, timeout: float = RX_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """Run a Python script of the project (``@task`` calls) and return it finished."""
        return subprocess.run([sys.executable, script, *args], cwd=self.project, env=self.env, capture_output=True,
                              text=True, timeout=timeout, check=False)

    def start(self, *args: str) -> subprocess.Popen[str]:
        """Start ``rx ARGS`` in the background (stdout and stderr piped; killed after the test)."""
        process = subprocess.Popen(self.argv(*args), cwd=self.project, env=self.env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.started.append(process)
        return process

    def stop_started(self) -> None:
        """Kill what :meth:`start` started and is still running; close its pipes."""
        for process in self.started:
            if process.poll() is None:
                process.kill()
            process.communicate(timeout=30)

    def show(self, run: str = "latest") -> dict[str, Any]:
        """``rx show RUN --json``."""
        done = self.rx("show", run, "--json")
        assert done.returncode == 0, done.stderr
        info: dict[str, Any] = json.loads(done.stdout)
        return info

    def latest_id(self) -> str:
        return str(self.show()["run_id"])

    def files_of(self, run: str) -> dict[str, str]:
        root = self.workspace / "runs" / run / "files"
        return {path.relative_to(root).as_posix(): path.read_text() for path in sorted(root.rglob("*"))
                if path.is_file()} if root.is_dir() else {}

    def login(self, command: str, timeout: float = 60) -> str:
        """Run ``command`` on the login node as the user ``rx``; its output (it must succeed)."""
        code, output = self.slurm.exec("head", command, timeout=timeout)
        assert code == 0, output
        return output

    def squeue(self) -> str:
        """The user's jobs still in the queue (``JOBID STATE``)."""
        return self.login("squeue -h -o '%i %T'")

    def sacct_state(self, job_id: str) -> str:
        """The job's state as accounting has it (``CANCELLED by 1000``)."""
        return self.login(f"sacct -n -X -P -j {job_id} -o State").strip().splitlines()[-1]

    def remote_runs(self) -> list[str]:
        """The run directories left under the login node's workdir."""
        return self.login("ls ~/.cache/remote_exec/runs 2>/dev/null || true").split()

    def wait_for(self, what: str, check: Callable[[], Any], timeout: float = 60) -> Any:
        """Poll ``check`` until it returns something true; fail the test after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = check()
            if value:
                return value
            time.sleep(0.3)
        pytest.fail(f"waited {timeout:g} s for {what}")

    def job_state(self, run: str = "latest") -> str:
        """The job's state as the run's record has it (empty before the first poll)."""
        return str((self.show(run).get("job") or {}).get("state") or "")

    @staticmethod
    def interrupt(process: subprocess.Popen[str]) -> None:
        """Ctrl-C, as a terminal sends it: SIGINT to rx's process group."""
        os.killpg(process.pid, signal.SIGINT)


@pytest.fixture(params=["openssh"])
def slurm_backend(request: pytest.FixtureRequest) -> str:
    """The backend of a Slurm test (a module parametrizes it over both where it matters)."""
    name: str = request.param
    return name


@pytest.fixture
def cluster(slurm_cluster: SlurmCluster, slurm_backend: str, tmp_path: Path,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    """A fresh project and workspace whose remote ``cluster`` is the testbed's login node."""
    project = tmp_path / "project"
    project.mkdir()
    workspace = tmp_path / "workspace"
    (project / "pyproject.toml").write_text(textwrap.dedent(f"""\
        [tool.rx]
        ssh_config = "{slurm_cluster.ssh_config}"

        [tool.rx.remotes.cluster]
        host = "{slurm_cluster.alias}"
        scheduler = "slurm"
        slurm = {{ time = "5", poll_interval = 0.5, poll_max = 4 }}
        """))
    env = {**os.environ, "PYTHONPATH": str(REPO), "RX_WORKSPACE": str(workspace), "RX_BACKEND": slurm_backend,
           "RX_CACHE_DIR": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    env.pop("RX_SSH_CONFIG", None)
    monkeypatch.chdir(project)
    helper = Cluster(slurm=slurm_cluster, project=project, workspace=workspace, env=env)
    try:
        yield helper
    finally:
        helper.stop_started()
        # A test that failed half-way must not leave jobs that hold the nodes for the next one.
        slurm_cluster.exec("head", "scancel -u rx; rm -rf ~/.cache/remote_exec/runs", timeout=30)
