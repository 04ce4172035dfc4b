"""Executing advices: run the session somewhere else and conclude with its result.

:class:`ExecutingAdvice` holds the one trip every executing advice makes (pack, connect, ensure, execute,
collect, all through :func:`remote_exec.dispatch.dispatch`) and records it in the workspace; subclasses
only say where: :class:`RemoteAdvice` over SSH, :class:`~remote_exec.advices.subprocess.SubprocessAdvice`
in a local interpreter.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import queue
import sys
import threading
import time
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import IO, Any

from ..advice import Advice
from ..backends import BackendPool
from ..backends.base import Backend, HostSpec
from ..config import Configuration
from ..dispatch import CallOptions, Outcome, close_workers, dispatch
from ..errors import ConfigError, RemoteExecError
from ..packing import DistributionArchive
from ..session import Result, Session
from ..task import Task

__all__ = ["ExecutingAdvice", "RemoteAdvice", "Target", "archive_for", "execute"]

logger = logging.getLogger(__name__)

# stopgap until the Coordinator: the process's backends (one connection per host), closed at exit after the
# persistent workers that use them (close_workers is idempotent; dispatch registers it at exit as well).
backend_pool = BackendPool()


def _close_at_exit() -> None:  # stopgap until the Coordinator
    close_workers()
    backend_pool.close()


atexit.register(_close_at_exit)  # stopgap until the Coordinator


@dataclass(frozen=True)
class Target:
    """Where and how one call runs.

    Attributes:
        backend: The connection.
        backend_name: ``openssh``, ``paramiko`` or ``local``.
        host: The host as the user named it (``local`` for a subprocess).
        options: Interpreter, directories, environment, timeout, files.
        spec: How the backend reaches the host (None for a local subprocess).
    """

    backend: Backend
    backend_name: str
    host: str
    options: CallOptions
    spec: HostSpec | None = None


def _entry_points(task: Task) -> tuple[list[Path], list[Path]]:
    """The files whose imports define the code to ship, and the roots project modules live under."""
    if task.kind == "script" and task.filename:
        script = Path(task.filename).resolve()
        return [script], [script.parent, Path.cwd()]
    if task.kind == "module":
        roots = [Path.cwd()]
        files = [Path(task.filename)] if task.filename else []
        return files, roots
    module_name = task.module or "__main__"
    module = sys.modules.get(module_name)
    file = getattr(module, "__file__", None)
    if not file:
        return [], [Path.cwd()]
    path = Path(file).resolve()
    if module_name == "__main__":
        return [path], [path.parent, Path.cwd()]
    root = path.parent
    for _ in range(module_name.count(".") + (1 if path.name == "__init__.py" else 0)):
        root = root.parent
    return [path], [root, Path.cwd()]


_entry_cache: dict[tuple[str, str | None, str | None, str], tuple[list[Path], list[Path]]] = {}


def archive_for(task: Task, config: Configuration, cwd: str | None = None) -> DistributionArchive:
    """The distribution archive carrying ``task``'s code (built once per content); ``cwd``: the current
    directory, when the caller knows it."""
    where = (task.kind, task.module, task.filename, cwd or os.getcwd())
    entry = _entry_cache.get(where)
    if entry is None:
        entry = _entry_cache[where] = _entry_points(task)
    files, roots = entry
    extra = list(config.distribution_modules)
    if task.kind == "module" and task.module:
        extra.append(task.module)
    elif task.kind == "function" and task.module and task.module != "__main__":
        extra.append(task.module.split(".")[0])
    return DistributionArchive.build(entry_files=files, roots=roots, extra_modules=extra)


def _sink(stream: IO[str], log: IO[bytes] | None) -> Callable[[bytes], None]:
    lock = threading.Lock()
    buffer = getattr(stream, "buffer", None)

    def write(data: bytes) -> None:
        with lock:
            if buffer is not None:
                try:
                    stream.flush()
                    buffer.write(data)
                    buffer.flush()
                except (OSError, ValueError):
                    pass
            else:
                stream.write(data.decode("utf-8", "replace"))
                stream.flush()
            if log is not None:
                log.write(data)
                log.flush()

    return write


# -- the process-wide run that @task calls are recorded in --------------------------------------------


class _Recorder:
    """Records @task calls in their workspace runs, in order, on one background thread.

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
                    if self._thread is None:
                        atexit.register(self.flush)  # nothing submitted is lost when the process ends
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
        from ..workspace.state import utc_now

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


_recorder = _Recorder()


def flush_records() -> None:
    """Wait until every @task call of this process is recorded in its workspace."""
    _recorder.flush()


def _register_recorder() -> None:
    from ..workspace.manager import register_pending_writer

    register_pending_writer(_recorder.flush)

_runs: dict[tuple[Any, ...], Any] = {}
_runs_lock = threading.Lock()


def _process_run(session: Session, config: Configuration, target: Target) -> Any:
    """The workspace run for this process's @task calls (created on the first call)."""
    # Keyed by what names the workspace (not by its resolved path: resolving costs a sweep's call more).
    quick = (str(config.workspace or ""), os.environ.get("RX_WORKSPACE"), session.context.get("cwd") or os.getcwd(),
             session.run_id)
    run = _runs.get(quick)
    if run is not None:
        return run
    from ..workspace import Workspace

    workspace = Workspace.resolve(config.workspace)
    key = (str(workspace.root), session.run_id)
    with _runs_lock:
        run = _runs.get(key)
        if run is None:
            main = sys.modules.get("__main__")
            name = Path(getattr(main, "__file__", "") or "python").name
            try:
                run = workspace.run(session.run_id)
            except RemoteExecError:
                run = workspace.new_run(target=name, kind="task", argv=sys.argv[1:], remote=target.host,
                                        backend=target.backend_name, run_id=session.run_id)
                run.set_status("running")
                _register_recorder()
                atexit.register(_close_process_run, run)
            _runs[key] = run
        _runs[quick] = run
        return run


def _close_process_run(run: Any) -> None:
    """At exit: the process's run is finished when every task call is done, else failed."""
    try:
        _recorder.flush()
        tasks = run.tasks()
        failed = [key for key, entry in tasks.items() if entry.get("status") != "done"]
        run.set_status("failed" if failed else "finished", exit_code=1 if failed else 0,
                       error=f"{len(failed)} of {len(tasks)} task(s) did not finish" if failed else None)
    except Exception:  # exit must not fail; the run then shows as lost, and rx rerun --failed resumes it
        logger.debug("could not close run %s", getattr(run, "id", "?"), exc_info=True)


def execute(session: Session, target: Target) -> Result:
    """Run ``session`` at ``target``, recording it in the workspace, and return its result.

    A CLI run passes its workspace run in ``session.local["run"]`` and gets stdout/stderr logs, actions
    and pulled files recorded there; a ``@task`` call is recorded as one task entry of its process's run.
    """
    config = session.config or Configuration.load()
    cli_run = session.local.get("run")
    if cli_run is not None:
        return _execute_cli(session, target, config, cli_run)
    run = _process_run(session, config, target)
    key = session.execution.execution_id[:16]
    session_bytes = session.to_wire()
    # The wire form (already made for the call, read back by Session.loads): no second serialization.
    _recorder.put(("task", run, key, dict(name=session.task.name, host=target.host, status="running",
                                          started=time.time(), finished=None, error=None)),
                  ("file", run, f"sessions/{key}.session", lambda: session_bytes))
    stdout = _sink(sys.stdout, None)
    stderr = _sink(sys.stderr, None)
    try:
        archive = archive_for(session.task, config, session.context.get("cwd"))
        outcome = dispatch(session, target.backend, archive, target.options, on_stdout=stdout,
                           on_stderr=stderr, land_file=_lander(run, f"files/{key}/"),
                           session_bytes=session_bytes)
    except BaseException as exc:
        _recorder.task(run, key, status="failed", finished=time.time(), error=f"{type(exc).__name__}: {exc}")
        raise
    result = outcome.result
    jobs: list[tuple[Any, ...]] = []
    if result.ok and session.task.kind == "function":
        value = _recorded_value(session, target, outcome)
        if value:
            jobs.append(("file", run, f"results/{key}.pkl", lambda: value))
    error = None if result.ok else (result.detail or f"{result.exception_type}: {result.exception_message}")
    jobs.append(("task", run, key, dict(status="done" if result.ok else "failed", finished=time.time(),
                                        execution_id=session.execution.execution_id, exit_code=result.exit_code,
                                        result_status=result.status, phases=outcome.phases, error=error)))
    _recorder.put(*jobs)
    return result


def _recorded_value(session: Session, target: Target, outcome: Outcome) -> bytes:
    """The call's value as recorded in ``results/`` (a pickle), or b"" when it cannot be."""
    if outcome.value_data and session.serializer == "pickle" and not target.options.restricted:
        return outcome.value_data  # the pickle as it came (checked), not pickled again here
    try:
        return pickle.dumps(outcome.result.value, protocol=5)
    except Exception:  # an unpicklable value is still returned; it just cannot be merged later
        logger.debug("result of %s not recorded", session.task.name, exc_info=True)
        return b""


def _lander(run: Any, prefix: str) -> Callable[[PurePosixPath, Path, str], Path]:
    def land(relative: PurePosixPath, temporary: Path, sha256: str) -> Path:
        path: Path = run.store.write_file(f"{prefix}{relative}", temporary, sha256=sha256, move=True)
        return path

    return land


def _execute_cli(session: Session, target: Target, config: Configuration, run: Any) -> Result:
    stdout_log = run.store.open_append("stdout.log")
    stderr_log = run.store.open_append("stderr.log")
    indices: dict[str, int] = {}

    def on_phase(name: str, state: str) -> None:
        if state == "started":
            indices[name] = run.tracker.start(name, host=target.host)
        elif name in indices:
            run.tracker.end(indices.pop(name), error=None if state == "finished" else f"{name} failed")

    try:
        pack = run.tracker.start("pack", host=None)
        try:
            archive = archive_for(session.task, config)
        except BaseException as exc:
            run.tracker.end(pack, error=f"{type(exc).__name__}: {exc}")
            raise
        run.tracker.end(pack)
        outcome: Outcome = dispatch(
            session, target.backend, archive, target.options,
            on_stdout=_sink(sys.stdout, stdout_log), on_stderr=_sink(sys.stderr, stderr_log),
            land_file=_lander(run, "files/"), on_phase=on_phase,
        )
    finally:
        stdout_log.close()
        stderr_log.close()
    session.local["outcome"] = outcome
    return outcome.result


class ExecutingAdvice(Advice):
    """An advice that runs the task elsewhere and concludes with its result (it ends the chain)."""

    terminal = True

    @abstractmethod
    def target(self, session: Session) -> Target:
        """Where this session runs."""

    def before(self, session: Session) -> None:
        session.conclude(execute(session, self.target(session)))


class RemoteAdvice(ExecutingAdvice):
    """Runs the task on a host over SSH (or, when no host is named anywhere, in a local subprocess).

    The host comes from the session (``@task(remote=...)``, ``rx run --remote``), else from this advice.

    Args:
        remote: Default host: a ``[tool.rx.remotes]`` name, an ssh_config alias or ``[user@]host[:port]``.
        backend: ``openssh`` or ``paramiko`` (default: the configuration's, or RX_BACKEND).
    """

    def __init__(self, remote: str | None = None, *, backend: str | None = None) -> None:
        self.remote = remote
        self.backend = backend

    def target(self, session: Session) -> Target:
        config = session.config or Configuration.load()
        options: dict[str, Any] = dict(session.context.get("options") or {})
        name = session.context.get("remote") or self.remote
        if not name:
            from .subprocess import SubprocessAdvice

            return SubprocessAdvice().target(session)
        # The same call again (a sweep): the target worked out last time, unless secrets (read from the
        # environment on each call) are involved. The backend is looked up again: it may have been closed.
        try:
            key: tuple[Any, ...] | None = (
                str(name), self.backend, os.environ.get("RX_BACKEND"), os.environ.get("RX_SSH_CONFIG"),
                tuple(sorted(options.items())))
            hash(key)
        except TypeError:  # options holding lists or dicts: worked out every time
            key = None
        if key is not None and not options.get("secret_env"):
            known = _targets.get(key)
            spec = None if known is None or known[0] is not config else known[1].spec
            if known is not None and spec is not None:
                target = known[1]
                backend = backend_pool.get(spec, target.backend_name)
                return target if backend is target.backend else replace(target, backend=backend)
        target = self._target(config, options, str(name))
        if key is not None and not options.get("secret_env"):
            if len(_targets) > 256:
                _targets.clear()
            _targets[key] = (config, target)
        return target

    def _target(self, config: Configuration, options: dict[str, Any], name: str) -> Target:
        remote = config.remote(str(name))
        backend_name = config.effective_backend(options.get("backend") or remote.backend or self.backend)
        if backend_name not in ("openssh", "paramiko"):
            raise ConfigError(f"unknown backend {backend_name!r}", hint="openssh or paramiko")
        policy = options.get("host_key_policy") or config.host_key_policy
        spec = remote.spec(ssh_config=config.effective_ssh_config(options.get("ssh_config")),
                           host_key_policy=policy, connect_timeout=float(
                               options.get("connect_timeout") or config.connect_timeout))
        for field_name in ("keepalive_interval", "keepalive_count"):
            if options.get(field_name) is not None:
                spec = replace(spec, **{field_name: options[field_name]})
        backend = backend_pool.get(spec, backend_name)
        env = dict(remote.env)
        env.update(options.get("env") or {})
        call = call_options(
            options, python=remote.python, workdir=remote.workdir, env=env, timeout=remote.timeout,
            heartbeat=min(spec.keepalive_interval, 5.0), dead_after=spec.dead_after, keep_warm=remote.keep_warm,
            restricted=remote.restricted, allow_unpickle=remote.allow_unpickle,
            handshake_timeout=max(spec.connect_timeout, 5.0))
        return Target(backend=backend, backend_name=backend_name, host=remote.name, options=call, spec=spec)


_targets: dict[tuple[Any, ...], tuple[Configuration, Target]] = {}


def call_options(options: dict[str, Any], *, python: str, workdir: str, env: dict[str, str],
                 timeout: float | None = None, heartbeat: float = 5.0, dead_after: float = 16.0,
                 keep_warm: bool = False, restricted: bool = False, allow_unpickle: tuple[str, ...] = (),
                 handshake_timeout: float = 30.0) -> CallOptions:
    """The CallOptions of one call: the task's or CLI's ``options`` over the target's defaults."""
    limit = options.get("timeout", timeout)
    return CallOptions(
        python=options.get("python") or python,
        workdir=options.get("workdir") or workdir,
        env=env,
        secret_env=_secret_env(options.get("secret_env") or ()),
        timeout=float(limit) if limit is not None else None,
        pull=tuple(options.get("pull") or ()),
        no_pull=bool(options.get("no_pull")),
        keep=bool(options.get("keep")),
        heartbeat=heartbeat,
        dead_after=dead_after,
        keep_warm=bool(options.get("keep_warm", keep_warm)),
        restricted=bool(options.get("restricted", restricted)),
        allow_unpickle=tuple(options.get("allow_unpickle") or allow_unpickle),
        handshake_timeout=handshake_timeout,
    )


def _secret_env(names: Any) -> dict[str, str]:
    """Values of the named local environment variables (they travel over the channel only)."""
    secrets: dict[str, str] = {}
    for name in names:
        if name not in os.environ:
            raise ConfigError(f"--secret-env {name}: no such variable in the local environment")
        secrets[name] = os.environ[name]
    return secrets
