"""Backends: how rx reaches a host. ``openssh`` (the ssh CLI), ``paramiko``, and ``local`` (subprocesses).

:mod:`~remote_exec.backends.registry` is the only list of backend names; backends are imported lazily by
name, so ``rx --help`` never pays for paramiko. A :class:`BackendPool` keeps one backend (one connection)
per host and backend name for as long as its owner keeps it, and closes them together.
"""

from __future__ import annotations

from .base import Backend, CommandResult, HostSpec, Process, build_command
from .pool import BackendPool
from .registry import (
    backend_class,
    backend_names,
    check_backend_name,
    create,
    register,
    remote_backend_names,
    unregister,
)

__all__ = [
    "Backend",
    "BackendPool",
    "CommandResult",
    "HostSpec",
    "Process",
    "backend_class",
    "backend_names",
    "build_command",
    "check_backend_name",
    "create",
    "register",
    "remote_backend_names",
    "unregister",
]
