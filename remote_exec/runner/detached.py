"""Detached runs: ``detach`` starts a call that outlives its channel, ``attach`` follows it (and collects its
result), ``cancel`` stops it. The run's state lives in its run directory's private ``.rx``: the status file
(with the supervisor's and the task's process identities, pid and start time), the task's stdout and
stderr, and once it ended its outcome, value and exception. Secrets (``secret_env``) live only in the
supervisor's memory and the task's environment, never in a file.

A supervisor that died (``kill -9``, the OOM killer, a full disk, a reboot) is noticed by ``attach``,
``logs -f`` and ``cancel``: the run is reported ``lost`` with what it left, and no process is signalled
unless it is still the one recorded. The run directory goes only once the coordinator acknowledged the
result it collected (an ``A`` frame): a result it refused can be collected again."""

from __future__ import annotations

import io
import os
import sys
import time

from ..protocol import wire
from .channel import EXIT_RUNNER_FAILURE, CoordinatorGone, read_call
from .contain import alive, identity, signal_process
from .policy import INT_GRACE, KILL_GRACE, Policy
from .result import Ending, classify, send_classified
from .rundir import PRIVATE, RunStatus, read_status, rmtree
from .snapshot import open_run_dir
from .supervise import supervise

TYPE_CHECKING = False  # typing is not imported at run time
if TYPE_CHECKING:
    import signal
    from typing import Any

    from .channel import Out
else:
    import _signal as signal

__all__ = ["OUTCOME", "check_run_dir", "run_to_files", "serve_attach", "serve_cancel", "serve_detached",
           "store_outcome"]

#: The file in the run's private directory that holds a detached run's outcome (written last, atomically).
OUTCOME = "outcome.json"
_OUTPUT = {b"O": "stdout", b"E": "stderr"}


class FileSink:
    """Where a detached task's output goes: files in ``directory`` (the run's private one; no coordinator)."""

    def __init__(self, directory: str) -> None:
        self.streams = {b"O": open(os.path.join(directory, "stdout"), "ab", buffering=0),  # noqa: SIM115
                        b"E": open(os.path.join(directory, "stderr"), "ab", buffering=0)}  # noqa: SIM115
        self.last = time.monotonic()
        self.dropped = 0

    def send(self, kind: bytes, payload: bytes = b"", *, signed: bool = False) -> None:
        """Append output (O, E) to its file; other frames have no one to go to. Output that does not fit
        on the disk is dropped (counted): the task goes on, watched."""
        stream = self.streams.get(kind)
        if stream is not None:
            try:
                stream.write(payload)
            except OSError:
                self.dropped += len(payload)
        self.last = time.monotonic()

    def event(self, fields: dict[str, Any]) -> None:
        """Progress events have no one to go to."""

    def close(self) -> None:
        """Close the files."""
        for stream in self.streams.values():
            stream.close()


def serve_detached(cache_dir: str, out: Out) -> None:
    """Start the call so that it outlives this channel: a supervisor in its own session runs it, writes
    its output to files and its outcome to the run directory, and waits there for ``attach``."""
    options, session_bytes, reader = read_call(0)
    options = dict(options, key="00")  # the supervisor never holds the coordinator's key
    run_dir = open_run_dir(cache_dir, options, reader, out)
    RunStatus(run_dir).update(state="starting", detached=True)
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the supervisor
        if out.fd > 2:
            os.close(out.fd)  # the channel must close when this runner exits, not when the run ends
        _supervisor(options, session_bytes, run_dir, (ready_r, ready_w))
    os.close(ready_w)
    os.waitpid(pid, 0)
    supervisor = os.read(ready_r, 64).decode() or "0"
    os.close(ready_r)
    out.event({"event": "detached", "run_dir": run_dir, "supervisor_pid": int(supervisor),
               "host": os.uname().nodename})


def _supervisor(options: dict[str, Any], session_bytes: bytes, run_dir: str, ready: tuple[int, int]) -> None:
    """In the forked process: become a supervisor no terminal can reach, tell the runner its pid over the
    ``ready`` pipe, run the call to its end and store its outcome. Never returns."""
    status = RunStatus(run_dir)
    ready_r, ready_w = ready
    try:
        os.close(ready_r)
        os.setsid()
        if os.fork():  # the session leader goes; its child can never regain a terminal
            os._exit(0)
        _supervisor_stdio(run_dir)
        status.update(state="running", detached=True, supervisor_pid=os.getpid(), supervisor=identity(os.getpid()),
                      started=time.time())
        os.write(ready_w, str(os.getpid()).encode())
        os.close(ready_w)
        header, _ = run_to_files(options, session_bytes, run_dir, status)
        status.update(state="done", status=header["status"], exit_code=header["exit_code"], finished=time.time())
    except BaseException:
        import traceback

        traceback.print_exc()
        status.update(state="done", status="error", exit_code=EXIT_RUNNER_FAILURE)
    finally:
        os._exit(0)


def run_to_files(options: dict[str, Any], session_bytes: bytes, run_dir: str,
                 status: RunStatus, *, scheduled: bool = False) -> tuple[dict[str, Any], Ending]:
    """Run the call with no coordinator (SIGTERM to this process cancels it; ``scheduled``: a scheduler's
    job, which the scheduler ends), its output appended to the run's files; store its outcome; return the
    outcome's header and how the task ended."""
    sink = FileSink(os.path.join(run_dir, PRIVATE))
    try:
        ending = supervise(options, session_bytes, wire.FrameReader(), run_dir, sink, coordinator=False,
                           status=status, cache_dir=os.path.dirname(os.path.dirname(run_dir)), scheduled=scheduled)
    finally:
        sink.close()
    if sink.dropped:
        sys.stderr.write(f"rx supervisor: {sink.dropped} bytes of output did not fit on the disk\n")
    ending.release()
    return store_outcome(options, run_dir, *classify(options, ending)), ending


def _supervisor_stdio(run_dir: str) -> None:
    """stdin and stdout from and to /dev/null, stderr to the run's ``supervisor.log``."""
    devnull = os.open(os.devnull, os.O_RDWR)
    log = os.open(os.path.join(run_dir, PRIVATE, "supervisor.log"), os.O_WRONLY | os.O_CREAT, 0o600)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.dup2(log, 2)
    os.close(devnull)
    os.close(log)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)


def store_outcome(options: dict[str, Any], run_dir: str, header: dict[str, Any], value: bytes | memoryview,
                   exc_data: bytes | memoryview) -> dict[str, Any]:
    """Write the value, the exception and (last, atomically) the outcome for ``attach``; return the header.
    The call's secrets are not written: they stay in this process's memory only."""
    private = os.path.join(run_dir, PRIVATE)
    for name, data in (("value.bin", value), ("exception.bin", exc_data)):
        if data:
            with open(os.path.join(private, name), "wb") as stream:
                stream.write(data)
    stored = {key: item for key, item in options.items() if key not in ("secret_env", "key")}
    with open(os.path.join(private, OUTCOME + ".tmp"), "wb") as stream:
        stream.write(wire.json_bytes({"header": header, "options": stored}))
    os.rename(os.path.join(private, OUTCOME + ".tmp"), os.path.join(private, OUTCOME))
    return header


def check_run_dir(cache_dir: str, run_dir: str) -> str:
    """``run_dir`` resolved, if it is a run directory of ``cache_dir`` (else RuntimeError)."""
    runs = os.path.realpath(os.path.join(cache_dir, "runs"))
    real = os.path.realpath(run_dir)
    if os.path.dirname(real) != runs or not os.path.isdir(os.path.join(real, PRIVATE)):
        raise RuntimeError(f"no detached run at {run_dir} (already collected or cleaned?)")
    return real


def serve_attach(cache_dir: str, run_dir: str, collect: bool, out: Out) -> None:
    """Stream a detached run's output from its files until it ends; with ``collect``, then send its
    result exactly as an attached call would (signed with the key from this call's G frame), and remove the
    run directory once the coordinator acknowledged it (an ``A`` frame)."""
    run_dir = check_run_dir(cache_dir, run_dir)
    options = _read_go()
    out.new_call(options["key"])
    offsets = {b"O": int(options.get("stdout_offset") or 0), b"E": int(options.get("stderr_offset") or 0)}
    # Heartbeats only: a silent or closing link ends the following, never the detached task.
    policy = Policy(timeout=None, heartbeat=float(options.get("heartbeat") or 5.0), dead_after=None,
                    started=time.monotonic())
    done, lost = _follow(run_dir, offsets, policy, out, once=bool(options.get("once")))
    if not done:
        out.send(b"Z", wire.json_text({"done": None}).encode())  # what is there so far; the run goes on
        return
    header, run_options, value, exc_data = _outcome(run_dir, lost)
    if not collect:
        out.send(b"Z", wire.json_text({"done": header.get("status"), "exit_code": header.get("exit_code"),
                                      "detail": header.get("detail")}).encode())
        return
    if header.get("status") == "collected":
        raise RuntimeError("another rx attach collected the run meanwhile")
    run_options.update(pull=options.get("pull") or run_options.get("pull"), keep=False,
                       no_pull=bool(options.get("no_pull")))
    send_classified(run_options, run_dir, header, value, exc_data, out, remove=False)
    if _acknowledged() and not read_status(run_dir).get("over_limit"):  # over the pull limit: it stays
        rmtree(run_dir)


def _outcome(run_dir: str, lost: str | None) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes]:
    """The stored outcome of an ended run; a lost one's (its supervisor died, or failed to store it); or
    ``collected`` when another attach removed the run while this one followed it."""
    if lost is None:
        try:
            return _stored_result(run_dir)
        except (OSError, ValueError) as exc:
            if not os.path.isdir(os.path.join(run_dir, PRIVATE)):
                return {"status": "collected"}, {}, b"", b""
            lost = f"the run's supervisor failed before it stored how the run ended ({exc}; see supervisor.log)"
    return _lost_result(run_dir, lost), {}, b"", b""


def _acknowledged(wait: float = 600.0) -> bool:
    """Whether the coordinator acknowledged the result (an A frame) before its channel closed; a
    coordinator that refused the result (or went away) says nothing, and the run stays collectable."""
    from .channel import read_answer

    return read_answer(wire.FrameReader(), wait, (b"A",)) == b"A"


def _lost_result(run_dir: str, detail: str) -> dict[str, Any]:
    """The result header of a run whose supervisor died before it recorded how the run ended."""
    status = read_status(run_dir)
    task = status.get("task")
    if isinstance(task, dict):  # an orphan of the dead supervisor (only if it is still that process)
        signal_process(task, signal.SIGKILL, group=True)
    started = float(status.get("started") or time.time())
    header, _, _ = classify({}, Ending(time.monotonic() - (time.time() - started), status="lost", detail=detail))
    header["exit_code"] = 3
    return header


def _read_go() -> dict[str, Any]:
    """The options of this call's G frame."""
    reader = wire.FrameReader()
    while True:
        data = os.read(0, 1 << 16)
        if not data:
            raise CoordinatorGone()
        for kind, payload in reader.feed(data):
            if kind == b"G":
                return wire.load_options(payload)


def _follow(run_dir: str, offsets: dict[bytes, int], policy: Policy, out: Out, *,
            once: bool = False) -> tuple[bool, str | None]:
    """Send the run's output from ``offsets`` on as it grows, until the run is done (``once``: only what is
    there now). Returns whether the run is done, and why it is lost when its supervisor died first."""
    private = os.path.join(run_dir, PRIVATE)
    follower = _Follower(out)
    os.set_blocking(0, False)
    told = False
    while True:
        lost = _supervisor_gone(run_dir)
        state = read_status(run_dir).get("state")
        # Done, lost, or collected (and removed) by another attach while this one followed.
        done = lost is not None or state == "done" or not os.path.isdir(private)
        if state == "ended" and not told:  # its job's scheduler has the last word: the coordinator asks it
            out.event({"event": "ended"})
            told = True
        for kind, name in _OUTPUT.items():
            offsets[kind] = _send_from(os.path.join(private, name), offsets[kind], kind, out)
        if done or once:
            os.set_blocking(0, True)
            return done, lost
        now = time.monotonic()
        try:
            data = os.read(0, 1 << 16)
        except BlockingIOError:
            actions = []
        else:  # the coordinator's frames are not read: a cancel here stops the following, not the run
            actions = policy.on_input(now) if data else policy.on_eof(now)
        policy.on_sent(out.last)
        for action in actions + policy.step(now):
            action.apply(follower)
        time.sleep(0.1)


def _supervisor_gone(run_dir: str) -> str | None:
    """Why the run is lost, if its supervisor no longer runs and never recorded the run's end."""
    status = read_status(run_dir)
    if status.get("state") == "done":
        return None
    supervisor = status.get("supervisor")
    if isinstance(supervisor, dict):
        gone = not alive(supervisor)
    elif status.get("state") == "starting":
        gone = time.time() - os.stat(os.path.join(run_dir, PRIVATE)).st_mtime > 60
    else:
        return None  # an older rx's run: nothing to check it by
    if not gone or read_status(run_dir).get("state") == "done":  # it may have ended just now
        return None
    pid = supervisor.get("pid") if isinstance(supervisor, dict) else None
    return (f"the run's supervisor (pid {pid}) ended without recording how the run ended: killed, out of "
            "memory, out of disk space, or the host rebooted")


class _Follower:
    """What the policy's actions do while ``attach`` follows a detached run (see policy.Actor): only
    heartbeats and giving up apply (the task is not this process's to signal)."""

    def __init__(self, out: Out) -> None:
        self.out = out

    def heartbeat(self) -> None:
        self.out.send(b"B")

    def signal(self, signal: int) -> None:
        """Never asked (no timeout, no cancel here)."""

    def report(self, status: str, detail: str) -> None:
        """Never asked (no timeout, no cancel here)."""

    def give_up(self, reason: str) -> None:
        raise CoordinatorGone(reason)  # the detached task goes on

    def sweep(self) -> None:
        """Never asked (no task process here)."""

    def finish(self) -> None:
        """Never asked (no task process here)."""


def _send_from(path: str, offset: int, kind: bytes, out: Out) -> int:
    """Send what the file at ``path`` holds from ``offset`` on; return the new offset."""
    try:
        with open(path, "rb") as stream:
            stream.seek(offset)
            while chunk := stream.read(wire.MAX_FRAME):
                out.send(kind, chunk)
                offset += len(chunk)
    except FileNotFoundError:
        pass
    return offset


def _stored_result(run_dir: str) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes]:
    """The stored header, the run's options, its value and its exception."""
    import json

    private = os.path.join(run_dir, PRIVATE)
    with open(os.path.join(private, OUTCOME)) as stream:
        stored = json.load(stream)
    header: dict[str, Any] = stored["header"]
    run_options: dict[str, Any] = dict(stored.get("options") or {})
    data = {}
    for name in ("value.bin", "exception.bin"):
        try:
            with open(os.path.join(private, name), "rb") as stream:
                data[name] = stream.read()
        except FileNotFoundError:
            data[name] = b""
    return header, run_options, data["value.bin"], data["exception.bin"]


def serve_cancel(cache_dir: str, run_dir: str, out_fd: int = 1) -> int:
    """Stop a detached run's task (SIGTERM to its supervisor, which ends the task's process group) and
    print the run's status as JSON once it has ended (within a few seconds)."""
    run_dir = check_run_dir(cache_dir, run_dir)
    status = read_status(run_dir)
    supervisor = status.get("supervisor")
    # Only the recorded supervisor (same pid and start time): a pid alone may be another process by now.
    if status.get("state") != "done" and isinstance(supervisor, dict) and signal_process(supervisor, signal.SIGTERM):
        deadline = time.monotonic() + INT_GRACE + KILL_GRACE + 3
        while time.monotonic() < deadline and read_status(run_dir).get("state") != "done" and alive(supervisor):
            time.sleep(0.05)
    data = (wire.json_text(read_status(run_dir)) + "\n").encode()
    while data:
        data = data[os.write(out_fd, data):]
    return 0
