"""The backend pool: one backend (one connection) per host and backend name, kept while the pool lives.

The process-wide pool belongs to the coordinator, which closes it when the process ends; nothing here is
module-level state.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from types import TracebackType

from .base import Backend, HostSpec
from .registry import create

__all__ = ["BackendPool"]

logger = logging.getLogger(__name__)


class BackendPool:
    """Backends by (backend name, host spec): created on first use, then reused, closed together.

    Args:
        factory: Makes a backend from a name and a spec (default: :func:`~remote_exec.backends.registry.create`,
            which looks the name up in the registry).
    """

    def __init__(self, factory: Callable[[str, HostSpec], Backend] = create) -> None:
        self._factory = factory
        self._backends: dict[tuple[str, HostSpec], Backend] = {}
        self._lock = threading.Lock()

    def get(self, spec: HostSpec, name: str) -> Backend:
        """The backend ``name`` for ``spec``: created on first use (it connects on its first command), then
        the same object every time, so calls share its connection.

        Raises:
            ConfigError: No backend has that name.
        """
        key = (name, spec)
        with self._lock:
            backend = self._backends.get(key)
            if backend is None:
                backend = self._backends[key] = self._factory(name, spec)
            return backend

    def adopt(self, spec: HostSpec, name: str, backend: Backend) -> Backend:
        """Keep ``backend`` (made before the pool was at hand, e.g. connecting early) as the one for ``spec``
        and ``name``, unless the pool has one already; returns the one kept."""
        with self._lock:
            return self._backends.setdefault((name, spec), backend)

    def backends(self) -> list[Backend]:
        """The backends created so far and not closed."""
        with self._lock:
            return list(self._backends.values())

    def close(self) -> None:
        """Close every backend and forget them; a later :meth:`get` creates new ones. Never raises."""
        with self._lock:
            backends = list(self._backends.values())
            self._backends.clear()
        for backend in backends:
            try:
                backend.close()
            except Exception:  # closing (often at exit) must not raise
                logger.debug("closing %r failed", backend, exc_info=True)

    def __len__(self) -> int:
        return len(self._backends)

    def __enter__(self) -> BackendPool:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
