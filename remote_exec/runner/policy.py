"""When to heartbeat, time out, cancel, give up on the coordinator and kill: one policy for every loop.

The runner watches a running call in three loops: the per-call supervisor (:mod:`.supervise`), a persistent
worker's watcher thread (:mod:`.worker`) and ``attach`` following a detached run (:mod:`.detached`). They
do the I/O; :class:`Policy` decides. It is a pure function of time and events: a loop tells it what
happened (:meth:`Policy.on_input`, :meth:`Policy.on_eof`, :meth:`Policy.cancel`, :meth:`Policy.on_sent`,
:meth:`Policy.on_exit`), asks it what is due (:meth:`Policy.step`) and how long it may sleep
(:meth:`Policy.next_wake`), and applies the actions it gets back (``action.apply(loop)`` calls the loop's
method of the same name, see :class:`Actor`):

- :class:`Heartbeat`: send a B frame;
- :class:`Signal`: send a signal to the task and everything it started (its containment, see
  :mod:`.contain`), one step of a stop sequence (:data:`CANCEL`: SIGINT, so that ``except
  KeyboardInterrupt`` and ``finally`` run and what they write is brought back, then SIGTERM, then SIGKILL;
  :data:`TERMINATE`: SIGTERM, then SIGKILL), each after the previous one's grace;
- :class:`Report`: the runner decided the call's status (``timeout`` or ``cancelled``, with its detail);
  the first status decided stands;
- :class:`GiveUp`: the coordinator is gone (its channel closed, or it went silent for ``dead_after``);
- :class:`Sweep`: the task's own process ended: stop whatever it left running (and say so in the result);
- :class:`Finish`: the task ended and its output had the drain time to arrive: stop watching.

Nothing here reads a clock, sleeps or touches a file descriptor, so the rules are unit-tested by feeding
times (tests/unit/test_runner_policy.py).
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing is not imported at run time: the per-call runner imports this module
if TYPE_CHECKING:
    import signal as _signal
    from collections.abc import Iterable, Mapping
    from typing import Any, Protocol

    class Actor(Protocol):
        """A loop that applies actions: one method per kind of action."""

        def heartbeat(self) -> None:
            """Send a heartbeat frame."""

        def signal(self, signal: int) -> None:
            """Send ``signal`` to the task's process group."""

        def report(self, status: str, detail: str) -> None:
            """The runner decided the call's status."""

        def give_up(self, reason: str) -> None:
            """The coordinator is gone."""

        def sweep(self) -> None:
            """The task's process ended: stop what it left running."""

        def finish(self) -> None:
            """Stop watching: the task ended and its output arrived."""
else:
    import _signal  # signal's enums cost the per-call runner too much to import

__all__ = ["CANCEL", "INT_GRACE", "KILL_GRACE", "SCHEDULER_ENDS", "TERMINATE", "Action", "Finish", "GiveUp",
           "Heartbeat", "Policy", "Report", "Signal", "Sweep"]

#: Seconds between SIGTERM and SIGKILL to a task's process group.
KILL_GRACE = 2.0
#: Seconds a cancelled task has to end on SIGINT (its ``except KeyboardInterrupt`` and ``finally``)
#: before SIGTERM.
INT_GRACE = 2.0
#: How a cancelled call (Ctrl-C, a C or Q frame, rx cancel) stops its task: as a terminal's Ctrl-C would,
#: then harder; each signal after the previous one's grace (:attr:`Policy.int_grace`, :attr:`Policy.kill_grace`).
CANCEL: tuple[int, ...] = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGKILL)
#: How a timed-out call stops its task.
TERMINATE: tuple[int, ...] = (_signal.SIGTERM, _signal.SIGKILL)
#: How a scheduler's job ends its task when the scheduler ends the job (scancel, a time limit, a preemption):
#: the scheduler sent SIGTERM to every process of the job, the task's too, so that signal is the task's to
#: handle alone (signal 0 sends nothing: a grace of :attr:`Policy.int_grace`); then SIGTERM, for a scheduler
#: that signals only the job's process group, not the task's; then SIGKILL. (SIGINT first, as for rx cancel,
#: raced the scheduler's SIGTERM: a task could get KeyboardInterrupt instead of its SIGTERM handler.)
SCHEDULER_ENDS: tuple[int, ...] = (0, _signal.SIGTERM, _signal.SIGKILL)
#: Seconds the task's output may keep arriving after the task process ended (a process it left behind
#: outside its group may hold the pipes open).
DRAIN = 1.0
#: The longest a loop sleeps between two steps, whatever is due.
MAX_WAIT = 0.5
#: Frames from the coordinator that cancel the running call.
CANCEL_FRAMES = (b"C", b"Q")


class Action:
    """Something a loop must do now; compared by type and fields (the tests compare lists of them)."""

    __slots__: tuple[str, ...] = ()

    def _fields(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Action) and type(other) is type(self) and self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash((type(self), self._fields()))

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({fields})"

    def apply(self, actor: Actor) -> None:
        """Have ``actor`` (a loop) do it."""
        raise NotImplementedError


class Heartbeat(Action):
    """Send a heartbeat frame (B): nothing else went out for ``heartbeat`` seconds."""

    __slots__ = ()

    def apply(self, actor: Actor) -> None:
        actor.heartbeat()


class Signal(Action):
    """Send ``signal`` to the task's whole process group."""

    __slots__ = ("signal",)

    def __init__(self, signal: int) -> None:
        self.signal = signal

    def apply(self, actor: Actor) -> None:
        actor.signal(self.signal)


class Report(Action):
    """The runner decided how the call ends: ``status`` (``timeout``, ``cancelled``) and its detail."""

    __slots__ = ("detail", "status")

    def __init__(self, status: str, detail: str) -> None:
        self.status = status
        self.detail = detail

    def apply(self, actor: Actor) -> None:
        actor.report(self.status, self.detail)


class GiveUp(Action):
    """The coordinator is gone: end the task and report nothing (nobody would read it)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def apply(self, actor: Actor) -> None:
        actor.give_up(self.reason)


class Sweep(Action):
    """The task's own process ended: stop what it left running (after a Sweep nothing of the task runs)."""

    __slots__ = ()

    def apply(self, actor: Actor) -> None:
        actor.sweep()


class Finish(Action):
    """The task ended and the drain time passed: stop watching, even if a pipe is still open."""

    __slots__ = ()

    def apply(self, actor: Actor) -> None:
        actor.finish()


class Policy:
    """The liveness rules of one call, from ``started`` (a monotonic time) on.

    Args:
        timeout: Seconds the task may run (None: no limit).
        heartbeat: Send a heartbeat when nothing went out for this long (None: never, no one listens).
        dead_after: Give up on the coordinator when nothing came in for this long (None: never).
        started: When the call started (the clock of every ``now`` given to the methods).
        kill_grace: Seconds between SIGTERM and SIGKILL.
        drain: Seconds the task's output may still arrive after it ended.
        int_grace: Seconds between SIGINT and SIGTERM when a call is cancelled.

    Attributes:
        status: The status the runner decided (None while the task decides it by ending).
        detail: The detail of that status.
        exited: When the task process ended (None while it runs).
    """

    def __init__(self, *, timeout: float | None, heartbeat: float | None, dead_after: float | None,
                 started: float, kill_grace: float = KILL_GRACE, drain: float = DRAIN,
                 int_grace: float = INT_GRACE) -> None:
        self.timeout = timeout
        self.heartbeat = heartbeat
        self.dead_after = dead_after
        self.started = started
        self.kill_grace = kill_grace
        self.int_grace = int_grace
        self.drain = drain
        self.status: str | None = None
        self.detail: str | None = None
        self.exited: float | None = None
        self.last_input = started
        self.last_sent = started
        self.stopping: list[tuple[float, int]] = []  # the stop sequence's next signals: (when, signal)

    @classmethod
    def for_call(cls, options: Mapping[str, Any], started: float, *, coordinator: bool = True) -> Policy:
        """The policy of a call from its options (G frame); without a coordinator (a detached run) there
        is no one to heartbeat and no link to lose."""
        return cls(timeout=options.get("timeout"),
                   heartbeat=float(options.get("heartbeat") or 5.0) if coordinator else None,
                   dead_after=(float(options.get("dead_after") or 0) or None) if coordinator else None,
                   started=started)

    # -- events ----------------------------------------------------------------------------------------

    def on_input(self, now: float, kinds: Iterable[bytes] = ()) -> list[Action]:
        """Bytes came from the coordinator (the link lives); ``kinds`` are the frames they completed."""
        self.last_input = now
        if any(kind in CANCEL_FRAMES for kind in kinds):
            return self.cancel(now, "cancelled by the coordinator")
        return []

    def on_eof(self, now: float) -> list[Action]:
        """The coordinator's channel closed."""
        return [GiveUp("the coordinator closed the channel")]

    def cancel(self, now: float, detail: str, sequence: tuple[int, ...] = CANCEL) -> list[Action]:
        """Stop the task (a C or Q frame, or ``rx cancel``): the :data:`CANCEL` sequence (SIGINT first), or
        ``sequence`` (:data:`SCHEDULER_ENDS` for a job its scheduler ends)."""
        return self.decide(now, "cancelled", detail, sequence)

    def on_sent(self, when: float) -> None:
        """A frame went out at ``when``: the next heartbeat is due ``heartbeat`` seconds later."""
        if when > self.last_sent:
            self.last_sent = when

    def on_exit(self, now: float) -> list[Action]:
        """The task process ended: whatever it left running ends with it."""
        self.exited = now
        self.stopping = []
        return [Sweep()]

    def decide(self, now: float, status: str, detail: str,
               sequence: tuple[int, ...] = TERMINATE) -> list[Action]:
        """Make ``status`` the call's status and stop the task with ``sequence``, unless a status was decided
        already or the task ended (then how it ended stands). The hook for any new reason to stop a task."""
        if self.status is not None or self.exited is not None:
            return []
        self.status, self.detail = status, detail
        return [Report(status, detail), *self._stop(now, sequence)]

    def _stop(self, now: float, sequence: tuple[int, ...]) -> list[Action]:
        """The first signal of ``sequence`` now, each next one after the previous one's grace."""
        graces: dict[int, float] = {0: self.int_grace, _signal.SIGINT: self.int_grace,
                                    _signal.SIGTERM: self.kill_grace}
        self.stopping = []
        at = now
        for index in range(1, len(sequence)):
            at += graces.get(sequence[index - 1], 0.0)
            self.stopping.append((at, sequence[index]))
        return [Signal(sequence[0])]

    # -- time ------------------------------------------------------------------------------------------

    def step(self, now: float) -> list[Action]:
        """What is due at ``now``: the drain's end, the timeout, SIGKILL after the grace, giving up on a
        silent link, a heartbeat (in that order)."""
        if self.exited is not None and now - self.exited >= self.drain:
            return [Finish()]
        actions: list[Action] = []
        if self.timeout is not None and now - self.started >= self.timeout:
            actions += self.decide(now, "timeout", f"timed out after {self.timeout:g} s")
        while self.stopping and now >= self.stopping[0][0]:
            actions.append(Signal(self.stopping.pop(0)[1]))
        if self.dead_after is not None and now - self.last_input >= self.dead_after:
            actions.append(GiveUp(f"nothing came from the coordinator for {self.dead_after:g} s"))
        if self.heartbeat is not None and now - self.last_sent >= self.heartbeat:
            self.last_sent = now
            actions.append(Heartbeat())
        return actions

    def next_wake(self, now: float) -> float:
        """Seconds until :meth:`step` may have something to do (at most :data:`MAX_WAIT`, at least 0)."""
        wait = MAX_WAIT
        for due in self._deadlines():
            wait = min(wait, due - now)
        return max(0.0, wait)

    def _deadlines(self) -> list[float]:
        deadlines = []
        if self.heartbeat is not None:
            deadlines.append(self.last_sent + self.heartbeat)
        if self.exited is not None:
            deadlines.append(self.exited + self.drain)
        elif self.timeout is not None and self.status is None:
            deadlines.append(self.started + self.timeout)
        if self.stopping:
            deadlines.append(self.stopping[0][0])
        if self.dead_after is not None:
            deadlines.append(self.last_input + self.dead_after)
        return deadlines
