"""The persistent worker (``keep_warm``): many calls over one channel, each run in this process's main thread,
while a watcher thread streams their output and applies the :class:`~.policy.Policy` to the running call."""

from __future__ import annotations

import os
import sys
import threading
import time

from ..protocol import wire
from .channel import CoordinatorGone, Out, Poller, read_call
from .child import enter_project, run_task, set_call_environ, task_stdio
from .contain import Containment
from .policy import Policy
from .result import Ending, classify, oom_kills, send_result
from .rundir import make_run_dir, new_run_path, rmtree

TYPE_CHECKING = False  # typing is not imported at run time
if TYPE_CHECKING:
    import signal
    from typing import Any

    from .policy import Action
else:
    import _signal as signal

__all__ = ["serve_worker"]


def serve_worker(cache_dir: str, idle_timeout: float, out_fd: int = 1, slot: dict[str, Any] | None = None) -> int:
    """Persistent worker (``keep_warm``): many calls over one channel, each run in this process.

    Imports stay warm between calls, and a call runs in the main thread, so a small call costs a few
    hundred microseconds here; in a pool's worker a script or module runs in a process forked for it (a
    fresh ``__main__`` and nothing it does can end the worker, as ``rx run`` gives it), still with the
    worker's warm imports. fds 1 and 2 are pipes that a watcher thread (:class:`_WorkerWatch`) streams to
    the coordinator; it also heartbeats and polices the running call. The worker exits when stdin closes,
    after ``idle_timeout`` seconds without a call, or (through its watcher) when a call is cancelled or
    times out.

    A pool's worker first takes its ``slot`` (:mod:`.slot`: its lock, and the GPUs it asks for, waiting
    while none are free) and holds it for its whole life; its calls see CUDA_VISIBLE_DEVICES of those GPUs.
    """
    import json

    guardian = _guard_worker()
    try:
        os.setsid()
    except OSError:
        pass
    proto_in, out, out_r, err_r = _worker_stdio(out_fd)
    out.json_text = json.dumps  # the C encoder: the worker pays the import once, every result header gains
    home = os.getcwd()
    os.makedirs(os.path.join(cache_dir, "runs"), mode=0o700, exist_ok=True)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a cancelled call gets a KeyboardInterrupt
    containment = Containment(f"worker-{os.getpid()}", cgroups=False)
    containment.adopt(os.getpid(), group=False)  # what a call leaves (double forks too) stays below the worker
    reader = wire.FrameReader()
    placed = _take_slot(cache_dir, slot, out, proto_in, reader) if slot is not None else {}
    if placed is None:
        return 0
    calls = _Calls(cache_dir, out, _WorkerWatch(out, out_r, err_r, proto_in, reader, containment), containment,
                   guardian)
    calls.held = placed.pop("held", None)
    calls.placed = {name: os.environ[name] for name in _PLACED if placed.get("gpus") and name in os.environ}
    calls.fork_scripts = slot is not None
    out.event({"event": "worker", "pid": os.getpid(), "host": os.uname().nodename, **placed})
    calls.watch.thread.start()
    try:
        while True:
            calls.serve_next(idle_timeout)
    finally:
        if calls.run_dir is not None:  # leave nothing behind (a call in progress, or the kept empty directory)
            os.chdir(home)
            rmtree(calls.run_dir)
        containment.signal(signal.SIGKILL)
        _end_group()


def _guard_worker() -> int:
    """Fork; the child returns (the write end of a pipe on which it names each run directory it makes) and
    serves as the worker. This process stays its guardian: it passes on the signals that stop a runner,
    waits for the worker and, when a signal ended it (the kernel's out-of-memory killer, a kill -9, a task
    that killed its own process), removes the run directory it was using, writes :data:`wire.WORKER_DIED`
    and the header of how the running call ended on stderr (the worker, dead, can send no result), and
    exits with 128 + the signal's number (the link's own failure stays ssh's 255)."""
    oom_before = oom_kills()
    started = time.monotonic()
    named_r, named_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(named_r)
        os.set_blocking(named_w, False)  # a guardian behind must never stop the worker
        return named_w
    os.close(named_w)
    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(number, lambda number, frame: os.kill(pid, number))
    status, named = _wait_naming(pid, named_r)
    if os.WIFSIGNALED(status):
        if named and os.path.isdir(named):
            rmtree(named)
        header = classify({"kind": "function"}, Ending(started, exit_status=status, oom_before=oom_before))[0]
        sys.stderr.write(wire.WORKER_DIED + wire.json_text(header) + "\n")
        sys.stderr.flush()
    os._exit(128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))


def _wait_naming(pid: int, named_r: int) -> tuple[int, str]:
    """Wait for the worker ``pid`` to end, reading the run directories it names; return its wait status and
    the last directory it named."""
    import select

    lines = b""
    while True:
        if named_r >= 0 and select.select([named_r], [], [], 0.5)[0]:
            data = os.read(named_r, 65536)
            lines = (lines + data)[-8192:] if data else lines
            if not data:
                os.close(named_r)
                named_r = -1
        done, status = os.waitpid(pid, os.WNOHANG if named_r >= 0 else 0)
        if done:
            names = lines.decode("utf-8", "surrogateescape").split("\n")
            return status, names[-2] if len(names) > 1 else ""


def _worker_stdio(out_fd: int) -> tuple[int, Out, int, int]:
    """Move the protocol off fds 0 and 1 (frames out on ``out_fd``), give the tasks pipes as fds 1 and 2;
    return (protocol in, frames out, and the read ends of the tasks' stdout and stderr, non-blocking)."""
    proto_in = os.dup(0)
    out = Out(out_fd if out_fd > 2 else os.dup(out_fd))
    out.openssl = True  # a persistent worker pays for OpenSSL once: it always uses it
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    task_stdio(out_w, err_w)
    for fd in (out_r, err_r):
        os.set_blocking(fd, False)
    return proto_in, out, out_r, err_r


class _Calls:
    """The worker's calls, one after another; the run directory a call left empty (or, for a project, its
    snapshot untouched) serves the next. A project's snapshot keeps one path for the worker's life: the
    modules imported from it by one call stay where their ``__file__`` says for the next."""

    def __init__(self, cache_dir: str, out: Out, watch: _WorkerWatch, containment: Containment,
                 guardian: int) -> None:
        self.cache_dir = cache_dir
        self.out = out
        self.watch = watch
        self.containment = containment
        self.guardian = guardian
        self.run_dir: str | None = None
        self.tree: str | None = None
        self.snapshot_path: str | None = None
        self.placed: dict[str, str] = {}
        self.fork_scripts = False
        self.held: Any = None

    def serve_next(self, idle_timeout: float) -> None:
        """Read the next call, run it here, send its result."""
        watch = self.watch
        options, session_bytes, _ = read_call(watch.proto_in, watch.reader, idle_timeout)
        self.out.new_call(options["key"])
        run_dir = self._run_dir(options)
        saved_env = _environ_snapshot()
        if self.placed and options.get("env"):  # the slot's GPUs, whatever the call's environment says
            options["env"] = {k: v for k, v in options["env"].items() if k not in self.placed}
        set_call_environ(options)
        if os.environ.get("RX_RUN_DIR") != run_dir:
            os.environ["RX_RUN_DIR"] = run_dir
        script = enter_project(run_dir, options)
        current = _Current(options, run_dir)
        watch.begin(current)
        if self.fork_scripts and options.get("kind") in ("script", "module"):
            exit_status, loaded = _run_forked(session_bytes, run_dir, options, current,
                                              (watch.proto_in, self.out.fd, watch.out_r, watch.err_r))
        else:
            exit_status, loaded = 0, run_task(session_bytes, run_dir, bool(options.get("marshal")), script)
        del session_bytes
        watch.returned()
        try:
            _restore_environ(saved_env)
            contained = self.containment
            contained.stray, contained.stray_count = [], 0
            contained.sweep()  # what the call left running ends with it
            policy = current.policy  # a call cancelled with SIGINT that ended on it: reported as cancelled
            ending = Ending(policy.started, exit_status=exit_status, loaded=loaded, contained=contained.report(),
                            status=policy.status, detail=policy.detail)
            if not send_result(options, run_dir, ending, self.out, reuse=True):
                self.run_dir = None
                if self.held is not None:
                    self.held.note_run_dir(None)
            if policy.status is not None:
                raise CoordinatorGone("the call was stopped: a fresh worker takes the next one")
        finally:
            watch.lock.release()

    def _run_dir(self, options: dict[str, Any]) -> str:
        """This call's run directory: the one kept from the last call when it fits, else a new one."""
        tree = options.get("tree") or None
        if self.run_dir is not None and self.tree == tree:
            return self.run_dir
        if self.run_dir is not None:
            rmtree(self.run_dir)
            self.run_dir = None
        if tree is None:
            self.run_dir = make_run_dir(self.cache_dir, options, private=False)
        else:
            from .snapshot import prepare_snapshot
            from .store import Inbox

            if self.snapshot_path is None:
                self.snapshot_path = new_run_path(self.cache_dir, options)
            inbox = Inbox(self.watch.proto_in, self.watch.reader, self._send, float(options.get("heartbeat") or 5.0))
            prepare_snapshot(self.cache_dir, options, inbox, self.snapshot_path)
            inbox.done()
            self.run_dir = self.snapshot_path
        self.tree = tree
        try:  # the guardian removes it if the worker is killed
            os.write(self.guardian, self.run_dir.encode("utf-8", "surrogateescape") + b"\n")
        except OSError:
            pass
        if self.held is not None:  # a pool's worker: its lock file names it, for a sweep after a SIGKILL
            self.held.note_run_dir(self.run_dir)
        return self.run_dir

    def _send(self, kind: bytes, payload: bytes = b"") -> None:
        with self.watch.lock:  # the watcher thread sends the tasks' output meanwhile
            self.out.send(kind, payload)


class _Current:
    """The call a persistent worker is running: what its watcher needs to police it (and the process
    forked for it, if it runs in one)."""

    __slots__ = ("child", "options", "policy", "run_dir")

    def __init__(self, options: dict[str, Any], run_dir: str) -> None:
        self.options = options
        self.run_dir = run_dir
        self.policy = Policy.for_call(options, time.monotonic())
        self.child: int | None = None


#: The environment a worker's slot sets for all its calls (a call's own environment cannot change it).
_PLACED = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER")


def _take_slot(cache_dir: str, request: dict[str, Any], out: Out, proto_in: int,
               reader: wire.FrameReader) -> dict[str, Any] | None:
    """Take the worker's slot (its lock, its GPUs: see :mod:`.slot`); what the ``worker`` event tells of it.

    While GPUs are busy it reports ``waiting`` events and looks again; None when the slot can never be
    had here (reported as a ``slot-error`` event) or the coordinator went away meanwhile.
    """
    from .slot import SlotError, take_slot

    interval = float(request.get("interval") or 5.0)

    def wait(event: dict[str, Any]) -> None:
        out.event(event)
        deadline = time.monotonic() + interval
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if _wait_readable(proto_in, left):
                data = os.read(proto_in, 1 << 16)
                if not data or any(kind == b"Q" for kind, _ in reader.feed(data)):
                    raise CoordinatorGone("the coordinator went away while the slot waited")

    try:
        held = take_slot(cache_dir, request, wait)
    except SlotError as exc:
        out.event({"event": "slot-error", "message": str(exc)})
        return None
    except CoordinatorGone:
        return None
    if held.gpus:
        os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # nvidia-smi's order: its indices mean the same GPUs
        os.environ["CUDA_VISIBLE_DEVICES"] = held.visible_devices()
    return {"slot": request.get("owner", {}).get("slot"), "gpus": held.gpus, "held": held}


def _wait_readable(fd: int, seconds: float) -> bool:
    import select

    return bool(select.select([fd], [], [], seconds)[0])


def _run_forked(session_bytes: bytes, run_dir: str, options: dict[str, Any], current: _Current,
                worker_fds: tuple[int, ...]) -> tuple[int | None, Any]:
    """Run a script or module call in a process forked for it (its own ``__main__``, this worker's warm
    imports and slot; not ``worker_fds``, the worker's own channel); return its wait status and what it
    sent back."""
    from .child import parse_result, run_child

    result_r, result_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            for fd in (result_r, *worker_fds):
                os.close(fd)
            run_child(session_bytes, run_dir, options, os.dup(1), os.dup(2), result_w)
        finally:
            os._exit(70)
    os.close(result_w)
    current.child = pid
    buffer = bytearray()
    status: int | None = None
    try:
        while True:
            try:
                chunk = os.read(result_r, 1 << 20)
            except KeyboardInterrupt:  # the call is cancelled (SIGINT to the worker): the script gets it too
                _interrupt(pid)
                continue
            if not chunk:
                break
            buffer += chunk
        while status is None:
            try:
                status = os.waitpid(pid, 0)[1]
            except KeyboardInterrupt:
                _interrupt(pid)
    finally:
        os.close(result_r)
    current.child = None
    return status, parse_result(buffer)


def _interrupt(group: int) -> None:
    try:
        os.killpg(group, signal.SIGINT)
    except OSError:
        pass




class _WorkerWatch:
    """A persistent worker's second thread, for the worker's whole life.

    The call runs in the worker's main thread (no thread per call: a small call costs a few hundred
    microseconds). This thread streams what the tasks write to fds 1 and 2 as it comes, and while a call
    runs it applies the call's policy: heartbeats, the coordinator's frames (heartbeats, cancel), the
    timeout, the dead link. A cancelled or timed-out call cannot be stopped inside the main thread: the
    watcher reports it and ends the worker with its process group (the coordinator starts a fresh worker
    for the next call); so does a coordinator that went away.

    ``lock`` guards the frames sent, ``current`` and, while a call runs, the frame reader of stdin (the
    main thread owns stdin between calls).
    """

    def __init__(self, out: Out, out_r: int, err_r: int, proto_in: int, reader: wire.FrameReader,
                 containment: Containment) -> None:
        self.out = out
        self.containment = containment
        self.out_r = out_r
        self.err_r = err_r
        self.proto_in = proto_in
        self.reader = reader
        self.lock = threading.Lock()
        self.current: _Current | None = None
        self.thread = threading.Thread(target=self._run, name="rx-worker-watch", daemon=True)

    def _run(self) -> None:
        idle = Poller()
        busy = Poller()
        for poller in (idle, busy):
            poller.register(self.out_r, b"O")
            poller.register(self.err_r, b"E")
        busy.register(self.proto_in, b"I")
        try:
            while True:
                current = self.current
                if current is None:
                    ready = idle.select(0.5)
                else:
                    current.policy.on_sent(self.out.last)
                    ready = busy.select(current.policy.next_wake(time.monotonic()))
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
                self._input(current)
        if current is not None:
            current.policy.on_sent(self.out.last)
            self._apply(current.policy.step(time.monotonic()))

    def _input(self, current: _Current) -> None:
        data = os.read(self.proto_in, 1 << 16)
        if not data:
            self._apply(current.policy.on_eof(time.monotonic()))
            return
        kinds = [kind for kind, _payload in self.reader.feed(data)]
        self._apply(current.policy.on_input(time.monotonic(), kinds))

    def _apply(self, actions: list[Action]) -> None:
        for action in actions:
            action.apply(self)

    # -- what the policy's actions do here (see policy.Actor) -------------------------------------------

    def heartbeat(self) -> None:
        self.out.send(b"B")

    def signal(self, signal_number: int) -> None:
        """SIGINT (the first step of a cancel): a KeyboardInterrupt in the call, in this process's main thread
        (and SIGINT to what it started in the worker's group), so its ``finally`` runs and the main thread
        sends its result. Any later step (the call went on, or a timeout): the call is reported as the
        policy decided and the worker ends with its process group (the task cannot be stopped alone; the
        coordinator starts a fresh worker for the next call)."""
        current = self.current
        assert current is not None
        if signal_number == signal.SIGINT:
            try:
                os.killpg(os.getpgrp(), signal.SIGINT)
            except OSError:
                os.kill(os.getpid(), signal.SIGINT)
            return
        self._drain_output()
        ending = Ending(current.policy.started, status=current.policy.status, detail=current.policy.detail)
        send_result(current.options, current.run_dir, ending, self.out)
        self._end()

    def report(self, status: str, detail: str) -> None:
        """Nothing to do now: the policy keeps the status, the next :meth:`signal` acts on it."""

    def give_up(self, reason: str) -> None:
        raise CoordinatorGone(reason)

    def sweep(self) -> None:
        """Nothing: the main thread sweeps what a call left once it returned."""

    def finish(self) -> None:
        """Nothing: a call in this process ends by returning."""

    def _end(self) -> None:
        current = self.current
        if current is not None:
            if current.child is not None:  # a forked call leads a process group of its own
                try:
                    os.killpg(current.child, signal.SIGKILL)
                except OSError:
                    pass
            rmtree(current.run_dir)
        self.containment.signal(signal.SIGKILL)  # what the calls started outside the worker's group too
        _end_group()
        os._exit(0)

    def begin(self, current: _Current) -> None:
        """A call starts: police it."""
        with self.lock:
            self.current = current

    def returned(self) -> None:
        """The call returned: from here the main thread owns stdin; drain the task's output. Returns with
        the lock held (the caller sends the result, then releases it)."""
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


def _drain(fd: int, kind: bytes, out: Out) -> bool:
    """Send what a non-blocking pipe holds now; False once it reached end of file."""
    while True:
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            return True
        if not data:
            return False
        out.send(kind, data)


def _end_group() -> None:
    """End what the tasks left running in the worker's process group (the worker leads it).

    From the main thread the worker survives the signal (it ignores it) and goes on to exit normally.
    From the watcher thread it cannot change signal handling (only the main thread may): the worker ends
    with its group, which is what the watcher wants anyway.
    """
    if os.getpgrp() == os.getpid():
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
