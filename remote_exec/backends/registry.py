"""The backend registry: the only list of backend names rx knows.

Each entry names a backend, where its class lives (``"module:Class"``, imported on first use, so that
``rx --help`` never imports paramiko), and whether a user may choose it for a remote host (``openssh`` and
``paramiko`` may be chosen; ``local`` is the local-subprocess backend rx picks itself when no host is
named). The CLI's ``--backend`` choices and the configuration's validation read
:func:`remote_backend_names` and :func:`check_backend_name`; nothing else spells a backend name out.

Adding a backend is its own module plus one line in :data:`BUILTIN_BACKENDS`; a backend that lives outside
rx (a test double, a plug-in) calls :func:`register` instead.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    from .base import Backend, HostSpec

__all__ = [
    "BUILTIN_BACKENDS",
    "BackendEntry",
    "BackendRegistry",
    "backend_class",
    "backend_names",
    "check_backend_name",
    "create",
    "register",
    "remote_backend_names",
    "unregister",
]


@dataclass(frozen=True)
class BackendEntry:
    """One registered backend.

    Attributes:
        name: What users and configuration call it (``--backend NAME``, ``RX_BACKEND``).
        target: ``"module:Class"``: where the :class:`~remote_exec.backends.base.Backend` subclass lives.
        remote: True when a user may choose it to reach a remote host.
    """

    name: str
    target: str
    remote: bool = True

    def load(self) -> type[Backend]:
        """Import the module (first use only: Python caches it) and return the class."""
        module_name, _, attribute = self.target.partition(":")
        cls: type[Backend] = getattr(importlib.import_module(module_name), attribute)
        return cls


def _entries(*entries: BackendEntry) -> Mapping[str, BackendEntry]:
    return MappingProxyType({entry.name: entry for entry in entries})


BUILTIN_BACKENDS: Mapping[str, BackendEntry] = _entries(
    BackendEntry("openssh", "remote_exec.backends.openssh:OpenSSHBackend"),
    BackendEntry("paramiko", "remote_exec.backends.paramiko:ParamikoBackend"),
    BackendEntry("local", "remote_exec.backends.local:LocalBackend", remote=False),
)
"""The backends that ship with rx, in the order the CLI lists them (read-only)."""


def _choices(names: Iterable[str]) -> str:
    """``a``, ``a or b``, ``a, b or c``: names for a hint."""
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


class BackendRegistry:
    """Backend names and where their classes live: the built-in ones plus those added by :meth:`register`.

    The process has one (behind this module's functions); tests may build their own.
    """

    def __init__(self, entries: Mapping[str, BackendEntry] = BUILTIN_BACKENDS) -> None:
        self._entries: dict[str, BackendEntry] = dict(entries)

    def names(self) -> tuple[str, ...]:
        """Every backend name, built-in ones first, in registration order."""
        return tuple(self._entries)

    def remote_names(self) -> tuple[str, ...]:
        """The names a user may choose for a remote host."""
        return tuple(name for name, entry in self._entries.items() if entry.remote)

    def entry(self, name: str) -> BackendEntry:
        """The entry for ``name``.

        Raises:
            ConfigError: No backend has that name.
        """
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(f"unknown backend {name!r}",
                              hint=f"choose one of {', '.join(self._entries)}") from None

    def check_remote(self, name: str) -> str:
        """``name``, when a user may choose it for a remote host.

        Raises:
            ConfigError: It is not such a backend; the hint lists the choices.
        """
        entry = self._entries.get(name)
        if entry is None or not entry.remote:
            raise ConfigError(f"unknown backend {name!r}", hint=_choices(self.remote_names()))
        return name

    def register(self, name: str, target: str, *, remote: bool = True) -> BackendEntry:
        """Add a backend. Registering the same name and target again changes nothing.

        Raises:
            ConfigError: ``target`` is not ``"module:Class"``, or ``name`` is taken by another backend.
        """
        module_name, colon, attribute = target.partition(":")
        if not (name and module_name and colon and attribute):
            raise ConfigError(f"cannot register backend {name!r} as {target!r}",
                              hint='give a name and a target of the form "package.module:Class"')
        entry = BackendEntry(name, target, remote)
        known = self._entries.get(name)
        if known is not None and known != entry:
            raise ConfigError(f"backend {name!r} is already registered as {known.target!r}")
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        """Remove a backend added by :meth:`register` (tests clean up this way); built-in ones stay.

        Raises:
            ConfigError: ``name`` is a built-in backend.
        """
        if name in BUILTIN_BACKENDS:
            raise ConfigError(f"backend {name!r} is built in and cannot be removed")
        self._entries.pop(name, None)


# state: the process's one registry. It holds the built-in table and changes only when a caller registers
# a backend explicitly (nothing registers itself at import), so the CLI's choices and the configuration's
# checks, which are read at module level, see the same names as the backend pool.
_registry = BackendRegistry()


def backend_names() -> tuple[str, ...]:
    """Every backend name, including ``local``."""
    return _registry.names()


def remote_backend_names() -> tuple[str, ...]:
    """The backends a user may choose for a remote host: the CLI's ``--backend`` choices."""
    return _registry.remote_names()


def check_backend_name(name: str) -> str:
    """``name``, when it is a backend a user may choose for a remote host.

    Raises:
        ConfigError: It is not; the hint lists the choices (``openssh or paramiko``).
    """
    return _registry.check_remote(name)


def backend_class(name: str) -> type[Backend]:
    """The backend class registered under ``name``, imported on first use.

    Raises:
        ConfigError: No backend has that name.
    """
    return _registry.entry(name).load()


def create(name: str, spec: HostSpec) -> Backend:
    """A new backend ``name`` for ``spec`` (not connected yet: backends connect on first use).

    Raises:
        ConfigError: No backend has that name.
    """
    return backend_class(name)(spec)


def register(name: str, target: str, *, remote: bool = True) -> BackendEntry:
    """Add a backend: ``target`` is ``"module:Class"``, imported when the backend is first created.

    Args:
        name: The backend's name, as ``--backend`` and configuration give it.
        target: Where its :class:`~remote_exec.backends.base.Backend` subclass lives.
        remote: Whether users may choose it for a remote host.

    Raises:
        ConfigError: ``target`` is malformed, or ``name`` is taken by another backend.
    """
    return _registry.register(name, target, remote=remote)


def unregister(name: str) -> None:
    """Remove a backend added by :func:`register`.

    Raises:
        ConfigError: ``name`` is a built-in backend.
    """
    _registry.unregister(name)
