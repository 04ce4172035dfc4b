"""Workspaces and the runs recorded in them.

A workspace is a directory (``--workspace``, else ``RX_WORKSPACE``, else ``.rx/`` at the project root:
the first directory up from the current one holding ``.git``, ``pyproject.toml``, ``setup.py`` or
``setup.cfg``, below the home directory; else the current directory) holding one directory per run::

    <workspace>/runs/<run-id>/
        state.json        the run's record (below), rewritten atomically on every change
        session.zip       the saved session, for ``rx rerun``
        stdout.log        live output of the task (grows in place)
        stderr.log
        result.json       {"ok", "value_repr", "exception": {"type", "message", "traceback"}|null,
                           "exit_code"}
        result.pkl        the pickled value, when there is one
        results/<key>.*   per-task results of a multi-task run (merged from an earlier run, or written
                          one by one)
        calls/*.zip       what a @task run records per call, a batch of calls per archive (written as
                          the calls end, a few times a second): sessions/<key>.session (the call, for
                          rx rerun) and results/<key>.pkl (its pickled value)
        files/            files pulled back from the task's working directory
        .store/tmp, new   temporaries of the tmp -> new -> cur protocol (see store.py)

Run ids are ``YYYYMMDD-HHMMSS-mmmrrr``: the UTC date and time, three digits of milliseconds and three
random hex digits. Sorted as strings they are in creation order: within one process a guard makes each
id's millisecond strictly greater than the previous one, so two ids created in the same millisecond
still sort in creation order; across processes, ids of different milliseconds sort by time and a
collision of the whole id is refused by the exclusive ``mkdir`` and retried.

``state.json`` (the contract printed by ``rx show --json`` and ``rx runs --json``)::

    version      1
    run_id       the id
    status       pending | running | finished | failed | cancelled | lost
    target       script path, module name or task name
    kind         script | module | task | rerun | sweep
    argv         arguments, or null
    remote       host as the user named it, or null for a local run
    backend      openssh | paramiko | local ... or null
    exit_code    int or null
    error        one line, or null
    created, started, finished    ISO 8601 UTC strings or null
    duration     seconds from started (or created) to finished, or null
    coordinator  {pid, hostname, started, start_ticks, boot_id[, client_pid]}: the process that created the run
    actions      [{name, host, status: started|finished|failed, started, finished, error}]
    tasks        {key: {name, host, status, started, finished, duration, error, execution_id, ...}}
    parent       the run id this run reran, or null
    sweep        a sweep's parent: {grid, hosts, combinations, ...}; a sweep's child: {parent, index, label}
                 (only in runs of ``rx map``)

A run that is ``pending`` or ``running`` while its coordinator is gone (pid dead, or reused by another
process, or the host rebooted) is reported ``lost`` by :meth:`Run.info`, which records that. Runs
created on another host cannot be checked and keep the status they have.

Example::

    ws = Workspace.resolve()
    run = ws.new_run(target="train.py", kind="script", argv=["--epochs", "3"], remote="gpu1")
    run.set_status("running")
    with run.action("execute", host="gpu1"):
        ...
    run.set_status("finished", exit_code=0)
    ws.run("latest").info()["status"]       # "finished"
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import ConfigError, RunBusy, WorkspaceError
from . import procinfo
from .state import (
    ACTIVE_RUN_STATUSES,
    FINAL_RUN_STATUSES,
    RUN_STATUSES,
    ActionTracker,
    StateFile,
    StatusBoard,
    apply_actions,
    duration,
    utc_now,
)
from .store import STORE_DIR, Store, discard_spool, pid_alive

__all__ = [
    "DEFAULT_DIRNAME",
    "ENV_WORKSPACE",
    "RUN_KINDS",
    "STATE_VERSION",
    "Run",
    "Workspace",
    "coordinator_alive",
    "coordinator_record",
    "new_run_id",
]

logger = logging.getLogger(__name__)

#: Environment variable naming the workspace directory.
ENV_WORKSPACE = "RX_WORKSPACE"
#: The workspace used when neither an option nor the environment names one.
DEFAULT_DIRNAME = ".rx"
#: Format version of ``state.json``.
STATE_VERSION = 1
#: What a run ran.
RUN_KINDS = ("script", "module", "task", "rerun", "sweep")

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_id_guard = threading.Lock()
_last_ms = 0


def new_run_id() -> str:
    """A new run id ``YYYYMMDD-HHMMSS-mmmrrr`` that sorts after every id this process made before."""
    global _last_ms
    with _id_guard:
        ms = max(time.time_ns() // 1_000_000, _last_ms + 1)
        _last_ms = ms
    seconds, millis = divmod(ms, 1000)
    stamp = datetime.fromtimestamp(seconds, tz=timezone.utc)
    return f"{stamp:%Y%m%d-%H%M%S}-{millis:03d}{secrets.randbelow(4096):03x}"


#: Flush functions of in-process writers that record in the background (the @task call recorder): a
#: Workspace of this process runs them before it lists runs, so it never reads behind its own writes.
_pending_writers: list[Callable[[], None]] = []


def register_pending_writer(flush: Callable[[], None]) -> None:
    """Have every listing of runs in this process wait for ``flush()`` first."""
    if flush not in _pending_writers:
        _pending_writers.append(flush)


# -- the coordinator: which process owns a run, and is it still there ------------------------------

#: The pid of the process the user started, when this one runs its command for it: an rx server's worker
#: (:mod:`remote_exec.cli.server`), whose client is the ``rx`` they see in ``ps`` and may signal (the signals
#: it gets are passed on). Recorded beside this process's own pid, which the liveness checks use, and shown.
client_pid: int | None = None


@functools.lru_cache(maxsize=1)
def _own_start() -> str:
    ticks = procinfo.start_ticks(os.getpid())
    booted = procinfo.boot_time()
    if ticks is not None and booted is not None:
        started = booted + ticks / procinfo.clock_ticks()
        return datetime.fromtimestamp(started, tz=timezone.utc).isoformat(timespec="milliseconds")
    return utc_now()  # no /proc: the first time we were asked is the best we know


def coordinator_record() -> dict[str, Any]:
    """Describe the current process, so a later reader can tell whether it is still alive (and that its
    pid was not taken by another process since: clock ticks on Linux, ``ps``'s start time elsewhere)."""
    pid = os.getpid()
    ticks = procinfo.start_ticks(pid)
    record = {"pid": pid, "hostname": socket.gethostname(), "started": _own_start(), "start_ticks": ticks,
              "boot_id": procinfo.boot_id()}
    if ticks is None:
        record["process_start"] = procinfo.process_start(pid)
    if client_pid is not None:
        record["client_pid"] = client_pid
    return record


def shown_pid(record: dict[str, Any]) -> object:
    """The pid a user knows the process of a :func:`coordinator_record` by (its client's, see :data:`client_pid`)."""
    return record.get("client_pid") or record.get("pid")


def coordinator_alive(record: object) -> bool | None:
    """Tell whether the process described by a :func:`coordinator_record` still runs.

    Returns:
        ``True`` or ``False``; ``None`` when it cannot be known from here (another host, or no record).
    """
    if not isinstance(record, dict) or not isinstance(record.get("pid"), int):
        return None
    if record.get("hostname") != socket.gethostname():
        return None
    pid = record["pid"]
    if _rebooted_since(record.get("boot_id")) or not pid_alive(pid):
        return False
    return not _pid_reused(pid, record.get("start_ticks"), record.get("process_start"))


def _rebooted_since(boot: object) -> bool:
    """Tell whether this host booted again since it had the boot id ``boot`` (``False`` if unknown)."""
    now = procinfo.boot_id()
    return bool(boot) and now is not None and boot != now


def _pid_reused(pid: int, ticks: object, start: object = None) -> bool:
    """Tell whether ``pid`` now belongs to another process than the one started at ``ticks`` (or, where
    there are no ticks, at ``ps``'s ``start``)."""
    if isinstance(ticks, int):
        now_ticks = procinfo.start_ticks(pid)
        return now_ticks is not None and now_ticks != ticks
    if isinstance(start, str):
        now_start = procinfo.process_start(pid)
        return now_start is not None and now_start != start
    return False


# -- workspace -------------------------------------------------------------------------------------

class Workspace:
    """A directory of runs.

    Attributes:
        root: The workspace directory (absolute). It is created on the first :meth:`new_run`.
    """

    root: Path

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser().absolute()

    def __repr__(self) -> str:
        return f"Workspace({str(self.root)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Workspace) and other.root == self.root

    def __hash__(self) -> int:
        return hash(self.root)

    @classmethod
    def resolve(cls, path: Path | str | None = None) -> Workspace:
        """The workspace named by ``path``, else by ``RX_WORKSPACE``, else ``.rx`` at the project root of
        the current directory (wherever in the project rx starts, its runs land in one place), else
        ``./.rx``."""
        if path is not None and str(path) != "":
            return cls(path)
        env = os.environ.get(ENV_WORKSPACE)
        if env:
            return cls(env)
        from ..sync.root import find_project_root

        here = Path.cwd()
        return cls((find_project_root(here) or here) / DEFAULT_DIRNAME)

    @property
    def runs_dir(self) -> Path:
        """``<root>/runs``."""
        return self.root / "runs"

    def new_run(self, *, target: str, kind: str, argv: list[str] | None = None, remote: str | None = None,
                backend: str | None = None, run_id: str | None = None, parent: str | None = None,
                running: bool = False, session: Callable[[str], bytes] | None = None) -> Run:
        """Create a run directory with its initial ``pending`` state (``running``: ``running`` from now, as
        :meth:`Run.set_status` would make it, in the same first write), owned by this process.

        ``session`` makes the run's saved session (``session.zip``, what ``rx rerun`` runs again) from the
        run's id: it is written before the state, so a run that is listed has it, also when its coordinator
        was killed the moment after.

        Args:
            target: What runs: a script path, a module name, a task's name.
            kind: One of :data:`RUN_KINDS`.
            argv: The arguments given to the target.
            remote: The host as the user named it; ``None`` for a local run.
            backend: The backend's name.
            run_id: Use this id instead of a new one (letters, digits, ``.``, ``_``, ``-``).
            parent: The id of the run this one reruns.

        Raises:
            WorkspaceError: ``run_id`` is malformed or already taken, or the directory cannot be made.
            ConfigError: ``kind`` is unknown.
        """
        if kind not in RUN_KINDS:
            raise ConfigError(f"unknown run kind {kind!r}", hint=f"one of {', '.join(RUN_KINDS)}")
        if run_id is not None and not _SAFE_ID.match(run_id):
            raise WorkspaceError(f"invalid run id {run_id!r}",
                                 hint="letters, digits, '.', '_' and '-', starting with a letter or digit")
        rid = self._make_run_dir(run_id)
        run = Run(self, rid)
        if session is not None:
            run.store.write_bytes("session.zip", session(rid))
        created = utc_now()
        run.state.write({
            "version": STATE_VERSION, "run_id": rid, "status": "running" if running else "pending",
            "target": target, "kind": kind,
            "argv": list(argv) if argv is not None else None, "remote": remote, "backend": backend,
            "exit_code": None, "error": None, "created": created, "started": created if running else None,
            "finished": None,
            "duration": None, "coordinator": coordinator_record(), "actions": [], "tasks": {},
            "parent": parent,
        })
        logger.debug("created run %s in %s", rid, self.root)
        return run

    def _ignore_in_git(self) -> None:
        """Give a new ``.rx`` a ``.gitignore`` of ``*`` (as ``.venv`` and ``.pytest_cache`` have): the
        workspace sits at the project root, and ``git status`` should not list it."""
        if self.root.name != DEFAULT_DIRNAME:
            return
        marker = self.root / ".gitignore"
        try:
            with open(marker, "x", encoding="utf-8") as handle:
                handle.write("# made by rx: its runs stay out of git\n*\n")
        except OSError:
            pass  # there already, or not writable: git status shows .rx, nothing else changes

    def _make_run_dir(self, run_id: str | None) -> str:
        """Create the directory of run ``run_id``, or of a new id; return the id.

        Raises:
            WorkspaceError: ``run_id`` is already taken, or the directory cannot be made.
        """
        try:
            if not self.runs_dir.is_dir():
                self.runs_dir.mkdir(parents=True, exist_ok=True)
                self._ignore_in_git()
        except OSError as exc:
            raise WorkspaceError(f"cannot create {self.runs_dir}: {exc.strerror or exc}") from exc
        for _attempt in range(100):
            rid = run_id or new_run_id()
            try:
                (self.runs_dir / rid).mkdir()
            except FileExistsError:
                if run_id is not None:
                    raise WorkspaceError(f"run {run_id} already exists in {self.root}") from None
                continue
            except OSError as exc:
                raise WorkspaceError(f"cannot create run directory in {self.runs_dir}: "
                                     f"{exc.strerror or exc}") from exc
            return rid
        raise WorkspaceError(f"could not find a free run id in {self.runs_dir}")  # pragma: no cover

    def ids(self) -> list[str]:
        """The ids of every recorded run, oldest first (a directory without ``state.json`` is skipped)."""
        for flush in _pending_writers:
            flush()
        try:
            entries = list(self.runs_dir.iterdir())
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise WorkspaceError(f"cannot list {self.runs_dir}: {exc.strerror or exc}") from exc
        return sorted(e.name for e in entries
                      if not e.name.startswith(".") and (e / "state.json").is_file())

    def run(self, ref: str) -> Run:
        """The run named by an id, a unique prefix of one, or ``latest``.

        Raises:
            WorkspaceError: No run matches, or the prefix matches several (they are listed).
        """
        ids = self.ids()
        if ref == "latest":
            if not ids:
                raise WorkspaceError(f"no runs in {self.root}", hint="start one with `rx run`")
            return Run(self, ids[-1])
        if not ref:
            raise WorkspaceError("empty run reference", hint="give a run id, a prefix of one, or 'latest'")
        if ref in ids:
            return Run(self, ref)
        matches = [i for i in ids if i.startswith(ref)]
        if len(matches) == 1:
            return Run(self, matches[0])
        if not matches:
            raise WorkspaceError(f"unknown run {ref!r} in {self.root}", hint="`rx runs` lists them")
        shown = ", ".join(matches[:10]) + (f" and {len(matches) - 10} more" if len(matches) > 10 else "")
        raise WorkspaceError(f"run prefix {ref!r} is ambiguous: it matches {shown}",
                             hint="give more characters")

    def runs(self, status: str | None = None) -> list[Run]:
        """Every run, oldest first; with ``status``, only those whose (derived) status it is.

        With ``status``, a run whose state cannot be read is skipped with a logged warning.

        Raises:
            ConfigError: ``status`` is not one of :data:`~remote_exec.workspace.state.RUN_STATUSES`.
        """
        if status is not None and status not in RUN_STATUSES:
            raise ConfigError(f"unknown run status {status!r}", hint=f"one of {', '.join(RUN_STATUSES)}")
        found = [Run(self, i) for i in self.ids()]
        if status is None:
            return found
        return [r for r in found if _status_or_none(r) == status]

    def latest(self, *, action: str | None = None) -> Run | None:
        """The newest run; with ``action``, the newest run in which that action finished."""
        for rid in reversed(self.ids()):
            run = Run(self, rid)
            if action is None:
                return run
            try:
                if run.tracker.finished(action):
                    return run
            except WorkspaceError as exc:
                logger.warning("skipping run %s: %s", rid, exc)
        return None

    def current(self) -> Run | None:
        """The newest run that is ``running`` with its coordinator alive, if any."""
        for rid in reversed(self.ids()):
            run = Run(self, rid)
            if _status_or_none(run) == "running":
                return run
        return None

    def clean(self, keep: int) -> list[str]:
        """Remove every run but the newest ``keep``, never one that is pending or running.

        A run is first renamed to a hidden name, then deleted, so it vanishes from listings at once
        and a crash halfway leaves no half run behind. A run recorded on another host that still says
        pending or running cannot be checked from here, so it is kept too.

        Returns:
            The ids removed, oldest first.

        Raises:
            ConfigError: ``keep`` is negative.
        """
        if keep < 0:
            raise ConfigError(f"--keep must be 0 or more, not {keep}")
        ids = self.ids()
        victims = ids[: len(ids) - keep] if keep else ids
        removed: list[str] = []
        for rid in victims:
            run = Run(self, rid)
            try:
                if run.status() in ACTIVE_RUN_STATUSES:
                    logger.info("keeping run %s: it is still %s", rid, run.status())
                    continue
            except WorkspaceError:
                pass  # unreadable state: nothing running can be behind it
            trash = self.runs_dir / f".trash-{rid}-{secrets.token_hex(4)}"
            try:
                os.rename(run.dir, trash)
            except OSError as exc:
                logger.warning("cannot remove run %s: %s", rid, exc)
                continue
            shutil.rmtree(trash, ignore_errors=True)
            removed.append(rid)
        for leftover in self.runs_dir.glob(".trash-*") if self.runs_dir.is_dir() else []:
            shutil.rmtree(leftover, ignore_errors=True)
        return removed


# -- run -------------------------------------------------------------------------------------------

class Run:
    """One recorded run: its directory, its state file and its store.

    Attributes:
        id: The run id.
        dir: ``<workspace>/runs/<id>``.
        workspace: The workspace it belongs to.
        state: ``state.json`` as a :class:`StateFile`.
        tracker: The :class:`ActionTracker` over ``state["actions"]``.
        board: The :class:`StatusBoard` over ``state["tasks"]``.
    """

    def __init__(self, workspace: Workspace, run_id: str) -> None:
        self.workspace = workspace
        self.id = run_id
        self.dir = workspace.runs_dir / run_id
        self.state = StateFile(self.dir / "state.json")
        self.tracker = ActionTracker(self.state)
        self.board = StatusBoard(self.state)

    def __repr__(self) -> str:
        return f"Run({self.id!r}, workspace={str(self.workspace.root)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Run) and other.dir == self.dir

    def __hash__(self) -> int:
        return hash(self.dir)

    @functools.cached_property
    def store(self) -> Store:
        """The run directory's :class:`Store` (opened, and swept, on first use)."""
        return Store(self.dir)

    # -- paths -------------------------------------------------------------------------------------

    @property
    def stdout_log(self) -> Path:
        """``stdout.log``: the task's standard output, appended live."""
        return self.dir / "stdout.log"

    @property
    def stderr_log(self) -> Path:
        """``stderr.log``: the task's standard error, appended live."""
        return self.dir / "stderr.log"

    @property
    def files_dir(self) -> Path:
        """``files/``: files pulled back from the task's working directory."""
        return self.dir / "files"

    @property
    def session_path(self) -> Path:
        """``session.zip``: the saved session, for reruns."""
        return self.dir / "session.zip"

    @property
    def result_json(self) -> Path:
        """``result.json``: the result record."""
        return self.dir / "result.json"

    @property
    def result_pkl(self) -> Path:
        """``result.pkl``: the pickled return value, when there is one."""
        return self.dir / "result.pkl"

    @property
    def results_dir(self) -> Path:
        """``results/``: per-task results, ``results/<task key>.<ext>``."""
        return self.dir / "results"

    # -- state -------------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """The content of ``state.json``, with ``lost`` derived (and recorded) for a dead coordinator.

        Raises:
            WorkspaceError: The state file is missing or unreadable.
        """
        state = self.state.read()
        if not state:
            raise WorkspaceError(f"run {self.id} has no state.json in {self.dir}")
        active = state.get("status") in ACTIVE_RUN_STATUSES
        if active and coordinator_alive(state.get("coordinator")) is False:
            state = self.state.update(self._mark_lost)
        return state

    def status(self) -> str:
        """The run's status, as :meth:`info` derives it."""
        return str(self.info().get("status"))

    @staticmethod
    def _mark_lost(state: dict[str, Any]) -> None:
        if state.get("status") not in ACTIVE_RUN_STATUSES:
            return  # it ended while we were looking
        coord = state.get("coordinator") or {}
        if coordinator_alive(coord) is not False:
            return  # claimed by a live process meanwhile
        state["status"] = "lost"
        state["error"] = state.get("error") or (
            f"the coordinator (pid {shown_pid(coord)} on {coord.get('hostname')}) ended without "
            "recording how the run ended")
        for entry in (state.get("tasks") or {}).values():
            if entry.get("status") in ("pending", "waiting", "running"):
                entry["status"] = "cancelled"

    def set_status(self, status: str, *, exit_code: int | None = None, error: str | None = None,
                   actions: list[tuple[str, str, str | None, str]] | None = None) -> None:
        """Record the run's status (and ``actions``' events, see :meth:`ActionTracker.apply`, in the same
        rewrite).

        ``running`` stamps ``started`` (once); a final status stamps ``finished`` and the
        ``duration`` from ``started`` (or ``created`` if it never started).

        Raises:
            ConfigError: ``status`` is not one of :data:`~remote_exec.workspace.state.RUN_STATUSES`.
        """
        if status not in RUN_STATUSES:
            raise ConfigError(f"unknown run status {status!r}", hint=f"one of {', '.join(RUN_STATUSES)}")

        def change(state: dict[str, Any]) -> None:
            now = utc_now()
            state["status"] = status
            if status == "running" and not state.get("started"):
                state["started"] = now
            if status in FINAL_RUN_STATUSES:
                state["finished"] = now
                state["duration"] = duration(state.get("started") or state.get("created"), now)
            else:
                state["finished"] = None
                state["duration"] = None
            if exit_code is not None:
                state["exit_code"] = exit_code
            if error is not None:
                state["error"] = error
            if actions:
                apply_actions(state, actions)

        self.state.update(change)

    def claim(self) -> None:
        """Make the current process the run's coordinator (for a process that takes over a run)."""
        self.state.update(lambda state: state.__setitem__("coordinator", coordinator_record()))

    def update(self, **fields: Any) -> dict[str, Any]:
        """Set top-level fields of ``state.json`` (``backend=...``, ``remote=...``) atomically."""
        return self.state.update(lambda state: state.update(fields))

    @contextlib.contextmanager
    def exclusive(self, purpose: str) -> Iterator[None]:
        """Hold the run for ``purpose`` (``attach``: one process follows and collects a detached run at a
        time, so its logs never get a line twice). The lock is the OS's (released if the process dies);
        beside it, who holds it.

        Raises:
            RunBusy: Another process holds it (the error names its pid, host and since when).
        """
        from .oslock import LockTimeout, ProcessLock

        lock = ProcessLock(self.dir / f".{purpose}.lock")
        holder = self.dir / f".{purpose}.holder"
        try:
            lock.acquire(0)
        except LockTimeout:
            raise self._busy(purpose, holder) from None
        try:
            holder.write_text(json.dumps(coordinator_record()), encoding="utf-8")
            yield
        finally:
            holder.unlink(missing_ok=True)
            lock.release()

    def _busy(self, purpose: str, holder: Path) -> RunBusy:
        try:
            record = json.loads(holder.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            record = {}
        who = (f"pid {shown_pid(record)} on {record.get('hostname')} since {record.get('started')}"
               if isinstance(record, dict) and record.get("pid") else "another rx process")
        return RunBusy(f"run {self.id} is already being {purpose}ed by {who}",
                       holder=record if isinstance(record, dict) else {},
                       hint="wait for it to collect the run, or stop it (the run goes on) and try again")

    # -- actions (woger) ---------------------------------------------------------------------------

    def action(self, name: str, *, host: str | None = None) -> contextlib.AbstractContextManager[None]:
        """Record the enclosed block as action ``name`` (``started`` -> ``finished`` | ``failed``).

        An exception inside marks the action failed with ``"Type: message"`` and is re-raised.
        """
        return self.tracker.action(name, host=host)

    def actions(self) -> list[dict[str, Any]]:
        """The actions recorded, oldest first."""
        return self.tracker.actions()

    # -- status board (valjean) --------------------------------------------------------------------

    def task_started(self, key: str, *, name: str, host: str | None) -> None:
        """Mark task ``key`` running now."""
        self.board.started(key, name=name, host=host)

    def task_finished(self, key: str, *, ok: bool, error: str | None = None) -> None:
        """Mark task ``key`` ``done`` (``ok``) or ``failed`` with ``error`` now."""
        self.board.finished(key, ok=ok, error=error)

    def set_task(self, key: str, status: str, **fields: Any) -> None:
        """Set task ``key``'s status and any fields (``execution_id``, ``traceback``, ...)."""
        self.board.set(key, status, **fields)

    def tasks(self) -> dict[str, dict[str, Any]]:
        """Every task entry, by key."""
        return self.board.tasks()

    # -- per-call records (sessions and results of a @task run) -------------------------------------

    def write_calls(self, members: list[tuple[str, bytes | Path]]) -> None:
        """Record a batch of per-call files (``sessions/<key>.session``, ``results/<key>.pkl``) in one
        archive under ``calls/``: one file per batch, not two per call (a sweep makes thousands of calls).
        A member given as a file (a large value spooled as it arrived) is copied in as it is read, and the
        file removed.

        The archive appears complete or not at all; it is not fsynced (state.json is) unless it holds such a
        file: a crash of the machine may lose the last batch, a killed process loses nothing it wrote.
        """
        import io
        import shutil
        import tempfile
        import zipfile

        name = f"calls/{time.time_ns():020d}-{os.getpid()}.zip"
        spooled = [data for _, data in members if isinstance(data, Path)]
        try:
            if not spooled:
                buffer = io.BytesIO()
                with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
                    for member, data in members:
                        archive.writestr(member, data)  # type: ignore[arg-type]  # bytes: no file here
                self.store.write_bytes(name, buffer.getvalue(), sync=False)
            else:  # streamed through a file beside the run (memory stays flat, landing is a rename)
                with tempfile.NamedTemporaryFile(dir=self.dir, prefix=".calls-", delete=False) as stream:
                    temporary = Path(stream.name)
                    with zipfile.ZipFile(stream, "w", compression=zipfile.ZIP_STORED) as archive:
                        for member, data in members:
                            if isinstance(data, Path):
                                with data.open("rb") as source, archive.open(member, "w", force_zip64=True) as out:
                                    shutil.copyfileobj(source, out, 1 << 20)
                            else:
                                archive.writestr(member, data)
                try:
                    self.store.write_file(name, temporary, move=True)
                finally:
                    temporary.unlink(missing_ok=True)
        finally:
            for path in spooled:
                discard_spool(path)
        self.__dict__.pop("_call_index", None)

    def _calls(self) -> dict[str, Path]:
        """Which archive under ``calls/`` holds each recorded member (the newest, if several do)."""
        index: dict[str, Path] = self.__dict__.get("_call_index") or {}
        if not index:
            import zipfile

            try:
                archives = sorted((self.dir / "calls").glob("*.zip"))
            except OSError:
                archives = []
            for path in archives:
                try:
                    with zipfile.ZipFile(path) as archive:
                        index.update(dict.fromkeys(archive.namelist(), path))
                except (OSError, zipfile.BadZipFile):
                    continue
            self.__dict__["_call_index"] = index
        return index

    def call_record(self, name: str) -> bytes | None:
        """A per-call file (``sessions/<key>.session``, ``results/<key>.pkl``): written on its own, or in
        a batch archive under ``calls/``; None if there is none."""
        import zipfile

        try:
            return (self.dir / name).read_bytes()
        except OSError:
            pass
        path = self._calls().get(name)
        if path is None:
            return None
        try:
            with zipfile.ZipFile(path) as archive:
                return archive.read(name)
        except (OSError, KeyError, zipfile.BadZipFile):
            return None

    def merge_done(self, previous: Run) -> list[str]:
        """Copy the ``done`` tasks of ``previous`` (entries and ``results/<key>.<ext>`` files) here.

        A rerun calls this first so that only tasks that did not finish run again. A key already
        ``done`` in this run is left alone. Merged entries carry ``merged_from: <previous id>``.

        Returns:
            The keys merged, sorted.
        """
        mine = self.tasks()
        done = {key: entry for key, entry in previous.tasks().items()
                if entry.get("status") == "done" and (mine.get(key) or {}).get("status") != "done"}
        if not done:
            return []
        # Results first: an entry must never claim a result file that is not there yet.
        for key in done:
            self._copy_results(previous, key)
        entries = {key: {**entry, "merged_from": previous.id} for key, entry in done.items()}
        return sorted(self.board.merge(entries))

    def _copy_results(self, previous: Run, key: str) -> None:
        """Copy task ``key``'s results from ``previous``: its loose ``results/<key>.<ext>`` files, or
        else its pickle from a batch archive under ``calls/``."""
        loose = previous._result_files(key)
        for source in loose:
            self.store.write_file(f"results/{source.name}", source)
        if loose:
            return
        batched = previous.call_record(f"results/{key}.pkl")
        if batched is not None:
            self.store.write_bytes(f"results/{key}.pkl", batched)

    def _result_files(self, key: str) -> list[Path]:
        try:
            candidates = list(self.results_dir.iterdir())
        except OSError:
            return []
        prefix = key + "."
        return sorted(p for p in candidates if p.is_file() and p.name.startswith(prefix)
                      and p.name[len(prefix):] and "." not in p.name[len(prefix):])

    # -- content -----------------------------------------------------------------------------------

    def result(self) -> dict[str, Any] | None:
        """The ``result.json`` record, or ``None`` if there is none (yet) or it is unreadable."""
        try:
            data = json.loads(self.result_json.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def read_log(self, *, stderr: bool = False, tail: int | None = None) -> bytes:
        """The content of ``stdout.log`` (or ``stderr.log``), or only its last ``tail`` bytes."""
        path = self.stderr_log if stderr else self.stdout_log
        try:
            with open(path, "rb") as fh:
                if tail is not None:
                    size = fh.seek(0, os.SEEK_END)
                    fh.seek(max(0, size - tail))
                return fh.read()
        except FileNotFoundError:
            return b""

    def files(self) -> list[tuple[str, int]]:
        """The pulled files under ``files/``: (relative POSIX path, size in bytes), sorted by path."""
        return sorted(_walk(self.files_dir))


def _status_or_none(run: Run) -> str | None:
    """The run's status, or ``None`` (with a warning) if its state cannot be read."""
    try:
        return run.status()
    except WorkspaceError as exc:
        logger.warning("skipping run %s: %s", run.id, exc)
        return None


def _walk(root: Path) -> Iterator[tuple[str, int]]:
    if not root.is_dir():
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != STORE_DIR]
        for name in filenames:
            path = Path(dirpath) / name
            with contextlib.suppress(OSError):
                yield path.relative_to(root).as_posix(), path.lstat().st_size
