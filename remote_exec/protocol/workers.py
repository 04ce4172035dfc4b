"""Persistent workers (``keep_warm``): runners that each serve many calls, one at a time, over one channel
with warm imports, each of one host, interpreter, workdir, archive and project tree.

A :class:`WorkerPool` belongs to the process's :class:`~remote_exec.coordinator.Coordinator`, which closes it
at exit (a worker also ends by itself when its channel closes or after ``worker_idle`` idle seconds). A call
takes a worker of its host, interpreter, workdir, archive and tree for itself (:meth:`WorkerPool.acquire`) and
gives it back (:meth:`WorkerPool.release`): calls from several threads run side by side in several workers,
up to :attr:`WorkerPool.per_host` at one place; more calls wait for one of those to be free.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from ..backends.base import Backend
from ..launchers.base import Launcher
from ..packing import DistributionArchive
from .bootstrap import start_runner
from .channel import Channel
from .options import CallOptions, PhaseCallback

__all__ = ["MAX_WORKERS_PER_HOST", "WorkerPool"]

#: Persistent workers kept per host, interpreter and workdir (tasks of different code each keep theirs, and
#: calls from several threads each take one); beyond this the least recently used idle one is stopped, or
#: a call waits for one to be free.
MAX_WORKERS_PER_HOST = 4

_Key = tuple[int, str, str, str, 'str | None']


@dataclass
class _Worker:
    key: _Key
    channel: Channel
    busy: bool = False


class WorkerPool:
    """The persistent workers of one coordinator, least recently used first."""

    def __init__(self, per_host: int = MAX_WORKERS_PER_HOST) -> None:
        self.per_host = per_host
        self._workers: list[_Worker] = []
        self._starting: dict[tuple[int, str, str], int] = {}
        self._changed = threading.Condition()

    def acquire(self, launcher: Launcher, backend: Backend, archive: DistributionArchive, options: CallOptions,
                phase: PhaseCallback, *, tree: str | None = None) -> Channel:
        """A worker for this host, interpreter, workdir, archive and project tree, for one call (give it back
        with :meth:`release`): an idle one, else a new one while its place has room, else the first to be
        free. A worker's imports are of one version of the code: another tree takes another worker."""
        key: _Key = (id(backend), options.python, options.workdir, archive.sha256, tree)
        place = key[:3]
        while True:
            with self._changed:
                stale = self._take_stale()
                worker = next((w for w in reversed(self._workers) if w.key == key and not w.busy), None)
                if worker is not None:
                    worker.busy = True
                    self._workers.remove(worker)
                    self._workers.append(worker)  # most recently used last
                    return worker.channel
                at_place = [w for w in self._workers if w.key[:3] == place]
                idle = [w for w in at_place if not w.busy]
                room = len(at_place) + self._starting.get(place, 0) < self.per_host
                if room or idle:
                    if not room:  # make room: stop the least recently used idle worker of other code
                        self._workers.remove(idle[0])
                        stale.append(idle[0].channel)
                    self._starting[place] = self._starting.get(place, 0) + 1
                    break
                if not stale:
                    self._changed.wait()
            _close(stale)
        _close(stale)
        try:
            channel = start_runner(launcher, backend, archive, options, "worker", phase)
        finally:
            with self._changed:
                self._starting[place] -= 1
                self._changed.notify_all()
        with self._changed:
            self._workers.append(_Worker(key, channel, busy=True))
        return channel

    def release(self, channel: Channel) -> None:
        """The call on ``channel`` is over: the worker takes the next one (or is stopped if it broke)."""
        with self._changed:
            worker = next((w for w in self._workers if w.channel is channel), None)
            if worker is not None:
                worker.busy = False
            stale = self._take_stale()
            self._changed.notify_all()
        _close(stale)

    def _take_stale(self) -> list[Channel]:
        """Remove the idle workers that broke; return their channels to close (the caller holds the lock)."""
        stale = [w for w in self._workers if w.channel.broken and not w.busy]
        for worker in stale:
            self._workers.remove(worker)
        return [worker.channel for worker in stale]

    def channels(self) -> list[Channel]:
        """The workers' channels, least recently used first."""
        with self._changed:
            return [worker.channel for worker in self._workers]

    def close(self) -> None:
        """Stop every worker."""
        with self._changed:
            workers = [worker.channel for worker in self._workers]
            self._workers.clear()
        _close(workers)


def _close(channels: list[Channel]) -> None:
    for channel in channels:
        try:
            channel.close()
        except Exception:
            pass
