"""One call on a runner: send it, stream its output, collect and check its result.

:func:`dispatch` is the protocol's entry point for an attached call: it starts a runner through the
target's launcher (or takes a persistent worker from the pool, for ``keep_warm``), sends the call's
options (``G``) and session (``S``, ``s``) over stdin (secrets and the per-call HMAC key travel there,
never on a command line), hands the task's output to the sinks as it arrives, and collects the result
(:mod:`.collect`). A Ctrl-C cancels the remote task first.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from ..backends.base import Backend, Process
from ..errors import (
    CommandTimeout,
    ConnectError,
    IntegrityError,
    Interrupted,
    LocalDiskFull,
    RemoteExecError,
    RunnerError,
    SyncError,
)
from ..launchers.base import Launcher
from ..packing import DistributionArchive
from ..session import Result, Session, wire_pickles
from . import places, wire
from .bootstrap import start_runner
from .channel import Channel, Flag, reap
from .collect import RESULT_FRAMES, Received, collect
from .options import (
    CallOptions,
    EventSink,
    FileLander,
    Outcome,
    OutputSink,
    PhaseCallback,
    ProgressCallback,
    ProjectCall,
    ProjectScan,
    SyncProgress,
    scanned,
)
from .stdin import StdinPump
from .tree import TREE_FRAMES, TreeAhead, TreeSender, ahead_frames

if TYPE_CHECKING:
    from .workers import WorkerPool

__all__ = ["STOP_MARGIN", "Call", "RunnerAhead", "StaleWorker", "dispatch", "run_call", "send_session"]

logger = logging.getLogger(__name__)

#: Seconds past a call's timeout that the coordinator waits for the runner's result before it gives the link
#: up (exit 124 all the same): the runner's kill grace (SIGTERM, SIGKILL 2 s later) and the way back. A link
#: that still carries heartbeats gets longer: the runner is alive and stops the task itself.
STOP_MARGIN = 4.0


#: Seconds a call interrupted with Ctrl-C (or SIGTERM) waits for its task to stop and its result, with the
#: files it wrote, to come back: the runner's SIGINT and SIGTERM graces (2 s each), its drain (1 s) and a
#: margin. A second Ctrl-C stops waiting.
STOP_WAIT = 8.0


class StaleWorker(Exception):
    """A persistent worker's channel was already closed when a call was sent to it."""


class Call:
    """One call on a channel: its output frames, its result frames, and its watchdog.

    Attributes:
        started: The runner's ``P`` frame (the task's pid, run directory, host), once it came.
        received: The result frames so far.
        dead: The watchdog gave the link up (silent too long, or past the call's deadline).
        overdue: The watchdog gave the link up because the call was past its deadline (its timeout and
            :data:`STOP_MARGIN`) and the runner had not confirmed the stop.
        stop: The call is over; the watchdog leaves it alone.
        stop_wait: Seconds a Ctrl-C waits for the stopped task's result (0: it does not wait).
        interrupted: Ctrl-C stopped the task, and its result came back.
        tree: Answers the runner's requests for the call's project tree.

    ``spool`` makes the directory the result's files are spooled in, on the file system they land on (see
    :class:`.collect.Received`).
    """

    def __init__(self, channel: Channel, options: CallOptions, key: bytes, on_stdout: OutputSink,
                 on_stderr: OutputSink, on_event: EventSink | None = None, stop_wait: float = STOP_WAIT,
                 tree: TreeSender | None = None, spool: Callable[[], Path] | None = None) -> None:
        self.channel = channel
        self.tree = tree or TreeSender(channel, None)
        self.host = channel.backend.host
        self.options = options
        self.on_stdout = on_stdout
        self.on_stderr = on_stderr
        self.on_event = on_event
        self.received = Received(key, spool)
        self.stdin: StdinPump | None = None  # rx run's stdin, when it forwards it
        self.started: dict[str, Any] | None = None
        self.dead = Flag()
        self.overdue = Flag()
        self.stop = Flag()
        self.stop_wait = stop_wait
        self.interrupted = False

    def check(self, deadline: float | None) -> None:
        """Called about every second while the call runs: heartbeat to the runner, and drop the link
        when it has been silent too long, or when the call is past its deadline and the runner, silent
        for longer than a heartbeat, has not sent its result (whatever the link does, ``--timeout N``
        ends the call within N + :data:`STOP_MARGIN` + a heartbeat)."""
        if self.stop.is_set() or self.dead.is_set():
            return
        now = time.monotonic()
        silent = now - self.channel.last_read
        overdue = (deadline is not None and now > deadline and self.received.header is None
                   and silent > self.options.heartbeat + 1.0)
        if overdue or silent > self.options.dead_after:
            if overdue:
                self.overdue.set()
            else:
                logger.warning("%s: no sign of life for %.0f s; giving up on the link", self.host, silent)
            self.dead.set()
            self.channel.process.abandon()  # the host does not answer: signalling through it would wait
            return
        try:
            self.channel.send(b"H")
        except Exception:
            logger.debug("heartbeat to %s failed", self.host, exc_info=True)

    def handle(self, kind: bytes, payload: bytes) -> bool:
        """Take one frame from the runner; True once the result is complete (the ``Z`` frame)."""
        if kind == b"O":
            self.on_stdout(payload)
        elif kind == b"E":
            self.on_stderr(payload)
        elif kind == b"P":
            self.started = json.loads(payload)
            if self.on_event is not None:
                self.on_event(self.started)
        elif kind in TREE_FRAMES:
            self.tree.handle(kind, payload)
        elif kind == b"W":
            if self.stdin is not None:
                self.stdin.taken(payload)
        elif kind in RESULT_FRAMES:
            self.received.add(kind, payload)
            if kind == b"R" and self.received.large_value_follows():
                self.channel.process.grow_buffers()
            return kind == b"Z"
        elif kind != b"B":
            raise RunnerError(f"unknown frame {kind!r} from the runner", reason="protocol", host=self.host)
        return False

    def stop_and_wait(self) -> bool:
        """After a Ctrl-C: ask the runner to stop the task (SIGINT first, so the task's ``finally`` runs) and
        wait up to :attr:`stop_wait` seconds for its result; False when it did not come (a second Ctrl-C,
        a lost link, or no waiting for this call)."""
        if self.stop_wait <= 0:
            return False
        try:
            self.channel.send(b"C")
            self.channel.watch(self, time.monotonic() + self.stop_wait)
            return self.channel.pump(self.handle)
        except (KeyboardInterrupt, Exception):
            return False

    def cancel(self) -> None:
        """Ask the runner to stop the task, give it a moment, then drop the channel."""
        try:
            self.channel.send(b"C")
        except Exception:
            pass
        self.stop.set()
        time.sleep(0.2)
        self.channel.process.kill()


def send_session(process: Process, session_bytes: bytes) -> None:
    """Send the session as ``S`` frames and its end (``s``, with its size) after the call's ``G``."""
    process.grow_buffers()
    with memoryview(session_bytes) as view:
        for start in range(0, len(view), wire.MAX_FRAME):
            process.write_stdin(wire.encode(b"S", view[start:start + wire.MAX_FRAME]))
    # SSH's own MAC protects this direction; the size catches a protocol fault without hashing 100 MB twice.
    process.write_stdin(wire.encode(b"s", wire.dump_options({"size": len(session_bytes)})))


def _call_options(session: Session, options: CallOptions, key: bytes, land_file: FileLander | None,
                  extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``G`` frame's options: the per-call key, limits, environment and secrets, files to pull, the
    host's cache limits."""
    return {
        "key": key.hex(),
        "run_id": session.run_id or "run",
        "timeout": options.timeout,
        "heartbeat": options.heartbeat,
        "dead_after": options.dead_after,
        "env": dict(options.env),
        "secret_env": dict(options.secret_env),
        "pull": list(options.pull),
        "no_pull": options.no_pull or land_file is None,
        "keep": options.keep,
        "kind": session.task.kind,
        "marshal": not options.restricted,  # restricted mode reads pickles through its allow-list only
        "pull_limit": options.pull_limit,
        "gc": [options.cache_limit, options.cache_days],
        **(extra or {}),
    }


def _small_call(go: dict[str, Any], session_bytes: bytes) -> bytes:
    """``G``, the session and its end as one piece (a session of one frame)."""
    return (wire.encode(b"G", wire.dump_options(go)) + wire.encode(b"S", session_bytes)
            + wire.encode(b"s", wire.dump_options({"size": len(session_bytes)})))


def _send_call(channel: Channel, go: dict[str, Any], session_bytes: bytes | None, *, keep: bool,
               after: TreeAhead | None = None) -> None:
    """Write ``G``, (unless ``session_bytes`` is None) the session, and ``after`` (a tree sent unasked);
    one write for a small call."""
    process = channel.process
    with channel.write_lock:
        frame = wire.encode(b"G", wire.dump_options(go))
        try:
            if session_bytes is not None and len(session_bytes) <= wire.MAX_FRAME:
                process.write_stdin(_small_call(go, session_bytes) + (after.frames if after else b""))
            else:
                process.write_stdin(frame)
                if session_bytes is not None:
                    send_session(process, session_bytes)
                if after is not None:
                    process.write_stdin(after.frames)
        except ConnectError:
            if keep:
                raise StaleWorker() from None
            raise


def _project_not_stored(call: Call, code: int | None, tail: str) -> SyncError | None:
    """Why the project did not reach the host, if it did not. The host's own account (a full disk) comes
    first: the upload it cut short may fail in any way after it (a pipe closed under the sending thread);
    the coordinator's own error next (a file that changed), rather than the runner's echo of it."""
    told = call.tree.requested and code == 70 and tail.startswith("rx runner: ")
    echo = tail.startswith(f"rx runner: {wire.COORDINATOR_SEND_FAILED}")
    if told and not (echo and call.tree.error):
        return SyncError(f"{call.host}: {tail[len('rx runner: '):]}")
    if call.tree.error:
        return SyncError(f"{call.host}: {call.tree.error}")
    return None


def _no_result_error(call: Call, deadline: float | None) -> RemoteExecError:
    """Why the result stream ended before its ``Z`` frame."""
    channel, host, options = call.channel, call.host, call.options
    code = channel.process.wait(5)
    tail = channel.stderr_tail()
    call.tree.join(5)
    unstored = _project_not_stored(call, code, tail)
    if unstored is not None:
        return unstored
    if call.overdue.is_set() or (deadline is not None and time.monotonic() > deadline):
        return CommandTimeout(host, f"the task ran past its timeout of {options.timeout:g} s and the host did "
                                    f"not confirm the stop within {STOP_MARGIN:g} s; the link was given up",
                              hint="the runner stops the task itself if the host comes back")
    if call.dead.is_set():
        return ConnectError(host, f"the link went silent for {options.dead_after:g} s and was given up",
                            hint="the host may be down, paused or unreachable")
    link = channel.backend.classify_exit(code, bytes(channel.stderr))
    if link is not None:
        return ConnectError(host, "the connection was lost while the task ran" + (f": {tail}" if tail else ""))
    if channel.reader.pending:
        return IntegrityError(f"{host}: the result stream ended inside a frame; it was not accepted")
    if code == 0:
        return RunnerError(f"the runner on {host} exited 0 without a result", reason="no-result", host=host)
    return RunnerError(f"the runner on {host} failed (exit {code})" + (f": {tail}" if tail else ""),
                       reason="crashed", host=host)


def _worker_death(call: Call) -> Result | None:
    """How the call ended when a signal ended the persistent worker running it (its guardian's
    :data:`wire.WORKER_DIED` line on stderr), as a per-call run reports it; None if that is not what
    happened."""
    channel = call.channel
    channel.stderr_reader.join(2)
    lines = bytes(channel.stderr).decode("utf-8", "replace").splitlines()
    line = next((line for line in reversed(lines) if line.startswith(wire.WORKER_DIED)), None)
    try:
        header = json.loads(line[len(wire.WORKER_DIED):]) if line else None
    except ValueError:
        return None
    if not isinstance(header, dict) or header.get("status") not in ("oom", "signal"):
        return None
    result = Result(status=header["status"], exit_code=int(header.get("exit_code") or 137),
                    detail=str(header.get("detail") or "killed by a signal"))
    result.host = call.host
    return result


def _stream(call: Call, phase: PhaseCallback, deadline: float | None, *, detached: bool = False) -> Result | None:
    """Stream the call's output until its result is complete. Ctrl-C stops the remote task and waits a
    moment for its result (its files come back); when following a ``detached`` run it only stops
    following, and says so: the run goes on.

    Returns:
        None, or how the call ended when a signal ended the persistent worker running it.
    """
    channel = call.channel
    channel.watch(call, deadline)
    try:
        complete = channel.pump(call.handle)
    except KeyboardInterrupt:
        if detached:
            phase("execute", "failed")
            call.stop.set()
            channel.process.kill()  # the follower on the host; the detached run goes on
            raise Interrupted(f"stopped following the run on {call.host}; it goes on") from None
        call.interrupted = call.stop_and_wait()  # the task's files come back with its result
        if not call.interrupted:
            call.cancel()
            phase("execute", "failed")
            raise Interrupted(f"interrupted; the task on {call.host} was stopped") from None
        complete = True
    call.stop.set()
    call.received.close_spool()
    if not complete:
        channel.broken = True
        phase("execute", "failed")
        died = _worker_death(call) if not call.dead.is_set() else None
        if died is not None:
            return died
        raise _no_result_error(call, deadline)
    return None


def _send_tolerantly(call: Call, go: dict[str, Any], session_bytes: bytes | None, *, keep: bool,
                     after: TreeAhead | None = None) -> None:
    """Send the call; a runner that ended before it read it is reported by what it said (see
    :func:`_no_result_error`), not as a closed pipe."""
    try:
        _send_call(call.channel, go, session_bytes, keep=keep, after=after)
    except ConnectError:
        if keep:
            raise
        logger.debug("%s: the runner stopped reading its input", call.host, exc_info=True)


def _extra_options(project: ProjectCall | None, extra_options: Mapping[str, Any] | None, *, hold: bool,
                   stdin: bool, tree_ahead: TreeAhead | None = None) -> dict[str, Any]:
    """The G frame's options beyond :func:`_call_options`: the project's, the caller's, hold, stdin, and
    whether the tree follows the call unasked."""
    return {**(project.go_options() if project else {}), **(extra_options or {}), "hold": hold,
            **({"stdin": True} if stdin else {}), **({"tree_ahead": True} if tree_ahead is not None else {})}


def _tree_ahead(project: ProjectCall | None, place: places.Place | None) -> TreeAhead | None:
    """The frames that send the call's tree unasked, when the record of ``place`` says the host lacks it
    (see :mod:`.places`); else None."""
    if project is None or place is None or place.has_tree(project.tree.tree_id):
        return None
    previous = places.load_manifest(place.trees[-1]) if place.trees else None
    return ahead_frames(project.tree, previous, places.TREE_AHEAD_LIMIT)


def _note_tree(place: places.Place | None, project: ProjectCall | None) -> None:
    """Record at ``place`` that the host has the project's tree (a call ran in it)."""
    if place is not None and project is not None:
        place.note_tree(project.tree)


def run_call(channel: Channel, session: Session, session_bytes: bytes | None, options: CallOptions, *,
             on_stdout: OutputSink, on_stderr: OutputSink, land_file: FileLander | None, phase: PhaseCallback,
             phases: dict[str, float], uploaded: bool, keep: bool, extra_options: Mapping[str, Any] | None = None,
             stdin: BinaryIO | None = None, on_event: EventSink | None = None, detached: bool = False,
             hold: bool = False, project: ProjectCall | None = None, on_progress: ProgressCallback | None = None,
             sent: bytes | None = None, place: places.Place | None = None, pushed: TreeAhead | None = None) -> Outcome:
    """One call on ``channel``: send it (``session_bytes`` None: the runner has it already), stream its
    output (and ``stdin`` to the task, if given), collect and check its result. With ``keep`` the channel
    (a worker) stays open after it.

    The call's timeout holds here too: past it and :data:`STOP_MARGIN`, a runner that did not answer is
    given up. Not when the call collects a ``detached`` run: its host keeps its clock, Ctrl-C only stops
    following (:class:`Interrupted`; the run goes on), and the runner hears ``A`` once the result landed,
    and only then removes the run's data: a result that was refused can be collected again.

    With ``hold`` (an ``rx run``, whose collection can be tried again) the runner waits, after the result,
    to hear what becomes of it: ``A`` (it landed, or was refused) and it goes; ``K`` when the local disk
    filled up, and the host keeps it (:class:`LocalDiskFull` says where) for ``rx attach``.

    With ``project``, the task runs in a snapshot of its tree (sent if the host lacks it; ``pushed``: sent
    unasked behind the call; ``place``: where a call in it is recorded). ``sent``: the call went already,
    right behind the runner's command, with this HMAC key (see :func:`dispatch`)."""
    key = sent or channel.call_key()
    call = Call(channel, options, key, on_stdout, on_stderr, on_event, stop_wait=0.0 if detached else STOP_WAIT,
                tree=TreeSender(channel, project.tree if project else None, _with_phase(on_progress, phase), pushed),
                spool=land_file.stage if land_file is not None else None)
    deadline = None
    acknowledged = hold or detached
    try:
        try:
            if sent is None:  # (else it went right behind the runner's command)
                extra = _extra_options(project, extra_options, hold=hold, stdin=stdin is not None, tree_ahead=pushed)
                _send_tolerantly(call, _call_options(session, options, key, land_file, extra), session_bytes,
                                 keep=keep, after=pushed)
        finally:  # told once the call is on its way: recording it (a durable rewrite) no longer delays it
            phase("execute", "started")
            call.tree.report_pushed()
        if stdin is not None:
            call.stdin = StdinPump(channel, stdin).start()
        deadline = _deadline(options, detached=detached)
        died = _stream(call, phase, deadline, detached=detached)
        if died is not None:  # the worker was killed: the call ended as a per-call run's task would
            return Outcome(result=died, header={"status": died.status, "exit_code": died.exit_code,
                                                "detail": died.detail}, uploaded=uploaded, phases=phases)
        header = call.received.header or {}
        if not keep and not acknowledged:
            channel.reap_later()
        if keep and header.get("status") in ("timeout", "cancelled"):
            channel.broken = True  # a worker exits after such a call
        phase("execute", "finished")
        result, landed, value_data = _collect(call, session, land_file, phase, hold=hold, detached=detached)
        _note_tree(place, project)
    except BaseException:
        channel.broken = True
        raise
    finally:
        _end_call(call, keep=keep, acknowledged=acknowledged)
    result.host = call.host
    return Outcome(result=result, header=header, files=landed, uploaded=uploaded, phases=phases,
                   value_data=value_data, synced=call.tree.synced)


def _deadline(options: CallOptions, *, detached: bool) -> float | None:
    """When the coordinator gives up on a call's result (its timeout and :data:`STOP_MARGIN` from now: the
    task starts once its session arrived); None without a timeout, or collecting a detached run."""
    if options.timeout is None or detached:
        return None
    return time.monotonic() + options.timeout + STOP_MARGIN


def _with_phase(on_progress: ProgressCallback | None, phase: PhaseCallback) -> ProgressCallback:
    """The progress callback, and the ``sync`` phase around the upload of blobs."""
    started = False

    def report(progress: SyncProgress) -> None:
        nonlocal started
        if not started:
            started = True
            phase("sync", "started")
        if on_progress is not None:
            on_progress(progress)
        if progress.done:
            phase("sync", "finished")

    return report


def _end_call(call: Call, *, keep: bool, acknowledged: bool) -> None:
    """However the call ended: the watchdog and stdin pump stop, the spool goes, a runner that waited for
    ``A`` or ``K`` is let go, and a channel whose result did not come whole is dropped (its pipes released
    now, not whenever the last reference to them goes)."""
    channel = call.channel
    call.stop.set()
    if call.stdin is not None:
        call.stdin.stop()
    channel.watch(None)
    if not keep:
        channel.closed.set()
        if acknowledged and call.received.end is not None and channel.process.wait(0) is None:
            channel.reap_later()  # after A or K (or without: a detached run stays for another attach)
    call.received.discard()
    if call.received.end is None:
        channel.process.kill()
        if not keep:
            reap(channel.process, channel.stderr_reader)


def _collect(call: Call, session: Session, land_file: FileLander | None, phase: PhaseCallback, *,
             hold: bool, detached: bool) -> tuple[Result, list[Path], bytes | Path]:
    """Check and land the result (see :func:`.collect.collect`) as the ``collect`` phase; tell the runner
    what becomes of it (``A``, or ``K`` for a full local disk); raise Interrupted, once the files landed,
    for a call Ctrl-C stopped."""
    phase("collect", "started")
    try:
        collected = collect(call.received, call.host, session, call.options, land_file)
    except LocalDiskFull as exc:  # the host keeps the result for another try
        phase("collect", "failed")
        if hold and not detached:
            _answer(call.channel, b"K")
        if hold or detached:
            exc.kept = {"host": call.host, "run_dir": (call.started or {}).get("run_dir")}
        raise
    except RemoteExecError:
        phase("collect", "failed")
        if hold and not detached:  # refused: nothing to try again (a detached run stays for another attach)
            _answer(call.channel, b"A")
        raise
    except BaseException:
        phase("collect", "failed")
        raise
    phase("collect", "finished")
    if detached:  # the host removes the run now: wait for that (20,000 files take a few seconds)
        _answer(call.channel, b"A")
        reap(call.channel.process, call.channel.stderr_reader)
    elif hold:
        _answer(call.channel, b"A")
    if call.interrupted:
        landed = collected[1]
        raise Interrupted(f"interrupted; the task on {call.host} was stopped"
                          + (f" ({len(landed)} file(s) it wrote brought back)" if landed else ""))
    return collected


def _answer(channel: Channel, kind: bytes) -> None:
    """Tell the runner what becomes of the result: ``A`` (taken care of: it may remove what it kept of it)
    or ``K`` (keep it for another try)."""
    try:
        channel.send(kind)
    except Exception:  # a runner that did not wait for it has gone: nothing is kept
        logger.debug("answering the result failed", exc_info=True)


class _Phases:
    """Seconds per phase, and the caller's phase callback told of each change."""

    def __init__(self, on_phase: PhaseCallback | None) -> None:
        self.on_phase = on_phase
        self.seconds: dict[str, float] = {}
        self.marks: dict[str, float] = {}

    def __call__(self, name: str, state: str, when: float | None = None) -> None:
        if self.on_phase is not None:
            if when is None:
                self.on_phase(name, state)
            else:  # a replayed phase (RunnerAhead): the callback is a CallRecorder's, which takes its time
                self.on_phase(name, state, when)  # type: ignore[call-arg]
        now = time.monotonic() if when is None else when
        if state == "started":
            self.marks[name] = now
        elif state == "finished" and name in self.marks:
            self.seconds[name] = self.seconds.get(name, 0.0) + now - self.marks.pop(name)


class RunnerAhead:
    """A runner started on a thread of its own while the caller still prepares its call (``rx run`` records
    the run meanwhile): its connect and upload overlap that work. :func:`dispatch` takes it when the call
    is for the same host, archive and options, and closes it otherwise; the caller closes one it never
    dispatched (:meth:`close`). The phases it went through reach the call's phase callback when it is taken,
    with their own durations."""

    def __init__(self, launcher: Launcher, backend: Backend, archive: DistributionArchive,
                 options: CallOptions) -> None:
        self.launcher, self.backend, self.archive, self.options = launcher, backend, archive, options
        self._events: list[tuple[str, str, float]] = []
        self._channel: Channel | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._dropped = False
        self._thread = threading.Thread(target=self._start, name=f"rx-runner-{backend.host}", daemon=True)
        self._thread.start()

    def _start(self) -> None:
        try:
            channel = start_runner(self.launcher, self.backend, self.archive, self.options, "serve",
                                   lambda name, state: self._events.append((name, state, time.monotonic())))
        except BaseException as exc:  # the call that takes it raises this
            self._error = exc
            return
        with self._lock:
            dropped = self._dropped
            if not dropped:
                self._channel = channel
        if dropped:
            channel.close()

    def fits(self, backend: Backend, archive: DistributionArchive, options: CallOptions, launcher: Launcher) -> bool:
        """Whether a call with these would have started this very runner (the call's own options, its
        environment, limits and files to pull, travel with it)."""
        return (backend is self.backend and launcher.same(self.launcher) and archive.sha256 == self.archive.sha256
                and options.runner_start() == self.options.runner_start())

    def take(self, phase: _Phases) -> Channel:
        """The runner, once started (its phases told to ``phase``).

        Raises:
            What starting it raised (as :func:`~.bootstrap.start_runner` documents).
        """
        self._thread.join()
        for name, state, when in self._events:
            phase(name, state, when)
        if self._error is not None:
            raise self._error
        assert self._channel is not None
        channel, self._channel = self._channel, None
        return channel

    def close(self) -> None:
        """Stop the runner unless a call took it (now, or as soon as it is up)."""
        with self._lock:
            self._dropped = True
            channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()


# shape: its docstring names every argument and error; the body is twenty lines
def dispatch(session: Session, backend: Backend, archive: DistributionArchive, options: CallOptions, *,
             launcher: Launcher, workers: WorkerPool, on_stdout: OutputSink, on_stderr: OutputSink,
             land_file: FileLander | None = None, on_phase: PhaseCallback | None = None,
             session_bytes: bytes | None = None, stdin: BinaryIO | None = None, hold: bool = False,
             project: ProjectCall | ProjectScan | None = None, on_progress: ProgressCallback | None = None,
             ahead: RunnerAhead | None = None) -> Outcome:
    """Run ``session`` on ``backend``'s host and return what came back.

    Args:
        session: The call.
        backend: The connection to the host.
        archive: The distribution archive (sent only if the host lacks it).
        options: Interpreter, directories, environment, timeout, files to pull, ``keep_warm``.
        launcher: Starts the runner on the host.
        workers: The persistent workers of this process (used when ``options.keep_warm``).
        on_stdout: Receives the task's stdout bytes as they arrive.
        on_stderr: Receives the task's stderr bytes as they arrive.
        land_file: Lands each pulled file that passed its checks; None: files are not pulled.
        on_phase: Told (phase, "started" | "finished" | "failed") around connect, upload, execute and
            collect (the workspace records them as actions).
        session_bytes: ``session.to_wire()``, when the caller has it already.
        stdin: What the task reads on its stdin (``rx run`` forwards a pipe or a file); None: nothing.
            A call with stdin runs in a runner of its own, never in a persistent worker.
        hold: The runner keeps the result until it landed (a process-per-call run that can be collected
            again: see :func:`run_call`).
        project: The project the task runs in (a snapshot of its tree on the host); None: the archive
            carries the task's code and the task runs in an empty directory. A :class:`ProjectScan` (still
            being scanned) is waited for only once the runner is started, when the call's frames go.
        on_progress: Told how the upload of the tree's blobs goes (when the host lacks some).
        ahead: A runner started for this call beforehand: taken when it fits, else closed.

    Raises:
        ConnectError, AuthError, HostKeyError: The host could not be reached or the link died.
        CommandTimeout: The call ran past its timeout and the runner did not report back.
        RunnerError: The interpreter is missing or too old, or the runner failed.
        IntegrityError: The result failed its checks.
        SyncError: A file of the project changed or vanished while it was sent.
        Interrupted: Ctrl-C (the remote task is stopped first).
    """
    phase = _Phases(on_phase)
    if session_bytes is None:
        session_bytes = session.to_wire()

    warm = options.keep_warm and stdin is None
    primed = (backend.serial, options.python, options.workdir, archive.sha256)
    # (not a worker's, nor a runner's started ahead)
    early = stdin is None and not options.secret_env and len(session_bytes) <= wire.MAX_FRAME
    seen = places.place(backend, options.python, options.workdir) if early or project is not None else None
    place = seen if early and primed not in workers.primed else None
    ready = early and (place is None or place.has(archive.sha256))  # (seen by this process, or by an earlier rx)
    pushed: list[TreeAhead | None] = [None]  # the tree, when it went unasked right behind the command

    def call(channel: Channel, *, uploaded: bool, keep: bool, sent: bytes | None = None) -> Outcome:
        return run_call(channel, session, session_bytes, options, on_stdout=on_stdout, on_stderr=on_stderr,
                        land_file=land_file, phase=phase, phases=phase.seconds, uploaded=uploaded, keep=keep,
                        stdin=stdin, hold=hold and not keep, project=scanned(project), on_progress=on_progress,
                        sent=sent, place=seen, pushed=pushed[0] if sent is not None else
                        None if keep else _tree_ahead(scanned(project), seen))

    if warm or ahead is not None or not ready:
        project = scanned(project)  # a call that overlaps no runner's start with the scan: done now
    if ahead is not None and (warm or not ahead.fits(backend, archive, options, launcher)):
        logger.debug("%s: the runner started ahead does not fit this call; starting another", backend.host)
        ahead.close()
        ahead = None
    elif ahead is not None:
        logger.debug("%s: the call takes the runner started ahead", backend.host)
    if warm:
        for attempt in (1, 2):
            channel = workers.acquire(launcher, backend, archive, options, phase,  # for this call alone
                                      tree=project.tree.tree_id if isinstance(project, ProjectCall) else None)
            try:
                uploaded, channel.uploaded = channel.uploaded, False
                return call(channel, uploaded=uploaded, keep=True)
            except StaleWorker:
                # The worker had gone (idle exit, a lost channel) before it took the call: nothing ran; a
                # fresh worker takes it.
                logger.debug("persistent worker on %s had gone; starting a new one", backend.host)
                if attempt == 2:
                    raise ConnectError(backend.host, "the persistent worker could not take the call") from None
            finally:
                workers.release(channel)
    if ahead is not None:  # started while the caller prepared the call: the call goes after its answer
        channel = ahead.take(phase)
        return call(channel, uploaded=channel.uploaded, keep=False)
    # The task process, forked before the call arrives, loads pickle meanwhile if the session needs it.
    # Where a runner of this archive answered at once before, the call goes right behind the command;
    # else right behind the archive, if the host asks for that.
    key = None
    frames: Callable[[], bytes] | None = None
    if early:
        key = os.urandom(32)

        def frames() -> bytes:  # once the runner's command went (the project's scan ends meanwhile)
            assert key is not None
            pushed[0] = ahead = _tree_ahead(scanned(project), seen)
            extra = _extra_options(scanned(project), None, hold=hold, stdin=False, tree_ahead=ahead)
            go = _small_call(_call_options(session, options, key, land_file, extra), session_bytes)
            return go if ahead is None else go + ahead.frames

    channel = start_runner(launcher, backend, archive, options, "serve", phase,
                           ("pickle",) if wire_pickles(session_bytes) else (), call=frames, eager=ready, place=place)
    if channel.prompt:
        workers.primed.add(primed)
    else:  # (a login shell that replaced itself, or a host too slow to start for sending ahead to pay)
        workers.primed.discard(primed)
    return call(channel, uploaded=channel.uploaded, keep=False, sent=key if channel.call_sent else None)
