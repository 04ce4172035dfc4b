"""The coordinator: one object per process that owns what every call shares, and runs calls.

It owns the configuration it loaded per directory, the pool of open backends (one connection per host),
the persistent workers, the archive packer, the run id of this process's ``@task`` calls and their
recorder. :meth:`Coordinator.current` is the process's coordinator, closed at exit (its recorder flushed,
its ``@task`` runs closed, its workers and connections ended, in that order); tests make their own.

The stages of a call, and who does them::

    resolve   Coordinator.resolve_target: host, backend, launcher, interpreter, call options
    pack      packing.Packer: the distribution archive, built once per content
    snapshot  sync: the project's tree (root, files, digests), scanned as cheaply as its changes allow
    connect   backends: one connection per host, kept across calls
    launch    launchers: how the runner is started on the host (direct: one exec; a scheduler: the call
              stored on the login node and submitted as a job, protocol.scheduled)
    execute   protocol.call.dispatch: handshake and upload, session in, live output out (a job: its
              output followed from its files while the cluster's JobWatch polls the scheduler)
    collect   protocol.collect: the result checked and rebuilt, files landed
    record    workspace.recorder: rx run's logs and actions, or the @task call's entry
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import sys
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from .backends.base import Backend, HostSpec
from .backends.local import LocalBackend
from .backends.pool import BackendPool
from .config import (
    Configuration,
    Remote,
    check_env,
    check_pull,
    check_secret_env,
    check_timeout,
    find_pyproject,
    parse_size,
)
from .errors import LocalDiskFull, SerializationError, printable
from .launchers.base import Launcher
from .launchers.registry import create_launcher
from .packing import DistributionArchive, Packer, default_cache_dir
from .protocol.call import RunnerAhead, dispatch
from .protocol.detached import attach_detached, cancel_detached, follow_detached, start_detached
from .protocol.maintain import collect_garbage, sync_tree
from .protocol.options import (
    CallOptions,
    Outcome,
    OutputSink,
    ProgressCallback,
    ProjectCall,
    ProjectScan,
    root_of,
    scanned,
)
from .protocol.workers import WorkerPool
from .serialization import get_serializer
from .session import Result, Session
from .sync.plan import ProjectPlan, plan_project
from .sync.project import Project, ProjectSpec
from .sync.tree import guard, refuse
from .task import Execution, Task, travels_by_value
from .workspace.manager import new_run_id
from .workspace.output import OutputPump
from .workspace.recorder import CallRecorder, TaskCallRecorder, TaskRecorder, TaskRuns
from .workspace.store import discard_spool

if TYPE_CHECKING:
    from .envs.manager import Environments
    from .envs.resolve import EnvSpec
    from .jobs import Jobs

__all__ = ["Coordinator", "Target", "call_options"]

logger = logging.getLogger(__name__)

_PYTHON_VERSION = tuple(sys.version_info[:3])


@dataclass(frozen=True)
class Target:
    """Where and how one call runs.

    Attributes:
        backend: The connection.
        backend_name: ``openssh``, ``paramiko`` or ``local`` (a registered backend's name).
        host: The host as the user named it (``local`` for a subprocess).
        options: Interpreter, directories, environment, timeout, files.
        spec: How the backend reaches the host (None for a local subprocess).
        launcher: How the runner is started there.
    """

    backend: Backend
    backend_name: str
    host: str
    options: CallOptions
    spec: HostSpec | None = None
    launcher: Launcher = field(default_factory=lambda: create_launcher("direct"))


def call_options(options: dict[str, Any], *, python: str, workdir: str, env: dict[str, str],
                 timeout: float | None = None, heartbeat: float = 5.0, dead_after: float = 16.0,
                 keep_warm: bool = False, restricted: bool = False, allow_unpickle: tuple[str, ...] = (),
                 handshake_timeout: float = 30.0, config: Configuration | None = None) -> CallOptions:
    """The CallOptions of one call: the task's or CLI's ``options`` over the target's defaults (and the
    configuration's pull and cache limits).

    Raises:
        UsageError: A bad ``timeout``, ``env`` or ``pull`` (``@task(timeout=float("nan"))``), or a
            ``secret_env`` name that is not set locally.
        ConfigError: A ``pull_limit`` that is not a size.
    """
    limit = options.get("timeout", timeout)
    config = config or Configuration()
    pull_limit = options.get("pull_limit", config.pull_limit)
    return CallOptions(
        python=options.get("python") or python,
        workdir=options.get("workdir") or workdir,
        env=check_env(env, "env="),
        secret_env=check_secret_env(options.get("secret_env") or (), "secret_env="),
        timeout=check_timeout(limit, "timeout="),
        pull=check_pull(options.get("pull") or (), "pull="),
        no_pull=bool(options.get("no_pull")),
        keep=bool(options.get("keep")),
        heartbeat=heartbeat,
        dead_after=dead_after,
        keep_warm=bool(options.get("keep_warm", keep_warm)),
        restricted=bool(options.get("restricted", restricted)),
        allow_unpickle=tuple(options.get("allow_unpickle") or allow_unpickle),
        handshake_timeout=handshake_timeout,
        pull_limit=parse_size(pull_limit, what="pull limit") if pull_limit is not None else None,
        cache_limit=config.cache_limit,
        cache_days=config.cache_days,
        slot=options.get("slot"),
        placement=options.get("placement"),
    )


def _progress(session: Session) -> ProgressCallback | None:
    """Who is told how an upload of the project goes: ``session.local["on_progress"]`` (the CLI's bar)."""
    callback: ProgressCallback | None = session.local.get("on_progress")
    return callback


def _hint(session: Session, exception: dict[str, Any], host: str, python: str,
          sources: list[tuple[str, str]]) -> str | None:
    """What to try when the task failed because the two sides differ (:mod:`remote_exec.hints`)."""
    if exception.get("packages"):
        from .hints import arguments_hint

        return arguments_hint(exception["packages"], host)
    from .hints import import_hint

    return import_hint(str(exception.get("message") or ""), host=host, python=python,
                       shipped=[name.removesuffix(".py") for name, _ in sources],
                       project=Path(session.context.get("cwd") or os.getcwd()).resolve())


class Coordinator:
    """Everything a process shares across its calls, and the calls themselves.

    Attributes:
        workers: The persistent workers (``keep_warm``).
        packer: Builds distribution archives (once per content).
        output: Writes the live output of ``@task`` calls to this process's stdout and stderr (a slow
            reader never holds up a call's link).
        recorder: Writes ``@task`` call records in batches.
        task_runs: The workspace runs of this process's ``@task`` calls.
        pools: The pools ``task.submit`` made, by hosts and options (shut down at exit).
        jobs: Its calls through batch schedulers (one watch per cluster polls all its jobs there).
        run_id: The run id ``@task`` calls of this process are recorded under (made on the first call).
        all_frames: Remote tracebacks keep rx's own frames (``rx -v``, ``RX_DEBUG=1``).
    """

    _current: ClassVar[Coordinator | None] = None
    _current_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self) -> None:
        self.workers = WorkerPool()
        self.packer = Packer()
        self.recorder = TaskRecorder()
        self.task_runs = TaskRuns(self.recorder)
        self.output = OutputPump()
        self.run_id: str | None = None
        #: Show rx's own frames in remote tracebacks too (``rx -v``, ``RX_DEBUG=1``).
        self.all_frames = bool(os.environ.get("RX_DEBUG"))
        self._lock = threading.Lock()
        self._backends = BackendPool()
        self._local = LocalBackend()
        self._configs: dict[str, Configuration] = {}
        self.pools: dict[tuple[Any, ...], Any] = {}  # @task(...).submit's pools, by hosts and options
        self._pools_lock = threading.Lock()
        self._targets: dict[tuple[Any, ...], tuple[Configuration, Target]] = {}
        self._projects: dict[ProjectSpec, Project] = {}
        self._warned: set[str] = set()
        self._insecure_warned: set[str] = set()
        self._jobs: Jobs | None = None
        self._envs: Environments | None = None

    @property
    def jobs(self) -> Jobs:
        """The scheduler side (imported and made on first use: most processes never submit a job)."""
        with self._lock:
            if self._jobs is None:
                from .jobs import Jobs

                self._jobs = Jobs(self)
            return self._jobs

    @property
    def envs(self) -> Environments:
        """The environments of declared dependencies (imported and made on first use)."""
        with self._lock:
            if self._envs is None:
                from .envs.manager import Environments

                self._envs = Environments(default_cache_dir().parent / "envs")
            return self._envs

    @classmethod
    def current(cls) -> Coordinator:
        """This process's coordinator (made on first use, closed at exit)."""
        coordinator = cls._current
        if coordinator is None:
            with cls._current_lock:
                coordinator = cls._current
                if coordinator is None:
                    coordinator = cls._current = cls()
                    atexit.register(coordinator.close)
        return coordinator

    # -- configuration and sessions -------------------------------------------------------------------

    def config_for(self, cwd: str) -> Configuration:
        """The configuration of the project ``cwd`` is in (loaded once per directory: a call in a sweep
        pays a dictionary lookup here)."""
        config = self._configs.get(cwd)
        if config is None:
            path = find_pyproject(Path(cwd))
            config = self._configs[cwd] = Configuration.from_pyproject(path) if path else Configuration()
        return config

    def process_run_id(self) -> str:
        """The run id of this process's ``@task`` calls (made on the first call)."""
        with self._lock:
            if self.run_id is None:
                self.run_id = new_run_id()
            return self.run_id

    def task_session(self, task: Task, args: tuple[Any, ...], kwargs: dict[str, Any], *, remote: str | None,
                     options: dict[str, Any], config: Configuration, cwd: str) -> Session:
        """The session of one ``@task`` call (its arguments serialized once)."""
        try:
            serialized = get_serializer(config.serializer).dumps([list(args), kwargs])
        except TypeError as exc:
            raise SerializationError(f"cannot serialize the arguments of {task.name}: {exc}") from exc
        session = Session(
            task=task,
            execution=Execution.create(task, args, kwargs, serialized=serialized),
            context={"remote": remote, "options": dict(options), "origin": "task", "cwd": cwd,
                     "python_version": [*_PYTHON_VERSION]},
            run_id=self.process_run_id(),
            serializer=config.serializer,
            arguments=serialized,
        )
        session.config = config
        return session

    # -- resolve --------------------------------------------------------------------------------------

    def backend(self, spec: HostSpec, name: str) -> Backend:
        """The open backend for ``spec`` (created on first use, then reused: one connection per host)."""
        return self._backends.get(spec, name)

    def resolve_target(self, session: Session, *, remote: str | None = None, backend: str | None = None) -> Target:
        """Where ``session`` runs: the host it names (or ``remote``) over SSH, else a local subprocess.

        The same call again (a sweep) gets the target worked out last time, unless secrets (read from the
        environment on each call) are involved; its backend is looked up again (it may have been closed).

        Raises:
            ConfigError: The host, backend or options are not valid.
        """
        config = session.config or self.config_for(session.context.get("cwd") or os.getcwd())
        ahead = session.local.pop("backend_ahead", None)
        if ahead is not None:  # rx run started connecting before rx's machinery was imported: that backend
            self._backends.adopt(*ahead)
        options: dict[str, Any] = dict(session.context.get("options") or {})
        name = session.context.get("remote") or remote
        if not name:
            return self.local_target(session)
        key = self._target_key(str(name), backend, options)
        if key is not None:
            known = self._targets.get(key)
            if known is not None and known[0] is config and known[1].spec is not None:
                target = known[1]
                live = self.backend(known[1].spec, target.backend_name)
                return target if live is target.backend else replace(target, backend=live)
        target = self._remote_target(config, options, str(name), backend)
        if key is not None:
            if len(self._targets) > 256:
                self._targets.clear()
            self._targets[key] = (config, target)
        return target

    @staticmethod
    def _target_key(name: str, backend: str | None, options: dict[str, Any]) -> tuple[Any, ...] | None:
        if options.get("secret_env"):
            return None
        try:
            key = (name, backend, os.environ.get("RX_BACKEND"), os.environ.get("RX_SSH_CONFIG"),
                   tuple(sorted(options.items())))
            hash(key)
        except TypeError:  # options holding lists or dicts: worked out every time
            return None
        return key

    def local_store_target(self, config: Configuration) -> Target | None:
        """The local subprocess target whose workdir holds the store of ``rx run`` without ``--remote``
        (trees, blobs, pooled snapshots), for ``rx gc``; None when no local run made one yet."""
        workdir = default_cache_dir().parent / "local"
        if not workdir.is_dir():
            return None
        call = call_options({}, python=sys.executable, workdir=str(workdir), env={}, config=config)
        return Target(backend=self._local, backend_name="local", host="local", options=call)

    def host_target(self, name: str, config: Configuration, *, backend: str | None = None,
                    options: dict[str, Any] | None = None) -> Target:
        """The target of host ``name`` for a call that is not a session's (``rx sync``, ``rx gc``; a pool
        probing a host's GPUs before it has a call to send there), with these task ``options``."""
        return self._remote_target(config, dict(options or {}), name, backend)

    def _remote_target(self, config: Configuration, options: dict[str, Any], name: str,
                       backend: str | None) -> Target:
        remote = config.remote(name)
        backend_name = config.effective_backend(options.get("backend") or remote.backend or backend)
        config.check_remote_backend(backend_name)
        spec = self._host_spec(config, remote, options)
        env = dict(remote.env)
        env.update(options.get("env") or {})
        call = call_options(
            options, python=remote.python, workdir=remote.workdir, env=env, timeout=remote.timeout,
            heartbeat=min(spec.keepalive_interval, 5.0), dead_after=spec.dead_after, keep_warm=remote.keep_warm,
            restricted=remote.restricted, allow_unpickle=remote.allow_unpickle,
            handshake_timeout=max(spec.connect_timeout, 5.0), config=config)
        return Target(backend=self.backend(spec, backend_name), backend_name=backend_name, host=remote.name,
                      options=call, spec=spec, launcher=self._launcher(remote, options))

    def _host_spec(self, config: Configuration, remote: Remote, options: dict[str, Any]) -> HostSpec:
        """How the backend reaches ``remote``: its ssh_config, host-key policy, timeouts and keepalives."""
        spec = config.host_spec(remote, options)
        if spec.host_key_policy == "off" and remote.name not in self._insecure_warned:
            self._insecure_warned.add(remote.name)  # once per host and process, whatever reconnects
            logger.warning("host key checking is OFF for %s: anyone on the path can impersonate it", remote.name)
        return spec

    @staticmethod
    def _launcher(remote: Remote, options: dict[str, Any]) -> Launcher:
        """The launcher of ``remote`` (``--slurm`` makes a direct remote's login node a Slurm one)."""
        scheduler = options.get("scheduler") or remote.scheduler
        if scheduler == "direct" and (options.get("slurm") or options.get("slurm_args")):
            scheduler = "slurm"  # rx run --remote login1 --slurm "...": login1 is a Slurm login node
        launcher = create_launcher(scheduler, remote.launcher_options if scheduler == remote.scheduler else {})
        if launcher.schedules:
            from .jobs import job_options

            launcher.check_options(job_options(options))
        return launcher

    def local_target(self, session: Session, *, python: str | None = None,
                     env: dict[str, str] | None = None) -> Target:
        """A local subprocess (through the same archive and runner as a remote run)."""
        options: dict[str, Any] = dict(session.context.get("options") or {})
        merged = dict(env or {})
        merged.update(options.get("env") or {})
        config = session.config or self.config_for(session.context.get("cwd") or os.getcwd())
        call = call_options(options, python=python or sys.executable,
                            workdir=str(default_cache_dir().parent / "local"), env=merged, config=config)
        return Target(backend=self._local, backend_name="local", host="local", options=call)

    # -- execute --------------------------------------------------------------------------------------

    def archive_for(self, session: Session, *, project: bool = False) -> DistributionArchive:
        """The archive carrying ``session``'s code (with ``project``: only rx's runner side, cloudpickle and
        ``distribution_modules``; the project's own modules come from its snapshot)."""
        config = session.config or self.config_for(session.context.get("cwd") or os.getcwd())
        if project:
            return self.packer.build(extra_modules=config.distribution_modules)
        return self.packer.archive_for(session.task, config.distribution_modules, session.context.get("cwd"))

    def runner_ahead(self, session: Session, target: Target, root: Path | None, *,
                     started: RunnerAhead | None = None) -> RunnerAhead | None:
        """Start ``session``'s runner on ``target`` now, while the caller prepares the rest of the call (see
        :class:`~remote_exec.protocol.call.RunnerAhead`); None when the call will not start one of its own
        that way (a scheduler's job, a persistent worker, an environment to build or check first).
        ``root``: the root of the project the task runs in (None: it has none). ``started``: a runner
        started earlier still (``rx run``'s head start): returned when it fits this call, else stopped."""
        ahead = None
        if not (target.launcher.schedules or target.options.keep_warm or travels_by_value(session.task)
                or self.env_spec(session, target, root)[0] is not None):
            archive = self.archive_for(session, project=root is not None)
            if started is not None and started.fits(target.backend, archive, target.options, target.launcher):
                logger.debug("%s: the runner started from the command line fits this run", target.host)
                return started
            ahead = RunnerAhead(target.launcher, target.backend, archive, target.options)
        if started is not None:
            logger.debug("%s: the runner started ahead does not fit this run; stopped", target.host)
            started.close()
        return ahead

    def project_for(self, session: Session) -> tuple[ProjectCall | None, list[str]]:
        """The project ``session``'s task runs in (its tree scanned now), and the warnings its size deserves
        that were not given yet in this process; (None, []) when it has no project.

        Raises:
            SyncError: The tree is larger than rx ships (without ``force``), a symlink leads out of it, or a
                file cannot be read.
        """
        known: tuple[ProjectCall | None, list[str]] | None = session.local.get("project")
        if known is not None:
            return known[0], []  # scanned a moment ago by the caller (rx run), who gave the warnings
        plan = self._plan_to_scan(session)
        if plan is None:
            return None, []
        options = session.context.get("options") or {}
        return self.scan(plan, force=bool(options.get("force")))

    def _plan_to_scan(self, session: Session) -> ProjectPlan | None:
        """The plan of ``session``'s project when its tree is still to be scanned (None: it has no project,
        or the caller scanned it)."""
        if session.local.get("project") is not None:
            return None
        planned: tuple[ProjectPlan | None] | None = session.local.get("plan")
        return planned[0] if planned is not None else self.plan_for(session)

    def plan_for(self, session: Session) -> ProjectPlan | None:
        """Where ``session``'s project is (its root, what travels), without scanning it; None: no project.
        A caller making many calls of one task from one place (a pool) may keep it in
        ``session.local["plan"]`` (as a 1-tuple) for the next ones: :meth:`project_for` then scans only."""
        config = session.config or self.config_for(session.context.get("cwd") or os.getcwd())
        return plan_project(session, config)

    def scan(self, plan: ProjectPlan, *, force: bool = False) -> tuple[ProjectCall, list[str]]:
        """Scan a planned project's tree now; return the call's project and the warnings not yet given in
        this process.

        Raises:
            SyncError: See :meth:`project_for`.
        """
        with self._lock:
            project = self._projects.get(plan.spec)
            if project is None:
                if len(self._projects) > 64:
                    self._projects.clear()
                project = self._projects[plan.spec] = Project(plan.spec, default_cache_dir().parent)
        tree = project.scan()
        if tree.tree_id in self._warned:
            refuse(tree, force=force)
            return plan.call(tree), []
        warnings = guard(tree, force=force)
        self._warned.add(tree.tree_id)
        return plan.call(tree), warnings

    def _pack(self, session: Session, recorder: CallRecorder,
              ahead: bool = False) -> tuple[DistributionArchive, ProjectCall | ProjectScan | None]:
        """The archive and the project of a call (the ``pack`` phase); with ``ahead``, a project still to be
        scanned is scanned on a thread of its own (:class:`ProjectScan`: the runner starts meanwhile)."""
        recorder.phase("pack", "started")
        try:
            project: ProjectCall | ProjectScan | None
            plan = self._plan_to_scan(session) if ahead else None
            if plan is not None:
                force = bool((session.context.get("options") or {}).get("force"))
                project = ProjectScan(partial(self.scan, plan, force=force), plan.spec.root)
            else:
                project, warnings = self.project_for(session)
                for warning in warnings:
                    logger.warning("%s", warning)
            archive = self.archive_for(session, project=project is not None)
        except BaseException:
            recorder.phase("pack", "failed")
            raise
        recorder.phase("pack", "finished")
        return archive, project

    def execute(self, session: Session, target: Target) -> Result:
        """Run ``session`` at ``target`` and return its result, recording it.

        ``rx run`` passes its :class:`~remote_exec.workspace.recorder.RunRecorder` in
        ``session.local["recorder"]`` and finds the call's :class:`Outcome` in ``session.local["outcome"]``
        afterwards; a ``@task`` call is recorded as one task entry of its process's run (a pool's call gives
        the entry's key, extra fields, its list of attempts and its output sinks in ``session.local``:
        ``task_key``, ``task_fields``, ``attempts``, ``sinks``).
        """
        recorder: CallRecorder | None = session.local.get("recorder")
        session_bytes = session.to_wire()
        if recorder is None:
            recorder = self.task_recorder(session, target, session_bytes)
        try:
            # (a persistent worker's call is too short to gain from a thread)
            archive, project = self._pack(session, recorder,
                                          not (target.launcher.schedules or target.options.keep_warm))
            target = self.environment(session, target, archive, recorder, root_of(project))
            if target.launcher.schedules:
                outcome = self.jobs.run(session, target, archive, recorder, scanned(project))
            else:  # the project's scan ends while the runner starts
                outcome = dispatch(session, target.backend, archive, target.options, launcher=target.launcher,
                                   ahead=session.local.pop("runner_ahead", None),
                                   workers=self.workers, on_stdout=recorder.stdout, on_stderr=recorder.stderr,
                                   land_file=recorder.land_file, on_phase=recorder.phase,
                                   session_bytes=session_bytes, stdin=recorder.stdin, hold=recorder.retryable,
                                   project=project, on_progress=_progress(session))
        except LocalDiskFull as exc:
            if exc.kept:  # what rx attach needs to collect it from the host
                exc.kept.update(archive=archive.sha256, archive_path=str(archive.path),
                                python=target.options.python, workdir=target.options.workdir)
            recorder.failed(exc)
            raise
        except BaseException as exc:
            recorder.failed(exc)
            raise
        session.local["outcome"] = outcome
        self.localize(session, outcome, archive.sources, recorder, python=target.options.python,
                      project=root_of(project))
        taken = False

        def recorded() -> bytes | Path:
            nonlocal taken
            taken = True
            return self.recorded_value(session, target, outcome)

        try:
            recorder.finished(result=outcome.result, phases=outcome.phases, value=recorded)
        finally:
            if not taken and isinstance(outcome.value_data, Path):  # a spooled value nobody records
                discard_spool(outcome.value_data)
        return outcome.result

    def env_spec(self, session: Session, target: Target,
                 project: Path | None = None) -> tuple[EnvSpec | None, dict[str, Any]]:
        """What ``session`` declares it needs on ``target`` (None: nothing; the host's interpreter as it is),
        and the settings it was read with (``[tool.rx]``'s, the remote's ``offline`` / ``inherit_site``).
        Without a declaration and with ``[tool.rx] project_deps = true``, a remote host gets the
        ``project``'s own dependencies (its uv.lock's pins, else ``[project] dependencies``, else its
        requirements.txt; a local run uses this interpreter, which has them already)."""
        config = session.config or self.config_for(session.context.get("cwd") or os.getcwd())
        settings = self.env_settings(config, target.host)
        cwd = session.context.get("cwd")
        options = session.context.get("options") or {}
        own = project is not None and target.backend_name != "local" and bool(settings.get("project_deps"))
        if not own and not any(options.get(key) or settings.get(key) for key in ("deps", "requirements")):
            return None, settings  # nothing declared (and the environment machinery left unimported)
        from .envs.resolve import EnvSpec, project_requirements

        spec = EnvSpec.from_options(options, settings, Path(cwd) if cwd else None)
        if spec is None and own:
            assert project is not None
            spec = EnvSpec.from_options({**options, **project_requirements(project)}, settings, project)
        return spec, settings

    @staticmethod
    def env_settings(config: Configuration, host: str) -> dict[str, Any]:
        """``[tool.rx]``'s dependency settings with the remote's ``offline`` / ``inherit_site``."""
        settings = dict(config.env_settings)
        remote = config.remotes.get(host)
        if remote is not None:
            settings.update({key: True for key in ("offline", "inherit_site") if getattr(remote, key)})
        return settings

    def describe_env(self, target: Target, config: Configuration, options: dict[str, Any], *,
                     build: bool = False) -> dict[str, Any] | None:
        """``rx env HOST``: the probe, the lock, the key and whether the environment exists (None: no
        dependencies declared)."""
        settings = self.env_settings(config, target.host)
        from .envs.resolve import EnvSpec

        spec = EnvSpec.from_options(options, settings)
        if spec is None:
            return None
        from .envs.manager import EnvCall

        archive = self.packer.build(extra_modules=config.distribution_modules)
        call = EnvCall(target.host, target.backend, target.launcher, archive, target.options)
        return self.envs.describe(spec, call, settings, build=build)

    def environment(self, session: Session, target: Target, archive: DistributionArchive,
                    recorder: CallRecorder, project: Path | None = None) -> Target:
        """``target`` with its interpreter replaced by the environment of ``session``'s declared
        dependencies (built on the host first when it lacks it); unchanged when nothing is declared.

        Raises:
            EnvError: Resolution, the wheels or the build failed.
            SerializationError: A function travelling by value to a host whose Python (as probed, now or
                before) is another minor version.
        """
        spec, settings = self.env_spec(session, target, project)
        if spec is None and not travels_by_value(session.task):
            return target  # nothing to build, nothing to refuse: the environment machinery stays unimported
        from .envs.manager import EnvCall, refuse_by_value

        options = target.options
        if spec is not None:
            call = EnvCall(target.host, target.backend, target.launcher, archive, target.options,
                           on_phase=recorder.phase, on_progress=_progress(session),
                           on_status=session.local.get("on_env"))
            options = self.envs.prepare(spec, call, settings)
        known = self.envs.known_probe(target.host, target.options.python, target.options.workdir)
        refuse_by_value(session.task, known, target.host)
        return target if spec is None else replace(target, options=options)

    def localize(self, session: Session, outcome: Outcome, sources: Iterable[tuple[str, str]],
                 recorder: CallRecorder, *, python: str = "python3", project: Path | None = None) -> None:
        """Map the task's remote traceback to the user's files (:mod:`remote_exec.tracebacks`), with what to
        try when the two sides differ (:mod:`remote_exec.hints`); a script's goes to its stderr, where
        Python would have printed it. ``project``: the local root of the project the run's snapshot was
        made of (its files map to the user's)."""
        exception = outcome.header.get("exception")
        if not exception:
            return
        from .tracebacks import localize, roots_for  # only when there is a traceback to map

        task = session.task
        sources = list(sources)
        script = None
        if task.kind == "script" and task.filename:
            script = (f".rx/{os.path.basename(task.filename)}", Path(task.filename).resolve())
        roots = roots_for(remote_roots=exception.get("roots") or {}, sources=sources, script=script, project=project)
        text = localize(outcome.result, exception, roots, all_frames=self.all_frames,
                        hint=_hint(session, exception, outcome.result.host or "the host", python, sources),
                        function=task.function if task.kind == "function" else None)
        if task.kind != "function" and (text or outcome.result.traceback):
            # the host wrote the exception's message and frames: escaped before they reach a terminal
            recorder.stderr(printable(text or outcome.result.traceback or "", lines=True).encode())

    def task_recorder(self, session: Session, target: Target, session_bytes: bytes) -> CallRecorder:
        """The recorder of one ``@task`` call: a task entry of its process's run."""
        config = session.config or self.config_for(session.context.get("cwd") or os.getcwd())
        run = self.task_runs.run_for(config.workspace, session.run_id, cwd=session.context.get("cwd") or os.getcwd(),
                                     host=target.host, backend=target.backend_name)
        local = session.local
        execution_id = session.execution.execution_id
        key = self.task_runs.key_for(run, execution_id, local.get("task_key"))
        return TaskCallRecorder(self.recorder, run, execution_id, name=session.task.name, host=target.host,
                                session_bytes=session_bytes, output=self.output, key=key,
                                fields=local.get("task_fields"), attempts=local.get("attempts"),
                                sinks=local.get("sinks"))

    @staticmethod
    def recorded_value(session: Session, target: Target, outcome: Outcome) -> bytes | Path:
        """The call's value as recorded (a pickle: its bytes, or a file the recorder takes over), or b""
        when it cannot be."""
        if outcome.value_data and session.serializer == "pickle" and not target.options.restricted:
            return outcome.value_data  # the pickle as it came (checked), not pickled again here
        if isinstance(outcome.value_data, Path):
            discard_spool(outcome.value_data)
        try:
            return pickle.dumps(outcome.result.value, protocol=5)
        except Exception:  # an unpicklable value is still returned; it just cannot be merged later
            logger.debug("result of %s not recorded", session.task.name, exc_info=True)
            return b""

    # -- arrays (a scheduler launcher) ----------------------------------------------------------------

    def map_array(self, function: Any, items: Iterable[Any], *, parallel: int | None = None) -> list[Result]:
        """Call the ``@task`` ``function`` once per item, all as one job array on its scheduler remote
        (``sbatch --array=0-N%parallel``); return each call's result in order (``result.unwrap()`` gives its
        value or raises its exception). Each call is a task of this process's run, so ``rx rerun --failed``
        reruns the ones that failed."""
        cwd = os.getcwd()
        config = function.config or self.config_for(cwd)
        sessions = [self.task_session(function.task, (item,), {}, remote=function.remote, options=function.options,
                                      config=config, cwd=cwd) for item in items]
        return self.jobs.run_array(sessions, parallel=parallel)

    def run_array(self, sessions: Sequence[Session], *, parallel: int | None = None) -> list[Result]:
        """Run ``sessions`` (calls of one task, to one scheduler remote) as one job array; their results in
        order (see :meth:`remote_exec.jobs.Jobs.run_array`)."""
        return self.jobs.run_array(sessions, parallel=parallel)

    # -- detached runs --------------------------------------------------------------------------------

    def start_detached(self, session: Session, target: Target, recorder: CallRecorder) -> dict[str, Any]:
        """Start ``session`` at ``target`` so that it outlives this process; return where it runs."""
        archive, ahead = self._pack(session, recorder)
        project = scanned(ahead)  # (not scanned ahead: it is)
        target = self.environment(session, target, archive, recorder, root_of(project))
        if target.launcher.schedules:
            started = self.jobs.submit(session, target, archive, recorder, project)
        else:
            started = start_detached(session, target.backend, archive, target.options, launcher=target.launcher,
                                     on_phase=recorder.phase, project=project, on_progress=_progress(session))
        return {**started, "sources": [list(pair) for pair in archive.sources],
                "project": str(project.tree.root) if project is not None else None}

    def attach(self, session: Session, target: Target, detached: dict[str, Any], recorder: CallRecorder,
               offsets: tuple[int, int]) -> Outcome:
        """Follow a detached run to its end and collect its result and files."""
        if "job" in detached:
            outcome = self.jobs.follow(session, target, detached, recorder, offsets=offsets, interrupt="leave")
        else:
            outcome = attach_detached(session, target.backend, detached, target.options, launcher=target.launcher,
                                      on_stdout=recorder.stdout, on_stderr=recorder.stderr,
                                      land_file=recorder.land_file, offsets=offsets)
        self.localize(session, outcome, [tuple(pair) for pair in detached.get("sources") or ()], recorder,
                      python=target.options.python,
                      project=Path(detached["project"]) if detached.get("project") else None)
        return outcome

    def follow(self, target: Target, detached: dict[str, Any], *, on_stdout: OutputSink, on_stderr: OutputSink,
               offsets: tuple[int, int], once: bool = False) -> None:
        """Stream a detached run's output until it ends (``once``: what it wrote so far); collect nothing."""
        if "job" in detached and not once:  # what a job wrote so far is read like any detached run's
            self.jobs.follow_output(target, detached, on_stdout=on_stdout, on_stderr=on_stderr, offsets=offsets)
            return
        follow_detached(target.backend, detached, target.options, launcher=target.launcher, on_stdout=on_stdout,
                        on_stderr=on_stderr, offsets=offsets, once=once)

    def cancel(self, target: Target, detached: dict[str, Any]) -> dict[str, Any]:
        """Stop a detached run's task (a job: ask its scheduler to cancel it); return the host's status record
        of it (a job: what the scheduler says)."""
        if "job" in detached:
            return self.jobs.cancel(target, detached)
        return cancel_detached(target.backend, detached, target.options)

    # -- maintenance ----------------------------------------------------------------------------------

    def sync(self, target: Target, project: ProjectCall, config: Configuration, *,
             on_progress: ProgressCallback | None = None) -> dict[str, Any]:
        """Store ``project``'s tree at ``target`` without running anything (``rx sync --remote``)."""
        archive = self.packer.build(extra_modules=config.distribution_modules)
        return sync_tree(target.backend, archive, target.options, project, launcher=target.launcher,
                         on_progress=on_progress)

    def collect_garbage(self, target: Target, config: Configuration, *, dry_run: bool = False) -> dict[str, Any]:
        """Collect ``target``'s garbage now (``rx gc HOST``)."""
        archive = self.packer.build(extra_modules=config.distribution_modules)
        return collect_garbage(target.backend, archive, target.options, launcher=target.launcher, dry_run=dry_run)

    # -- the end --------------------------------------------------------------------------------------

    def flush(self) -> None:
        """Wait until every ``@task`` call so far is recorded in its workspace."""
        self.recorder.flush()

    def close(self) -> None:
        """Shut its pools down, record the end of this process's ``@task`` runs, stop its workers and its job
        watches, close its connections."""
        for step in (self._close_pools, self.task_runs.close, self.workers.close, self._close_jobs,
                     self.close_backends):
            try:
                step()
            except Exception:  # closing at exit must never raise
                logger.debug("closing the coordinator: %s failed", step, exc_info=True)

    def _close_jobs(self) -> None:
        """Stop the job watches, if this process ever made any (closing imports nothing)."""
        if self._jobs is not None:
            self._jobs.close()

    def pool_for(self, key: tuple[Any, ...], make: Any) -> Any:
        """The pool ``task.submit`` keeps for ``key`` (hosts and options), made with ``make()`` when there is
        none yet or the one there broke."""
        with self._pools_lock:
            pool = self.pools.get(key)
            if pool is None or pool.broken is not None:
                pool = self.pools[key] = make()
            return pool

    def _close_pools(self) -> None:
        """Shut the pools of ``task.submit`` down: their queued calls are cancelled."""
        pools, self.pools = list(self.pools.values()), {}
        for pool in pools:
            pool.shutdown(wait=False, cancel_futures=True)

    def close_backends(self) -> None:
        """Close every open connection (a later call reconnects)."""
        self._backends.close()
