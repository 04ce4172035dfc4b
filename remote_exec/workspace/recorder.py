"""Recording calls in the workspace: one interface, synchronous for ``rx run``, batched for ``@task`` calls.

The coordinator drives every call through a :class:`CallRecorder`: it gives the call's output sinks, lands
its pulled files, hears of its phases, and records how it ended.

- :class:`RunRecorder` (``rx run``, ``rx attach``): the run's ``stdout.log`` and ``stderr.log`` written as
  output arrives, each phase an action of the run, files under ``files/``; the caller records the end.
- :class:`TaskCallRecorder` (``@task`` calls): one task entry per call in the process's run, written by a
  :class:`TaskRecorder` thread in batches (a call never waits for the disk).
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import IO, Any, BinaryIO

from ..errors import RemoteExecError
from .manager import Run, Workspace, register_pending_writer
from .output import CappedLog, OutputPump
from .state import utc_now

__all__ = ["CallRecorder", "ExitStatus", "RunRecorder", "StreamSink", "TaskCallRecorder", "TaskRecorder", "TaskRuns",
           "calls_failed"]

logger = logging.getLogger(__name__)

OutputSink = Callable[[bytes], None]


class StreamSink:
    """Hands a task's output bytes to an :class:`~.output.OutputPump` for a local text stream (so a slow
    reader never holds up the link's reading loop) and writes them to a log file when given one;
    thread-safe."""

    def __init__(self, stream: IO[str], log: IO[bytes] | CappedLog | None = None,
                 pump: OutputPump | None = None) -> None:
        self.stream = stream
        self.log = log
        self.pump = pump or OutputPump()
        self._writer = self.pump.sink(stream)
        self._lock = threading.Lock()

    def __call__(self, data: bytes) -> None:
        with self._lock:
            if self.log is not None:
                self.log.write(data)
            self.pump.write(self._writer, data)


class FileLanding:
    """Lands a call's checked files under the folder ``into`` of its run's store (a
    :class:`~remote_exec.protocol.options.FileLander`: see :meth:`.Store.stage` and :meth:`.Store.land_tree`)."""

    def __init__(self, run: Run, into: str) -> None:
        self.run = run
        self.into = into

    def stage(self) -> Path:
        return self.run.store.stage()

    def land(self, staged: Path, files: Sequence[PurePosixPath]) -> list[Path]:
        return self.run.store.land_tree(staged, self.into, [path.as_posix() for path in files])


class CallRecorder(ABC):
    """Where one call's record goes.

    Attributes:
        stdout: Receives the task's stdout as it arrives.
        stderr: Receives the task's stderr as it arrives.
        retryable: Its collection can be tried again (``rx attach``): the host keeps the result until it
            landed.
        stdin: What the task reads on its stdin (``rx run`` forwards a pipe or a file), or None: empty.
        land_file: Where the files the call brings back land.
    """

    stdout: OutputSink
    stderr: OutputSink
    land_file: FileLanding
    retryable = False
    stdin: BinaryIO | None = None

    def phase(self, name: str, state: str, when: float | None = None) -> None:  # noqa: B027 - optional
        """A phase of the call (``pack``, ``connect``, ``upload``, ``execute``, ``collect``) ``started``,
        ``finished`` or ``failed``, now (or at ``when``, a ``time.monotonic()`` of the past: a runner
        started ahead tells its phases once the call takes it). Not every record keeps phases."""

    def submitted(self, detached: dict[str, Any]) -> None:  # noqa: B027 - optional: only scheduled calls
        """The call was submitted to a scheduler as a job; ``detached`` says where it runs and which job it
        is (what ``rx attach`` needs to follow and collect it later)."""

    def job(self, record: dict[str, Any]) -> None:  # noqa: B027 - optional: only scheduled calls
        """What the scheduler says of the call's job now (its state, reason, nodes; at the end its
        accounting)."""

    @abstractmethod
    def finished(self, *, result: Any, phases: dict[str, float], value: Callable[[], bytes | Path]) -> None:
        """The call came back with ``result``; ``value`` gives its value's pickle for the record (its bytes,
        or a file that the recorder then owns and removes once recorded)."""

    @abstractmethod
    def failed(self, exc: BaseException) -> None:
        """The call did not come back (``exc`` says why)."""

    def close(self) -> None:  # noqa: B027 - optional
        """Release what the record holds open."""


class RunRecorder(CallRecorder):
    """Records an ``rx run`` (or ``rx attach``): logs (each kept to ``log_cap`` bytes, 0: all), actions,
    files; synchronously."""

    retryable = True

    def __init__(self, run: Run, *, host: str | None, stdout: IO[str] | None = None,
                 stderr: IO[str] | None = None, stdin: BinaryIO | None = None, log_cap: int = 0) -> None:
        self.run = run
        self.stdin = stdin
        self.host = host
        self._logs = tuple(CappedLog(run.store.open_append(name), run.dir / name, log_cap)
                           for name in ("stdout.log", "stderr.log"))
        self.offsets = (self._logs[0].offset, self._logs[1].offset)
        self.output = OutputPump()  # one for both streams: their order stays the task's
        self.stdout = StreamSink(stdout or sys.stdout, self._logs[0], self.output)
        self.stderr = StreamSink(stderr or sys.stderr, self._logs[1], self.output)
        self.land_file = FileLanding(run, "files")
        self._phases: list[tuple[str, str, str | None, str]] = []

    def phase(self, name: str, state: str, when: float | None = None) -> None:
        """Phases are recorded as the run's actions, in two rewrites of its state rather than two per phase:
        the ones before the task starts when it starts (``execute``), the rest when the call is over."""
        now = utc_now() if when is None else utc_now(time.time() - (time.monotonic() - when))
        if state == "started":
            self._phases.append(("started", name, None if name == "pack" else self.host, now))
        else:
            self._phases.append(("finished" if state == "finished" else "failed", name,
                                 None if state == "finished" else f"{name} failed", now))
        if name == "execute" and state == "started":
            self.record_phases()

    def record_phases(self) -> None:
        """Write the phases heard so far into the run's actions."""
        self.run.tracker.apply(self.take_phases())

    def submitted(self, detached: dict[str, Any]) -> None:
        """A submitted job belongs to the cluster, not to this process: the run keeps where it is (so
        ``rx attach`` can collect it) and never counts as lost for want of this process."""
        self.run.update(detached=detached, coordinator=None, job=detached.get("job"))

    def job(self, record: dict[str, Any]) -> None:
        self.run.update(job=record)

    def finished(self, *, result: Any, phases: dict[str, float], value: Callable[[], bytes | Path]) -> None:
        """The caller (the CLI) records the run's end with its outcome."""

    def failed(self, exc: BaseException) -> None:
        """The caller (the CLI) records the run's end with its error."""

    def close(self, *, record: bool = True) -> None:
        """Wait until the local reader took the output (rx's summary comes after it), close the logs, record
        the phases not yet written (``record=False``: the caller records them with the run's end, see
        :meth:`take_phases`)."""
        try:
            self.output.close()
        finally:
            for log in self._logs:
                log.close()
            if record:
                self.record_phases()

    def take_phases(self) -> list[tuple[str, str, str | None, str]]:
        """The phases not yet recorded, for :meth:`~remote_exec.workspace.manager.Run.set_status`; they are
        the caller's to record now."""
        pending, self._phases = self._phases, []
        return pending


class TaskRecorder:
    """Records @task calls in their workspace runs, in order, on one background thread (batched).

    A call does not wait for its record to reach the disk (a locked, fsynced state rewrite costs
    milliseconds, more than a warm call itself). Jobs are data: per-call files (the call's session, its
    value) and task-board changes. The thread gathers what queues up for :attr:`INTERVAL` seconds, writes
    the batch's files as one archive (:meth:`Run.write_calls`) and applies all board changes of a run in
    one state rewrite, so a sweep of many small calls writes a few files a second, not two per call, and
    competes little with the calls for the interpreter. The archives are written atomically but not
    fsynced (a killed process loses nothing; only a crash of the machine may lose the last moments'
    records); state.json is.
    :meth:`flush` cuts the wait short and returns once everything submitted so far is applied; it runs at
    exit.
    """

    #: Seconds the thread gathers jobs before applying them.
    INTERVAL = 0.2

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[tuple[Any, ...], ...]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._urgent = threading.Event()
        self._flushing = 0

    def task(self, run: Any, key: str, **fields: Any) -> None:
        """Change task ``key`` of the run's status board (``started``/``finished`` may be epoch seconds)."""
        self.put(("task", run, key, fields))

    def put(self, *jobs: tuple[Any, ...]) -> None:
        """Submit ``("file", run, name, data)`` and ``("task", run, key, fields)`` jobs, in order."""
        if self._thread is None or not self._thread.is_alive():
            with self._lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._work, name="rx-recorder", daemon=True)
                    self._thread.start()
        self._queue.put(jobs)

    def _work(self) -> None:
        while True:
            submitted = [self._queue.get()]
            self._urgent.wait(self.INTERVAL)
            while True:
                try:
                    submitted.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._apply([job for jobs in submitted for job in jobs])
            except Exception:
                logger.warning("recording task calls in the workspace failed", exc_info=True)
            finally:
                for _ in submitted:
                    self._queue.task_done()

    @staticmethod
    def _apply(batch: list[tuple[Any, ...]]) -> None:

        files: dict[int, tuple[Any, list[tuple[str, bytes]]]] = {}
        changes: dict[int, tuple[Any, list[tuple[str, dict[str, Any]]]]] = {}
        for kind, run, name, payload in batch:
            if kind == "file":
                files.setdefault(id(run), (run, []))[1].append((name, payload()))
                continue
            for stamp in ("started", "finished"):
                if isinstance(payload.get(stamp), float):
                    payload[stamp] = utc_now(payload[stamp])
            changes.setdefault(id(run), (run, []))[1].append((name, payload))
        for run, members in files.values():  # before the entries that point at them
            run.write_calls(members)
        for run, run_changes in changes.values():
            run.board.apply(run_changes)

    def flush(self) -> None:
        """Wait until every submitted update is applied."""
        if self._thread is None:
            return
        with self._lock:
            self._flushing += 1
            self._urgent.set()
        try:
            self._queue.join()
        finally:
            with self._lock:
                self._flushing -= 1
                if not self._flushing:
                    self._urgent.clear()


class TaskCallRecorder(CallRecorder):
    """Records one ``@task`` call as a task entry of its process's run (through a :class:`TaskRecorder`)."""

    def __init__(self, recorder: TaskRecorder, run: Run, execution_id: str, *, name: str, host: str,
                 session_bytes: bytes, output: OutputPump | None = None, key: str | None = None,
                 fields: dict[str, Any] | None = None, attempts: list[dict[str, Any]] | None = None,
                 sinks: tuple[OutputSink, OutputSink] | None = None) -> None:
        self.recorder = recorder
        self.run = run
        self.execution_id = execution_id
        self.key = key = key or execution_id[:16]
        self.host = host
        self.output = output or OutputPump()
        self.stdout, self.stderr = sinks or (StreamSink(sys.stdout, pump=self.output),
                                             StreamSink(sys.stderr, pump=self.output))
        self.land_file = FileLanding(run, f"files/{key}")
        self._fields = dict(fields or {})
        self._attempts = attempts
        self._started = time.time()
        recorder.put(("task", run, key, dict(name=name, host=host, status="running", started=self._started,
                                             finished=None, error=None, execution_id=execution_id,
                                             **self._fields)),
                     ("file", run, f"sessions/{key}.session", lambda: session_bytes))

    def _attempt(self, status: str, error: str | None) -> dict[str, Any]:
        """This attempt added to the call's list of attempts (when it keeps one): the entry's fields. A call
        done at its first attempt keeps no list: its entry (host, slot, GPUs, times) is that attempt, and a
        sweep of many small calls keeps state.json small."""
        if self._attempts is None:
            return {}
        self._attempts.append({"host": self.host, **self._fields, "started": utc_now(self._started),
                               "finished": utc_now(), "status": status, "error": error})
        if len(self._attempts) == 1 and status == "done":
            return {}
        return {"attempts": list(self._attempts)}

    def finished(self, *, result: Any, phases: dict[str, float], value: Callable[[], bytes | Path]) -> None:
        self.output.drain()  # the caller prints after the call: the task's output comes first
        jobs: list[tuple[Any, ...]] = []
        if result.ok:
            data = value()
            if data:
                jobs.append(("file", self.run, f"results/{self.key}.pkl", lambda: data))
        error = None if result.ok else (result.detail or f"{result.exception_type}: {result.exception_message}")
        status = "done" if result.ok else "failed"
        jobs.append(("task", self.run, self.key, dict(
            status=status, finished=time.time(), execution_id=self.execution_id,
            exit_code=result.exit_code,
            result_status=result.status, phases=phases, error=error, **self._attempt(status, error))))
        self.recorder.put(*jobs)

    def failed(self, exc: BaseException) -> None:
        if not isinstance(exc, KeyboardInterrupt):
            self.output.drain()
        status = "cancelled" if isinstance(exc, KeyboardInterrupt) else "failed"
        error = f"{type(exc).__name__}: {exc}"
        self.recorder.task(self.run, self.key, status=status, finished=time.time(), error=error,
                           **self._attempt(status, error))

    def submitted(self, detached: dict[str, Any]) -> None:
        self.recorder.task(self.run, self.key, job=detached.get("job"))

    def job(self, record: dict[str, Any]) -> None:
        self.recorder.task(self.run, self.key, job=record)


class ExitStatus:
    """The exit status this process ends with, as far as Python lets it be known while it exits.

    An uncaught exception leaves ``sys.last_value`` (1; 130 for Ctrl-C); ``sys.exit(N)`` is watched (the
    status is not kept anywhere Python code can read it at exit); else the script ended: 0. ``raise
    SystemExit(N)`` without ``sys.exit`` is not seen (0).
    """

    def __init__(self) -> None:
        self.code: int | None = None
        self._original: Callable[..., Any] | None = None
        self._watcher: Callable[..., Any] | None = None

    def watch(self) -> None:
        """Watch ``sys.exit`` from now on (once)."""
        if self._original is not None:
            return
        original = self._original = sys.exit

        def exit(status: object = None) -> None:
            if threading.current_thread() is threading.main_thread():
                self.code = _exit_status(status)
            original(status)  # type: ignore[arg-type]

        self._watcher = sys.exit = exit  # type: ignore[assignment]

    def unwatch(self) -> None:
        """Put ``sys.exit`` back (unless something replaced it since)."""
        if self._original is not None and sys.exit is self._watcher:
            sys.exit = self._original
        self._original = self._watcher = None

    def status(self) -> int:
        """The exit status the process ends with (see the class)."""
        last = getattr(sys, "last_value", None)
        if isinstance(last, BaseException) and not isinstance(last, SystemExit):
            return 130 if isinstance(last, KeyboardInterrupt) else 1
        return self.code if self.code is not None else 0


def _exit_status(status: object) -> int:
    """What ``sys.exit(status)`` makes the exit status: 0 for None, the number, else 1 (a message)."""
    if status is None:
        return 0
    if isinstance(status, int):
        return status & 0xFF
    return 1


def calls_failed(tasks: dict[str, Any]) -> str | None:
    """``3 of 6 calls failed`` for a run's task board (None when none failed)."""
    failed = sum(1 for entry in tasks.values() if entry.get("status") != "done")
    return f"{failed} of {len(tasks)} call{'s' if len(tasks) != 1 else ''} failed" if failed else None


class TaskRuns:
    """The workspace runs that a process's ``@task`` calls are recorded in (one per workspace and run id),
    created on the first call, closed at exit with the process's own exit status (:class:`ExitStatus`);
    calls that failed are counted in the run's error (``3 of 6 calls failed``), whatever the process made
    of them.

    Each call is its own entry of its run, under its own key: the first 16 characters of its execution id
    (which names the task and its arguments), then ``-2``, ``-3``... for more calls with the same arguments
    (:meth:`key_for`).
    """

    def __init__(self, recorder: TaskRecorder) -> None:
        self.recorder = recorder
        self.exit_status = ExitStatus()
        self._runs: dict[tuple[Any, ...], Run] = {}
        self._created: dict[str, Run] = {}  # by run dir: the runs this process made (and so closes)
        self._keys: dict[str, set[str]] = {}  # by run dir: the task keys taken so far
        self._lock = threading.Lock()
        self._registered = False

    def key_for(self, run: Run, execution_id: str, wanted: str | None = None) -> str:
        """A key of its own for a call of ``run``: ``wanted`` (a rerun keeps its call's key) when given,
        else the execution id's first 16 characters, suffixed ``-N`` when calls before took it."""
        with self._lock:
            taken = self._keys.get(str(run.dir))
            if taken is None:
                try:
                    taken = set(run.tasks())  # a run made elsewhere (rx rerun) may hold entries already
                except RemoteExecError:
                    taken = set()
                self._keys[str(run.dir)] = taken
            if wanted:
                taken.add(wanted)
                return wanted
            base = key = execution_id[:16]
            count = 1
            while key in taken:
                count += 1
                key = f"{base}-{count}"
            taken.add(key)
            return key

    def run_for(self, workspace: Path | str | None, run_id: str, *, cwd: str, host: str, backend: str) -> Run:
        """The run for calls of this process recorded under ``run_id`` in ``workspace``."""
        # Keyed by what names the workspace first (resolving it costs a sweep's call more than a lookup).
        quick = (str(workspace or ""), os.environ.get("RX_WORKSPACE"), cwd, run_id)
        run = self._runs.get(quick)
        if run is not None:
            return run
        resolved = Workspace.resolve(workspace)
        key = (str(resolved.root), run_id)
        with self._lock:
            run = self._runs.get(key)
            if run is None:
                run = self._open(resolved, run_id, host=host, backend=backend)
                self._runs[key] = run
            self._runs[quick] = run
            return run

    def _open(self, workspace: Workspace, run_id: str, *, host: str, backend: str) -> Run:
        try:
            return workspace.run(run_id)  # a run made elsewhere (rx rerun): its maker records its end
        except RemoteExecError:
            pass
        main = sys.modules.get("__main__")
        name = Path(getattr(main, "__file__", "") or "python").name
        run = workspace.new_run(target=name, kind="task", argv=sys.argv[1:], remote=host, backend=backend,
                                run_id=run_id)
        run.set_status("running")
        self._created[str(run.dir)] = run
        self.exit_status.watch()
        if not self._registered:
            register_pending_writer(self.recorder.flush)
            self._registered = True
        return run

    def close(self) -> None:
        """Record each run's end (what is still pending is written first)."""
        self.recorder.flush()
        with self._lock:
            runs = list(self._created.values())
            self._created.clear()
            self._runs.clear()
            self._keys.clear()
        code = self.exit_status.status()
        self.exit_status.unwatch()
        for run in runs:
            try:
                failed = calls_failed(run.tasks())
                error = "; ".join(part for part in (f"exit status {code}" if code else None, failed) if part)
                run.set_status("failed" if code else "finished", exit_code=code, error=error or None)
            except Exception:  # exit must not fail; the run then shows as lost, and rx rerun --failed resumes it
                logger.debug("could not close run %s", run.id, exc_info=True)
