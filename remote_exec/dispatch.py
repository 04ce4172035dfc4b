"""The coordinator's side of one call: pack, connect, ensure, execute, collect.

:func:`dispatch` is the only place that speaks the runner protocol (:mod:`remote_exec.protocol.wire`); the remote
and subprocess advices and ``rx run`` all come through it, over whichever :class:`Backend` reaches the
host (a local subprocess is the :class:`LocalBackend`).

One exec per call: ``python3 -c BOOTSTRAP <archive sha256> <workdir> serve``. The bootstrap answers
whether the host has the archive; only when it does not is the archive sent, in-band, and checked by
sha256 before it is installed. The session and the call's options (including secrets and the per-call
HMAC key) travel over stdin, never on a command line. Output streams back live. The result (value or
exception and traceback, files) is checked before anything lands: an HMAC-SHA256 over the whole result
with a key that never touches the remote disk, the declared sizes, and a sha256 per pulled file; a
result with one bad file lands none.
"""

from __future__ import annotations

import atexit
import collections
import hashlib
import hmac
import json
import logging
import marshal
import pickle
import secrets
import shutil
import signal
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

from .backends.base import Backend, Process
from .errors import (
    CommandTimeout,
    ConnectError,
    IntegrityError,
    Interrupted,
    RunnerError,
)
from .packing import DistributionArchive
from .protocol import wire
from .session import Result, Session

__all__ = ["CallOptions", "Outcome", "dispatch", "safe_member_path"]

logger = logging.getLogger(__name__)

OutputSink = Callable[[bytes], None]


@dataclass(frozen=True)
class CallOptions:
    """How to run one call on its host.

    Attributes:
        python: The remote interpreter (a name on PATH or an absolute path).
        workdir: The remote cache and run directory root (``~`` is the remote user's home).
        env: Environment variables for the task.
        secret_env: Environment variables passed over the channel only (never on a command line, in
            logs or state).
        timeout: Seconds the task may run; the runner stops it at the limit.
        pull: Glob patterns of the files to bring back (empty: all).
        no_pull: Bring back no files.
        keep: Keep the remote run directory.
        heartbeat: Seconds between heartbeats in each direction.
        dead_after: Seconds of silence after which the link counts as dead.
        keep_warm: Run the call in a persistent worker on the host (started on first use, reused by
            later calls of the same code; imports stay warm).
        worker_idle: Seconds a persistent worker waits for its next call before it exits.
        restricted: Unpickle results through an allow-list (plain data, built-in exceptions, and
            ``allow_unpickle``), for hosts you do not fully trust.
        allow_unpickle: Extra globals or modules restricted mode accepts.
        handshake_timeout: Seconds the remote interpreter has to start and answer the bootstrap.
    """

    python: str = "python3"
    workdir: str = "~/.cache/remote_exec"
    env: Mapping[str, str] = field(default_factory=dict)
    secret_env: Mapping[str, str] = field(default_factory=dict)
    timeout: float | None = None
    pull: Sequence[str] = ()
    no_pull: bool = False
    keep: bool = False
    heartbeat: float = 5.0
    dead_after: float = 16.0
    keep_warm: bool = False
    worker_idle: float = 600.0
    restricted: bool = False
    allow_unpickle: Sequence[str] = ()
    handshake_timeout: float = 30.0


@dataclass
class Outcome:
    """What came back from one call.

    Attributes:
        result: The task's result.
        header: The runner's result header (status, exit code, host, python, duration, files).
        files: Local paths of the files that landed.
        uploaded: True when the archive had to be sent.
        phases: Seconds per phase: ``connect``, ``upload``, ``execute``, ``collect``.
        value_data: The value as the runner pickled it (it passed the result's checks); empty if none or
            if it came as marshal.
    """

    result: Result
    header: dict[str, Any]
    files: list[Path] = field(default_factory=list)
    uploaded: bool = False
    phases: dict[str, float] = field(default_factory=dict)
    value_data: bytes = b""


def safe_member_path(name: str) -> PurePosixPath:
    """A file name from a result archive as a safe relative path.

    Raises:
        IntegrityError: Absolute, empty, or climbing out with ``..``.
    """
    path = PurePosixPath(name)
    if not name or path.is_absolute() or ".." in path.parts or "\\" in name or name.startswith("~"):
        raise IntegrityError(f"the result holds a file outside its run directory: {name!r}")
    return path


class _Runner:
    """One runner process on a host: its channel, frame reader, stderr and liveness clock.

    A process-per-call runner serves one call; a persistent worker (``keep_warm``) serves many, one at a
    time (``lock``).
    """

    def __init__(self, backend: Backend, process: Process, rest: bytes, uploaded: bool) -> None:
        self.backend = backend
        self.process = process
        self.reader = wire.FrameReader()
        self.pending = rest
        self.uploaded = uploaded
        self.stderr = bytearray()
        self.last_read = time.monotonic()
        self.write_lock = threading.Lock()
        self.lock = threading.Lock()
        self.broken = False
        self.current: tuple[_Call, float | None] | None = None
        self.closed = threading.Event()
        self._watcher: threading.Thread | None = None
        self.stderr_reader = threading.Thread(target=self._pump_stderr, daemon=True)
        self.stderr_reader.start()

    def _pump_stderr(self) -> None:
        while chunk := self.process.read_stderr(65536):
            self.stderr += chunk
            self.last_read = time.monotonic()

    def send(self, kind: bytes, payload: bytes = b"") -> None:
        with self.write_lock:
            self.process.write_stdin(wire.encode(kind, payload))

    def stderr_tail(self) -> str:
        """The runner's last stderr line (its own diagnostics), once the stream has ended."""
        self.stderr_reader.join(2)
        text = bytes(self.stderr).decode("utf-8", "replace").strip()
        return text.splitlines()[-1] if text else ""

    def watch(self, call: _Call | None, deadline: float | None = None) -> None:
        """Watch ``call`` (None: no call is running): heartbeats, dead link, deadline.

        One watcher thread per runner, started with its first call, serves every call of a persistent
        worker: a call starts no thread of its own.
        """
        self.current = None if call is None else (call, deadline)
        if call is not None and self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="rx-watch", daemon=True)
            self._watcher.start()

    def _watch(self) -> None:
        while not self.closed.wait(1.0):
            current = self.current
            if current is not None:
                current[0].check(current[1])

    def close(self) -> None:
        """Ask a worker to quit and drop its channel."""
        self.broken = True
        self.closed.set()
        try:
            self.send(b"Q")
        except Exception:
            pass
        _reap(self.process, self.stderr_reader)


class _Flag:
    """A flag one thread sets and another polls (an Event without its lock and condition: nobody waits)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = False

    def set(self) -> None:
        self.value = True

    def is_set(self) -> bool:
        return self.value


class _Call:
    """One call on a runner: heartbeats, watchdog, and the frames of its output and result."""

    def __init__(self, runner: _Runner, options: CallOptions, key: bytes, on_stdout: OutputSink,
                 on_stderr: OutputSink) -> None:
        self.runner = runner
        self.backend = runner.backend
        self.process = runner.process
        self.options = options
        self.on_stdout = on_stdout
        self.on_stderr = on_stderr
        self.mac = hmac.new(key, digestmod=hashlib.sha256)
        self.header: dict[str, Any] | None = None
        self.value: list[bytes] = []  # the V and X payloads, joined once at the end
        self.exc_data: list[bytes] = []
        self.files_path: Path | None = None  # a spool file, made when the first F frame arrives
        self.files_stream: IO[bytes] | None = None
        self.end: dict[str, Any] | None = None
        self.started: dict[str, Any] | None = None
        self.dead = _Flag()
        self.stop = _Flag()

    def send(self, kind: bytes, payload: bytes = b"") -> None:
        self.runner.send(kind, payload)

    def check(self, deadline: float | None) -> None:
        """Called about every second while the call runs: heartbeat to the runner, and drop the link
        when it has been silent too long or the call is past its deadline."""
        if self.stop.is_set() or self.dead.is_set():
            return
        now = time.monotonic()
        if now - self.runner.last_read > self.options.dead_after:
            logger.warning("%s: no sign of life for %.0f s; giving up on the link",
                           self.backend.host, now - self.runner.last_read)
            self.dead.set()
            self.process.kill()
            return
        if deadline is not None and now > deadline:
            self.dead.set()
            self.process.kill()
            return
        try:
            self.send(b"H")
        except Exception:
            logger.debug("heartbeat to %s failed", self.backend.host, exc_info=True)

    def spool(self) -> IO[bytes]:
        """The file the result's files stream into (created on first use)."""
        if self.files_stream is None:
            self.files_path = Path(tempfile.mkdtemp(prefix="rx-collect-")) / "files.tar"
            self.files_stream = self.files_path.open("wb")
        return self.files_stream

    def discard_spool(self) -> None:
        if self.files_stream is not None and not self.files_stream.closed:
            self.files_stream.close()
        if self.files_path is not None:
            shutil.rmtree(self.files_path.parent, ignore_errors=True)

    def handle(self, kind: bytes, payload: bytes) -> None:
        if kind == b"O":
            self.on_stdout(payload)
        elif kind == b"E":
            self.on_stderr(payload)
        elif kind == b"B":
            pass
        elif kind == b"P":
            self.started = json.loads(payload)
        elif kind in (b"R", b"V", b"X", b"F"):
            self.mac.update(kind + len(payload).to_bytes(8, "big"))
            self.mac.update(payload)
            if kind == b"R":
                try:
                    self.header = json.loads(payload)
                except ValueError:  # damaged: the HMAC check in _collect refuses the result
                    self.header = {}
                declared = self.header.get("value") if isinstance(self.header, dict) else None
                if isinstance(declared, dict) and int(declared.get("size") or 0) > (1 << 20):
                    self.process.grow_buffers()  # a large value follows
            elif kind == b"V":
                self.value.append(payload)
            elif kind == b"X":
                self.exc_data.append(payload)
            else:
                self.spool().write(payload)
        elif kind == b"Z":
            self.end = json.loads(payload)
        else:
            raise RunnerError(f"unknown frame {kind!r} from the runner", reason="protocol",
                              host=self.backend.host)

    def read_loop(self) -> None:
        """Handle frames until the call's Z frame (frames after it stay in the runner's reader)."""
        runner = self.runner
        data, runner.pending = runner.pending, b""
        while True:
            if data:
                runner.last_read = time.monotonic()
            for kind, payload in runner.reader.feed(data):
                self.handle(kind, payload)
                if self.end is not None:
                    return
            data = self.process.read_stdout(1 << 20)
            if not data:
                return


def _read_handshake(process: Process, buffer: bytes = b"") -> tuple[str, bytes]:
    """The bootstrap's next ``RXBOOT1 ...`` line, and the bytes read past it."""
    while b"\n" not in buffer:
        chunk = process.read_stdout(65536)
        if not chunk:
            return "", buffer
        buffer += chunk
    line, _, rest = buffer.partition(b"\n")
    return line.decode("ascii", "replace"), rest


def _interpreter_error(host: str, python: str, code: int | None, stderr: bytes) -> RunnerError:
    text = stderr.decode("utf-8", "replace").strip()
    last = text.splitlines()[-1] if text else ""
    if code == 127 or "not found" in text or "No such file" in text:
        return RunnerError(f"{python} not found on {host}", reason="interpreter-missing", host=host,
                           hint="install Python 3 there or pass --python /path/to/python3")
    return RunnerError(f"the runner could not start on {host} with {python} (exit {code}): {last}",
                       reason="crashed", host=host)


def _start_runner(backend: Backend, archive: DistributionArchive, options: CallOptions, mode: str,
                  phase: Callable[[str, str], None], extra: Sequence[str] = ()) -> _Runner:
    """Exec the bootstrap; send the archive only if the host lacks it. Returns the running runner."""
    host = backend.host
    argv = [options.python, "-c", wire.BOOTSTRAP, archive.sha256, options.workdir, mode, *extra]
    if mode == "worker":
        argv.append(f"{options.worker_idle:g}")
    phase("connect", "started")
    try:
        process = backend.start(argv)
    except BaseException:
        phase("connect", "failed")
        raise
    # An interpreter that starts but never answers (a wrapper waiting on stdin, a hung NFS home) must not
    # hang the call: past the deadline the process is dropped and the error says so.
    hung = threading.Event()

    def give_up() -> None:
        hung.set()
        process.kill()

    timer = threading.Timer(options.handshake_timeout, give_up)
    timer.daemon = True
    timer.start()
    try:
        line, rest = _read_handshake(process)
    except BaseException:
        phase("connect", "failed")
        process.kill()
        raise
    finally:
        timer.cancel()
    if hung.is_set() and not line.startswith("RXBOOT1"):
        phase("connect", "failed")
        raise RunnerError(f"{options.python} on {host} started but did not answer within "
                          f"{options.handshake_timeout:g} s", reason="interpreter-hung", host=host,
                          hint="check that --python names a Python 3 interpreter")
    if not line.startswith("RXBOOT1"):
        code = process.wait(5)
        stderr = _drain(process)
        process.kill()  # ended or hopeless: release its pipes
        phase("connect", "failed")
        if code in (255, -1) and not line:
            reason = stderr.decode("utf-8", "replace").strip().splitlines() or ["no reason given"]
            raise ConnectError(host, f"the connection closed before the runner started: {reason[-1]}")
        raise _interpreter_error(host, options.python, code, stderr)
    if line.startswith("RXBOOT1 OLDPY"):
        version = line.split()[-1]
        process.kill()
        phase("connect", "failed")
        raise RunnerError(f"{options.python} on {host} is Python {version}; the runner needs "
                          f"{'.'.join(map(str, wire.MIN_PYTHON))} or newer", reason="python-too-old",
                          host=host, hint="pass --python with a newer interpreter")
    phase("connect", "finished")
    uploaded = False
    if line == "RXBOOT1 NEED":
        phase("upload", "started")
        data = archive.read()
        try:
            process.write_stdin(len(data).to_bytes(8, "big") + data)
            line, rest = _read_handshake(process, rest)
        except BaseException:
            phase("upload", "failed")
            process.kill()
            raise
        if line != "RXBOOT1 OK":
            process.wait(5)
            stderr = _drain(process)
            process.kill()
            phase("upload", "failed")
            raise RunnerError(f"installing the archive on {host} failed: "
                              + stderr.decode("utf-8", "replace").strip()[-300:], reason="crashed", host=host)
        uploaded = True
        phase("upload", "finished")
    return _Runner(backend, process, rest, uploaded)


# -- persistent workers (keep_warm) -------------------------------------------------------------------

_workers: collections.OrderedDict[tuple[int, str, str, str], _Runner] = collections.OrderedDict()
_workers_lock = threading.Lock()
#: Persistent workers kept per host, interpreter and workdir (one per archive: tasks of different code
#: each keep theirs); beyond this the least recently used one is stopped.
MAX_WORKERS_PER_HOST = 4


def _worker_for(backend: Backend, archive: DistributionArchive, options: CallOptions,
                phase: Callable[[str, str], None]) -> _Runner:
    """The persistent worker for this host, interpreter, workdir and archive (started when missing)."""
    key = (id(backend), options.python, options.workdir, archive.sha256)
    with _workers_lock:
        worker = _workers.get(key)
        if worker is not None and not worker.broken:
            _workers.move_to_end(key)
            return worker
        if worker is not None:
            _workers.pop(key).close()
        same_place = [k for k in _workers if k[:3] == key[:3]]  # least recently used first
        while len(same_place) >= MAX_WORKERS_PER_HOST:
            _workers.pop(same_place.pop(0)).close()
        worker = _start_runner(backend, archive, options, "worker", phase)
        _workers[key] = worker
        return worker


def close_workers() -> None:
    """Stop every persistent worker of this process (also registered to run at exit)."""
    with _workers_lock:
        workers = list(_workers.values())
        _workers.clear()
    for worker in workers:
        try:
            worker.close()
        except Exception:
            pass


atexit.register(close_workers)


def dispatch(
    session: Session,
    backend: Backend,
    archive: DistributionArchive,
    options: CallOptions,
    *,
    on_stdout: OutputSink,
    on_stderr: OutputSink,
    land_file: Callable[[PurePosixPath, Path, str], Path] | None = None,
    on_phase: Callable[[str, str], None] | None = None,
    session_bytes: bytes | None = None,
) -> Outcome:
    """Run ``session`` on ``backend``'s host and return what came back.

    Args:
        session: The call.
        backend: The connection to the host.
        archive: The distribution archive (sent only if the host lacks it).
        options: Interpreter, directories, environment, timeout, files to pull, ``keep_warm``.
        on_stdout: Receives the task's stdout bytes as they arrive.
        on_stderr: Receives the task's stderr bytes as they arrive.
        land_file: Called for each pulled file that passed its checks with (relative path, a local
            temporary holding it, its sha256); returns where it landed. None: files are not pulled.
        on_phase: Called with (phase, "started" | "finished" | "failed") around connect, upload,
            execute and collect (the workspace records them as actions).
        session_bytes: ``session.to_wire()``, when the caller has it already.

    Raises:
        ConnectError, AuthError, HostKeyError: The host could not be reached or the link died.
        CommandTimeout: The call ran past its timeout and the runner did not report back.
        RunnerError: The interpreter is missing or too old, or the runner failed.
        IntegrityError: The result failed its checks.
        Interrupted: Ctrl-C (the remote task is stopped first).
    """
    phases: dict[str, float] = {}
    mark = time.monotonic()

    def phase(name: str, state: str) -> None:
        nonlocal mark
        if on_phase is not None:
            on_phase(name, state)
        if state == "started":
            mark = time.monotonic()
        elif state == "finished":
            phases[name] = phases.get(name, 0.0) + time.monotonic() - mark

    if session_bytes is None:
        session_bytes = session.to_wire()
    if options.keep_warm:
        for attempt in (1, 2):
            runner = _worker_for(backend, archive, options, phase)
            with runner.lock:
                uploaded, runner.uploaded = runner.uploaded, False
                try:
                    return _call(runner, session, session_bytes, options, on_stdout, on_stderr, land_file,
                                 phase, phases, uploaded, keep=True)
                except _StaleWorker:
                    # The worker had gone (idle exit, a lost channel) before it took the call: nothing
                    # ran; a fresh worker takes it.
                    logger.debug("persistent worker on %s had gone; starting a new one", backend.host)
                    if attempt == 2:
                        raise ConnectError(backend.host, "the persistent worker could not take the call") from None
    runner = _start_runner(backend, archive, options, "serve", phase)
    return _call(runner, session, session_bytes, options, on_stdout, on_stderr, land_file, phase, phases,
                 runner.uploaded, keep=False)


class _StaleWorker(Exception):
    """A persistent worker's channel was already closed when a call was sent to it."""


def _call(runner: _Runner, session: Session, session_bytes: bytes, options: CallOptions,
          on_stdout: OutputSink, on_stderr: OutputSink,
          land_file: Callable[[PurePosixPath, Path, str], Path] | None, phase: Callable[[str, str], None],
          phases: dict[str, float], uploaded: bool, *, keep: bool,
          extra_options: Mapping[str, Any] | None = None, send_session: bool = True) -> Outcome:
    """One call on ``runner``: send it, stream its output, collect and check its result."""
    host = runner.backend.host
    process = runner.process
    key = secrets.token_bytes(32)
    call_options = {
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
        **(extra_options or {}),
    }
    call = _Call(runner, options, key, on_stdout, on_stderr)
    phase("execute", "started")
    deadline = None if options.timeout is None else time.monotonic() + options.timeout + options.dead_after + 5
    try:
        with runner.write_lock:
            go = wire.encode(b"G", wire.dump_options(call_options))
            try:
                if send_session and len(session_bytes) <= wire.MAX_FRAME:  # one write for a small call
                    process.write_stdin(go + wire.encode(b"S", session_bytes)
                                        + wire.encode(b"s", wire.dump_options({"size": len(session_bytes)})))
                else:
                    process.write_stdin(go)
                    if send_session:
                        _send_session(process, session_bytes)
            except ConnectError:
                if keep:
                    raise _StaleWorker() from None
                raise
        runner.watch(call, deadline)
        try:
            call.read_loop()
        except KeyboardInterrupt:
            _cancel(call)
            phase("execute", "failed")
            raise Interrupted(f"interrupted; the task on {host} was stopped") from None
        call.stop.set()
        if call.files_stream is not None:
            call.files_stream.close()
        if call.end is None:
            runner.broken = True
            code = process.wait(5)
            tail = runner.stderr_tail()
            phase("execute", "failed")
            if deadline is not None and time.monotonic() > deadline:
                raise CommandTimeout(host, f"the task ran past its timeout of {options.timeout:g} s and the "
                                           "runner did not report back")
            if call.dead.is_set():
                raise ConnectError(host, f"the link went silent for {options.dead_after:g} s and was given up",
                                   hint="the host may be down, paused or unreachable")
            if code in (-1, 255):
                raise ConnectError(host, "the connection was lost while the task ran"
                                   + (f": {tail}" if tail else ""))
            if runner.reader.pending:
                raise IntegrityError(f"{host}: the result stream ended inside a frame; it was not accepted")
            if code == 0:
                raise RunnerError(f"the runner on {host} exited 0 without a result", reason="no-result",
                                  host=host)
            raise RunnerError(f"the runner on {host} failed (exit {code})" + (f": {tail}" if tail else ""),
                              reason="crashed", host=host)
        if not keep:
            # The runner cleaned up before its last frame; let it exit without waiting here.
            threading.Thread(target=_reap, args=(process, runner.stderr_reader), daemon=True).start()
        elif call.header is not None and call.header.get("status") in ("timeout", "cancelled"):
            runner.broken = True  # a worker exits after such a call
        phase("execute", "finished")
        phase("collect", "started")
        try:
            result, landed, value_data = _collect(call, session, land_file)
        except BaseException:
            phase("collect", "failed")
            raise
        phase("collect", "finished")
    except BaseException:
        runner.broken = True
        raise
    finally:
        call.stop.set()
        runner.watch(None)
        if not keep:
            runner.closed.set()
        call.discard_spool()
        if call.end is None:
            process.kill()
    assert call.header is not None
    result.host = host
    return Outcome(result=result, header=call.header, files=landed, uploaded=uploaded, phases=phases,
                   value_data=value_data)


def _send_session(process: Process, session_bytes: bytes) -> None:
    process.grow_buffers()
    with memoryview(session_bytes) as view:
        for start in range(0, len(view), wire.MAX_FRAME):
            process.write_stdin(wire.encode(b"S", view[start:start + wire.MAX_FRAME]))
    # SSH's own MAC protects this direction; the size catches a protocol fault without hashing 100 MB twice.
    process.write_stdin(wire.encode(b"s", wire.dump_options({"size": len(session_bytes)})))


# -- detached runs --------------------------------------------------------------------------------------


def start_detached(session: Session, backend: Backend, archive: DistributionArchive, options: CallOptions,
                   *, on_phase: Callable[[str, str], None] | None = None) -> dict[str, Any]:
    """Start ``session`` on the host so that it outlives this process and the connection.

    Returns:
        What :func:`attach_detached` and :func:`cancel_detached` need: host, remote run directory,
        supervisor pid, archive sha256, interpreter and workdir.
    """
    runner = _start_runner(backend, archive, options, "detach", on_phase or (lambda name, state: None))
    call_options = {"run_id": session.run_id or "run", "timeout": options.timeout, "env": dict(options.env),
                    "secret_env": dict(options.secret_env), "kind": session.task.kind,
                    "pull": list(options.pull), "no_pull": options.no_pull, "key": "00"}
    try:
        with runner.write_lock:
            runner.process.write_stdin(wire.encode(b"G", wire.dump_options(call_options)))
            _send_session(runner.process, session.to_wire())
        info: dict[str, Any] | None = None
        data, runner.pending = runner.pending, b""
        while info is None:
            for kind, payload in runner.reader.feed(data):
                if kind == b"P":
                    info = json.loads(payload)
            if info is None:
                data = runner.process.read_stdout(65536)
                if not data:
                    raise RunnerError(f"starting the detached run on {backend.host} failed: "
                                      f"{runner.stderr_tail() or 'no reason given'}", host=backend.host)
    finally:
        _reap(runner.process, runner.stderr_reader)
    return {"host": backend.host, "run_dir": info["run_dir"], "supervisor_pid": info.get("supervisor_pid"),
            "archive": archive.sha256, "archive_path": str(archive.path), "python": options.python,
            "workdir": options.workdir}


def attach_detached(session: Session, backend: Backend, detached: Mapping[str, Any], options: CallOptions, *,
                    on_stdout: OutputSink, on_stderr: OutputSink,
                    land_file: Callable[[PurePosixPath, Path, str], Path] | None = None,
                    collect: bool = True, offsets: tuple[int, int] = (0, 0)) -> Outcome | None:
    """Follow a detached run's output until it ends; with ``collect``, bring its result back (checked
    as an attached call's is) and let the host remove its run directory.

    Returns:
        The outcome, or None when only following (``collect=False``).
    """
    archive = DistributionArchive(path=Path(detached["archive_path"]), sha256=detached["archive"],
                                  size=0, modules=())
    mode_args = [str(detached["run_dir"])] + (["collect"] if collect else [])
    runner = _start_runner(backend, archive, options, "attach", lambda name, state: None, mode_args)
    phases: dict[str, float] = {}
    if not collect:
        key = secrets.token_bytes(32)
        call = _Call(runner, options, key, on_stdout, on_stderr)
        try:
            runner.send(b"G", wire.dump_options({"key": key.hex(), "heartbeat": options.heartbeat,
                                                 "stdout_offset": offsets[0], "stderr_offset": offsets[1]}))
            runner.watch(call)  # a silent link is given up after dead_after, as for any call
            call.read_loop()
        finally:
            call.stop.set()
            runner.closed.set()
            runner.process.kill()
        if call.end is None:
            raise ConnectError(backend.host, "the connection was lost while following the run")
        return None
    return _call(runner, session, b"", options, on_stdout, on_stderr, land_file, lambda name, state: None,
                 phases, False, keep=False, send_session=False,
                 extra_options={"stdout_offset": offsets[0], "stderr_offset": offsets[1]})


def cancel_detached(backend: Backend, detached: Mapping[str, Any], options: CallOptions) -> dict[str, Any]:
    """Stop a detached run's task; return the host's status record of the run once it has ended."""
    argv = [options.python, "-c", wire.BOOTSTRAP, detached["archive"], options.workdir, "cancel",
            str(detached["run_dir"])]
    result = backend.run(argv, timeout=30)
    lines = result.stdout.decode("utf-8", "replace").strip().splitlines()
    if result.failed or not lines or lines[0] != "RXBOOT1 HAVE":
        raise RunnerError(f"cancelling the run on {backend.host} failed: {result.tail() or 'no reason given'}",
                          host=backend.host)
    status: dict[str, Any] = json.loads(lines[-1])
    return status


def _reap(process: Process, stderr_reader: threading.Thread) -> None:
    """Collect a finished runner's exit (or end it if it lingers), then release its pipes."""
    try:
        process.close_stdin()
        if process.wait(10) is None:
            process.kill()
        stderr_reader.join(10)
        if not stderr_reader.is_alive():
            process.kill()  # the process has ended: this only closes the pipes nobody reads any more
            while process.read_stdout(65536):  # to its end, so the backend closes that pipe too
                pass
    except Exception:
        logger.debug("reaping the runner failed", exc_info=True)


def _drain(process: Process) -> bytes:
    parts = []
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        chunk = process.read_stderr(65536)
        if not chunk:
            break
        parts.append(chunk)
    return b"".join(parts)


def _cancel(call: _Call) -> None:
    """Ask the runner to stop the task, give it a moment, then drop the channel."""
    try:
        call.send(b"C")
    except Exception:
        pass
    call.stop.set()
    time.sleep(0.2)
    call.process.kill()


def _collect(call: _Call, session: Session,
             land_file: Callable[[PurePosixPath, Path, str], Path] | None) -> tuple[Result, list[Path], bytes]:
    host = call.backend.host
    assert call.end is not None
    if call.header is None:
        raise IntegrityError(f"{host}: the runner sent no result header")
    if not hmac.compare_digest(call.mac.hexdigest(), str(call.end.get("hmac", ""))):
        raise IntegrityError(f"{host}: the result failed its HMAC check; it was not accepted",
                             hint="something changed the result in transit or on the remote disk")
    header = call.header
    value = call.value[0] if len(call.value) == 1 else b"".join(call.value)
    exc_data = b"".join(call.exc_data)
    call.value.clear()
    for name, data in (("value", value), ("exc_pickle", exc_data)):
        expected = header.get(name)
        if expected is None and data:
            raise IntegrityError(f"{host}: the result carries an undeclared {name}")
        if expected is not None and len(data) != expected["size"]:  # its content is under the HMAC
            raise IntegrityError(f"{host}: the result's {name} is damaged (size mismatch)")
    result = _rebuild_result(header, value, exc_data, session, call.options)
    landed: list[Path] = []
    if land_file is not None and header.get("files"):
        landed = _land_files(call, header["files"], land_file)
    if (header.get("value") or {}).get("encoding") == "marshal":
        value = b""  # not a pickle: the value is recorded from the object instead
    return result, landed, value


def _rebuild_result(header: dict[str, Any], value: bytes, exc_data: bytes, session: Session,
                    options: CallOptions) -> Result:
    from .serialization import get_serializer, restricted_loads

    def unpickle(data: bytes) -> Any:
        if options.restricted:
            return restricted_loads(data, options.allow_unpickle)
        return pickle.loads(data)

    status = header.get("status", "error")
    exit_code = int(header.get("exit_code", 1))
    exception = header.get("exception")
    if exception is not None and session.task.kind == "function":
        traceback_text = exception.get("traceback") or ""
        if exc_data:
            try:
                exc = unpickle(exc_data)
                if isinstance(exc, BaseException):
                    return Result.from_exception(exc, traceback_text, exit_code=exit_code, status=status)
            except Exception:
                logger.debug("remote exception %s could not be rebuilt", exception.get("type"), exc_info=True)
        return Result.from_remote_text(exception.get("type", "Exception"), exception.get("message", ""),
                                       traceback_text, exit_code=exit_code, status=status)
    if status in ("timeout", "cancelled", "signal", "oom", "error", "lost"):
        result = Result(status=status, exit_code=exit_code, detail=header.get("detail"))
        if exception is not None:
            result.exception_type = exception.get("type")
            result.exception_message = exception.get("message")
            result.traceback = exception.get("traceback")
        return result
    result = Result(status=status, exit_code=exit_code)
    if exception is not None:  # a script that raised: its traceback was printed, its exit code is 1
        result.exception_type = exception.get("type")
        result.exception_message = exception.get("message")
        result.traceback = exception.get("traceback")
    if value:
        encoding = (header.get("value") or {}).get("encoding")
        if encoding == "marshal":
            if options.restricted:
                raise IntegrityError(f"{header.get('host', 'the host')}: restricted mode was sent a marshalled "
                                     "value it did not ask for; it was not accepted")
            try:
                result.value = marshal.loads(value)
            except (ValueError, EOFError, TypeError) as exc:
                raise IntegrityError(f"the result's value is damaged: {exc}") from exc
        elif session.serializer == "pickle":
            result.value = unpickle(value)
        else:
            result.value = get_serializer(session.serializer).loads(value)
    return result


def _land_files(call: _Call, manifest: list[dict[str, Any]],
                land_file: Callable[[PurePosixPath, Path, str], Path]) -> list[Path]:
    """Check every pulled file, then land them all: a result with one bad member lands nothing."""
    host = call.backend.host
    expected: dict[str, dict[str, Any]] = {}
    for entry in manifest:
        try:
            expected[str(safe_member_path(entry["path"]))] = entry
        except IntegrityError as exc:
            raise IntegrityError(f"{host}: {exc}") from None
    if call.files_path is None or not call.files_path.exists():
        raise IntegrityError(f"{host}: the result lists files but carries none")
    checked: list[tuple[PurePosixPath, Path, str]] = []
    try:
        with tarfile.open(call.files_path, mode="r:") as archive:
            for member in archive:
                try:
                    relative = safe_member_path(member.name)
                except IntegrityError as exc:
                    raise IntegrityError(f"{host}: {exc}") from None
                if not member.isfile():
                    raise IntegrityError(f"{host}: the result holds a non-regular file {member.name!r}")
                listed = expected.pop(str(relative), None)
                if listed is None:
                    raise IntegrityError(f"{host}: the result holds an unlisted file {member.name!r}")
                source = archive.extractfile(member)
                assert source is not None
                with tempfile.NamedTemporaryFile(dir=call.files_path.parent, delete=False) as temporary:
                    checked.append((relative, Path(temporary.name), listed["sha256"]))
                    digest = hashlib.sha256()
                    while block := source.read(1 << 20):
                        digest.update(block)
                        temporary.write(block)
                if digest.hexdigest() != listed["sha256"]:
                    raise IntegrityError(f"{host}: pulled file {member.name!r} is damaged (sha256 mismatch)")
        if expected:
            raise IntegrityError(f"{host}: the result is missing listed files: {', '.join(sorted(expected))}")
    except (tarfile.TarError, EOFError) as exc:
        for _, temporary_path, _ in checked:
            temporary_path.unlink(missing_ok=True)
        raise IntegrityError(f"{host}: the result's files are damaged: {exc}") from exc
    except BaseException:
        for _, temporary_path, _ in checked:
            temporary_path.unlink(missing_ok=True)
        raise
    return [land_file(relative, temporary_path, sha256) for relative, temporary_path, sha256 in checked]


def signal_name(number: int) -> str:
    """``SIGKILL`` for 9."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
