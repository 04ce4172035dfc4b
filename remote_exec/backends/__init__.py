"""Backends: how rx reaches a host. ``openssh`` (the ssh CLI), ``paramiko``, and ``local`` for tests.

Backends are imported lazily by name, so ``rx --help`` never pays for paramiko. :func:`connect` keeps one
backend (one connection) per host and backend name for the life of the process and closes them at exit.
"""

from __future__ import annotations

import atexit
import importlib
import threading

from ..errors import ConfigError
from .base import Backend, CommandResult, HostSpec, Process, build_command

__all__ = [
    "BACKENDS",
    "Backend",
    "CommandResult",
    "HostSpec",
    "Process",
    "backend_class",
    "build_command",
    "close_all",
    "connect",
    "remote_backend_names",
]

BACKENDS: dict[str, str] = {
    "openssh": "remote_exec.backends.openssh:OpenSSHBackend",
    "paramiko": "remote_exec.backends.paramiko:ParamikoBackend",
    "local": "remote_exec.backends.local:LocalBackend",
}

_pool: dict[tuple[str, HostSpec], Backend] = {}
_pool_lock = threading.Lock()


def remote_backend_names() -> list[str]:
    """The backends a remote host may use (``local`` is the local-subprocess backend)."""
    return [name for name in BACKENDS if name != "local"]


def backend_class(name: str) -> type[Backend]:
    """The backend class registered under ``name``, imported on first use.

    Raises:
        ConfigError: No backend has that name.
    """
    try:
        module_name, _, attribute = BACKENDS[name].partition(":")
    except KeyError:
        raise ConfigError(f"unknown backend {name!r}", hint=f"choose one of {', '.join(BACKENDS)}") from None
    cls: type[Backend] = getattr(importlib.import_module(module_name), attribute)
    return cls


def connect(spec: HostSpec, backend: str = "openssh") -> Backend:
    """The process-wide backend for ``spec``: created on first use, then reused (one connection per host)."""
    key = (backend, spec)
    with _pool_lock:
        instance = _pool.get(key)
        if instance is None:
            instance = backend_class(backend)(spec)
            _pool[key] = instance
        return instance


def close_all() -> None:
    """Close every pooled backend (registered to run at exit)."""
    with _pool_lock:
        backends = list(_pool.values())
        _pool.clear()
    for instance in backends:
        try:
            instance.close()
        except Exception:  # closing at exit must never raise
            pass


atexit.register(close_all)
