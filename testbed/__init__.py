"""A Docker testbed of sshd hosts for remote_exec's integration and fault tests.

Each host is a container of the image ``rx-testbed:<recipe hash>`` (Debian bookworm, openssh-server, python3,
procps, rsync), with a user ``rx`` who logs in by key only. A *state dir* (``$RX_TESTBED_DIR``, else
``<repo>/.testbed``) holds the key pair, an ``ssh_config`` with one ``Host rx-testbed-K`` block per host and
a ``known_hosts`` prefilled with every host's keys::

    python -m testbed up --hosts 2
    ssh -F .testbed/ssh_config rx-testbed-1 python3 -V
    python -m testbed down

or from Python (the pytest fixtures in :mod:`testbed.pytest_plugin` do this)::

    import testbed
    bed = testbed.up(2, state_dir=tmp)
    host = bed.host(0)            # alias "rx-testbed-1", port on 127.0.0.1
    testbed.down(state_dir=tmp)

The fault tools (:func:`start_host`, :func:`pause`, :func:`exec_root`, :func:`regenerate_host_keys`,
:func:`set_login`) act on real containers with ``docker pause`` and ``docker exec``; :data:`LOGIN_VARIANTS`
are logins of real lab servers (a ``~/.bashrc`` that prints, one that execs another shell). Every host has a
fake ``nvidia-smi`` (no GPUs until :func:`set_gpus` gives it some, and processes using them:
:func:`start_foreign_process` starts one rx did not), which prints what the real tool prints for the queries
rx makes. :func:`slurm_up` starts a three-node Slurm cluster (login node ``rx-slurm`` with slurmctld and
accounting, compute nodes ``c1`` and ``c2``, a shared /home) for the scheduler tests (see
:mod:`testbed._slurm`). This package needs only the standard library, the ``docker`` SDK and the OpenSSH
client's ``ssh-keygen``; it never imports remote_exec.
"""

from __future__ import annotations

from testbed._hosts import (
    LOGIN_VARIANTS,
    Testbed,
    TestbedHost,
    default_state_dir,
    down,
    exec_root,
    pause,
    prune,
    regenerate_host_keys,
    remove_host,
    set_gpus,
    set_login,
    start_foreign_process,
    start_host,
    status,
    unpause,
    up,
)
from testbed._image import BASE_IMAGE, IMAGE, TestbedError, docker_available, ensure_image
from testbed._slurm import (
    SLURM_IMAGE,
    SlurmCluster,
    default_slurm_state_dir,
    ensure_slurm_image,
    slurm_down,
    slurm_status,
    slurm_up,
)
from testbed._wheels import make_wheel

__all__ = [
    "BASE_IMAGE",
    "IMAGE",
    "LOGIN_VARIANTS",
    "SLURM_IMAGE",
    "SlurmCluster",
    "Testbed",
    "TestbedError",
    "TestbedHost",
    "default_slurm_state_dir",
    "default_state_dir",
    "docker_available",
    "down",
    "ensure_image",
    "ensure_slurm_image",
    "exec_root",
    "make_wheel",
    "pause",
    "prune",
    "regenerate_host_keys",
    "remove_host",
    "set_gpus",
    "set_login",
    "slurm_down",
    "slurm_status",
    "slurm_up",
    "start_foreign_process",
    "start_host",
    "status",
    "unpause",
    "up",
]
