"""The runner: the archive's entry point on the remote (standard library only, plus the archive's cloudpickle).

Started by the bootstrap (see :mod:`remote_exec.protocol.wire`) as ``main([cache_dir, "serve"])``. It reads the
call's options and session from stdin, creates a private run directory (mode 0700) under the cache dir,
forks the task into its own session and process group with that directory as working directory, and
streams the task's stdout and stderr back as frames while it runs. It watches three things: the task's
end, the coordinator (stdin closed or heartbeats stopped: the link or the coordinator died) and the
timeout; in the last two cases it kills the task's whole process group. Then it sends the result (value
or exception with its traceback text, the files the task wrote), signed with the per-call HMAC key,
removes the run directory and exits 0. A runner failure (not the task's) exits 70 with one line on stderr.

Statuses it reports: ``finished`` (the task ran to its end; see exit_code), ``raised`` (a function task
raised), ``timeout``, ``cancelled``, ``signal`` (killed by a signal it did not send; named in detail),
``oom`` (killed by the kernel's out-of-memory killer), ``lost`` (the coordinator went away), ``error``
(the task process ended without a result).
"""

from __future__ import annotations

# Every import here is paid on every call (process-per-call mode): only what the runner always needs, and
# the lean variants (_signal and select.poll rather than signal and selectors, which pull in enum;
# wire's JSON writer rather than json, which pulls in re; marshal for built-in data rather than even the
# C pickle module, which loads functools and collections). The rest is imported where it is used.
import errno
import io
import marshal
import os
import select
import sys
import time

from .protocol import wire

TYPE_CHECKING = False  # typing is not imported at run time: the runner's start-up is on every call's path
if TYPE_CHECKING:
    import signal
    from typing import Any

    #: What a task sent back: its record, its serialized value and its pickled exception (bytes or views).
    _Loaded = tuple[dict[str, Any], bytes | memoryview, bytes | memoryview]
else:
    import _signal as signal

__all__ = ["main"]

EXIT_RUNNER_FAILURE = 70
_STATUS_FILE = "status.json"
_PRIVATE = ".rx"
_KILL_GRACE = 2.0
#: Writes the runner's JSON messages: wire's small encoder (json costs a process-per-call runner too much to
#: import); a persistent worker swaps in json's C encoder.
_json_text: Any = wire.json_text
_PYTHON = "{}.{}.{}".format(*sys.version_info[:3])
_NODE: list[str] = []


def _node() -> str:
    """This host's name (asked once per process)."""
    if not _NODE:
        _NODE.append(os.uname().nodename)
    return _NODE[0]


class _CoordinatorGone(Exception):
    """stdout or stdin of the runner closed: nobody is listening any more."""


class _Out:
    """Frames to the coordinator on the runner's stdout, with the running HMAC of the result.

    Between :meth:`hold` and :meth:`release`, frames are gathered and written together (a result's R, V
    and Z frames leave in one write: one packet, one wake-up of the coordinator for a small result).
    """

    def __init__(self, fd: int, key: bytes = b"") -> None:
        self.fd = fd
        self.key = key
        self.mac: Any = None  # made by sign() once the result's size is known
        self.last = time.monotonic()
        self.held: bytearray | None = None
        self.openssl = False  # a persistent worker has paid for OpenSSL once: it always uses it

    def sign(self, key: bytes | None = None, size: int = 0) -> None:
        """Start the HMAC of a result of about ``size`` bytes (OpenSSL's only when it is large)."""
        if key is not None:
            self.key = key
        self.mac = wire.new_hmac(self.key, bulk=self.openssl or size > (1 << 20))

    def send(self, kind: bytes, payload: bytes | memoryview = b"", *, signed: bool = False) -> None:
        if signed:
            if self.mac is None:
                self.sign()
            self.mac.update(kind + len(payload).to_bytes(8, "big"))
            self.mac.update(payload)
        frame = wire.encode(kind, payload)
        if self.held is not None:
            if len(frame) < 65536:
                self.held += frame
                if len(self.held) < 65536:
                    return
                frame, self.held = bytes(self.held), bytearray()
            elif self.held:  # a large frame goes as it is, after what was gathered
                self._write(bytes(self.held))
                self.held = bytearray()
        self._write(frame)

    def _write(self, frame: bytes) -> None:
        data = memoryview(frame)
        try:
            while data:
                written = os.write(self.fd, data)
                data = data[written:]
        except OSError as exc:
            if exc.errno in (errno.EPIPE, errno.EBADF, errno.ECONNRESET):
                raise _CoordinatorGone() from exc
            raise
        self.last = time.monotonic()

    def hold(self) -> None:
        if self.held is None:
            self.held = bytearray()

    def release(self) -> None:
        held, self.held = self.held, None
        if held:
            self._write(bytes(held))

    def send_chunks(self, kind: bytes, data: bytes | memoryview) -> None:
        with memoryview(data) as view:
            for start in range(0, len(view), wire.MAX_FRAME):
                self.send(kind, view[start:start + wire.MAX_FRAME], signed=True)


def _read_call(stdin_fd: int, reader: wire.FrameReader | None = None,
               idle_timeout: float | None = None) -> tuple[dict[str, Any], bytes, wire.FrameReader]:
    """Read the G frame, the session frames and the s frame (frames already buffered in ``reader`` first).

    Raises:
        _CoordinatorGone: stdin closed, a Q frame arrived, or nothing came for ``idle_timeout`` seconds.
    """
    reader = reader or wire.FrameReader()
    options = None
    parts: list[bytes] = []
    data = b""
    while True:
        if idle_timeout is not None and not data and not reader.pending:
            import select

            if not select.select([stdin_fd], [], [], idle_timeout)[0]:
                raise _CoordinatorGone()
        data = os.read(stdin_fd, 1 << 20)
        if not data:
            raise _CoordinatorGone()
        for kind, payload in reader.feed(data):
            if kind == b"G":
                options = wire.load_options(payload)
            elif kind == b"S":
                if not parts and len(payload) == wire.MAX_FRAME:  # a large session: larger reads
                    wire.grow_pipe(stdin_fd)
                parts.append(payload)
            elif kind == b"s":
                session = b"".join(parts)
                check = wire.load_options(payload)
                if options is None:
                    raise RuntimeError("protocol: session before options")
                if len(session) != check.get("size", len(session)) or (
                        "sha256" in check and _sha256_hex(session) != check["sha256"]):
                    raise RuntimeError("protocol: the session arrived damaged")
                return options, session, reader
            elif kind == b"Q":
                raise _CoordinatorGone()


def _sha256_hex(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _signal_name(number: int) -> str:
    """``SIGKILL`` for 9 (the signal module, with its enum, is imported only on this rare path)."""
    import signal as signals

    try:
        return signals.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _oom_kills() -> int | None:
    for path in ("/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control"):
        try:
            with open(path) as stream:
                for line in stream:
                    name, _, value = line.partition(" ")
                    if name == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            continue
    return None


def _child(session_bytes: bytes, run_dir: str, options: dict[str, Any], out_w: int, err_w: int,
           result_w: int) -> None:
    """In the forked task process: run the task, send the result to the parent over ``result_w``, exit."""
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    for fd in (devnull, out_w, err_w):
        if fd > 2:
            os.close(fd)
    os.chdir(run_dir)
    for name, value in (options.get("env") or {}).items():
        os.environ[name] = value
    for name, value in (options.get("secret_env") or {}).items():
        os.environ[name] = value
    # The interpreter read PYTHONPATH before the call's environment was set: apply it to sys.path too
    # (after the archive, which stays first).
    extra_path = (options.get("env") or {}).get("PYTHONPATH", "")
    sys.path[1:1] = [entry for entry in extra_path.split(os.pathsep) if entry and entry not in sys.path]
    os.environ["RX_INSIDE_RUNNER"] = "1"
    os.environ["RX_RUN_DIR"] = run_dir
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.stdin = open(os.devnull)  # noqa: SIM115 - the task's stdin for its whole life
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8",
                                  errors="backslashreplace", line_buffering=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8",
                                  errors="backslashreplace", line_buffering=True)
    record, value, exc_data = _run_task(session_bytes, run_dir, bool(options.get("marshal")))
    record = dict(record, value_size=len(value), exc_size=len(exc_data))
    if len(value) > (1 << 20):
        wire.grow_pipe(result_w)
    header = marshal.dumps(record, 4)
    for data in (len(header).to_bytes(8, "big"), header, value, exc_data):
        view = memoryview(data)
        while view:
            view = view[os.write(result_w, view):]
    os.close(result_w)
    os._exit(int(record["exit_code"]))


def _parse_result(buffer: bytearray) -> _Loaded | None:
    """What the task process sent on its result pipe: (record, value, exception) — the last two as views
    of ``buffer``, not copies — or None if incomplete."""
    data = memoryview(buffer)
    try:
        size = int.from_bytes(data[:8], "big")
        record: dict[str, Any] = marshal.loads(data[8:8 + size])
        value_end = 8 + size + int(record["value_size"])
        exc_end = value_end + int(record["exc_size"])
    except (ValueError, KeyError, EOFError, TypeError):
        return None
    if exc_end != len(data):
        return None
    return record, data[8 + size:value_end], data[value_end:exc_end]


def _run_task(session_bytes: bytes, run_dir: str, marshal_ok: bool = False) -> tuple[dict[str, Any], bytes, bytes]:
    """Restore the session and run its task here; return (record, serialized value, pickled exception).

    The record holds status, exit_code and, when the task raised, the exception's type, message and
    traceback text (which always travel, even when the exception itself cannot be pickled). With
    ``marshal_ok`` (the coordinator reads marshal: it is not in restricted mode), a value of built-in
    data goes as marshal (``value_encoding``), which needs no pickle module here.
    """
    record: dict[str, Any] = {"status": "finished", "exit_code": 0, "exception": None, "value": False,
                              "exc_pickle": False}
    value_data = b""
    exc_data = b""
    kind = "function"
    try:
        from .serialization import PickleSerializer, get_serializer, marshal_dumps
        from .session import Session

        session = Session.loads(session_bytes)
        kind = session.task.kind
        value = session.task.execute(session.execution, workdir=run_dir)
        if kind == "function":
            try:
                marshalled = marshal_dumps(value) if marshal_ok and session.serializer == "pickle" else None
                if marshalled is not None:
                    value_data = marshalled
                    record["value_encoding"] = "marshal"
                else:
                    value_data = (PickleSerializer().dumps_fast(value) if session.serializer == "pickle"
                                  else get_serializer(session.serializer).dumps(value))
            except Exception as exc:
                raise TypeError(f"the task's return value ({type(value).__qualname__}) cannot be "
                                f"serialized: {exc}") from exc
            record["value"] = True
    except SystemExit as exc:
        code = exc.code
        if code is None:
            record["exit_code"] = 0
        elif isinstance(code, int):
            record["exit_code"] = code & 0xFF if code >= 0 else code % 256
        else:
            print(code, file=sys.stderr)
            record["exit_code"] = 1
    except BaseException as exc:  # the task's failure, reported as data
        import traceback

        text = traceback.format_exc()
        value_data = b""
        record["value"] = False
        record["exit_code"] = 1
        record["status"] = "raised" if kind == "function" else "finished"
        record["exception"] = {
            "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
            "message": _safe_str(exc),
            "traceback": text,
        }
        if kind != "function":
            sys.stderr.write(text)
        else:
            try:
                from .serialization import PickleSerializer

                exc_data = PickleSerializer().dumps_fast(exc)
                record["exc_pickle"] = True
            except BaseException:  # an exception holding something unpicklable arrives as text
                exc_data = b""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:
        pass
    return record, value_data, exc_data


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return f"<{type(exc).__name__} whose str() failed>"


def _kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


_statuses: dict[str, dict[str, object]] = {}


def _write_status(run_dir: str, **fields: object) -> None:
    """Rewrite the run's own status file (``.rx/status.json``) with ``fields`` merged in, atomically."""
    status = _statuses.setdefault(run_dir, {})
    status.update(fields)
    path = os.path.join(run_dir, _PRIVATE, _STATUS_FILE)
    temporary = path + ".tmp"
    with open(temporary, "wb") as stream:
        stream.write(wire.json_bytes(status))
    os.rename(temporary, path)


def _rmtree(path: str) -> None:
    """Remove a directory tree, whatever the task left in it (shutil costs the runner too much to import)."""
    try:
        os.rmdir(path)  # most calls leave their run directory empty
        return
    except OSError:
        pass
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            try:
                os.unlink(os.path.join(root, name))
            except OSError:
                pass
        for name in dirs:
            entry = os.path.join(root, name)
            try:
                os.unlink(entry) if os.path.islink(entry) else os.rmdir(entry)
            except OSError:
                try:
                    os.chmod(entry, 0o700)
                    for child in os.listdir(entry):
                        os.unlink(os.path.join(entry, child))
                    os.rmdir(entry)
                except OSError:
                    pass
    try:
        os.rmdir(path)
    except OSError:
        pass


def _make_run_dir(cache_dir: str, options: dict[str, Any], *, private: bool = True) -> str:
    """A new private (0700) run directory for one call; with ``private``, its own ``.rx`` inside (status
    and logs of the runner; a persistent worker's calls keep none there)."""
    runs = os.path.join(cache_dir, "runs")
    run_dir = os.path.join(runs, f"{options.get('run_id', 'run')}-{os.urandom(4).hex()}")
    try:
        os.mkdir(run_dir, 0o700)
    except FileNotFoundError:
        os.makedirs(runs, mode=0o700, exist_ok=True)
        os.mkdir(run_dir, 0o700)
    if private:
        os.mkdir(os.path.join(run_dir, _PRIVATE), 0o700)
    return run_dir


class _FileSink:
    """Where a detached task's output goes: files in the run's private directory (no coordinator)."""

    def __init__(self, run_dir: str) -> None:
        private = os.path.join(run_dir, _PRIVATE)
        self.streams = {b"O": open(os.path.join(private, "stdout"), "ab", buffering=0),  # noqa: SIM115
                        b"E": open(os.path.join(private, "stderr"), "ab", buffering=0)}  # noqa: SIM115
        self.last = time.monotonic()

    def send(self, kind: bytes, payload: bytes = b"", *, signed: bool = False) -> None:
        stream = self.streams.get(kind)
        if stream is not None:
            stream.write(payload)
        self.last = time.monotonic()

    def close(self) -> None:
        for stream in self.streams.values():
            stream.close()


def _serve_call(options: dict[str, Any], session_bytes: bytes, reader: wire.FrameReader, cache_dir: str,
                out: _Out) -> None:
    """One call in a forked task process (the default, process-per-call mode)."""
    out.key, out.mac = bytes.fromhex(options["key"]), None
    run_dir = _make_run_dir(cache_dir, options, private=bool(options.get("keep")))
    exit_status, status, detail, oom_before, started, loaded = _supervise(
        options, session_bytes, reader, run_dir, out, coordinator=True)
    try:
        _send_result(options, run_dir, exit_status, status, detail, oom_before, started, out, loaded=loaded)
    finally:
        if not options.get("keep"):
            _rmtree(run_dir)


def _supervise(options: dict[str, Any], session_bytes: bytes, reader: wire.FrameReader, run_dir: str,
               out: _Out | _FileSink, *, coordinator: bool
               ) -> tuple[int | None, str | None, str | None, int | None, float,
                          _Loaded | None]:
    """Fork the task into its own process group and watch it to its end.

    With a coordinator, its frames arrive on stdin (heartbeats, cancel) and its absence kills the task;
    without one (a detached run), SIGTERM to this process cancels the task.

    Returns:
        (wait status, status if the runner decided it, detail, OOM kills before, start clock, and what
        the task sent on its result pipe: record, value, exception — None if it sent nothing whole).
    """
    timeout = options.get("timeout")
    heartbeat = float(options.get("heartbeat") or 5.0)
    dead_after = float(options.get("dead_after") or 0) or None
    started = time.monotonic()
    oom_before = _oom_kills()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    result_r, result_w = os.pipe()
    # SIGCHLD wakes the loop the moment the task ends (set_wakeup_fd writes the signal number).
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    previous_wakeup = signal.set_wakeup_fd(wake_w)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            for fd in (out_r, err_r, result_r, wake_r, wake_w):
                os.close(fd)
            _child(session_bytes, run_dir, options, out_w, err_w, result_w)
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(EXIT_RUNNER_FAILURE)
    os.close(out_w)
    os.close(err_w)
    os.close(result_w)
    if not coordinator:
        _write_status(run_dir, task_pid=pid)
    elif options.get("keep"):  # a kept run directory tells who ran in it
        _write_status(run_dir, state="running", runner_pid=os.getpid(), task_pid=pid, started=time.time())
    out.send(b"P", wire.json_text({"event": "started", "pid": pid, "run_dir": run_dir,
                               "host": os.uname().nodename}).encode())

    selector = _Poller()
    selector.register(wake_r, b"W")
    selector.register(out_r, b"O")
    selector.register(err_r, b"E")
    selector.register(result_r, b"R")
    result = bytearray()
    cancel_requested: list[bool] = []
    if coordinator:
        selector.register(0, b"I")
    else:
        dead_after = None
        signal.signal(signal.SIGTERM, lambda *_: cancel_requested.append(True))
    status = None
    detail = None
    exit_status = None
    kill_deadline = None
    last_input = time.monotonic()
    open_pipes = 3
    child_done_at = None
    try:
        while True:
            now = time.monotonic()
            waits = [heartbeat - (now - out.last)]
            if timeout is not None and status is None:
                waits.append(started + timeout - now)
            if kill_deadline is not None:
                waits.append(kill_deadline - now)
            for fd, tag in selector.select(max(0.0, min([*waits, 0.5]))):
                if tag == b"I":
                    data = os.read(0, 1 << 16)
                    if not data:
                        selector.unregister(0)
                        raise _CoordinatorGone()
                    last_input = time.monotonic()
                    for kind, _payload in reader.feed(data):
                        if kind in (b"C", b"Q") and status is None:
                            status, detail = "cancelled", "cancelled by the coordinator"
                            _kill_group(pid, signal.SIGTERM)
                            kill_deadline = time.monotonic() + _KILL_GRACE
                    continue
                if tag == b"W":
                    try:
                        os.read(wake_r, 512)
                    except BlockingIOError:
                        pass
                    continue
                data = os.read(fd, 1 << 20 if tag == b"R" else 1 << 16)
                if not data:
                    selector.unregister(fd)
                    os.close(fd)
                    open_pipes -= 1
                elif tag == b"R":
                    result += data
                else:
                    out.send(tag, data)
            now = time.monotonic()
            if exit_status is None:
                done, raw = os.waitpid(pid, os.WNOHANG)
                if done:
                    exit_status = raw
                    child_done_at = now
                    # Whatever the task left running in its group ends with it.
                    _kill_group(pid, signal.SIGKILL)
            if exit_status is not None and (open_pipes == 0 or now - (child_done_at or now) > 1.0):
                break
            if cancel_requested and status is None:
                status, detail = "cancelled", "cancelled (rx cancel)"
                _kill_group(pid, signal.SIGTERM)
                kill_deadline = now + _KILL_GRACE
            if timeout is not None and status is None and now - started > timeout:
                status, detail = "timeout", f"timed out after {timeout:g} s"
                _kill_group(pid, signal.SIGTERM)
                kill_deadline = now + _KILL_GRACE
            if kill_deadline is not None and now >= kill_deadline and exit_status is None:
                _kill_group(pid, signal.SIGKILL)
                kill_deadline = None
            if dead_after is not None and now - last_input > dead_after:
                raise _CoordinatorGone()
            if now - out.last >= heartbeat:
                out.send(b"B")
    except _CoordinatorGone:
        _kill_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + _KILL_GRACE
        while time.monotonic() < deadline:
            if os.waitpid(pid, os.WNOHANG)[0]:
                break
            time.sleep(0.02)
        else:
            _kill_group(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        _kill_group(pid, signal.SIGKILL)
        _rmtree(run_dir)
        raise
    finally:
        selector.close()
        signal.set_wakeup_fd(previous_wakeup)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.close(wake_r)
        os.close(wake_w)
    if open_pipes:  # something the task left behind still holds a pipe: close ours
        for fd in (out_r, err_r, result_r):
            try:
                os.close(fd)
            except OSError:
                pass
    return exit_status, status, detail, oom_before, started, _parse_result(result)


def _send_result(options: dict[str, Any], run_dir: str, exit_status: int | None, status: str | None,
                 detail: str | None, oom_before: int | None, started: float, out: _Out,
                 loaded: _Loaded | None = None, reuse: bool = False) -> bool:
    """Classify how the task ended, then send its result (see :func:`_send_classified`).

    ``loaded`` is the task's (record, value, exception) when it ran in this process; otherwise they
    are read from the run directory, where the forked task left them. Returns True when the run
    directory was kept for the next call (``reuse``, and the task left it empty).
    """
    header, value, exc_data = _classify(options, run_dir, exit_status, status, detail, oom_before, started,
                                        loaded)
    return _send_classified(options, run_dir, header, value, exc_data, out, reuse=reuse)


def _classify(options: dict[str, Any], run_dir: str, exit_status: int | None, status: str | None,
              detail: str | None, oom_before: int | None, started: float,
              loaded: _Loaded | None = None) -> _Loaded:
    """The result header (status, exit code, signal, exception) and the value and exception bytes."""
    record = loaded[0] if loaded is not None else None
    header: dict[str, Any] = {"protocol": wire.PROTOCOL, "duration": time.monotonic() - started,
                              "python": _PYTHON, "host": _node()}
    signal_number = None
    if exit_status is not None and os.WIFSIGNALED(exit_status):
        signal_number = os.WTERMSIG(exit_status)
        exit_code = 128 + signal_number
    elif exit_status is not None:
        exit_code = os.WEXITSTATUS(exit_status)
    else:
        exit_code = 128 + signal.SIGKILL
    if status is None:
        if record is not None:
            status = record["status"]
            exit_code = record["exit_code"]
        elif signal_number is not None:
            oom_after = _oom_kills()
            name = _signal_name(signal_number)
            if oom_before is not None and oom_after is not None and oom_after > oom_before:
                status, detail = "oom", f"killed by the kernel's out-of-memory killer ({name})"
            else:
                status, detail = "signal", f"killed by {name}"
        elif options.get("kind") in ("script", "module"):
            status = "finished"  # os._exit(N) in a script: its exit code is its result
        else:
            status, detail = "error", f"the task process exited with status {exit_code} without a result"
    header.update({"status": status, "exit_code": exit_code, "detail": detail,
                   "signal": _signal_name(signal_number) if signal_number else None})
    if record is not None:
        header["exception"] = record.get("exception")
    value: bytes | memoryview = b""
    exc_data: bytes | memoryview = b""
    if loaded is not None:
        value, exc_data = loaded[1], loaded[2]
    # Sizes only: the content of both is under the result's HMAC.
    header["value"] = ({"size": len(value), "encoding": (record or {}).get("value_encoding", "serializer")}
                       if value else None)
    header["exc_pickle"] = {"size": len(exc_data)} if exc_data else None
    return header, value, exc_data


def _send_classified(options: dict[str, Any], run_dir: str, header: dict[str, Any], value: bytes | memoryview,
                     exc_data: bytes | memoryview, out: _Out, *, reuse: bool = False) -> bool:
    """Send R, V, X, F frames, clean the run directory, send Z (the HMAC over the result).

    With ``reuse``, a run directory the task left empty is kept (creating and removing a directory costs
    a persistent worker's small call more than all the rest); returns True when it was.
    """
    names = os.listdir(run_dir)
    files = [] if options.get("no_pull") or not names else _manifest(run_dir, options.get("pull") or [])
    header = dict(header, files=files)
    size = len(value) + len(exc_data) + sum(entry["size"] for entry in files)
    out.sign(size=size)
    if size > (1 << 20):
        wire.grow_pipe(out.fd)
    out.hold()
    out.send(b"R", _json_text(header).encode(), signed=True)
    if value:
        out.send_chunks(b"V", value)
    if exc_data:
        out.send_chunks(b"X", exc_data)
    if files:
        _send_files(run_dir, files, out)
    kept = reuse and not names and not options.get("keep")
    if not options.get("keep") and not kept:
        _rmtree(run_dir)
    out.send(b"Z", _json_text({"hmac": out.mac.hexdigest()}).encode())
    out.release()
    return kept


def _manifest(run_dir: str, patterns: list[str]) -> list[dict[str, Any]]:
    import fnmatch

    entries = []
    for directory, dirnames, filenames in os.walk(run_dir):
        relative_dir = os.path.relpath(directory, run_dir)
        if relative_dir == ".":
            dirnames[:] = [d for d in dirnames if d != _PRIVATE]
        dirnames.sort()
        for filename in sorted(filenames):
            path = os.path.join(directory, filename)
            relative = os.path.normpath(os.path.join(relative_dir, filename)).replace(os.sep, "/")
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            if patterns and not any(fnmatch.fnmatch(relative, pattern) for pattern in patterns):
                continue
            import hashlib

            digest = hashlib.sha256()
            size = 0
            with open(path, "rb") as stream:
                for block in iter(lambda: stream.read(1 << 20), b""):
                    digest.update(block)
                    size += len(block)
            entries.append({"path": relative, "size": size, "sha256": digest.hexdigest()})
    return entries


class _FrameStream(io.RawIOBase):
    def __init__(self, out: _Out) -> None:
        self.out = out

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.out.send_chunks(b"F", bytes(data))
        return len(data)


def _send_files(run_dir: str, files: list[dict[str, Any]], out: _Out) -> None:
    import tarfile

    stream = io.BufferedWriter(_FrameStream(out), buffer_size=wire.MAX_FRAME)
    with tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT) as archive:
        for entry in files:
            info = tarfile.TarInfo(entry["path"])
            info.size = entry["size"]
            info.mode = 0o644
            with open(os.path.join(run_dir, entry["path"]), "rb") as source:
                archive.addfile(info, source)
    stream.flush()


class _Poller:
    """select.poll with a tag per fd (the selectors module costs the runner too much to import)."""

    def __init__(self) -> None:
        self._poll = select.poll()
        self._tags: dict[int, bytes] = {}

    def register(self, fd: int, tag: bytes) -> None:
        self._poll.register(fd, select.POLLIN)
        self._tags[fd] = tag

    def unregister(self, fd: int) -> None:
        self._poll.unregister(fd)
        del self._tags[fd]

    def select(self, timeout: float) -> list[tuple[int, bytes]]:
        return [(fd, self._tags[fd]) for fd, _ in self._poll.poll(timeout * 1000) if fd in self._tags]

    def close(self) -> None:
        self._tags.clear()


def _drain(fd: int, kind: bytes, out: _Out) -> bool:
    """Send what a non-blocking pipe holds now; False once it reached end of file."""
    while True:
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            return True
        if not data:
            return False
        out.send(kind, data)


class _Current:
    """The call a persistent worker is running: what its watcher needs to police it."""

    __slots__ = ("dead_after", "heartbeat", "last_input", "options", "run_dir", "started", "timeout")

    def __init__(self, options: dict[str, Any], run_dir: str) -> None:
        self.options = options
        self.run_dir = run_dir
        self.started = self.last_input = time.monotonic()
        self.timeout = options.get("timeout")
        self.heartbeat = float(options.get("heartbeat") or 5.0)
        self.dead_after = float(options.get("dead_after") or 0) or None


class _WorkerWatch:
    """A persistent worker's second thread, for the worker's whole life.

    The call runs in the worker's main thread (no thread per call: a small call costs a few hundred
    microseconds). This thread streams what the tasks write to fds 1 and 2 as it comes, and while a call
    runs it sends heartbeats, reads the coordinator's frames (heartbeats, cancel) and enforces the
    timeout. A cancelled or timed-out call cannot be stopped inside the main thread: the watcher reports
    it and ends the worker with its process group (the coordinator starts a fresh worker for the next
    call); so does a coordinator that went away.

    ``lock`` guards the frames sent, ``current`` and, while a call runs, the frame reader of stdin (the
    main thread owns stdin between calls).
    """

    def __init__(self, out: _Out, out_r: int, err_r: int, proto_in: int, reader: wire.FrameReader) -> None:
        import threading

        self.out = out
        self.out_r = out_r
        self.err_r = err_r
        self.proto_in = proto_in
        self.reader = reader
        self.lock = threading.Lock()
        self.current: _Current | None = None
        self.thread = threading.Thread(target=self._run, name="rx-worker-watch", daemon=True)

    def _run(self) -> None:
        idle = _Poller()
        busy = _Poller()
        for poller in (idle, busy):
            poller.register(self.out_r, b"O")
            poller.register(self.err_r, b"E")
        busy.register(self.proto_in, b"I")
        try:
            while True:
                current = self.current
                wait = 0.5
                if current is not None:
                    wait = min(wait, max(0.0, current.heartbeat - (time.monotonic() - self.out.last)))
                    if current.timeout is not None:
                        wait = min(wait, max(0.0, current.started + current.timeout - time.monotonic()))
                ready = (idle if current is None else busy).select(wait)
                with self.lock:
                    self._step(ready)
        except BaseException:  # the coordinator went away, or the watcher itself failed: end the worker
            try:
                self._end()
            finally:
                os._exit(0)

    def _step(self, ready: list[tuple[int, bytes]]) -> None:
        current = self.current
        for fd, tag in ready:
            if tag != b"I":
                _drain(fd, tag, self.out)
            elif current is not None:  # stdin is the main thread's again once the call ended
                data = os.read(self.proto_in, 1 << 16)
                if not data:
                    raise _CoordinatorGone()
                current.last_input = time.monotonic()
                for kind, _payload in self.reader.feed(data):
                    if kind in (b"C", b"Q"):
                        self._abort(current, "cancelled", "cancelled by the coordinator")
        if current is None:
            return
        now = time.monotonic()
        if current.timeout is not None and now - current.started > current.timeout:
            self._abort(current, "timeout", f"timed out after {current.timeout:g} s")
        if current.dead_after is not None and now - current.last_input > current.dead_after:
            raise _CoordinatorGone()
        if now - self.out.last >= current.heartbeat:
            self.out.send(b"B")

    def _abort(self, current: _Current, status: str, detail: str) -> None:
        """Report the running call as ``status``, then end the worker (the task cannot be stopped)."""
        self._drain_output()
        _send_result(current.options, current.run_dir, None, status, detail, None, current.started, self.out)
        self._end()

    def _end(self) -> None:
        current = self.current
        if current is not None:
            _rmtree(current.run_dir)
        _end_group()
        os._exit(0)

    def begin(self, current: _Current) -> None:
        with self.lock:
            self.current = current

    def finish(self) -> None:
        """The call returned: from here the main thread owns stdin; drain the task's output."""
        try:
            sys.stdout.flush()  # outside the lock: a full pipe waits for the watcher to drain it
            sys.stderr.flush()
        except Exception:
            pass
        self.lock.acquire()
        self.current = None
        self._drain_output()

    def _drain_output(self) -> None:
        """Send what the tasks wrote to fds 1 and 2 so far (the caller holds the lock)."""
        _drain(self.out_r, b"O", self.out)
        _drain(self.err_r, b"E", self.out)


def _end_group() -> None:
    """End what the tasks left running in the worker's process group (the worker leads it).

    From the main thread the worker survives the signal (it ignores it) and goes on to exit normally.
    From the watcher thread it cannot change signal handling (only the main thread may): the worker ends
    with its group, which is what the watcher wants anyway.
    """
    if os.getpgrp() == os.getpid():
        import threading

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            os.killpg(os.getpgrp(), signal.SIGTERM)
        except OSError:
            pass


def _environ_snapshot() -> dict[Any, Any]:
    data = getattr(os.environ, "_data", None)
    return dict(data) if isinstance(data, dict) else dict(os.environ)


def _restore_environ(snapshot: dict[Any, Any]) -> None:
    """Undo what a call did to ``os.environ`` (only the variables that changed are touched)."""
    data = getattr(os.environ, "_data", None)
    if not isinstance(data, dict):
        os.environ.clear()
        os.environ.update(snapshot)
        return
    if data == snapshot:
        return
    decode = os.fsdecode
    for key in [key for key in data if key not in snapshot]:
        del os.environ[decode(key)]
    for key, value in snapshot.items():
        if data.get(key) != value:
            os.environ[decode(key)] = decode(value)


def _serve_worker(cache_dir: str, idle_timeout: float) -> int:
    """Persistent worker (``keep_warm``): many calls over one channel, each run in this process.

    Imports stay warm between calls, and a call runs in the main thread, so a small call costs a few
    hundred microseconds here. fds 1 and 2 are pipes that a watcher thread (:class:`_WorkerWatch`)
    streams to the coordinator; it also heartbeats and polices the running call. The worker exits when
    stdin closes, after ``idle_timeout`` seconds without a call, or (through its watcher) when a call is
    cancelled or times out.
    """
    import json

    global _json_text
    _json_text = json.dumps  # the C encoder: the worker pays the import once, every result header gains
    try:
        os.setsid()
    except OSError:
        pass
    proto_in = os.dup(0)
    proto_out = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    os.close(out_w)
    os.close(err_w)
    for fd in (out_r, err_r):
        os.set_blocking(fd, False)
    sys.stdin = open(os.devnull)  # noqa: SIM115 - the tasks' stdin for the worker's life
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8",
                                  errors="backslashreplace", line_buffering=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8",
                                  errors="backslashreplace", line_buffering=True)
    os.environ["RX_INSIDE_RUNNER"] = "1"
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    out = _Out(proto_out)
    out.openssl = True
    reader = wire.FrameReader()
    home = os.getcwd()
    runs = os.path.join(cache_dir, "runs")
    os.makedirs(runs, mode=0o700, exist_ok=True)
    watch = _WorkerWatch(out, out_r, err_r, proto_in, reader)
    out.send(b"P", _json_text({"event": "worker", "pid": os.getpid(), "host": os.uname().nodename}).encode())
    watch.thread.start()
    run_dir: str | None = None  # the current run directory (kept empty between calls), if any
    try:
        while True:
            options, session_bytes, reader = _read_call(proto_in, reader, idle_timeout)
            out.key, out.mac = bytes.fromhex(options["key"]), None
            if run_dir is None:
                run_dir = _make_run_dir(cache_dir, options, private=False)
            saved_env = _environ_snapshot()
            os.environ.update(options.get("env") or {})
            os.environ.update(options.get("secret_env") or {})
            if os.environ.get("RX_RUN_DIR") != run_dir:
                os.environ["RX_RUN_DIR"] = run_dir
            os.chdir(run_dir)
            current = _Current(options, run_dir)
            watch.begin(current)
            loaded = _run_task(session_bytes, run_dir, bool(options.get("marshal")))
            del session_bytes
            watch.finish()
            try:
                _restore_environ(saved_env)
                if not _send_result(options, run_dir, 0, None, None, None, current.started, out, loaded=loaded,
                                    reuse=True):
                    run_dir = None
            finally:
                watch.lock.release()
    finally:
        if run_dir is not None:  # leave nothing behind (a call in progress, or the kept empty directory)
            os.chdir(home)
            _rmtree(run_dir)
        _end_group()


# -- detached runs -----------------------------------------------------------------------------------

_OUTCOME = "outcome.json"


def _serve_detached(options: dict[str, Any], session_bytes: bytes, cache_dir: str, out: _Out) -> None:
    """Start the call so that it outlives this channel: a supervisor in its own session runs it, writes
    its output to files and its outcome to the run directory, and waits there for ``attach``."""
    options = dict(options, key="00")  # the supervisor never holds the coordinator's key
    run_dir = _make_run_dir(cache_dir, options)
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the supervisor
        try:
            os.close(ready_r)
            os.setsid()
            if os.fork():  # the session leader goes; its child can never regain a terminal
                os._exit(0)
            devnull = os.open(os.devnull, os.O_RDWR)
            log = os.open(os.path.join(run_dir, _PRIVATE, "supervisor.log"), os.O_WRONLY | os.O_CREAT, 0o600)
            os.dup2(devnull, 0)
            os.dup2(devnull, 1)
            os.dup2(log, 2)
            os.close(devnull)
            os.close(log)
            sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
            _write_status(run_dir, state="running", supervisor_pid=os.getpid(), started=time.time())
            os.write(ready_w, str(os.getpid()).encode())
            os.close(ready_w)
            sink = _FileSink(run_dir)
            exit_status, status, detail, oom_before, started, loaded = _supervise(
                options, session_bytes, wire.FrameReader(), run_dir, sink, coordinator=False)
            sink.close()
            header, value, exc_data = _classify(options, run_dir, exit_status, status, detail, oom_before,
                                                started, loaded=loaded)
            private = os.path.join(run_dir, _PRIVATE)
            for name, data in (("value.bin", value), ("exception.bin", exc_data)):
                if data:
                    with open(os.path.join(private, name), "wb") as stream:
                        stream.write(data)
            with open(os.path.join(private, _OUTCOME + ".tmp"), "wb") as stream:
                stream.write(wire.json_bytes({"header": header, "options": options}))
            os.rename(os.path.join(private, _OUTCOME + ".tmp"), os.path.join(private, _OUTCOME))
            _write_status(run_dir, state="done", status=header["status"], exit_code=header["exit_code"],
                          finished=time.time())
        except BaseException:
            import traceback

            traceback.print_exc()
            _write_status(run_dir, state="done", status="error", exit_code=EXIT_RUNNER_FAILURE)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.waitpid(pid, 0)
    supervisor = os.read(ready_r, 64).decode() or "0"
    os.close(ready_r)
    out.send(b"P", wire.json_text({"event": "detached", "run_dir": run_dir, "supervisor_pid": int(supervisor),
                               "host": os.uname().nodename}).encode())


def _read_status(run_dir: str) -> dict[str, Any]:
    import json

    try:
        with open(os.path.join(run_dir, _PRIVATE, _STATUS_FILE)) as stream:
            status: dict[str, Any] = json.load(stream)
            return status
    except (OSError, ValueError):
        return {}


def _check_run_dir(cache_dir: str, run_dir: str) -> str:
    runs = os.path.realpath(os.path.join(cache_dir, "runs"))
    real = os.path.realpath(run_dir)
    if os.path.dirname(real) != runs or not os.path.isdir(os.path.join(real, _PRIVATE)):
        raise RuntimeError(f"no detached run at {run_dir} (already collected or cleaned?)")
    return real


def _serve_attach(cache_dir: str, run_dir: str, collect: bool, out: _Out) -> None:
    """Stream a detached run's output from its files until it ends; with ``collect``, then send its
    result exactly as an attached call would (signed with the key from this call's G frame)."""
    run_dir = _check_run_dir(cache_dir, run_dir)
    reader = wire.FrameReader()
    options: dict[str, Any] | None = None
    while options is None:
        data = os.read(0, 1 << 16)
        if not data:
            raise _CoordinatorGone()
        for kind, payload in reader.feed(data):
            if kind == b"G":
                options = wire.load_options(payload)
    out.key, out.mac = bytes.fromhex(options["key"]), None
    heartbeat = float(options.get("heartbeat") or 5.0)
    private = os.path.join(run_dir, _PRIVATE)
    offsets = {b"O": int(options.get("stdout_offset") or 0), b"E": int(options.get("stderr_offset") or 0)}
    names = {b"O": "stdout", b"E": "stderr"}
    os.set_blocking(0, False)
    while True:
        done = _read_status(run_dir).get("state") == "done"
        for kind, name in names.items():
            try:
                with open(os.path.join(private, name), "rb") as stream:
                    stream.seek(offsets[kind])
                    while chunk := stream.read(wire.MAX_FRAME):
                        out.send(kind, chunk)
                        offsets[kind] += len(chunk)
            except FileNotFoundError:
                pass
        if done:
            break
        try:
            if os.read(0, 1 << 16) == b"":
                raise _CoordinatorGone()  # the detached task goes on
        except BlockingIOError:
            pass
        if time.monotonic() - out.last >= heartbeat:
            out.send(b"B")
        time.sleep(0.1)
    import json

    with open(os.path.join(private, _OUTCOME)) as stream:
        stored = json.load(stream)
    header = stored["header"]
    if not collect:
        out.send(b"Z", wire.json_text({"done": header.get("status"), "exit_code": header.get("exit_code")}).encode())
        return
    value = exc_data = b""
    for name in ("value.bin", "exception.bin"):
        try:
            with open(os.path.join(private, name), "rb") as stream:
                data = stream.read()
        except FileNotFoundError:
            continue
        if name == "value.bin":
            value = data
        else:
            exc_data = data
    run_options = dict(stored.get("options") or {})
    run_options.update(pull=options.get("pull") or run_options.get("pull"), keep=False,
                       no_pull=bool(options.get("no_pull")))
    _send_classified(run_options, run_dir, header, value, exc_data, out)


def _serve_cancel(cache_dir: str, run_dir: str) -> int:
    """Stop a detached run's task (SIGTERM to its supervisor, which ends the task's process group) and
    print the run's status as JSON once it has ended (within a few seconds)."""
    run_dir = _check_run_dir(cache_dir, run_dir)
    status = _read_status(run_dir)
    pid = status.get("supervisor_pid")
    if status.get("state") != "done" and isinstance(pid, int) and pid > 0:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + _KILL_GRACE + 3
        while time.monotonic() < deadline and _read_status(run_dir).get("state") != "done":
            time.sleep(0.05)
    sys.stdout.write(wire.json_text(_read_status(run_dir)) + "\n")
    sys.stdout.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Serve one call (``serve``), many (``worker``), or a detached run (``detach``, ``attach RUN_DIR
    [collect]``, ``cancel RUN_DIR``) over stdin/stdout; see the module docstring."""
    args = list(sys.argv[1:] if argv is None else argv)
    cache_dir = os.path.expanduser(args[0]) if args else os.path.expanduser("~/.cache/remote_exec")
    mode = args[1] if len(args) > 1 else "serve"
    out = _Out(1)
    try:
        if mode == "serve":
            options, session, reader = _read_call(0)
            _serve_call(options, session, reader, cache_dir, out)
            return 0
        if mode == "detach":
            options, session, reader = _read_call(0)
            _serve_detached(options, session, cache_dir, out)
            return 0
        if mode == "attach":
            _serve_attach(cache_dir, args[2], len(args) > 3 and args[3] == "collect", out)
            return 0
        if mode == "cancel":
            return _serve_cancel(cache_dir, args[2])
        if mode == "worker":
            idle = float(args[2]) if len(args) > 2 else 600.0
            return _serve_worker(cache_dir, idle)
        sys.stderr.write(f"rx runner: unknown mode {mode!r}\n")
        return EXIT_RUNNER_FAILURE
    except _CoordinatorGone:
        return 0
    except Exception as exc:
        sys.stderr.write(f"rx runner: {type(exc).__name__}: {exc}\n")
        if os.environ.get("RX_DEBUG"):
            import traceback

            traceback.print_exc()
        return EXIT_RUNNER_FAILURE
