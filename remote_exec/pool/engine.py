"""The pool's core: its calls, its hosts, one attempt of a call, and what each way of failing means.

An :class:`Engine` owns the feed of waiting calls (:class:`~.work.Feed`), the state of every host
(:class:`~.placement.HostState`) and one placement per host, which takes calls and hands each attempt to
:meth:`Engine.attempt`. How an attempt ends decides what happens next:

    the task returned                    the future's result
    the task raised / failed             the future's exception (tried again only if ``retry_on`` matches)
    the link failed (ConnectError, ...)  the host is down; the call goes to another host (``retries``)
    the worker failed (RunnerError, ...) the slot starts a fresh worker; the call is tried again
    the host can never run it            the host is lost; the call goes elsewhere, not counted
    (auth, host key, no interpreter, no GPUs)
    anything else (serialization, ...)   the future's exception

A future's outcome is set exactly once: a call whose attempt was given up (its link dead) runs again
elsewhere, and only the attempt that reports back counts. The call itself may have run to its end on the
host that dropped: what it did there (files it wrote outside its run directory, say) may happen twice.
When every host is lost, the calls still waiting fail with :class:`BrokenPool` (its ``__cause__`` is the
last host's failure), as a broken ``ProcessPoolExecutor`` fails its pending futures.
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import BrokenExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..advice import run_chain
from ..errors import (
    AuthError,
    BackendError,
    CommandTimeout,
    ConfigError,
    HostKeyError,
    IntegrityError,
    Interrupted,
    RemoteExecError,
    RunnerError,
)
from .events import PoolObserver
from .placement import HostState, Placement, Slot, placement_class
from .work import Feed, Work

if TYPE_CHECKING:
    from ..config import Configuration
    from ..coordinator import Coordinator
    from ..session import Result, Session
    from ..sync.plan import ProjectPlan

__all__ = ["BrokenPool", "Engine", "PoolSettings", "classify_failure"]

logger = logging.getLogger(__name__)

#: Reasons of a RunnerError that mean the host can never run the calls.
_HOST_NEVER = ("interpreter-missing", "python-too-old", "no-slot")


class BrokenPool(RemoteExecError, BrokenExecutor):
    """Every host of the pool is lost: the calls still waiting cannot run (``__cause__`` says why)."""

    exit_code = 255


@dataclass(frozen=True)
class PoolSettings:
    """How a pool runs its calls.

    Attributes:
        hosts: The hosts, as the user names them.
        per_host: Slots per host (None: one per ``gpus`` GPUs the host has, or 1 without GPUs).
        gpus: GPUs each call holds (0: none).
        retries: How many times a call is tried again after a failure that was not the task's.
        retry_on: Exception types of the task that are tried again too (within ``retries``).
        config: The configuration the hosts are resolved in.
        cwd: The directory the calls are made from (project, workspace).
        gpu_request: The GPU part of every slot's request (see :class:`~.placement.GpuPolicy`).
        options: The calls' task options (``backend``, ``python``, ``timeout``, ``env``, ...).
    """

    hosts: tuple[str, ...]
    per_host: int | None
    gpus: int
    retries: int
    retry_on: tuple[type[BaseException], ...]
    config: Configuration
    cwd: str
    gpu_request: dict[str, Any]
    options: dict[str, Any]


def classify_failure(exc: BaseException) -> str:
    """What a failure outside the task means: ``lost`` (the host never will work), ``down`` (its link
    failed), ``worker`` (the slot's worker failed), ``call`` (this call cannot run: no retry)."""
    if isinstance(exc, (AuthError, HostKeyError, ConfigError)):
        return "lost"
    if isinstance(exc, RunnerError):
        return "lost" if exc.reason in _HOST_NEVER else "worker"
    if isinstance(exc, CommandTimeout):
        return "call"
    if isinstance(exc, BackendError):
        return "down"
    if isinstance(exc, IntegrityError):
        return "worker"
    return "call"


def _line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


class Engine:
    """One pool: the calls, the hosts and their placements.

    Attributes:
        settings: How it runs its calls.
        coordinator: The process's coordinator (connections, workers, records).
        feed: The calls waiting for a slot.
        hosts: Every host's state, by name.
        observer: Told of every change (progress, counts).
        pool_id: Names this pool's slots and ledger keys.
        owner: Who holds this pool's slots, as their lock files on the hosts say.
        finished: Set once no call is left and none will come (or the pool broke).
        pack_lock: Held while a slot has the calls' archive built (one build serves every slot).
    """

    def __init__(self, settings: PoolSettings, coordinator: Coordinator, observer: PoolObserver,
                 owner: dict[str, Any] | None = None) -> None:
        self.settings = settings
        self.coordinator = coordinator
        self.observer = observer
        self.feed = Feed()
        self.hosts = {name: HostState(name) for name in settings.hosts}
        self.pool_id = secrets.token_hex(3)
        self.owner = {"coordinator": f"{socket.gethostname()}:{_own_pid()}", **(owner or {})}
        self.finished = threading.Event()
        self.broken: BrokenPool | None = None
        self.interrupting = False
        self._placements: list[Placement] = []
        self._lock = threading.Lock()
        self.pack_lock = threading.Lock()
        self._in_flight = 0
        self._plans: dict[tuple[Any, ...], tuple[ProjectPlan | None]] = {}
        self._count = 0
        self._shutdown = False
        self._closed = False

    # -- calls in -------------------------------------------------------------------------------------

    def next_index(self) -> int:
        """The next call's number."""
        with self._lock:
            index = self._count
            self._count += 1
            return index

    def submit(self, work: Work) -> None:
        """Queue a call (the hosts' placements start with the first).

        Raises:
            BrokenPool: Every host is lost.
            RuntimeError: The pool is shut down.
        """
        with self._lock:
            if self.broken is not None:
                raise self.broken
            if self._shutdown:
                raise RuntimeError("cannot submit calls after shutdown")
            self._in_flight += 1
        self.observer.queued(work)
        self.feed.put(work)
        self._start()

    def _start(self) -> None:
        with self._lock:
            if self._placements:
                return
            config = self.settings.config
            placements = [placement_class(config.remote(host.name).scheduler)(self, host)
                          for host in self.hosts.values()]  # all or none (an unknown scheduler raises)
            self._placements = placements
        for placement in placements:
            placement.start()

    def others_up(self, host: str) -> bool:
        """Whether a host other than ``host`` can take calls now."""
        return any(state.status == "up" for name, state in self.hosts.items() if name != host)

    def request(self, slot_name: str, host: str) -> dict[str, Any]:
        """The slot request of a slot (its owner record, and the GPUs it asks for)."""
        return {**self.settings.gpu_request, "owner": {**self.owner, "slot": slot_name, "host": host}}

    def plan(self, work: Work, session: Session) -> None:
        """Find ``work``'s project once per code and place (its tree is still scanned at every call):
        resolving the root costs more than a warm call itself (``Coordinator.plan_for``)."""
        if work.code is None:
            return  # calls of unknown code: each finds its own
        options = session.context.get("options") or {}
        key = (work.code, session.context.get("cwd"), repr(options.get("project")), repr(options.get("include")),
               bool(options.get("follow_symlinks")))
        with self._lock:
            known = self._plans.get(key)
        if known is None:
            known = (self.coordinator.plan_for(session),)
            with self._lock:
                self._plans[key] = known
        session.local["plan"] = known

    # -- one attempt ----------------------------------------------------------------------------------

    def attempt(self, work: Work, slot: Slot, session: Session) -> None:
        """Run one attempt of ``work`` on ``slot`` (``session``: made for it) and settle what came of it."""
        session.local.update(task_key=work.key, attempts=work.attempts, coordinator=self.coordinator,
                             task_fields={"slot": slot.label, "gpus": slot.gpu_indices})
        slot.current, slot.state = work, "running"
        started = time.monotonic()
        self.observer.started(work, slot)
        try:
            self.plan(work, session)
            if work.begin is not None:
                work.begin(work, session, slot)
            result = run_chain(session, work.chain, work.extensions)
        except BaseException as exc:  # shape: every failure is sorted out by settle_failure
            self.settle_failure(work, slot, exc, time.monotonic() - started)
            return
        finally:
            slot.current = None
            if slot.state == "running":
                slot.state = "ready"
        self.settle(work, slot, result, time.monotonic() - started)

    def run_array(self, works: list[Work], slot: Slot, parallel: int) -> None:
        """Run ``works`` (calls of one code, to a scheduler remote) as one job array and settle each."""
        sessions, ready = [], []
        for work in works:
            try:
                session = work.make_session(slot)
            except Exception as exc:  # its arguments cannot be serialized, say: the call's own failure
                self.settle_failure(work, slot, exc, 0.0)
                continue
            session.local.update(task_key=work.key, attempts=work.attempts, coordinator=self.coordinator,
                                 task_fields={"slot": slot.label, "gpus": []})
            sessions.append(session)
            ready.append(work)
            self.observer.started(work, slot)
        works = ready
        if not works:
            return
        started = time.monotonic()
        try:
            results = self.coordinator.run_array(sessions, parallel=parallel)
        except BaseException as exc:  # shape: every failure is sorted out by settle_failure
            for work in works:
                self.settle_failure(work, slot, exc, time.monotonic() - started)
            return
        for work, result in zip(works, results, strict=True):
            self.settle(work, slot, result, time.monotonic() - started)

    def settle(self, work: Work, slot: Slot, result: Result, seconds: float) -> None:
        """The call came back: its value, or the task's failure (tried again if ``retry_on`` says so)."""
        value_of: Callable[[Result], Any] = work.value_of or _unwrap
        try:
            value = value_of(result)
        except BaseException as exc:
            error = exc
            if self.interrupting and result.status == "cancelled":  # stopped by this pool's interrupt
                error = Interrupted(f"interrupted; the call on {slot.host} was stopped")
            if (not isinstance(error, Interrupted) and isinstance(error, self.settings.retry_on)
                    and work.failures < self.settings.retries and not self.interrupting):
                work.failures += 1
                self._again(work, slot, error)
                return
            self._end(work, slot, seconds, error=error)
            return
        self._end(work, slot, seconds, value=value)

    def settle_failure(self, work: Work, slot: Slot, exc: BaseException, seconds: float) -> None:
        """The attempt did not come back: the host, the worker or the call is to blame (see the module)."""
        if self.interrupting or isinstance(exc, (Interrupted, KeyboardInterrupt)):
            self._end(work, slot, seconds, error=Interrupted(f"interrupted; the call on {slot.host} was stopped"))
            return
        kind = classify_failure(exc)
        if kind == "call":
            self._end(work, slot, seconds, error=exc)
            return
        self.trouble(slot, exc)
        if kind != "lost":
            work.failures += 1
            if work.failures > self.settings.retries:
                self._end(work, slot, seconds, error=exc)
                return
        self._again(work, slot, exc)

    def trouble(self, slot: Slot, exc: BaseException) -> None:
        """A slot could not reach its host or its worker failed: mark the host down or lost, or have the
        slot start a fresh worker."""
        kind = classify_failure(exc)
        host = self.hosts[slot.host]
        for other in host.slots if kind in ("lost", "down") else [slot]:  # a down host's idle slots too
            self.coordinator.workers.close_slot(other.name, kill=True)
            other.gpus, other.code = [], None
        if kind in ("lost", "down"):
            status = host.down(_line(exc), lost=kind == "lost")
            slot.state, slot.detail = "down", _line(exc)
            self.observer.host_state(host, status, _line(exc))
            self.feed.wake()
            if all(state.status == "lost" for state in self.hosts.values()):
                self._break(exc)
        else:
            slot.state, slot.detail = "starting", _line(exc)
            self.observer.slot_state(slot, "restarting", _line(exc))

    def reject(self, work: Work, exc: BaseException) -> None:
        """``work`` cannot run anywhere (its code cannot be packed, its arguments serialized): its future
        gets the error, unless a slot took it meanwhile."""
        if not self.feed.remove(work):
            return
        if work.future.running() or work.future.set_running_or_notify_cancel():
            self._end(work, None, 0.0, error=exc)
        else:
            self.cancelled(work)

    def reached(self, slot: Slot) -> None:
        """A slot's worker is ready: its host is up."""
        host = self.hosts[slot.host]
        slot.state, slot.detail = "ready", None
        if host.up():
            self.observer.host_state(host, "up", None)
            self.feed.wake()
        self.observer.slot_state(slot, "ready", None)

    def _again(self, work: Work, slot: Slot, exc: BaseException) -> None:
        work.avoid.add(slot.host)
        self.observer.retried(work, slot, _line(exc))
        if self.broken is not None:
            self._end(work, slot, 0.0, error=self.broken)
            return
        self.feed.put(work, again=True)

    def _end(self, work: Work, slot: Slot | None, seconds: float, *, value: Any = None,
             error: BaseException | None = None) -> None:
        """Set the call's outcome (once) and count it out."""
        future = work.future
        if not future.done():
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(value)
            failed = error is not None or (work.failed_of is not None and work.failed_of(value))
            self.observer.finished(work, slot, seconds, error, failed)
            if work.finish is not None:
                try:
                    work.finish(work)
                except Exception:
                    logger.warning("recording call %s failed", work.label, exc_info=True)
        self._count_out()

    def cancelled(self, work: Work) -> None:
        """A queued call was cancelled before it ran."""
        self.observer.finished(work, None, 0.0, None, True)
        if work.finish is not None:
            work.finish(work)
        self._count_out()

    def _count_out(self) -> None:
        with self._lock:
            self._in_flight -= 1
            done = self._shutdown and self._in_flight <= 0
        if done:
            self._finish()

    def _finish(self) -> None:
        """No call is left and none will come: wake the slots (they release their hosts), close the views."""
        self.finished.set()
        self.feed.wake()
        with self._lock:
            closing, self._closed = not self._closed, True
        if closing:
            self.observer.close()

    def _break(self, cause: BaseException) -> None:
        """Every host is lost: fail what waits."""
        with self._lock:
            if self.broken is not None:
                return
            broken = BrokenPool("every host of the pool is lost: " + "; ".join(
                f"{state.name}: {state.reason}" for state in self.hosts.values()))
            broken.__cause__ = cause
            self.broken = broken
        for work in self.feed.drain():
            if work.future.running() or work.future.set_running_or_notify_cancel():
                self._end(work, None, 0.0, error=broken)
            else:
                self.cancelled(work)
        self.feed.close()
        self._finish()

    # -- the end --------------------------------------------------------------------------------------

    def idle(self) -> bool:
        """Whether a slot may stop: no call waits and none will come."""
        return self.finished.is_set() or (self.feed.closed and not len(self.feed) and self._in_flight <= 0)

    def shutdown(self, *, wait: bool, cancel_futures: bool, interrupt: bool) -> None:
        """No more calls; with ``cancel_futures`` the waiting ones are cancelled, with ``interrupt`` the
        running ones are stopped; with ``wait``, return once every slot has released its host."""
        with self._lock:
            self._shutdown = True
            done = self._in_flight <= 0
        if cancel_futures or interrupt:
            for work in self.feed.drain():
                if work.future.running():  # a call to try again: it started, it cannot be cancelled
                    self._end(work, None, 0.0, error=Interrupted("the pool was shut down before it ran again"))
                elif work.future.cancel():
                    self.cancelled(work)
        if interrupt:
            self.interrupting = True
            for placement in list(self._placements):
                placement.interrupt()
        self.feed.close()
        if done:
            self._finish()
        if wait:
            for placement in list(self._placements):
                placement.join()


def _unwrap(result: Result) -> Any:
    return result.unwrap()


def _own_pid() -> int:
    import os

    return os.getpid()
