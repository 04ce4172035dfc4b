"""Persistent workers (``keep_warm``): runners that each serve many calls, one at a time, over one channel
with warm imports, each of one host, interpreter, workdir, archive and project tree.

A :class:`WorkerPool` belongs to the process's :class:`~remote_exec.coordinator.Coordinator`, which closes it
at exit (a worker also ends by itself when its channel closes or after ``worker_idle`` idle seconds). A call
takes a worker of its host, interpreter, workdir, archive and tree for itself (:meth:`WorkerPool.acquire`) and
gives it back (:meth:`WorkerPool.release`): calls from several threads run side by side in several workers,
up to :attr:`WorkerPool.per_host` at one place; more calls wait for one of those to be free.

A pool slot (:mod:`remote_exec.pool`) has a worker of its own, named by the slot (``CallOptions.slot``):
one at a time, whatever its archive, because the slot's worker holds the slot's lock and GPUs on the host
for its whole life (:mod:`remote_exec.runner.slot`). It is started with the slot's placement and answers
once it holds them; until then it reports ``waiting`` events, which :meth:`WorkerPool.slot` passes on.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..backends.base import Backend
from ..errors import RunnerError
from ..launchers.base import Launcher
from ..packing import DistributionArchive
from .bootstrap import start_runner
from .channel import Channel
from .options import CallOptions, PhaseCallback

__all__ = ["MAX_WORKERS_PER_HOST", "SlotEvent", "WorkerPool", "await_slot"]

#: Persistent workers kept per host, interpreter and workdir (tasks of different code each keep theirs, and
#: calls from several threads each take one); beyond this the least recently used idle one is stopped, or
#: a call waits for one to be free.
MAX_WORKERS_PER_HOST = 4

_Key = tuple[int, str, str, str, 'str | None']

#: Told of a slot worker's events before it serves: ``{"event": "waiting", "busy": {...}}`` and the like.
SlotEvent = Callable[[dict[str, Any]], None]


class _SlotWait:
    """Watches a slot worker until it holds its slot: silent longer than ``limit`` seconds, it is dropped."""

    def __init__(self, channel: Channel, limit: float) -> None:
        self.channel = channel
        self.limit = limit
        self.dead = False

    def check(self, deadline: float | None) -> None:
        if time.monotonic() - self.channel.last_read > self.limit:
            self.dead = True
            self.channel.process.kill()


def await_slot(channel: Channel, options: CallOptions, on_event: SlotEvent | None) -> dict[str, Any]:
    """Read a slot worker's events until it holds its slot (its ``worker`` event, returned; also kept as
    ``channel.placement``), passing ``waiting`` events to ``on_event``.

    Raises:
        RunnerError: The host can never give the slot (``reason="no-slot"``), or the worker ended first.
    """
    host = channel.backend.host
    request = json.loads(options.placement or "{}")
    interval = float(request.get("interval") or 5.0)
    watch = _SlotWait(channel, max(options.dead_after, 3 * interval))
    found: dict[str, Any] = {}

    def handle(kind: bytes, payload: bytes) -> bool:
        if kind != b"P":
            return False
        event = json.loads(payload)
        name = event.get("event")
        if name == "slot-error":
            raise RunnerError(f"{host}: {event.get('message')}", reason="no-slot", host=host)
        if name == "worker":
            found.update(event)
            return True
        if on_event is not None:
            on_event(event)
        return False

    channel.watch(watch)
    try:
        held = channel.pump(handle)
    finally:
        channel.watch(None)
    if not held:
        channel.broken = True
        code = channel.process.wait(2)
        why = "went silent" if watch.dead else f"ended (exit {code})"
        tail = channel.stderr_tail()
        raise RunnerError(f"the worker on {host} {why} before it took its slot" + (f": {tail}" if tail else ""),
                          reason="crashed", host=host)
    channel.placement = found
    return found


@dataclass
class _Worker:
    key: _Key
    channel: Channel
    busy: bool = False


class WorkerPool:
    """The persistent workers of one coordinator, least recently used first, and its pool slots' workers."""

    def __init__(self, per_host: int = MAX_WORKERS_PER_HOST) -> None:
        self.per_host = per_host
        self._workers: list[_Worker] = []
        self._starting: dict[tuple[int, str, str], int] = {}
        self._changed = threading.Condition()
        self._slots: dict[str, tuple[_Key, Channel]] = {}
        #: (backend, python, workdir, archive) whose runner answered at once, the archive in place: a
        #: per-call runner there gets its call right behind its command (see :func:`.bootstrap.start_runner`).
        self.primed: set[tuple[int, str, str, str]] = set()

    def acquire(self, launcher: Launcher, backend: Backend, archive: DistributionArchive, options: CallOptions,
                phase: PhaseCallback, *, tree: str | None = None) -> Channel:
        """A worker for this host, interpreter, workdir, archive and project tree, for one call (give it back
        with :meth:`release`): an idle one, else a new one while its place has room, else the first to be
        free. A worker's imports are of one version of the code: another tree takes another worker. A call
        of a pool slot takes that slot's worker (:meth:`slot`)."""
        if options.slot is not None:
            return self.slot(launcher, backend, archive, options, phase, tree=tree)
        key: _Key = (backend.serial, options.python, options.workdir, archive.sha256, tree)
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

    def slot(self, launcher: Launcher, backend: Backend, archive: DistributionArchive, options: CallOptions,
             phase: PhaseCallback, on_event: SlotEvent | None = None, *, tree: str | None = None) -> Channel:
        """The worker of the pool slot ``options.slot``, started (and its slot taken: its lock, its GPUs)
        when it has none for this archive and tree; a worker it had for other code is stopped first (it
        holds the slot's GPUs). Waits while the host's GPUs are busy, telling ``on_event``.

        Only the slot's own thread calls this for a slot; workers of different slots start in parallel.
        """
        name = options.slot
        assert name is not None
        key: _Key = (backend.serial, options.python, options.workdir, archive.sha256, tree)
        with self._changed:
            current = self._slots.get(name)
        if current is not None:
            if current[0] == key and not current[1].broken:
                return current[1]
            self.close_slot(name)
        channel = start_runner(launcher, backend, archive, options, "worker", phase)
        try:
            if options.placement is not None:
                await_slot(channel, options, on_event)
        except BaseException:
            channel.broken = True
            channel.process.kill()
            raise
        with self._changed:
            self._slots[name] = (key, channel)
        return channel

    def slot_channel(self, name: str) -> Channel | None:
        """The worker the pool slot ``name`` has now, if any."""
        with self._changed:
            current = self._slots.get(name)
        return current[1] if current is not None else None

    def close_slot(self, name: str, *, kill: bool = False) -> None:
        """Stop the pool slot's worker (its GPUs are free once it ended); ``kill``: drop its channel at once
        (its host is down: asking it to quit would wait for an answer that does not come)."""
        with self._changed:
            current = self._slots.pop(name, None)
        if current is None:
            return
        channel = current[1]
        try:
            if kill or channel.broken:
                channel.broken = True
                channel.closed.set()
                channel.process.kill()
            else:
                channel.close()
        except Exception:
            pass

    def channels(self) -> list[Channel]:
        """The workers' channels, least recently used first (pool slots' workers last)."""
        with self._changed:
            return [worker.channel for worker in self._workers] + [channel for _, channel in self._slots.values()]

    def close(self) -> None:
        """Stop every worker."""
        with self._changed:
            workers = [worker.channel for worker in self._workers] + [channel for _, channel in self._slots.values()]
            self._workers.clear()
            self._slots.clear()
        _close(workers)


def _close(channels: list[Channel]) -> None:
    for channel in channels:
        try:
            channel.close()
        except Exception:
            pass
