"""The runner's liveness policy, fed times and events: no fork, no sleep, no file descriptor."""

from __future__ import annotations

import signal

import pytest

from remote_exec.runner.policy import (
    INT_GRACE,
    KILL_GRACE,
    MAX_WAIT,
    SCHEDULER_ENDS,
    Finish,
    GiveUp,
    Heartbeat,
    Policy,
    Report,
    Signal,
    Sweep,
)

INT = Signal(signal.SIGINT)
TERM = Signal(signal.SIGTERM)
KILL = Signal(signal.SIGKILL)


def policy(*, timeout: float | None = None, heartbeat: float | None = 5.0,
           dead_after: float | None = None) -> Policy:
    return Policy(timeout=timeout, heartbeat=heartbeat, dead_after=dead_after, started=100.0)


def test_heartbeats_come_every_interval_of_silence() -> None:
    rules = policy(heartbeat=5.0)
    assert rules.step(104.9) == []
    assert rules.next_wake(104.0) == MAX_WAIT
    assert rules.next_wake(104.7) == pytest.approx(0.3)
    assert rules.step(105.0) == [Heartbeat()]
    assert rules.step(105.1) == []
    assert rules.step(110.0) == [Heartbeat()]
    rules.on_sent(113.0)  # output went out: it counts as a sign of life, the next heartbeat waits
    assert rules.step(115.0) == []
    assert rules.step(118.0) == [Heartbeat()]


def test_next_wake_is_the_nearest_deadline_capped_and_never_negative() -> None:
    rules = policy(timeout=10.0, heartbeat=5.0, dead_after=16.0)
    assert rules.next_wake(100.0) == MAX_WAIT
    assert rules.next_wake(104.8) == pytest.approx(0.2)
    rules.on_sent(109.0)
    assert rules.next_wake(109.7) == pytest.approx(0.3)  # the timeout at 110
    assert rules.next_wake(200.0) == 0.0


def test_without_heartbeat_or_limits_nothing_is_ever_due() -> None:
    rules = policy(heartbeat=None)
    assert [rules.step(100.0 + t) for t in (0, 1, 1000)] == [[], [], []]
    assert rules.next_wake(5000.0) == MAX_WAIT


def test_timeout_terminates_then_kills_after_the_grace() -> None:
    rules = policy(timeout=10.0, heartbeat=None)
    assert rules.step(109.9) == []
    assert rules.step(110.0) == [Report("timeout", "timed out after 10 s"), TERM]
    assert (rules.status, rules.detail) == ("timeout", "timed out after 10 s")
    assert rules.next_wake(110.0) == pytest.approx(min(KILL_GRACE, MAX_WAIT))
    assert rules.step(110.0 + KILL_GRACE - 0.1) == []
    assert rules.step(110.0 + KILL_GRACE) == [KILL]
    assert rules.step(130.0) == []  # once: the status and the signals are not repeated


def test_a_task_that_ends_within_the_grace_is_not_killed_again() -> None:
    rules = policy(timeout=1.0, heartbeat=None)
    assert rules.step(101.0) == [Report("timeout", "timed out after 1 s"), TERM]
    assert rules.on_exit(101.5) == [Sweep()]  # what the task left running ends with it
    assert rules.step(101.0 + KILL_GRACE) == [Finish()]
    assert rules.status == "timeout"


def test_cancel_frames_stop_the_task_as_ctrl_c_would_then_harder() -> None:
    """SIGINT first (the task's ``except KeyboardInterrupt`` and ``finally`` run), SIGTERM after the
    interrupt grace, SIGKILL after the kill grace."""
    rules = policy(heartbeat=None)
    assert rules.on_input(101.0, [b"H"]) == []
    assert rules.on_input(102.0, [b"H", b"C"]) == [Report("cancelled", "cancelled by the coordinator"), INT]
    assert rules.next_wake(102.0) == pytest.approx(min(INT_GRACE, MAX_WAIT))
    assert rules.step(102.0 + INT_GRACE - 0.1) == []
    assert rules.step(102.0 + INT_GRACE) == [TERM]
    assert rules.step(102.0 + INT_GRACE + KILL_GRACE) == [KILL]
    assert rules.step(200.0) == []
    assert policy().on_input(101.0, [b"Q"])[0] == Report("cancelled", "cancelled by the coordinator")


def test_a_cancelled_task_that_ends_on_sigint_gets_no_harder_signal() -> None:
    rules = policy(heartbeat=None)
    assert rules.on_input(102.0, [b"C"])[-1] == INT
    assert rules.on_exit(102.5) == [Sweep()]
    assert rules.step(102.0 + INT_GRACE + KILL_GRACE) == [Finish()]


def test_rx_cancel_of_a_detached_run() -> None:
    rules = Policy.for_call({"timeout": None}, 100.0, coordinator=False)
    assert rules.heartbeat is None and rules.dead_after is None  # nobody listens, no link to lose
    assert rules.cancel(100.5, "cancelled (rx cancel)") == [Report("cancelled", "cancelled (rx cancel)"), INT]
    assert rules.cancel(100.6, "cancelled (rx cancel)") == []
    assert rules.step(10_000.0) == [TERM, KILL]


def test_a_job_its_scheduler_ends_has_the_schedulers_sigterm_to_itself_for_a_grace() -> None:
    """The scheduler signalled the task too: nothing more during the interrupt grace (signal 0), then SIGTERM
    (for a scheduler that signals only the job's process group), then SIGKILL; no SIGINT at all."""
    rules = Policy.for_call({"timeout": None}, 100.0, coordinator=False)
    assert rules.cancel(100.5, "ended by its scheduler (SIGTERM)", SCHEDULER_ENDS) == [
        Report("cancelled", "ended by its scheduler (SIGTERM)"), Signal(0)]
    assert rules.step(100.5 + INT_GRACE - 0.1) == []
    assert rules.step(100.5 + INT_GRACE) == [TERM]
    assert rules.step(100.5 + INT_GRACE + KILL_GRACE) == [KILL]
    ended = Policy.for_call({"timeout": None}, 100.0, coordinator=False)
    ended.cancel(100.5, "ended by its scheduler (SIGTERM)", SCHEDULER_ENDS)
    assert ended.on_exit(101.0) == [Sweep()]  # its own handler ended it: no signal from rx
    assert ended.step(100.5 + INT_GRACE + KILL_GRACE) == [Finish()]


def test_the_first_status_decided_stands() -> None:
    rules = policy(timeout=10.0, heartbeat=None)
    rules.on_input(105.0, [b"C"])
    assert rules.step(111.0) == [TERM, KILL]  # the graces ended; the timeout passed, but the call was cancelled first
    assert rules.on_input(111.5, [b"C"]) == []
    assert (rules.status, rules.detail) == ("cancelled", "cancelled by the coordinator")
    late = policy(timeout=10.0, heartbeat=None)
    late.step(110.0)
    assert late.cancel(110.5, "cancelled (rx cancel)") == []
    assert late.status == "timeout"


def test_a_task_that_ended_decides_its_own_status() -> None:
    rules = policy(timeout=10.0, heartbeat=None)
    assert rules.on_exit(109.9) == [Sweep()]
    assert rules.step(110.5) == []  # still draining its output: no timeout for a task that ended in time
    assert rules.on_input(110.6, [b"C"]) == []
    assert rules.status is None
    assert rules.next_wake(110.5) == pytest.approx(0.4)  # the drain's end
    assert rules.step(111.0) == [Finish()]


def test_a_silent_link_is_given_up_after_dead_after() -> None:
    rules = policy(heartbeat=None, dead_after=16.0)
    assert rules.step(115.9) == []
    rules.on_input(110.0)  # a heartbeat from the coordinator: bytes, no frame that matters
    assert rules.step(125.9) == []
    actions = rules.step(126.0)
    assert actions == [GiveUp("nothing came from the coordinator for 16 s")]
    assert rules.status is None  # nobody is left to report to


def test_a_closed_channel_is_given_up_at_once() -> None:
    rules = policy(timeout=10.0)
    assert rules.on_eof(101.0) == [GiveUp("the coordinator closed the channel")]


def test_options_of_a_call() -> None:
    rules = Policy.for_call({"timeout": 3, "heartbeat": 2.0, "dead_after": 9.0}, 50.0)
    assert (rules.timeout, rules.heartbeat, rules.dead_after, rules.started) == (3, 2.0, 9.0, 50.0)
    defaults = Policy.for_call({}, 50.0)
    assert (defaults.timeout, defaults.heartbeat, defaults.dead_after) == (None, 5.0, None)
    assert rules.step(53.0) == [Report("timeout", "timed out after 3 s"), TERM, Heartbeat()]


def test_actions_compare_by_value() -> None:
    assert Signal(9) == Signal(9) and Signal(9) != Signal(15) and Signal(9) != GiveUp("9")
    assert repr(Report("timeout", "timed out")) == "Report(detail='timed out', status='timeout')"
    assert len({Heartbeat(), Heartbeat(), Finish()}) == 2


def test_each_action_calls_the_loop_method_of_its_name() -> None:
    calls: list[tuple[str, tuple[object, ...]]] = []

    class Loop:
        def heartbeat(self) -> None:
            calls.append(("heartbeat", ()))

        def signal(self, signal: int) -> None:
            calls.append(("signal", (signal,)))

        def report(self, status: str, detail: str) -> None:
            calls.append(("report", (status, detail)))

        def give_up(self, reason: str) -> None:
            calls.append(("give_up", (reason,)))

        def sweep(self) -> None:
            calls.append(("sweep", ()))

        def finish(self) -> None:
            calls.append(("finish", ()))

    for action in (Heartbeat(), TERM, Report("timeout", "t"), GiveUp("gone"), Sweep(), Finish()):
        action.apply(Loop())
    assert calls == [("heartbeat", ()), ("signal", (signal.SIGTERM,)), ("report", ("timeout", "t")),
                     ("give_up", ("gone",)), ("sweep", ()), ("finish", ())]
