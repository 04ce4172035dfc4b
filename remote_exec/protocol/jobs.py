"""Following a cluster's jobs: one thread per cluster polls the scheduler for all of them at once.

A :class:`JobWatch` belongs to the coordinator (one per cluster connection). Every job a call follows is
added to it; its thread asks the launcher about all of them in one poll (:meth:`Launcher.poll`: one
scheduler command over the cluster's one connection, never one per job), every ``fastest`` seconds while
something changes, the interval doubling up to ``slowest`` while nothing does. A submission, a cancel or
a result that came in makes it look again at once (:meth:`JobWatch.hurry`). Listeners hear of each change
of an element's state; :meth:`JobWatch.wait` blocks until an element's state satisfies a predicate.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ..backends.base import Backend
from ..launchers.base import Launcher
from ..launchers.jobs import Job, JobKey, JobState

__all__ = ["JobWatch", "Listener"]

logger = logging.getLogger(__name__)
#: Told of each new state of an element of a followed job.
Listener = Callable[[JobKey, JobState], None]


class JobWatch:
    """The followed jobs of one cluster, polled together.

    Attributes:
        backend: The cluster's login node connection.
        launcher: Asks the scheduler (its :meth:`~Launcher.poll`).
        fastest: Seconds between polls while states change.
        slowest: The longest interval, reached while nothing changes.
        memo: What the launcher learned of the cluster once (whether accounting answers).
        polls: How many polls ran (the benchmarks and tests count them).
    """

    def __init__(self, backend: Backend, launcher: Launcher, *, fastest: float = 1.0, slowest: float = 30.0) -> None:
        self.backend = backend
        self.launcher = launcher
        self.fastest = fastest
        self.slowest = slowest
        self.memo: dict[str, Any] = {}
        self.polls = 0
        self.error: BaseException | None = None
        self._jobs: dict[str, tuple[Job, int]] = {}
        self._states: dict[JobKey, JobState] = {}
        self._seen: dict[JobKey, list[str]] = {}
        self._listeners: dict[str, list[Listener]] = {}
        self._condition = threading.Condition()
        self._hurry = False
        self._closed = False
        self._thread: threading.Thread | None = None

    # -- what callers do -------------------------------------------------------------------------------

    def follow(self, job: Job, listener: Listener | None = None) -> None:
        """Follow ``job`` (until as many :meth:`forget` calls as :meth:`follow` calls); tell ``listener`` of
        each new state of its elements (the current one at once, if known)."""
        with self._condition:
            known, followers = self._jobs.get(job.job_id, (job, 0))
            self._jobs[job.job_id] = (known, followers + 1)
            if listener is not None:
                self._listeners.setdefault(job.job_id, []).append(listener)
            current = [(key, state) for key, state in self._states.items() if key[0] == job.job_id]
            self._hurry = True
            self._condition.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"rx-jobs-{self.backend.host}", daemon=True)
                self._thread.start()
        if listener is not None:
            for key, state in current:
                listener(key, state)

    def forget(self, job: Job, listener: Listener | None = None) -> None:
        """Stop following ``job`` for one caller (and stop telling ``listener``)."""
        with self._condition:
            known, followers = self._jobs.get(job.job_id, (job, 0))
            if listener is not None and listener in self._listeners.get(job.job_id, []):
                self._listeners[job.job_id].remove(listener)
            if followers > 1:
                self._jobs[job.job_id] = (known, followers - 1)
                return
            self._jobs.pop(job.job_id, None)
            self._listeners.pop(job.job_id, None)
            for key in [key for key in self._states if key[0] == job.job_id]:
                self._states.pop(key, None)
                self._seen.pop(key, None)

    def state(self, key: JobKey) -> JobState | None:
        """The last state of one element (None before the first poll saw it)."""
        with self._condition:
            return self._states.get(key)

    def seen(self, key: JobKey) -> list[str]:
        """Every state the polls saw the element in, in order (repeats left out)."""
        with self._condition:
            return list(self._seen.get(key, []))

    def hurry(self) -> None:
        """Poll now, and at the fastest interval again."""
        with self._condition:
            self._hurry = True
            self._condition.notify_all()

    def wait(self, key: JobKey, until: Callable[[JobState], bool], timeout: float,
             poke: float | None = None) -> JobState | None:
        """Wait up to ``timeout`` seconds until the element's state satisfies ``until``; with ``poke``, ask
        for a poll every ``poke`` seconds meanwhile. Return its state then (or the last one)."""
        deadline = time.monotonic() + timeout
        with self._condition:
            while True:
                state = self._states.get(key)
                left = deadline - time.monotonic()
                if (state is not None and until(state)) or left <= 0 or self._closed:
                    return state
                if poke is not None:
                    self._hurry = True
                    self._condition.notify_all()
                self._condition.wait(min(left, poke or left))

    def close(self) -> None:
        """Stop polling (the jobs go on)."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        if self._thread is not None:
            self._thread.join(5)

    # -- the polling thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        interval = self.fastest
        while True:
            with self._condition:
                while not self._jobs and not self._closed:
                    self._condition.wait()
                if self._closed:
                    return
                self._hurry = False
                jobs = [job for job, _ in self._jobs.values()]
                previous = dict(self._states)
            changed = self._poll(jobs, previous)
            interval = self.fastest if changed else min(interval * 2, self.slowest)
            with self._condition:
                if not self._hurry and not self._closed:
                    self._condition.wait(interval)

    def _poll(self, jobs: list[Job], previous: dict[JobKey, JobState]) -> bool:
        """One poll; tell the listeners what changed; return whether anything did."""
        try:
            states = self.launcher.poll(self.backend, jobs, previous, self.memo)
        except Exception as exc:  # the link or the scheduler hiccuped: keep the last states, ask again
            logger.debug("polling %s failed", self.backend.host, exc_info=True)
            with self._condition:
                self.error = exc
                self.polls += 1
            return False
        changes: list[tuple[Listener, JobKey, JobState]] = []
        with self._condition:
            self.error = None
            self.polls += 1
            for key, state in states.items():
                if key[0] not in self._jobs:
                    continue  # forgotten while the poll ran
                old = self._states.get(key)
                self._states[key] = state
                seen = self._seen.setdefault(key, [])
                if state.state and (not seen or seen[-1] != state.state):
                    seen.append(state.state)
                if old is None or _differs(old, state):
                    changes += [(listener, key, state) for listener in self._listeners.get(key[0], [])]
            self._condition.notify_all()
        for listener, key, state in changes:
            try:
                listener(key, state)
            except Exception:  # a listener's failure is its own
                logger.debug("a job listener failed", exc_info=True)
        return bool(changes) or any(previous.get(key) is None or _differs(previous[key], state)
                                    for key, state in states.items())


def _differs(old: JobState, new: JobState) -> bool:
    """Whether a user would notice the change (state, phase, reason, nodes, place in the queue)."""
    return (old.state, old.phase, old.reason, old.nodes, old.position) != (
        new.state, new.phase, new.reason, new.nodes, new.position)
