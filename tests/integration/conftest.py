"""Integration-test helpers over the Docker testbed (fixtures ``testbed``, ``testbed_host`` and
``dedicated_host`` come from :mod:`testbed.pytest_plugin`)."""

from __future__ import annotations

import shutil

import pytest

from testbed import Testbed
from testbed.pytest_plugin import SSHCommand


@pytest.fixture(scope="session")
def ssh(testbed: Testbed) -> SSHCommand:
    """Call as ``ssh(alias, command)`` to run the OpenSSH client against the session testbed."""
    if shutil.which("ssh") is None:
        pytest.skip("the OpenSSH client (ssh) is not installed")
    return SSHCommand(testbed.ssh_config)
