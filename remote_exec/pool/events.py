"""What a pool tells about itself: an observer interface, and the counts every view is drawn from.

The pool calls a :class:`PoolObserver` when a call is queued, starts, is tried again or ends, and when a
slot or a host changes state. :class:`Tally` keeps the counts (per host: running, done, failed; queued;
calls per second; time left), which :meth:`remote_exec.pool.Executor.status` returns and the live view
(:mod:`.progress`) draws.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .placement import HostState, Slot
    from .work import Work

__all__ = ["HostCounts", "PoolObserver", "Tally", "Tee"]


class PoolObserver:
    """Told of what happens in a pool (every method does nothing here; override what you need).

    Called from the pool's threads: keep each call short and thread-safe.
    """

    def queued(self, work: Work) -> None:
        """A call was submitted."""

    def started(self, work: Work, slot: Slot) -> None:
        """An attempt of a call started on a slot."""

    def retried(self, work: Work, slot: Slot, error: str) -> None:
        """An attempt failed for a reason outside the task; the call waits to be tried again."""

    def finished(self, work: Work, slot: Slot | None, seconds: float, error: BaseException | None,
                 failed: bool) -> None:
        """The call's outcome is set: a value, or ``error`` (``failed``: either; a script's run that exited
        non-zero fails with a value). ``slot`` None: cancelled, or failed before it ran."""

    def slot_state(self, slot: Slot, state: str, detail: str | None) -> None:
        """A slot is ``starting``, ``waiting`` (for GPUs: ``detail`` says what holds them), ``ready``,
        ``restarting`` (its worker failed) or ``stopped``."""

    def host_state(self, host: HostState, state: str, detail: str | None) -> None:
        """A host is ``up``, ``down`` (looked at again later) or ``lost``."""

    def close(self) -> None:
        """The pool has shut down."""


@dataclass
class HostCounts:
    """One host's calls.

    Attributes:
        running: Calls running there now.
        done: Calls that ended there with a value.
        failed: Calls that ended there with an exception.
        retried: Attempts there that failed for a reason outside the task.
        state: ``up``, ``down`` or ``lost``.
        detail: Why it is down or lost.
    """

    running: int = 0
    done: int = 0
    failed: int = 0
    retried: int = 0
    state: str = "up"
    detail: str | None = None


@dataclass
class _Totals:
    queued: int = 0
    done: int = 0
    failed: int = 0
    cancelled: int = 0
    submitted: int = 0
    ends: collections.deque[float] = field(default_factory=collections.deque)


class Tally(PoolObserver):
    """The counts of a pool, kept as it runs.

    Attributes:
        hosts: Counts per host.
        slots: Every slot seen, by name (its state and detail are the slot's own).
        began: When the first call was queued (monotonic clock).
        expected: How many calls there will be, when known (a sweep): the time left counts from it.
    """

    #: Seconds of finished calls the rate is measured over.
    WINDOW = 30.0

    def __init__(self) -> None:
        self.hosts: dict[str, HostCounts] = {}
        self.slots: dict[str, Slot] = {}
        self.began: float | None = None
        self.expected: int | None = None
        self._totals = _Totals()
        self._lock = threading.Lock()

    def queued(self, work: Work) -> None:
        with self._lock:
            if self.began is None:
                self.began = time.monotonic()
            self._totals.queued += 1
            self._totals.submitted += 1

    def _since(self) -> float:
        return self.began if self.began is not None else time.monotonic()

    def _host(self, host: str) -> HostCounts:
        return self.hosts.setdefault(host, HostCounts())

    def started(self, work: Work, slot: Slot) -> None:
        with self._lock:
            self.slots[slot.name] = slot
            self._totals.queued -= 1
            self._host(slot.host).running += 1

    def retried(self, work: Work, slot: Slot, error: str) -> None:
        with self._lock:
            counts = self._host(slot.host)
            counts.running -= 1
            counts.retried += 1
            self._totals.queued += 1

    def finished(self, work: Work, slot: Slot | None, seconds: float, error: BaseException | None,
                 failed: bool) -> None:
        with self._lock:
            if slot is not None:
                counts = self._host(slot.host)
                counts.running -= 1
                if failed:
                    counts.failed += 1
                else:
                    counts.done += 1
            else:
                self._totals.queued -= 1
            if work.future.cancelled():
                self._totals.cancelled += 1
            elif failed:
                self._totals.failed += 1
            else:
                self._totals.done += 1
            now = time.monotonic()
            self._totals.ends.append(now)
            while self._totals.ends and self._totals.ends[0] < now - self.WINDOW:
                self._totals.ends.popleft()

    def slot_state(self, slot: Slot, state: str, detail: str | None) -> None:
        with self._lock:
            self.slots[slot.name] = slot
            self._host(slot.host)

    def host_state(self, host: HostState, state: str, detail: str | None) -> None:
        with self._lock:
            counts = self._host(host.name)
            counts.state, counts.detail = state, detail

    def snapshot(self) -> dict[str, Any]:
        """The counts now: ``queued``, ``running``, ``done``, ``failed``, ``cancelled``, ``submitted``,
        ``rate`` (calls/s over the last half minute), ``eta`` (seconds, or None) and ``hosts``."""
        with self._lock:
            totals = self._totals
            now = time.monotonic()
            ends = [end for end in totals.ends if end >= now - self.WINDOW]
            span = min(self.WINDOW, now - self._since())
            rate = len(ends) / span if ends and span > 0 else 0.0
            running = sum(max(counts.running, 0) for counts in self.hosts.values())
            total = self.expected if self.expected is not None else totals.submitted
            left = max(total - totals.done - totals.failed - totals.cancelled, 0)
            return {"queued": max(totals.queued, 0), "running": running, "done": totals.done,
                    "failed": totals.failed, "cancelled": totals.cancelled, "submitted": totals.submitted,
                    "total": total, "rate": rate, "eta": left / rate if rate > 0 else None,
                    "elapsed": now - self._since(),
                    "hosts": {name: vars(counts).copy() for name, counts in sorted(self.hosts.items())}}


class Tee(PoolObserver):
    """Tells several observers."""

    def __init__(self, *observers: PoolObserver) -> None:
        self.observers = [observer for observer in observers if observer is not None]

    def queued(self, work: Work) -> None:
        for observer in self.observers:
            observer.queued(work)

    def started(self, work: Work, slot: Slot) -> None:
        for observer in self.observers:
            observer.started(work, slot)

    def retried(self, work: Work, slot: Slot, error: str) -> None:
        for observer in self.observers:
            observer.retried(work, slot, error)

    def finished(self, work: Work, slot: Slot | None, seconds: float, error: BaseException | None,
                 failed: bool) -> None:
        for observer in self.observers:
            observer.finished(work, slot, seconds, error, failed)

    def slot_state(self, slot: Slot, state: str, detail: str | None) -> None:
        for observer in self.observers:
            observer.slot_state(slot, state, detail)

    def host_state(self, host: HostState, state: str, detail: str | None) -> None:
        for observer in self.observers:
            observer.host_state(host, state, detail)

    def close(self) -> None:
        for observer in self.observers:
            observer.close()
