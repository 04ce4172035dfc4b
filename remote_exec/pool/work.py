"""The calls of a pool and the queue they wait in.

A :class:`Work` is one call: its future, how to make its session for a slot, and its attempts. The
:class:`Feed` holds the calls not yet taken, in submission order, with calls to try again in front; slots
pull from it (a slow host takes fewer calls, a down host none). A call that failed on a host is offered to
the other hosts first, and to that host again only when no other host is up.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..advice import Advice, Extension
    from ..session import Result, Session
    from .placement import Slot

__all__ = ["Feed", "Work"]


@dataclass(eq=False)
class Work:
    """One call of a pool.

    Attributes:
        index: Its place in submission order (0, 1, ...).
        key: Its entry in the workspace run (unique within the run).
        label: How progress lines and output prefixes name it.
        future: Where its outcome goes (exactly once).
        make_session: A fresh session of the call for one attempt on a slot.
        chain: The advices its sessions go through (the last one runs it on the slot's host).
        extensions: The extensions told of every advice.
        value_of: What the future gets from the call's result (None: ``result.unwrap()``, which raises
            the task's exception).
        failed_of: Whether a value still means the call failed (a script's run that exited non-zero).
        begin: Called with the call, its session and the slot as an attempt starts (a sweep's child run
            starts recording there).
        attempts: What each attempt did (host, slot, GPUs, times, status, error), as the ledger records it.
        failures: Attempts that failed for a reason outside the task (a lost host, a crashed worker).
        avoid: Hosts it failed on (offered to the others first).
        finish: Called with the future once its outcome is set (a sweep records its child run there).
        code: Names the code the call runs (calls of equal code run in the same worker): a task's id.
    """

    index: int
    key: str
    label: str
    future: Future[Any]
    make_session: Callable[[Slot], Session]
    chain: Sequence[Advice]
    extensions: Sequence[Extension] = ()
    value_of: Callable[[Result], Any] | None = None
    failed_of: Callable[[Any], bool] | None = None
    begin: Callable[[Work, Session, Slot], None] | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)
    failures: int = 0
    avoid: set[str] = field(default_factory=set)
    finish: Callable[[Work], None] | None = None
    code: Any = None


class Feed:
    """The calls waiting for a slot, oldest first (calls to try again in front)."""

    def __init__(self) -> None:
        self._queue: collections.deque[Work] = collections.deque()
        self._changed = threading.Condition()
        self.closed = False

    def __len__(self) -> int:
        return len(self._queue)

    def put(self, work: Work, *, again: bool = False) -> None:
        """Queue ``work`` (``again``: in front, a call to try again)."""
        with self._changed:
            if again:
                self._queue.appendleft(work)
            else:
                self._queue.append(work)
            self._changed.notify_all()

    def _first(self, host: str, others_up: bool) -> Work | None:
        for work in self._queue:
            if host not in work.avoid or not others_up:
                return work
        return None

    def peek(self, host: str, others_up: Callable[[], bool], timeout: float) -> Work | None:
        """The call ``host`` would take next, without taking it; None after ``timeout`` s or once closed."""
        with self._changed:
            if not self._queue:
                self._changed.wait(timeout)
            return self._first(host, others_up()) if self._queue else None

    def take(self, host: str, others_up: Callable[[], bool]) -> Work | None:
        """Take the next call for ``host`` (None: nothing for it now)."""
        with self._changed:
            work = self._first(host, others_up()) if self._queue else None
            if work is not None:
                self._queue.remove(work)
            return work

    def remove(self, work: Work) -> bool:
        """Take ``work`` itself out of the queue; False if it is not there (a slot took it)."""
        with self._changed:
            try:
                self._queue.remove(work)
            except ValueError:
                return False
            return True

    def drain(self) -> list[Work]:
        """Take every waiting call (to cancel or fail them)."""
        with self._changed:
            works = list(self._queue)
            self._queue.clear()
            self._changed.notify_all()
            return works

    def close(self) -> None:
        """No more calls will come: wake every waiting slot."""
        with self._changed:
            self.closed = True
            self._changed.notify_all()

    def wake(self) -> None:
        """Wake every waiting slot (a host changed state)."""
        with self._changed:
            self._changed.notify_all()
