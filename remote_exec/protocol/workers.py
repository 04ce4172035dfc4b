"""Persistent workers (``keep_warm``): one runner per host, interpreter, workdir and archive, serving many
calls over one channel with warm imports; and a pool slot's own worker.

A :class:`WorkerPool` belongs to the process's :class:`~remote_exec.coordinator.Coordinator`, which closes it
at exit (a worker also ends by itself when its channel closes or after ``worker_idle`` idle seconds).

A pool slot (:mod:`remote_exec.pool`) has a worker of its own, named by the slot (``CallOptions.slot``):
one at a time, whatever its archive, because the slot's worker holds the slot's lock and GPUs on the host
for its whole life (:mod:`remote_exec.runner.slot`). It is started with the slot's placement and answers
once it holds them; until then it reports ``waiting`` events, which :meth:`WorkerPool.slot` passes on.
"""

from __future__ import annotations

import collections
import json
import threading
import time
from collections.abc import Callable
from typing import Any

from ..backends.base import Backend
from ..errors import RunnerError
from ..launchers.base import Launcher
from ..packing import DistributionArchive
from .bootstrap import start_runner
from .channel import Channel
from .options import CallOptions, PhaseCallback

__all__ = ["MAX_WORKERS_PER_HOST", "SlotEvent", "WorkerPool"]

#: Persistent workers kept per host, interpreter and workdir (one per archive: tasks of different code each
#: keep theirs); beyond this the least recently used one is stopped.
MAX_WORKERS_PER_HOST = 4

#: Told of a slot worker's events before it serves: ``{"event": "waiting", "busy": {...}}`` and the like.
SlotEvent = Callable[[dict[str, Any]], None]

_Key = tuple[int, str, str, str]


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


class WorkerPool:
    """The persistent workers of one coordinator, least recently used first, and its pool slots' workers."""

    def __init__(self, per_host: int = MAX_WORKERS_PER_HOST) -> None:
        self.per_host = per_host
        self._workers: collections.OrderedDict[_Key, Channel] = collections.OrderedDict()
        self._slots: dict[str, tuple[_Key, Channel]] = {}
        self._lock = threading.Lock()

    def get(self, launcher: Launcher, backend: Backend, archive: DistributionArchive, options: CallOptions,
            phase: PhaseCallback) -> Channel:
        """The worker for this host, interpreter, workdir and archive (started when missing); for a call of
        a pool slot, that slot's worker (:meth:`slot`)."""
        if options.slot is not None:
            return self.slot(launcher, backend, archive, options, phase)
        key = (id(backend), options.python, options.workdir, archive.sha256)
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

    def slot(self, launcher: Launcher, backend: Backend, archive: DistributionArchive, options: CallOptions,
             phase: PhaseCallback, on_event: SlotEvent | None = None) -> Channel:
        """The worker of the pool slot ``options.slot``, started (and its slot taken: its lock, its GPUs)
        when it has none for this archive; a worker it had for other code is stopped first (it holds the
        slot's GPUs). Waits while the host's GPUs are busy, telling ``on_event``.

        Only the slot's own thread calls this for a slot; workers of different slots start in parallel.
        """
        name = options.slot
        assert name is not None
        key = (id(backend), options.python, options.workdir, archive.sha256)
        with self._lock:
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
        with self._lock:
            self._slots[name] = (key, channel)
        return channel

    def slot_channel(self, name: str) -> Channel | None:
        """The worker the pool slot ``name`` has now, if any."""
        with self._lock:
            current = self._slots.get(name)
        return current[1] if current is not None else None

    def close_slot(self, name: str, *, kill: bool = False) -> None:
        """Stop the pool slot's worker (its GPUs are free once it ended); ``kill``: drop its channel at once
        (its host is down: asking it to quit would wait for an answer that does not come)."""
        with self._lock:
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
        with self._lock:
            return list(self._workers.values()) + [channel for _, channel in self._slots.values()]

    def close(self) -> None:
        """Stop every worker."""
        with self._lock:
            workers = list(self._workers.values()) + [channel for _, channel in self._slots.values()]
            self._workers.clear()
            self._slots.clear()
        for worker in workers:
            try:
                worker.close()
            except Exception:
                pass
