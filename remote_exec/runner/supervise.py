"""The per-call runner: fork the task into its own session and process group (held by a
:class:`~.contain.Containment`), stream its output, apply the :class:`~.policy.Policy` (heartbeats, timeout,
cancel, dead link, the runner's own SIGTERM) until it ends, then send its result."""

from __future__ import annotations

import os
import time

from ..protocol import wire
from .channel import CoordinatorGone, Poller, read_answer
from .child import fork_task, parse_result, run_child
from .contain import ENCLOSE_AFTER, Containment
from .prefork import GO_LIMIT
from .rundir import RunStatus, keep_for_attach, rmtree, sweep_runs
from .snapshot import open_run_dir

TYPE_CHECKING = False  # typing is not imported at run time: the runner's start-up is on every call's path
if TYPE_CHECKING:
    import signal
    from collections.abc import Callable
    from typing import Any

    from .channel import Out, Sink
    from .policy import Action, Policy
    from .prefork import Prefork
    from .result import Ending
    from .stdin import StdinFeed
else:
    import _signal as signal

__all__ = ["serve_call", "supervise"]


def serve_call(options: dict[str, Any], session_bytes: bytes, reader: wire.FrameReader, cache_dir: str,
               out: Out, early: Prefork | None = None) -> None:
    """One call in a forked task process (the default, process-per-call mode); ``early``: the task process
    forked before the call came (:mod:`.prefork`), else one is forked now."""
    out.new_call(options["key"])
    keep = bool(options.get("keep"))
    later: list[Callable[[], None]] = []  # made durable once the result is out (see .store.ensure_tree)
    run_dir = open_run_dir(cache_dir, options, reader, out, private=keep, later=later)
    # A kept run directory tells who ran in it (and the sweep of dead runs leaves it alone).
    status = (RunStatus(run_dir, state="running", runner_pid=os.getpid(), started=time.time(), keep=True)
              if keep else None)
    ending = supervise(options, session_bytes, reader, run_dir, out, coordinator=True, status=status,
                       cache_dir=cache_dir, early=early)
    from .result import classify, send_classified

    hold = bool(options.get("hold")) and not keep  # the coordinator says what becomes of the result
    header, value, exc_data = classify(options, ending)
    def kept_for_attach() -> bool:
        if _answer(reader) != b"K":
            return False
        keep_for_attach(options, run_dir, header, value, exc_data)  # its disk was full: kept for rx attach
        return True

    try:  # send_classified removes (or pools, or keeps) the run directory
        send_classified(options, run_dir, header, value, exc_data, out, answer=kept_for_attach if hold else None)
    except BaseException:
        if not keep:
            rmtree(run_dir)
        raise
    finally:
        ending.release()
        for step in later:
            step()


def _answer(reader: wire.FrameReader, wait: float = 600.0) -> bytes:
    """What the coordinator said of the result: ``A`` (taken care of), ``K`` (keep it: it could not land
    it), or b"" (its channel closed first, it stopped this runner with SIGTERM, or nothing came within
    ``wait`` seconds)."""
    previous = signal.signal(signal.SIGTERM, _stopped)
    try:
        return read_answer(reader, wait)
    except CoordinatorGone:
        return b""
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stopped(signum: int, frame: object) -> None:
    raise CoordinatorGone("stopped while the result waited for its answer")


def supervise(options: dict[str, Any], session_bytes: bytes, reader: wire.FrameReader, run_dir: str,
              out: Sink, *, coordinator: bool, status: RunStatus | None = None,
              cache_dir: str | None = None, early: Prefork | None = None, scheduled: bool = False) -> Ending:
    """Fork the task into its own process group and watch it to its end.

    With a coordinator, its frames arrive on stdin (heartbeats, cancel) and its absence, or a SIGTERM to
    this process, ends the task; without one (a detached run), SIGTERM to this process cancels the task.
    ``status``, if given, gets the task's pid and start time. With ``cache_dir``, the run directories of
    runners that died are swept while the task starts. ``early``: a task process waiting for its call
    (:mod:`.prefork`), used unless the session is too large for its pipe. ``scheduled``: a scheduler's job,
    whose SIGTERM came from the scheduler (the task got it too: :data:`.policy.SCHEDULER_ENDS`).

    Raises:
        CoordinatorGone: The coordinator went away (or this runner was told to stop); everything the task
            started was ended and the run directory removed.
    """
    started = time.monotonic()
    if early is not None and len(session_bytes) <= GO_LIMIT:
        containment = early.containment
        task = _TaskProcess.take(early, session_bytes, run_dir, options)
    else:
        if early is not None:
            early.drop()
        containment = Containment(os.path.basename(run_dir))
        task = _TaskProcess.fork(session_bytes, run_dir, options, containment, getattr(out, "fd", -1))
    policy: Policy | None = None
    try:
        # Imported once the task process exists: they load while it starts up, not before it.
        from .policy import Policy
        from .result import Ending, oom_kills

        containment.adopt(task.pid)
        oom_before = oom_kills()
        policy = Policy.for_call(options, started, coordinator=coordinator)
        if status is not None:
            status.update(task_pid=task.pid, task=containment.task)
        watch = _Watch(task, policy, out, reader if coordinator else None, containment, scheduled=scheduled)
        out.event({"event": "started", "pid": task.pid, "run_dir": run_dir, "host": os.uname().nodename})
        if cache_dir is not None:
            sweep_runs(cache_dir)
        watch.run()
    except CoordinatorGone:
        task.end(min(policy.kill_grace, 1.0) if policy is not None else 0.0)
        containment.close()
        rmtree(run_dir)
        raise
    except BaseException:  # the runner failed: it leaves no task behind (at once if it had no policy yet)
        task.end(policy.kill_grace if policy is not None else 0.0)
        containment.close()
        raise
    finally:
        task.close()
    return Ending(started, exit_status=watch.exit_status, status=policy.status, detail=policy.detail,
                  oom_before=oom_before, loaded=parse_result(watch.result), contained=containment.report(),
                  release=containment.close)


class _TaskProcess:
    """The forked task process: its pid, the read ends of its stdout, stderr and result pipes, and the
    pipe on which SIGCHLD wakes the watcher the moment the task ends (``set_wakeup_fd``)."""

    def __init__(self, pid: int, pipes: dict[bytes, int], wake: tuple[int, int], previous_wakeup: int,
                 containment: Containment) -> None:
        self.pid = pid
        self.pipes = pipes
        self.wake = wake
        self.previous_wakeup = previous_wakeup
        self.containment = containment
        self.stdin: StdinFeed | None = None

    @classmethod
    def fork(cls, session_bytes: bytes, run_dir: str, options: dict[str, Any], containment: Containment,
             out_fd: int = -1) -> _TaskProcess:
        """Start the task process (:func:`~.child.run_child`) with its own pipes (the protocol's ``out_fd``
        closed in it: nothing the task leaves behind holds the channel open)."""
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        result_r, result_w = os.pipe()
        in_r, in_w = os.pipe() if options.get("stdin") else (None, None)  # rx run forwards its stdin
        wake_r, wake_w, previous_wakeup = _wake_on_sigchld()

        def start() -> None:  # pragma: no cover - runs in the child
            containment.join()
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C is a KeyboardInterrupt
            run_child(session_bytes, run_dir, options, out_w, err_w, result_w, in_r)

        pid = fork_task(start, (out_r, err_r, result_r, wake_r, wake_w, in_w, out_fd if out_fd > 2 else None))
        for fd in (out_w, err_w, result_w, in_r):
            if fd is not None:
                os.close(fd)
        task = cls(pid, {b"O": out_r, b"E": err_r, b"R": result_r}, (wake_r, wake_w), previous_wakeup,
                   containment)
        task.feed_stdin(in_w)
        return task

    @classmethod
    def take(cls, early: Prefork, session_bytes: bytes, run_dir: str, options: dict[str, Any]) -> _TaskProcess:
        """Hand the early task process (:mod:`.prefork`) its call; the runner is its subreaper before it
        runs anything."""
        wake_r, wake_w, previous_wakeup = _wake_on_sigchld()
        task = cls(early.pid, early.pipes, (wake_r, wake_w), previous_wakeup, early.containment)
        early.containment.adopt(early.pid)
        early.go(run_dir, options, session_bytes)
        task.feed_stdin(early.stdin)
        return task

    def feed_stdin(self, in_w: int | None) -> None:
        """The task's stdin pipe, fed from the coordinator's I frames (None: the task reads /dev/null)."""
        if in_w is not None:
            from .stdin import StdinFeed

            self.stdin = StdinFeed(in_w)

    def end(self, grace: float) -> None:
        """End the task and everything it started: SIGTERM, SIGKILL to what is still there after ``grace``."""
        contained = self.containment
        contained.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        try:
            while not os.waitpid(self.pid, os.WNOHANG)[0]:
                if time.monotonic() >= deadline:
                    contained.signal(signal.SIGKILL)
                    os.waitpid(self.pid, 0)
                    break
                time.sleep(0.02)
        except ChildProcessError:  # reaped already: it ended before
            pass
        contained.signal(signal.SIGKILL)
        contained.reap()

    def close(self) -> None:
        """Restore SIGCHLD and the wake-up fd; close the pipes still open (something the task left
        behind may hold their other ends)."""
        signal.set_wakeup_fd(self.previous_wakeup)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        if self.stdin is not None:
            self.stdin.close()
        for fd in (*self.wake, *self.pipes.values()):
            try:
                os.close(fd)
            except OSError:
                pass


def _wake_on_sigchld() -> tuple[int, int, int]:
    """A pipe that SIGCHLD writes to (``set_wakeup_fd``): (read end, write end, the previous wake-up fd)."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    return wake_r, wake_w, signal.set_wakeup_fd(wake_w)


class _Watch:
    """The loop over one task process: its output goes out as frames, its result is gathered, the
    coordinator's frames (``reader``; None for a detached run) and the clock go to the policy, whose
    actions are applied here."""

    def __init__(self, task: _TaskProcess, policy: Policy, out: Sink,
                 reader: wire.FrameReader | None, containment: Containment, *, scheduled: bool = False) -> None:
        self.task = task
        self.policy = policy
        self.out = out
        self.reader = reader
        self.containment = containment
        self.result = bytearray()
        self.exit_status: int | None = None
        self.cancelled = False
        self.scheduled = scheduled  # a scheduler's job: its SIGTERM came from the scheduler (SCHEDULER_ENDS)
        self.terminated = False
        self.finished = False
        self.poller = Poller()
        self.poller.register(task.wake[0], b"W")
        for tag, fd in task.pipes.items():
            self.poller.register(fd, tag)
        if reader is not None:  # the runner told to stop (a backend's kill): the task ends with it
            self.poller.register(0, b"I")
            signal.signal(signal.SIGTERM, self._terminate)
        else:  # a detached run: rx cancel (or the scheduler) sends SIGTERM to this process
            signal.signal(signal.SIGTERM, self._cancel)
            # A scheduler's warning before a time limit or a preemption (sbatch --signal=B:USR2@60) is the
            # task's to act on (a checkpoint): it goes on to the task's process group.
            for number in (signal.SIGUSR1, signal.SIGUSR2):
                signal.signal(number, self._forward)

    def _cancel(self, *_: object) -> None:
        self.cancelled = True

    def _terminate(self, *_: object) -> None:
        self.terminated = True

    def _forward(self, number: int, *_: object) -> None:
        self.containment.signal(number)

    def run(self) -> None:
        """Watch until the task ended and its pipes closed (or the drain time passed)."""
        policy = self.policy
        try:
            if self.reader is not None and self.reader.pending:  # frames that came with the call's own
                self._take(self.reader.feed(b""))
            while not self.finished:
                for fd, tag in self.poller.select(policy.next_wake(time.monotonic())):
                    self._ready(fd, tag)
                now = time.monotonic()
                if self.exit_status is None:
                    self._reap(now)
                if self.exit_status is not None and not self.task.pipes:
                    return
                if self.cancelled and self.scheduled:
                    from .policy import SCHEDULER_ENDS

                    self._apply(policy.cancel(now, "ended by its scheduler (SIGTERM)", SCHEDULER_ENDS))
                elif self.cancelled:
                    self._apply(policy.cancel(now, "cancelled (rx cancel)"))
                if self.terminated:
                    raise CoordinatorGone("the runner was told to stop (SIGTERM)")
                if self.exit_status is None and now - policy.started >= ENCLOSE_AFTER:
                    self.containment.enclose()
                policy.on_sent(self.out.last)  # the output just sent counts: no heartbeat right after it
                self._apply(policy.step(now))
        finally:
            self.poller.close()

    def _ready(self, fd: int, tag: bytes) -> None:
        if tag == b"I":
            self._input()
        elif tag == b"w" and self.task.stdin is not None:  # room in the task's stdin pipe again
            self.task.stdin.flush(self.poller, self.out)
        elif tag == b"W":
            try:
                os.read(fd, 512)
            except BlockingIOError:
                pass
            if self.exit_status is None:
                self._reap_others()
        else:
            data = os.read(fd, 1 << 20 if tag == b"R" else 1 << 16)
            if not data:
                self.poller.unregister(fd)
                os.close(self.task.pipes.pop(tag))
            elif tag == b"R":
                self.result += data
            else:
                self.out.send(tag, data)

    def _input(self) -> None:
        """Frames from the coordinator (heartbeats, cancel), or the end of its channel."""
        assert self.reader is not None
        data = os.read(0, 1 << 16)
        if not data:
            self.poller.unregister(0)
            self._apply(self.policy.on_eof(time.monotonic()))
            return
        self._take(self.reader.feed(data))

    def _take(self, frames: list[tuple[bytes, bytes]]) -> None:
        if self.task.stdin is not None:
            self.task.stdin.take(frames, self.poller, self.out)
        self._apply(self.policy.on_input(time.monotonic(), [kind for kind, _payload in frames]))

    def _reap_others(self) -> None:
        """Collect what the task left that ended (re-parented to this runner, its subreaper), never the task."""
        try:
            while True:
                found = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
                if found is None or found.si_pid in (0, self.task.pid):
                    return
                os.waitpid(found.si_pid, 0)
        except (ChildProcessError, OSError, AttributeError):
            return

    def _reap(self, now: float) -> None:
        done, raw = os.waitpid(self.task.pid, os.WNOHANG)
        if done:
            self.exit_status = raw
            self._apply(self.policy.on_exit(now))

    def _apply(self, actions: list[Action]) -> None:
        for action in actions:
            action.apply(self)

    # -- what the policy's actions do here (see policy.Actor) -------------------------------------------

    def heartbeat(self) -> None:
        self.out.send(b"B")

    def signal(self, signal: int) -> None:
        self.containment.signal(signal)

    def report(self, status: str, detail: str) -> None:
        """Nothing to do now: the policy keeps the status for the result."""

    def give_up(self, reason: str) -> None:
        raise CoordinatorGone(reason)

    def sweep(self) -> None:
        self.containment.sweep()

    def finish(self) -> None:
        self.finished = True
