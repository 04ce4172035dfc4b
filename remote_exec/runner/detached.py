"""Detached runs: ``detach`` starts a call that outlives its channel, ``attach`` follows it (and collects its
result), ``cancel`` stops it. The run's state lives in its run directory's private ``.rx``: the status file,
the task's stdout and stderr, and once it ended its outcome, value and exception."""

from __future__ import annotations

import io
import os
import sys
import time

from ..protocol import wire
from .channel import EXIT_RUNNER_FAILURE, CoordinatorGone, read_call
from .policy import KILL_GRACE, Policy
from .result import classify, send_classified
from .rundir import PRIVATE, RunStatus, make_run_dir, read_status
from .supervise import supervise

TYPE_CHECKING = False  # typing is not imported at run time
if TYPE_CHECKING:
    import signal
    from typing import Any

    from .channel import Out
    from .result import Ending
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

    def send(self, kind: bytes, payload: bytes = b"", *, signed: bool = False) -> None:
        """Append output (O, E) to its file; other frames have no one to go to."""
        stream = self.streams.get(kind)
        if stream is not None:
            stream.write(payload)
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
    options, session_bytes, _ = read_call(0)
    options = dict(options, key="00")  # the supervisor never holds the coordinator's key
    run_dir = make_run_dir(cache_dir, options)
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the supervisor
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
        status.update(state="running", supervisor_pid=os.getpid(), started=time.time())
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
                 status: RunStatus) -> tuple[dict[str, Any], Ending]:
    """Run the call with no coordinator (SIGTERM to this process cancels it), its output appended to the
    run's files; store its outcome; return the outcome's header and how the task ended."""
    sink = FileSink(os.path.join(run_dir, PRIVATE))
    try:
        ending = supervise(options, session_bytes, wire.FrameReader(), run_dir, sink, coordinator=False,
                           status=status)
    finally:
        sink.close()
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
    """Write the value, the exception and (last, atomically) the outcome for ``attach``; return the header."""
    private = os.path.join(run_dir, PRIVATE)
    for name, data in (("value.bin", value), ("exception.bin", exc_data)):
        if data:
            with open(os.path.join(private, name), "wb") as stream:
                stream.write(data)
    with open(os.path.join(private, OUTCOME + ".tmp"), "wb") as stream:
        stream.write(wire.json_bytes({"header": header, "options": options}))
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
    result exactly as an attached call would (signed with the key from this call's G frame)."""
    run_dir = check_run_dir(cache_dir, run_dir)
    options = _read_go()
    out.new_call(options["key"])
    offsets = {b"O": int(options.get("stdout_offset") or 0), b"E": int(options.get("stderr_offset") or 0)}
    # Heartbeats only: a silent or closing link ends the following, never the detached task.
    policy = Policy(timeout=None, heartbeat=float(options.get("heartbeat") or 5.0), dead_after=None,
                    started=time.monotonic())
    if not _follow(run_dir, offsets, policy, out, once=bool(options.get("once"))):
        out.send(b"Z", wire.json_text({"done": None}).encode())  # what is there so far; the run goes on
        return
    if not collect:
        try:
            header = _stored_result(run_dir)[0]
        except OSError:  # another attach collected the run (and removed it) while this one followed it
            header = {"status": "collected"}
        out.send(b"Z", wire.json_text({"done": header.get("status"), "exit_code": header.get("exit_code")}).encode())
        return
    header, run_options, value, exc_data = _stored_result(run_dir)
    run_options.update(pull=options.get("pull") or run_options.get("pull"), keep=False,
                       no_pull=bool(options.get("no_pull")))
    send_classified(run_options, run_dir, header, value, exc_data, out)


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


def _follow(run_dir: str, offsets: dict[bytes, int], policy: Policy, out: Out, *, once: bool = False) -> bool:
    """Send the run's output from ``offsets`` on as it grows, until the run is done (``once``: only what is
    there now). Returns whether the run is done."""
    private = os.path.join(run_dir, PRIVATE)
    follower = _Follower(out)
    os.set_blocking(0, False)
    told = False
    while True:
        state = read_status(run_dir).get("state")
        # Done, or collected (and removed) by another attach while this one followed.
        done = state == "done" or not os.path.isdir(private)
        if state == "ended" and not told:  # its job's scheduler has the last word: the coordinator asks it
            out.event({"event": "ended"})
            told = True
        for kind, name in _OUTPUT.items():
            offsets[kind] = _send_from(os.path.join(private, name), offsets[kind], kind, out)
        if done or once:
            return done
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


def serve_cancel(cache_dir: str, run_dir: str) -> int:
    """Stop a detached run's task (SIGTERM to its supervisor, which ends the task's process group) and
    print the run's status as JSON once it has ended (within a few seconds)."""
    run_dir = check_run_dir(cache_dir, run_dir)
    status = read_status(run_dir)
    pid = status.get("supervisor_pid")
    if status.get("state") != "done" and isinstance(pid, int) and pid > 0:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + KILL_GRACE + 3
        while time.monotonic() < deadline and read_status(run_dir).get("state") != "done":
            time.sleep(0.05)
    sys.stdout.write(wire.json_text(read_status(run_dir)) + "\n")
    sys.stdout.flush()
    return 0
