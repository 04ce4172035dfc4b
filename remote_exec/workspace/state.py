"""State files, the action tracker and the task status board.

A :class:`StateFile` is a JSON document rewritten whole on every change: serialize, write a temporary
beside it, fsync, ``rename`` over the old one, fsync the directory. Readers therefore never see a torn
file and need no lock. Writers go through :meth:`StateFile.update`, a read-modify-write under a lock
that holds across threads (a per-path ``threading.RLock``) and processes (an ``flock`` on
``.<name>.lock`` beside the file), so concurrent coordinators and threads never lose an update.

Two views work on parts of one state file:

* :class:`ActionTracker` (woger's actions): named steps of a run -- ``pack``, ``connect``, ``execute``
  -- each recorded ``started`` and then ``finished`` or ``failed`` with its clocks and error.
* :class:`StatusBoard` (valjean's Env): one entry per task key with name, host, status, clocks, error
  and execution id; every change is an atomic read-modify-write.

Times are ISO 8601 strings in UTC (``2024-05-01T12:00:00.123+00:00``), see :func:`utc_now`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import WorkspaceError
from .oslock import LockTimeout, ProcessLock
from .store import fsync_dir

__all__ = ["ACTIVE_RUN_STATUSES", "FINAL_RUN_STATUSES", "FINAL_TASK_STATUSES", "LOCK_TIMEOUT", "RUN_STATUSES",
    "TASK_STATUSES", "ActionTracker", "StateFile", "StatusBoard", "apply_actions", "duration", "parse_time",
    "utc_now"]

logger = logging.getLogger(__name__)

#: Every status a run can have. ``lost``: its coordinator died without recording an end.
RUN_STATUSES = ("pending", "running", "finished", "failed", "cancelled", "lost")
#: Statuses of a run whose coordinator may still be working on it.
ACTIVE_RUN_STATUSES = ("pending", "running")
#: Statuses a run ends in.
FINAL_RUN_STATUSES = ("finished", "failed", "cancelled", "lost")

#: Every status a task entry of the status board can have.
TASK_STATUSES = ("pending", "waiting", "running", "done", "failed", "skipped", "cancelled")
#: Statuses a task ends in.
FINAL_TASK_STATUSES = ("done", "failed", "skipped", "cancelled")

#: Seconds a writer waits for another process's lock before giving up with a WorkspaceError.
LOCK_TIMEOUT = 60.0

_thread_locks: dict[str, threading.RLock] = {}
_thread_locks_guard = threading.Lock()


def _thread_lock(path: Path) -> threading.RLock:
    key = str(path)
    with _thread_locks_guard:
        lock = _thread_locks.get(key)
        if lock is None:
            lock = _thread_locks[key] = threading.RLock()
        return lock


def utc_now(epoch: float | None = None) -> str:
    """The current time (or ``epoch`` seconds) as an ISO 8601 UTC string with milliseconds."""
    moment = datetime.now(timezone.utc) if epoch is None else datetime.fromtimestamp(epoch, timezone.utc)
    return moment.isoformat(timespec="milliseconds")


def parse_time(value: object) -> datetime | None:
    """Parse a time written by :func:`utc_now`; ``None`` for ``None`` or anything unparseable."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def duration(start: object, end: object) -> float | None:
    """Seconds between two ISO times (rounded to milliseconds), or ``None`` if either is missing."""
    begin, finish = parse_time(start), parse_time(end)
    if begin is None or finish is None:
        return None
    return round((finish - begin).total_seconds(), 3)


class StateFile:
    """A JSON object on disk, replaced atomically and changed only under a lock.

    Attributes:
        path: The JSON file.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path).absolute()
        self._lock = ProcessLock(self.path.with_name(f".{self.path.name}.lock"))
        self._tlock = _thread_lock(self.path)
        self._written: tuple[tuple[int, int, int], dict[str, Any]] | None = None  # what this object wrote last

    def __repr__(self) -> str:
        return f"StateFile({str(self.path)!r})"

    def exists(self) -> bool:
        """Tell whether the file has been written at least once."""
        return self.path.is_file()

    def read(self) -> dict[str, Any]:
        """Return the current content; an empty dict if the file does not exist yet.

        No lock is needed: the file is only ever replaced whole.

        Raises:
            WorkspaceError: The file cannot be read or is not a JSON object.
        """
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise WorkspaceError(f"cannot read {self.path}: {exc.strerror or exc}") from exc
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise WorkspaceError(f"{self.path} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise WorkspaceError(f"{self.path} holds a JSON {type(data).__name__}, not an object")
        return data

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the state's lock (threads and processes) for a longer critical section.

        Raises:
            WorkspaceError: Another process held the lock for more than :data:`LOCK_TIMEOUT` seconds.
        """
        with self._tlock:
            try:
                self._lock.acquire(LOCK_TIMEOUT)
            except LockTimeout as exc:
                raise WorkspaceError(f"{self.path} stayed locked for {LOCK_TIMEOUT:.0f} s",
                                     hint="another rx process may be stuck") from exc
            except OSError as exc:
                raise WorkspaceError(f"cannot lock {self.path}: {exc.strerror or exc}") from exc
            try:
                yield
            finally:
                self._lock.release()

    def update(self, fn: Callable[[dict[str, Any]], dict[str, Any] | None]) -> dict[str, Any]:
        """Read, change and rewrite the state as one atomic step.

        Args:
            fn: Receives the current state; changes it in place and returns ``None``, or returns the
                new state. It runs under the lock, so keep it short, and it must not call
                :meth:`update` on the same file. If it raises, nothing is written.

        Returns:
            The state as written (kept for the next update: read it, do not change it).

        Raises:
            WorkspaceError: The state cannot be read or written, or is not JSON-serializable.
        """
        with self.locked():
            state = self._unchanged() or self.read()
            self._written = None
            result = fn(state)
            new = state if result is None else result
            self._write(new)
            self._remember(new)
            return new

    def write(self, state: dict[str, Any]) -> None:
        """Replace the whole state (under the lock)."""
        with self.locked():
            self._written = None
            self._write(state)

    def _unchanged(self) -> dict[str, Any] | None:
        """What this object wrote last, while the file is still that one (no parse of a run's thousands of
        task entries at every update of a pool's calls)."""
        known = self._written
        if known is None:
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return known[1] if (st.st_ino, st.st_mtime_ns, st.st_size) == known[0] else None

    def _remember(self, state: dict[str, Any]) -> None:
        try:
            st = os.stat(self.path)
        except OSError:
            return
        self._written = ((st.st_ino, st.st_mtime_ns, st.st_size), state)

    def _write(self, state: dict[str, Any]) -> None:
        try:
            text = _dumps(state, ascii=False)
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                # Bytes that are not UTF-8 (a command-line argument, say) arrive as lone surrogates:
                # escaped, they stay valid JSON and read back as the same string.
                text = _dumps(state, ascii=True)
        except (TypeError, ValueError) as exc:
            raise WorkspaceError(f"cannot save {self.path.name}: {exc}") from exc
        parent = self.path.parent
        # We hold the lock, so any temporary of ours still lying around belongs to a writer that died.
        for stale in parent.glob(f".{self.path.name}.*.tmp"):
            with contextlib.suppress(OSError):
                stale.unlink()
        tmp = parent / f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            with open(tmp, "x", encoding="utf-8") as out:
                out.write(text)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise WorkspaceError(f"cannot write {self.path}: {exc.strerror or exc}") from exc
        fsync_dir(parent)


def apply_actions(state: dict[str, Any], events: list[tuple[str, str, str | None, str]],
                  key: str = "actions") -> None:
    """Apply :meth:`ActionTracker.apply`'s events to ``state`` in place (inside another update)."""
    actions = state.setdefault(key, [])
    for event, name, detail, when in events:
        if event == "started":
            actions.append({"name": name, "host": detail, "status": "started", "started": when,
                            "finished": None, "error": None})
            continue
        for entry in reversed(actions):
            if entry.get("name") == name and entry.get("status") == "started":
                entry.update(status=event, finished=when, error=detail if event == "failed" else None)
                break


class ActionTracker:
    """Named steps of a run, recorded in the ``actions`` list of a state file.

    Each entry is ``{name, host, status, started, finished, error}`` with ``status`` going from
    ``started`` to ``finished`` or ``failed``. Entries are only appended, never reordered, so an
    entry's index identifies it.
    """

    def __init__(self, state: StateFile, key: str = "actions") -> None:
        self.state = state
        self.key = key

    @contextlib.contextmanager
    def action(self, name: str, *, host: str | None = None) -> Iterator[None]:
        """Record the enclosed block as action ``name``; an exception marks it failed and propagates."""
        index = self.start(name, host=host)
        try:
            yield
        except BaseException as exc:
            self.end(index, error=_describe(exc))
            raise
        self.end(index)

    def start(self, name: str, *, host: str | None = None) -> int:
        """Append a ``started`` entry and return its index (for :meth:`end`)."""
        entry = {"name": name, "host": host, "status": "started", "started": utc_now(), "finished": None,
                 "error": None}
        position: list[int] = []

        def append(state: dict[str, Any]) -> None:
            actions = state.setdefault(self.key, [])
            position.append(len(actions))
            actions.append(entry)

        self.state.update(append)
        return position[0]

    def end(self, index: int, *, error: str | None = None) -> None:
        """Mark the entry at ``index`` ``finished``, or ``failed`` with ``error``."""

        def finish(state: dict[str, Any]) -> None:
            actions = state.get(self.key) or []
            if not 0 <= index < len(actions):
                raise WorkspaceError(f"{self.state.path}: no action #{index} to end")
            actions[index].update(status="failed" if error is not None else "finished",
                                  finished=utc_now(), error=error)

        self.state.update(finish)

    def apply(self, events: list[tuple[str, str, str | None, str]]) -> None:
        """Record several starts and ends in one rewrite: ``("started", name, host, when)`` appends an entry,
        ``("finished" | "failed", name, error, when)`` ends the latest started entry of that name."""
        if events:
            self.state.update(lambda state: apply_actions(state, events, self.key))

    def actions(self) -> list[dict[str, Any]]:
        """Every action recorded, oldest first."""
        return list(self.state.read().get(self.key) or [])

    def finished(self, name: str) -> bool:
        """Tell whether an action named ``name`` finished (woger's "latest run where X finished")."""
        return any(a.get("name") == name and a.get("status") == "finished" for a in self.actions())


class StatusBoard:
    """The status of every task of a run: the ``tasks`` dict of a state file, keyed by task key.

    An entry holds ``name``, ``host``, ``status`` (one of :data:`TASK_STATUSES`), ``started``,
    ``finished``, ``duration``, ``error`` and ``execution_id``, plus any extra fields given to
    :meth:`set`. Every change is an atomic read-modify-write, so threads and processes can report on
    different tasks of one run at the same time.
    """

    def __init__(self, state: StateFile, key: str = "tasks") -> None:
        self.state = state
        self.key = key

    def started(self, key: str, *, name: str, host: str | None) -> None:
        """Mark task ``key`` running from now on (clearing a previous end and error)."""
        self._change(key, name=name, host=host, status="running", started=utc_now(), finished=None,
                     duration=None, error=None)

    def finished(self, key: str, *, ok: bool, error: str | None = None) -> None:
        """Mark task ``key`` ``done`` or ``failed`` now; the duration runs from its start."""
        self._change(key, status="done" if ok else "failed", finished=utc_now(), error=error)

    def set(self, key: str, status: str, **fields: Any) -> None:
        """Set the status of task ``key`` and any other fields (``execution_id=...``, ``traceback=...``).

        Entering a final status stamps ``finished`` unless given; entering ``running`` stamps
        ``started`` unless given.

        Raises:
            WorkspaceError: ``status`` is not one of :data:`TASK_STATUSES`.
        """
        if status not in TASK_STATUSES:
            raise WorkspaceError(f"unknown task status {status!r}", hint=f"one of {', '.join(TASK_STATUSES)}")
        now = utc_now()
        if status in FINAL_TASK_STATUSES:
            fields.setdefault("finished", now)
        elif status == "running":
            fields.setdefault("started", now)
            fields.setdefault("finished", None)
        self._change(key, status=status, **fields)

    def tasks(self) -> dict[str, dict[str, Any]]:
        """A copy of every entry, by task key."""
        return dict(self.state.read().get(self.key) or {})

    def merge(self, entries: dict[str, dict[str, Any]]) -> list[str]:
        """Add ``entries`` whose keys are not already ``done`` here; return the keys added."""
        added: list[str] = []

        def merge(state: dict[str, Any]) -> None:
            tasks = state.setdefault(self.key, {})
            for key, entry in entries.items():
                if (tasks.get(key) or {}).get("status") == "done":
                    continue
                tasks[key] = dict(entry)
                added.append(key)

        self.state.update(merge)
        return added

    def apply(self, changes: list[tuple[str, dict[str, Any]]]) -> None:
        """Apply many ``(key, fields)`` changes in order, in one atomic read-modify-write.

        For writers that report many small tasks (a sweep): one state rewrite instead of one per change.
        """
        def change(state: dict[str, Any]) -> None:
            tasks = state.setdefault(self.key, {})
            for key, fields in changes:
                self._merge(tasks, key, fields)

        self.state.update(change)

    @staticmethod
    def _merge(tasks: dict[str, Any], key: str, fields: dict[str, Any]) -> None:
        entry = tasks.setdefault(key, {"name": key, "host": None, "status": "pending", "started": None,
                                       "finished": None, "duration": None, "error": None,
                                       "execution_id": None})
        entry.update(fields)
        entry["duration"] = duration(entry.get("started"), entry.get("finished"))

    def _change(self, key: str, **fields: Any) -> None:
        self.apply([(key, fields)])


def _describe(exc: BaseException) -> str:
    message = str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _dumps(value: Any, *, ascii: bool, depth: int = 2, indent: str = "") -> str:
    """``value`` as JSON, its first ``depth`` levels of objects one member a line (a run's state: one line a
    task), deeper values on one line: those go through json's C encoder, which ``indent=`` would turn off
    (a pool's run rewrote thousands of entries in pure Python: most of a warm call's CPU time)."""
    if depth == 0 or not isinstance(value, dict) or not value or not all(isinstance(key, str) for key in value):
        return json.dumps(value, ensure_ascii=ascii, allow_nan=False)
    inner = indent + "  "
    members = [f"{inner}{json.dumps(key, ensure_ascii=ascii)}: "
               f"{_dumps(item, ascii=ascii, depth=depth - 1, indent=inner)}" for key, item in value.items()]
    text = "{\n" + ",\n".join(members) + f"\n{indent}}}"
    return text + "\n" if not indent else text
