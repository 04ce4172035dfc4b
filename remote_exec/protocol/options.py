"""What one call needs and what it gives back: :class:`CallOptions` in, :class:`Outcome` out."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Protocol

from ..session import Result

if TYPE_CHECKING:
    from ..sync.tree import Tree

__all__ = ["CallOptions", "EventSink", "FileLander", "Outcome", "OutputSink", "PhaseCallback", "ProgressCallback",
           "ProjectCall", "ProjectScan", "SyncProgress", "root_of", "scanned"]

logger = logging.getLogger(__name__)

#: Receives a stream's bytes as they arrive.
OutputSink = Callable[[bytes], None]


class FileLander(Protocol):
    """Where a call's pulled files land (a run's ``files/``): :func:`.collect.land_files` writes the checked
    files into a directory :meth:`stage` gives, then :meth:`land` moves them to their names."""

    def stage(self) -> Path:
        """A new, empty directory of its own on the destination's file system."""

    def land(self, staged: Path, files: Sequence[PurePosixPath]) -> list[Path]:
        """Move ``files`` (paths relative to ``staged``, each checked) to their names, all or none; ``staged`` is
        gone afterwards. Returns where they landed."""

#: Told (phase, "started" | "finished" | "failed") around connect, upload, execute and collect.
PhaseCallback = Callable[[str, str], None]
#: Told of each progress event (P frame) the runner sends: the task started, a detached run ended, ...
EventSink = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class SyncProgress:
    """How far the upload of a project's blobs is (told as it goes, and once at its end).

    Attributes:
        files: Blobs sent so far.
        files_total: Blobs the host asked for.
        bytes: Bytes sent so far.
        bytes_total: Bytes the host asked for.
        done: The last report of this upload.
    """

    files: int
    files_total: int
    bytes: int
    bytes_total: int
    done: bool = False


#: Told how an upload of blobs goes (only when the host lacks some).
ProgressCallback = Callable[[SyncProgress], None]


@dataclass(frozen=True)
class ProjectCall:
    """A call's project: the tree its snapshot is made of, and where in it the task runs.

    Attributes:
        tree: The scanned project tree.
        cwd: The task's working directory relative to the root (``""``: the root), as the user's was.
        path: Directories (relative) put first on the task's ``sys.path``, in order.
        script: The script's path in the tree (a script task); None otherwise.
        pool: Names the project on the host (its pool of snapshots: a run of another version of the same
            project starts from one and copies only what differs); empty: the tree's id.
    """

    tree: Tree
    cwd: str = ""
    path: tuple[str, ...] = (".",)
    script: str | None = None
    pool: str = ""

    @property
    def root(self) -> Path:
        """The project's local root."""
        return self.tree.root

    def go_options(self) -> dict[str, Any]:
        """What the call's G frame carries for it."""
        return {"tree": self.tree.tree_id, "cwd": self.cwd, "path": list(self.path), "script": self.script,
                "project": self.pool or self.tree.tree_id}


class ProjectScan:
    """A call's project being scanned on a thread of its own while the runner starts (a warm call's runner
    takes milliseconds to answer; the scan of a project of some hundred files, one ``lstat`` each, about
    one): :func:`~.call.dispatch` waits for it only when it writes the call's frames.

    Args:
        scan: Scans the project: its call and the warnings its size deserves (logged when it is taken).
        root: The project's root (known before the scan).
    """

    def __init__(self, scan: Callable[[], tuple[ProjectCall, list[str]]], root: Path) -> None:
        self.root = root
        self._scan = scan
        self._found: tuple[ProjectCall, list[str]] | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="rx-scan", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._found = self._scan()
        except BaseException as exc:  # raised where the project is taken
            self._error = exc

    def result(self) -> ProjectCall:
        """The scanned project (its warnings logged the first time).

        Raises:
            SyncError: What the scan raised (see :meth:`~remote_exec.coordinator.Coordinator.project_for`).
        """
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._found is not None
        project, warnings = self._found
        if warnings:
            self._found = (project, [])
            for warning in warnings:
                logger.warning("%s", warning)
        return project


def root_of(project: ProjectCall | ProjectScan | None) -> Path | None:
    """The local root of a call's project, scanned or not (None: it has none)."""
    return project.root if project is not None else None


def scanned(project: ProjectCall | ProjectScan | None) -> ProjectCall | None:
    """``project``, once its scan is done."""
    return project.result() if isinstance(project, ProjectScan) else project


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
        pull_limit: Bytes of files a call brings back at most (the rest is listed, not sent); None: no cap.
        cache_limit: Bytes the host's caches (trees, blobs, archives) may hold before the least recently
            used go (checked at most once a day, when a call starts).
        cache_days: Days after which an unused tree or archive goes in any case.
        slot: A pool slot's name: the call runs in that slot's own persistent worker (one per slot).
        placement: What the slot's worker takes on the host before its first call (its lock, GPUs), as
            JSON (see :mod:`remote_exec.runner.slot`); None: nothing.
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
    pull_limit: int | None = None
    cache_limit: int = 10 << 30
    cache_days: float = 30.0
    slot: str | None = None
    placement: str | None = None

    def runner_start(self) -> tuple[Any, ...]:
        """What starting a runner for a call with these options depends on (:func:`~.bootstrap.runner_argv`
        and the wait for its answer); the rest travels with the call itself."""
        return (self.python, self.workdir, self.handshake_timeout, self.keep_warm, self.worker_idle, self.slot,
                self.placement)


@dataclass
class Outcome:
    """What came back from one call.

    Attributes:
        result: The task's result.
        header: The runner's result header (status, exit code, host, python, duration, files).
        files: Local paths of the files that landed.
        uploaded: True when the archive had to be sent.
        phases: Seconds per phase: ``connect``, ``upload``, ``execute``, ``collect``.
        value_data: The value as the runner pickled it (it passed the result's checks): its bytes, or for a
            large value the spool file holding them, which the outcome's owner records and then removes;
            empty if none or if it came as marshal.
        synced: (blobs, bytes) sent when the host lacked the call's project tree; None when it had it.
    """

    result: Result
    header: dict[str, Any]
    files: list[Path] = field(default_factory=list)
    uploaded: bool = False
    phases: dict[str, float] = field(default_factory=dict)
    value_data: bytes | Path = b""
    synced: tuple[int, int] | None = None
