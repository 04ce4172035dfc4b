"""Persistent workers (``keep_warm``): one runner per host, interpreter, workdir, archive and project tree,
serving many calls over one channel with warm imports.

A :class:`WorkerPool` belongs to the process's :class:`~remote_exec.coordinator.Coordinator`, which closes it
at exit (a worker also ends by itself when its channel closes or after ``worker_idle`` idle seconds).
"""

from __future__ import annotations

import collections
import threading

from ..backends.base import Backend
from ..launchers.base import Launcher
from ..packing import DistributionArchive
from .bootstrap import start_runner
from .channel import Channel
from .options import CallOptions, PhaseCallback

__all__ = ["MAX_WORKERS_PER_HOST", "WorkerPool"]

#: Persistent workers kept per host, interpreter and workdir (one per archive: tasks of different code each
#: keep theirs); beyond this the least recently used one is stopped.
MAX_WORKERS_PER_HOST = 4


class WorkerPool:
    """The persistent workers of one coordinator, least recently used first."""

    def __init__(self, per_host: int = MAX_WORKERS_PER_HOST) -> None:
        self.per_host = per_host
        self._workers: collections.OrderedDict[tuple[int, str, str, str, str | None], Channel] = \
            collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, launcher: Launcher, backend: Backend, archive: DistributionArchive, options: CallOptions,
            phase: PhaseCallback, *, tree: str | None = None) -> Channel:
        """The worker for this host, interpreter, workdir, archive and project tree (started when missing:
        a worker's imports are of one version of the code)."""
        key = (id(backend), options.python, options.workdir, archive.sha256, tree)
        with self._lock:
            worker = self._workers.get(key)
            if worker is not None and not worker.broken:
                self._workers.move_to_end(key)
                return worker
            if worker is not None:
                self._workers.pop(key).close()
            same_place = [k for k in self._workers if k[:3] == key[:3]]  # least recently used first
            while len(same_place) >= self.per_host:
                self._workers.pop(same_place.pop(0)).close()
            worker = start_runner(launcher, backend, archive, options, "worker", phase)
            self._workers[key] = worker
            return worker

    def channels(self) -> list[Channel]:
        """The workers' channels, least recently used first."""
        with self._lock:
            return list(self._workers.values())

    def close(self) -> None:
        """Stop every worker."""
        with self._lock:
            workers = list(self._workers.values())
            self._workers.clear()
        for worker in workers:
            try:
                worker.close()
            except Exception:
                pass
