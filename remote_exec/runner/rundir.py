"""A call's run directory on the host: made private (0700) per call, its own status file, removed whole; and
the sweep that removes the run directories of runners that died.

A run directory's name says who made it: ``<run id>-<pid>.<start time>.<boot>-<random>``, the
runner's process identity (see :mod:`.contain`). Every way a call ends removes its directory; one a runner
could not remove (killed with SIGKILL, the host rebooted) is removed by :func:`sweep_runs`, which a later
runner calls at most once a minute (``<workdir>/.swept`` keeps the time). A detached run's directory
belongs to its supervisor (named in its status file): while the supervisor lives it stays; once the run
ended (or its supervisor died) it waits :data:`DETACHED_KEEP_DAYS` days for ``rx attach``. A run kept on
purpose (``--keep-remote``) is never swept.
"""

from __future__ import annotations

import os
import time

from ..protocol import wire
from .contain import alive, boot_id, end_stale_cgroup, start_time

TYPE_CHECKING = False  # typing is not imported at run time: the runner's start-up is on every call's path
if TYPE_CHECKING:
    from typing import Any

__all__ = ["DAY", "DETACHED_KEEP_DAYS", "PRIVATE", "RunStatus", "collection_due", "keep_for_attach",
           "keep_for_pull_limit", "make_run_dir", "new_run_path", "owner_token", "read_status", "rmtree",
           "sweep_runs"]

#: The run directory's own private directory: the runner's status, a detached run's output and outcome.
PRIVATE = ".rx"
#: Seconds between two collections of the host's garbage (see :mod:`.gc`).
DAY = 86400.0
_STATUS_FILE = "status.json"
#: Days a detached run's directory waits for ``rx attach`` once its run ended (or its supervisor died).
DETACHED_KEEP_DAYS = 14
#: Seconds between two sweeps of a host's run directories (the time of the last one: ``runs/.swept``).
SWEEP_EVERY = 60.0
#: Run directories a sweep looks at, at most (the next sweep goes on).
SWEEP_AT_MOST = 200
#: Seconds after which an unfinished archive install (``archives/.tmp-*``) counts as abandoned.
ABANDONED_INSTALL = 3600.0


def owner_token(pid: int | None = None) -> str:
    """``<pid>.<start time>.<boot>`` of this process (or ``pid``): what a run directory's name records."""
    pid = os.getpid() if pid is None else pid
    return f"{pid}.{start_time(pid) or 0}.{boot_id()[:8] or 0}"


def _owner_alive(token: str) -> bool | None:
    """Whether the process a run directory's name records still runs (None: the name records none)."""
    parts = token.split(".")
    if len(parts) != 3 or not parts[0].isdigit():
        return None
    pid, start, boot = parts
    current = boot_id()[:8]
    if boot != "0" and current and not current.startswith(boot):
        return False
    return alive({"pid": int(pid), "start": "" if start == "0" else start})


def new_run_path(cache_dir: str, options: dict[str, Any]) -> str:
    """A fresh run directory's path (not made; ``runs/`` is)."""
    runs = os.path.join(cache_dir, "runs")
    if not os.path.isdir(runs):
        os.makedirs(runs, mode=0o700, exist_ok=True)
    return os.path.join(runs, f"{options.get('run_id', 'run')}-{owner_token()}-{os.urandom(4).hex()}")


def make_run_dir(cache_dir: str, options: dict[str, Any], *, private: bool = True) -> str:
    """A new private (0700) run directory for one call; with ``private``, its own ``.rx`` inside (status
    and logs of the runner; a persistent worker's calls keep none there)."""
    runs = os.path.join(cache_dir, "runs")
    run_dir = os.path.join(runs, f"{options.get('run_id', 'run')}-{owner_token()}-{os.urandom(4).hex()}")
    try:
        os.mkdir(run_dir, 0o700)
    except FileNotFoundError:
        os.makedirs(runs, mode=0o700, exist_ok=True)
        os.mkdir(run_dir, 0o700)
    if private:
        os.mkdir(os.path.join(run_dir, PRIVATE), 0o700)
    return run_dir


def collection_due(cache_dir: str) -> bool:
    """Whether the host's garbage collection may be due (its stamp is missing or a day old): one stat, so
    that a call imports :mod:`.gc` only then."""
    try:
        return time.time() - os.stat(os.path.join(cache_dir, "gc.stamp")).st_mtime >= DAY
    except OSError:
        return True


class RunStatus:
    """The run's own status file (``.rx/status.json``), rewritten whole (atomically) on every update.

    ``fields`` given at construction are written with the first :meth:`update`.
    """

    def __init__(self, run_dir: str, **fields: object) -> None:
        self.path = os.path.join(run_dir, PRIVATE, _STATUS_FILE)
        self.fields: dict[str, object] = dict(fields)

    def update(self, **fields: object) -> None:
        """Merge ``fields`` into the status and rewrite the file."""
        self.fields.update(fields)
        temporary = self.path + ".tmp"
        with open(temporary, "wb") as stream:
            stream.write(wire.json_bytes(self.fields))
        os.rename(temporary, self.path)


def keep_for_attach(options: dict[str, Any], run_dir: str, header: dict[str, Any], value: bytes | memoryview,
                    exc_data: bytes | memoryview) -> None:
    """Keep an attached call's result in its run directory the way a detached run keeps its own (the value,
    the exception, then ``outcome.json`` atomically, the status ``done``), for a later ``attach ... collect``:
    its coordinator could not land it (its disk was full). The call's secrets and key are not written."""
    import time

    private = os.path.join(run_dir, PRIVATE)
    os.makedirs(private, 0o700, exist_ok=True)
    for name, data in (("value.bin", value), ("exception.bin", exc_data)):
        if data:
            with open(os.path.join(private, name), "wb") as stream:
                stream.write(data)
    stored = {key: item for key, item in options.items() if key not in ("secret_env", "key")}
    with open(os.path.join(private, "outcome.json.tmp"), "wb") as stream:
        stream.write(wire.json_bytes({"header": header, "options": stored}))
    os.rename(os.path.join(private, "outcome.json.tmp"), os.path.join(private, "outcome.json"))
    RunStatus(run_dir).update(state="done", status=header["status"], exit_code=header["exit_code"],
                              finished=time.time(), detached=True)  # swept, as a detached run, if never attached


def keep_for_pull_limit(run_dir: str) -> None:
    """Mark ``run_dir`` as kept on the host: files over the pull limit stay in it (the sweep of dead runs
    leaves it alone; the garbage collector removes it once unused for its ``days``)."""
    try:
        os.makedirs(os.path.join(run_dir, PRIVATE), mode=0o700, exist_ok=True)
        RunStatus(run_dir, **read_status(run_dir)).update(keep=True, over_limit=True)
    except OSError:
        pass


def read_status(run_dir: str) -> dict[str, Any]:
    """The run's status file as written by :class:`RunStatus` (empty if there is none yet). json (and the
    re it imports, ~3 ms of the host's time) is imported only for a file that exists: a call's own run
    directory has none, and the sweep looks at every run directory."""
    try:
        with open(os.path.join(run_dir, PRIVATE, _STATUS_FILE), "rb") as stream:
            data = stream.read()
    except OSError:
        return {}
    import json

    try:
        status: dict[str, Any] = json.loads(data)
    except ValueError:
        return {}
    return status if isinstance(status, dict) else {}


def sweep_runs(cache_dir: str, now: float | None = None) -> list[str]:
    """Remove the run directories of runners that died (and abandoned archive installs), at most once every
    :data:`SWEEP_EVERY` seconds per host (``<cache_dir>/.swept``); return the names removed."""
    import time

    now = time.time() if now is None else now
    runs = os.path.join(cache_dir, "runs")
    marker = os.path.join(cache_dir, ".swept")
    try:
        if now - os.stat(marker).st_mtime < SWEEP_EVERY:
            return []
    except OSError:
        pass
    try:
        with open(marker, "w"):
            pass
        names = [name for name in os.listdir(runs) if not name.startswith(".")][:SWEEP_AT_MOST]
    except OSError:
        return []
    removed = [name for name in names if _dead_run(os.path.join(runs, name), name, now)]
    for name in removed:
        end_stale_cgroup(name)  # what its task left running, where a cgroup held it
        rmtree(os.path.join(runs, name))
    _sweep_installs(os.path.join(cache_dir, "archives"), now)
    return removed


def _dead_run(run_dir: str, name: str, now: float) -> bool:
    """Whether ``run_dir`` belongs to nobody any more (see the module docstring)."""
    status = read_status(run_dir)
    if status.get("keep"):
        return False
    supervisor = status.get("supervisor")
    if isinstance(supervisor, dict) or status.get("detached"):  # its supervisor's, then waiting for rx attach
        if status.get("state") != "done" and isinstance(supervisor, dict) and alive(supervisor):
            return False
        try:
            age = now - os.stat(os.path.join(run_dir, PRIVATE)).st_mtime
        except OSError:
            return False
        return age > DETACHED_KEEP_DAYS * 86400
    if status:
        return False  # a scheduler's run (its job and the coordinator end it) or an older rx's detached one
    parts = name.rsplit("-", 2)
    owner = _owner_alive(parts[1]) if len(parts) == 3 else None
    return owner is False


def _sweep_installs(archives: str, now: float) -> None:
    """Remove archive installs a killed bootstrap left half done."""
    try:
        names = [name for name in os.listdir(archives) if name.startswith(".tmp-")]
    except OSError:
        return
    for name in names:
        path = os.path.join(archives, name)
        try:
            if now - os.stat(path).st_mtime > ABANDONED_INSTALL:
                rmtree(path)
        except OSError:
            pass


def rmtree(path: str) -> None:
    """Remove a directory tree, whatever the task left in it: a directory it made unreadable or read-only
    is opened up first (shutil costs the runner too much to import)."""
    try:
        os.rmdir(path)  # most calls leave their run directory empty
        return
    except OSError:
        pass
    _remove_tree(path, 0)


def _remove_tree(path: str, depth: int) -> None:
    for name in _listed(path):
        entry = os.path.join(path, name)
        if os.path.isdir(entry) and not os.path.islink(entry):
            if depth < 1000:
                _remove_tree(entry, depth + 1)
        else:
            _unlink(path, entry)
    for attempt in (0, 1):
        try:
            os.rmdir(path)
            return
        except PermissionError:
            if attempt == 0:
                _open_up(os.path.dirname(path) or ".")
        except OSError:
            return


def _listed(path: str) -> list[str]:
    """The names in ``path`` (opened up first if the task made it unreadable)."""
    try:
        return os.listdir(path)
    except PermissionError:
        _open_up(path)
    except OSError:
        return []
    try:
        return os.listdir(path)
    except OSError:
        return []


def _unlink(directory: str, entry: str) -> None:
    try:
        os.unlink(entry)
    except PermissionError:  # a read-only directory holds it
        _open_up(directory)
        try:
            os.unlink(entry)
        except OSError:
            pass
    except OSError:
        pass


def _open_up(directory: str) -> None:
    try:
        os.chmod(directory, 0o700)
    except OSError:
        pass
