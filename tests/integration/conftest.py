"""Integration-test helpers over the Docker testbed (fixtures ``testbed``, ``testbed_host`` and
``dedicated_host`` come from :mod:`testbed.pytest_plugin`)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from testbed import Testbed
from testbed.pytest_plugin import SSHCommand


@pytest.fixture(scope="session")
def ssh(testbed: Testbed) -> SSHCommand:
    """Call as ``ssh(alias, command)`` to run the OpenSSH client against the session testbed."""
    if shutil.which("ssh") is None:
        pytest.skip("the OpenSSH client (ssh) is not installed")
    return SSHCommand(testbed.ssh_config)


@pytest.fixture(scope="session", autouse=True)
def per_process_ssh_masters() -> Iterator[None]:
    """Each rx of these tests opens its own OpenSSH master, stopped when it exits (``RX_SSH_PERSIST=0``), as
    the tests assume (a changed host key is checked by a new connection, a backend counts the connection it
    opens); a master shared across rx invocations would couple one test to the one before it.
    tests/integration/test_shared_master.py turns sharing on for itself."""
    before = os.environ.get("RX_SSH_PERSIST")
    os.environ["RX_SSH_PERSIST"] = "0"
    yield
    if before is None:
        os.environ.pop("RX_SSH_PERSIST", None)
    else:
        os.environ["RX_SSH_PERSIST"] = before
