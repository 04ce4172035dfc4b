"""pytest fixtures for the Docker sshd testbed; load with ``pytest_plugins = ["testbed.pytest_plugin"]``.

Fixtures:
    testbed: session-wide :class:`~testbed.Testbed` of two hosts in a state dir of its own under pytest's
        temporary root, so a developer's ``.testbed`` is never touched; removed after the session unless
        ``RX_TESTBED_KEEP=1`` (then the state dir is the fixed ``<pytest tmp root>/rx-testbed-keep`` and the
        next session reuses its containers).
    testbed_host: the session testbed's first host, ``rx-testbed-1``.
    dedicated_host: a fresh container for one test that breaks its host (pause, host-key change, killing
        sshd); it joins the session testbed's ssh_config under its own alias and is removed afterwards.
    slurm_cluster: session-wide :class:`~testbed.SlurmCluster` (login node ``rx-slurm``, compute nodes
        ``c1`` and ``c2``); with ``RX_TESTBED_KEEP=1`` it is kept and the next session reuses it.

Without a usable Docker daemon the fixtures skip the test; with ``RX_REQUIRE_DOCKER=1`` (CI) they fail it
instead, so a broken daemon never passes as a green run.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from testbed import (
    SlurmCluster,
    Testbed,
    TestbedHost,
    docker_available,
    down,
    ensure_image,
    remove_host,
    slurm_down,
    slurm_up,
    start_host,
    up,
)

__all__ = ["SSHCommand", "dedicated_host", "slurm_cluster", "testbed", "testbed_host"]

TESTBED_HOSTS = 2


@dataclass(frozen=True)
class SSHCommand:
    """The OpenSSH client pointed at a testbed's ssh_config.

    Attributes:
        ssh_config: The ssh_config file passed with ``-F``.
    """

    ssh_config: Path

    def __call__(
        self,
        alias: str,
        command: str,
        *,
        strict: bool = True,
        timeout: float = 30,
        options: Sequence[str] = (),
    ) -> subprocess.CompletedProcess[str]:
        """Run ``command`` on ``alias`` in batch mode and return the finished process.

        Args:
            alias: A ``Host`` of the ssh_config.
            command: The remote command line.
            strict: Use ``StrictHostKeyChecking yes``: only keys already in known_hosts are trusted.
            timeout: Seconds before the local ssh process is killed.
            options: More ``-o`` values, such as ``"ConnectTimeout=2"``.
        """
        argv = ["ssh", "-F", str(self.ssh_config), "-o", "BatchMode=yes"]
        if strict:
            argv += ["-o", "StrictHostKeyChecking=yes"]
        for option in options:
            argv += ["-o", option]
        argv += [alias, command]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def _require_docker() -> None:
    """Skip (or fail, under ``RX_REQUIRE_DOCKER=1``) the requesting test when Docker is unusable."""
    reason = docker_available()
    if reason is None:
        return
    if _flag("RX_REQUIRE_DOCKER"):
        pytest.fail(f"RX_REQUIRE_DOCKER=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def _terminal_log(pytestconfig: pytest.Config) -> Callable[[str], None]:
    """Print a testbed line straight to the terminal, past output capture: the first build takes a minute
    and should not look like a hang."""
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")

    def say(line: str) -> None:
        if reporter is None:
            return
        with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
            reporter.ensure_newline()
            reporter.write_line(f"testbed: {line}")

    return say


@pytest.fixture(scope="session")
def testbed(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Iterator[Testbed]:
    """Two sshd hosts for the whole session, in a private state dir."""
    _require_docker()
    keep = _flag("RX_TESTBED_KEEP")
    if keep:
        state_dir = tmp_path_factory.getbasetemp().parent / "rx-testbed-keep"
    else:
        state_dir = tmp_path_factory.mktemp("testbed")
    say = _terminal_log(pytestconfig)
    ensure_image(log=say)
    bed = up(TESTBED_HOSTS, state_dir=state_dir)
    yield bed
    if keep:
        say(f"kept: ssh -F {bed.ssh_config} {bed.host(0).alias}")
    else:
        down(state_dir=state_dir)


@pytest.fixture(scope="session")
def testbed_host(testbed: Testbed) -> TestbedHost:
    """The session testbed's first host, ``rx-testbed-1``."""
    return testbed.host(0)


@pytest.fixture
def dedicated_host(testbed: Testbed) -> Iterator[TestbedHost]:
    """A fresh host this test may break; reachable as its alias through ``testbed.ssh_config``."""
    host = start_host(testbed.state_dir, f"rx-dedicated-{secrets.token_hex(4)}")
    try:
        yield host
    finally:
        remove_host(host)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Iterator[SlurmCluster]:
    """A three-node Slurm cluster (login node ``rx-slurm``, compute nodes ``c1``, ``c2``) for the session."""
    _require_docker()
    keep = _flag("RX_TESTBED_KEEP")
    base = tmp_path_factory.getbasetemp().parent
    state_dir = base / "rx-slurm-keep" if keep else tmp_path_factory.mktemp("slurm")
    say = _terminal_log(pytestconfig)
    cluster = slurm_up(state_dir, log=say)
    yield cluster
    if keep:
        say(f"kept: ssh -F {cluster.ssh_config} {cluster.alias}")
    else:
        slurm_down(state_dir)
