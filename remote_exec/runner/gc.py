"""The host's garbage collector: trees, blobs, pooled snapshots, archives, leftover temporaries and run
directories, least recently used first, never what a running run uses.

What counts as used when:

- a tree: its manifest's modification time (touched when a call uses it, at most hourly); the blobs no
  other kept tree names go with it. A tree used within the last hour is kept (a run may be making its
  snapshot from it), and so is a tree a run directory not yet done names (a scheduler's job, queued for
  days maybe, whose runner makes its snapshot when the job starts);
- a pooled snapshot (``snapshots/<project>/...``): its modification time (set when a run left it there);
  a run that takes one owns it (it is no longer in the pool);
- an archive: its directory's modification time; an archive a live process was started from (its sha256
  on a command line, read from /proc) is kept whatever its age: a running task imports from it;
- a run directory the pull limit left on the host (its files over the limit stay there), or a job's or a
  detached run's that nobody collected (queued, ended or done; never running): kept while its
  ``.rx/lock`` is held or for ``days`` after it was last touched; other run directories are the sweep's
  (:func:`.rundir.sweep_runs`: those of runners that died);
- an environment (``envs/<key>``): its ``.rx-complete``'s modification time (touched on each use); one
  a live process runs from (its interpreter's path on a command line) is kept whatever its age;
- temporaries (``tmp/``, half-written manifests, environments whose build was killed) and blobs no tree
  names: removed after a day.

Above ``limit`` bytes (trees with their blobs, pooled snapshots, archives and environments), the least
recently used go first; anything unused for ``days`` goes in any case. :func:`collect` runs under an exclusive lock
(``gc.lock``): a second collector finds it taken and does nothing. :func:`maybe_collect` starts one in the
background at most once a day, when a call starts (``gc.stamp``).
"""

from __future__ import annotations

import os
import time

from ..protocol import wire
from .rundir import DAY, PRIVATE, read_status, rmtree

TYPE_CHECKING = False  # typing is not imported at run time
if TYPE_CHECKING:
    from typing import Any

__all__ = ["DAY", "collect", "maybe_collect", "size_of"]

_GRACE = 3600.0


def size_of(path: str) -> int:
    """Bytes of the files under ``path`` (a file: its size)."""
    try:
        if not os.path.isdir(path) or os.path.islink(path):
            return os.lstat(path).st_size
    except OSError:
        return 0
    total = 0
    for folder, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                pass
    return total


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def _archives_in_use() -> set[str] | None:
    """The archives (sha256) that live processes were started from, and ``env:<key>`` for the environments
    they run in; None when that cannot be read here."""
    if not os.path.isdir("/proc/self"):
        return None
    used = set()
    for pid in _listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as stream:
                argv = stream.read().split(b"\0")
        except OSError:
            continue
        if len(argv) > 3 and argv[1] == b"-c" and len(argv[3]) == 64:
            used.add(argv[3].decode("ascii", "replace"))
        if b"/envs/" in argv[0]:
            used.add("env:" + argv[0].split(b"/envs/")[-1].split(b"/")[0].decode("ascii", "replace"))
    return used


def _locked(run_dir: str) -> bool | None:
    """True when a process holds the run's lock; None when the run has no lock file."""
    import fcntl

    try:
        fd = os.open(os.path.join(run_dir, PRIVATE, "lock"), os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


class _Plan:
    """What a collection removes and why, and what it frees."""

    def __init__(self, cache_dir: str, dry_run: bool) -> None:
        self.cache_dir = cache_dir
        self.dry_run = dry_run
        self.removed: list[dict[str, Any]] = []

    def remove(self, kind: str, path: str, size: int, reason: str) -> None:
        self.removed.append({"kind": kind, "name": os.path.relpath(path, self.cache_dir), "bytes": size,
                             "reason": reason})
        if not self.dry_run:
            if os.path.isdir(path) and not os.path.islink(path):
                rmtree(path)
            else:
                try:
                    os.unlink(path)
                except OSError:
                    pass

    @property
    def freed(self) -> int:
        return sum(entry["bytes"] for entry in self.removed)


class _Store:
    """The trees, blobs and archives of a cache directory, with their sizes and last uses."""

    def __init__(self, cache_dir: str, now: float) -> None:
        self.cache_dir = cache_dir
        self.now = now
        self.blobs: dict[str, int] = {}
        for prefix in _listdir(os.path.join(cache_dir, "blobs")):
            folder = os.path.join(cache_dir, "blobs", prefix)
            for name in _listdir(folder):
                try:
                    self.blobs[name] = os.lstat(os.path.join(folder, name)).st_size
                except OSError:
                    pass
        self.trees: dict[str, tuple[float, set[str]]] = {}  # id -> (last use, blobs)
        for name in _listdir(os.path.join(cache_dir, "trees")):
            if not name.startswith("."):
                self._tree(name)
        self.refs: dict[str, int] = {}
        for _, names in self.trees.values():
            for name in names:
                self.refs[name] = self.refs.get(name, 0) + 1
        self.archives = {name: (_mtime(os.path.join(cache_dir, "archives", name)),
                                size_of(os.path.join(cache_dir, "archives", name)))
                         for name in _listdir(os.path.join(cache_dir, "archives")) if not name.startswith(".")}
        self.snapshots: dict[str, tuple[float, int]] = {}  # "<project>/<name>" -> (last use, bytes)
        for project in _listdir(os.path.join(cache_dir, "snapshots")):
            for name in _listdir(os.path.join(cache_dir, "snapshots", project)):
                path = os.path.join(cache_dir, "snapshots", project, name)
                self.snapshots[f"{project}/{name}"] = (_mtime(path), size_of(path))
        self.envs = self._envs()
        self.statuses = {name: read_status(os.path.join(cache_dir, "runs", name))
                         for name in _listdir(os.path.join(cache_dir, "runs"))}

    def _envs(self) -> dict[str, tuple[float, int]]:
        """Complete environments: key -> (last use, bytes)."""
        found = {}
        for name in _listdir(os.path.join(self.cache_dir, "envs")):
            path = os.path.join(self.cache_dir, "envs", name)
            if "." not in name and os.path.exists(os.path.join(path, ".rx-complete")):
                found[name] = (_mtime(os.path.join(path, ".rx-complete")), size_of(path))
        return found

    @property
    def waiting(self) -> set[str]:
        """The trees that runs not yet done will make their snapshots of (a queued job's)."""
        return {str(status["tree"]) for status in self.statuses.values()
                if status.get("tree") and status.get("state") != "done"}

    def _tree(self, name: str) -> None:
        path = os.path.join(self.cache_dir, "trees", name)
        try:
            with open(path, "rb") as stream:
                entries = wire.load_manifest(stream.read())
        except (OSError, ValueError):
            entries = []
        names = {digest.hex() for _path, mode, _size, digest, _link in entries if mode != wire.LINK_MODE}
        self.trees[name] = (_mtime(path), names)

    def tree_bytes(self, name: str) -> int:
        """What removing tree ``name`` frees: the blobs only it names."""
        _, names = self.trees[name]
        return sum(self.blobs.get(blob, 0) for blob in names if self.refs.get(blob) == 1)

    def total(self) -> int:
        return (sum(self.blobs.values()) + sum(size for _, size in self.snapshots.values())
                + sum(size for _, size in self.archives.values()) + sum(size for _, size in self.envs.values()))


def _remove_tree(store: _Store, plan: _Plan, name: str, reason: str) -> None:
    _, names = store.trees.pop(name)
    cache_dir = store.cache_dir
    plan.remove("tree", os.path.join(cache_dir, "trees", name), 0, reason)
    for blob in names:
        store.refs[blob] -= 1
        if store.refs[blob] == 0 and blob in store.blobs:
            plan.remove("blob", os.path.join(cache_dir, "blobs", blob[:2], blob), store.blobs.pop(blob), reason)


def _candidates(store: _Store, in_use: set[str] | None) -> list[tuple[float, str, str]]:
    """What may go, oldest use first: (last use, kind, name)."""
    now = store.now
    candidates = []
    for name, (used, _) in store.trees.items():
        if now - used > _GRACE and name not in store.waiting:
            candidates.append((used, "tree", name))
    for name, (used, _) in store.snapshots.items():
        candidates.append((used, "snapshot", name))
    for name, (used, _) in store.archives.items():
        busy = name in in_use if in_use is not None else now - used < DAY
        if not busy and now - used > _GRACE:
            candidates.append((used, "archive", name))
    for name, (used, _) in store.envs.items():
        busy = f"env:{name}" in in_use if in_use is not None else now - used < DAY
        if not busy and now - used > _GRACE:
            candidates.append((used, "env", name))
    return sorted(candidates)


def _evict(store: _Store, plan: _Plan, limit: int, days: float, in_use: set[str] | None) -> None:
    """Trees, archives and environments unused for ``days``, then the least recently used while above
    ``limit``."""
    now = store.now
    total = store.total()
    for used, kind, name in _candidates(store, in_use):
        old = now - used > days * DAY
        if not old and total <= limit:
            break
        reason = f"unused for {(now - used) / DAY:.0f} days" if old else "least recently used, over the cache limit"
        if kind == "tree":
            freed = store.tree_bytes(name)
            _remove_tree(store, plan, name, reason)
        elif kind in ("snapshot", "env"):
            found = store.snapshots if kind == "snapshot" else store.envs
            freed = found.pop(name)[1]
            plan.remove(kind, os.path.join(store.cache_dir, f"{kind}s", name), freed, reason)
        else:
            freed = store.archives.pop(name)[1]
            plan.remove("archive", os.path.join(store.cache_dir, "archives", name), freed, reason)
        total -= freed


def _temporaries(store: _Store, plan: _Plan) -> None:
    """Temporaries older than a day: interrupted transfers and builds."""
    cache_dir, now = store.cache_dir, store.now
    for name in _listdir(os.path.join(cache_dir, "tmp")):
        path = os.path.join(cache_dir, "tmp", name)
        if now - _mtime(path) > DAY:
            plan.remove("temporary", path, size_of(path), "an interrupted transfer")
    for name in _listdir(os.path.join(cache_dir, "trees")):
        path = os.path.join(cache_dir, "trees", name)
        if name.startswith(".") and now - _mtime(path) > DAY:
            plan.remove("temporary", path, size_of(path), "an interrupted transfer")
    for name in _listdir(os.path.join(cache_dir, "envs")):
        path = os.path.join(cache_dir, "envs", name)
        if ".tmp-" in name and now - _mtime(path) > DAY:
            plan.remove("temporary", path, size_of(path), "an environment whose build was stopped")


def _leftovers(store: _Store, plan: _Plan, days: float) -> None:
    """Temporaries older than a day, blobs no tree names, run directories the pull limit left that nobody
    holds and nobody touched for ``days``."""
    cache_dir, now = store.cache_dir, store.now
    _temporaries(store, plan)
    for blob, size in list(store.blobs.items()):
        path = os.path.join(cache_dir, "blobs", blob[:2], blob)
        if not store.refs.get(blob) and now - _mtime(path) > DAY:
            plan.remove("blob", path, size, "named by no tree")
            del store.blobs[blob]
    for name, status in list(store.statuses.items()):
        path = os.path.join(cache_dir, "runs", name)
        reason = _forgotten(status, days)
        if reason and _locked(path) is not True and now - _mtime(os.path.join(path, PRIVATE)) > days * DAY:
            plan.remove("run", path, size_of(path), reason)
            del store.statuses[name]


def _forgotten(status: dict[str, Any], days: float) -> str | None:
    """Why a run directory is the collector's once untouched for ``days`` (None: it is not). Files kept by
    the pull limit; a job's or a detached run's that nobody collected (no ``rx attach``), unless it runs.
    Other run directories are the sweep's (:func:`.rundir.sweep_runs`)."""
    if status.get("over_limit"):
        return f"kept by the pull limit, untouched for {days:g} days"
    if (status.get("queued") or status.get("detached")) and status.get("state") in ("queued", "ended", "done"):
        return f"a {'job' if status.get('queued') else 'detached run'} nobody collected, untouched for {days:g} days"
    return None


def collect(cache_dir: str, limit: int, days: float, *, dry_run: bool = False) -> dict[str, Any]:
    """Collect the garbage of ``cache_dir`` (see the module docstring); return what was (or would be,
    with ``dry_run``) removed, as a report."""
    import fcntl

    os.makedirs(cache_dir, mode=0o700, exist_ok=True)
    lock = os.open(os.path.join(cache_dir, "gc.lock"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return {"cache": cache_dir, "busy": True, "removed": [], "freed_bytes": 0, "dry_run": dry_run}
        store = _Store(cache_dir, time.time())
        before = store.total()
        plan = _Plan(cache_dir, dry_run)
        _leftovers(store, plan, days)
        _evict(store, plan, limit, days, _archives_in_use())
        if not dry_run:
            _touch(os.path.join(cache_dir, "gc.stamp"))
        return {"cache": cache_dir, "busy": False, "limit_bytes": limit, "days": days, "total_bytes": before,
                "removed": plan.removed, "freed_bytes": plan.freed, "kept_bytes": max(before - plan.freed, 0),
                "dry_run": dry_run}
    finally:
        os.close(lock)


def _touch(path: str) -> None:
    with open(path, "ab"):
        pass
    os.utime(path)


def maybe_collect(cache_dir: str, options: dict[str, Any]) -> None:
    """Start a collection in the background if the last one is a day old (the call does not wait)."""
    settings = options.get("gc")
    if not settings:
        return
    stamp = os.path.join(cache_dir, "gc.stamp")
    try:
        if time.time() - os.stat(stamp).st_mtime < DAY:
            return
    except FileNotFoundError:
        _touch(stamp)  # a new cache: the first collection is due in a day
        return
    except OSError:
        return
    _touch(stamp)  # the other calls of this moment leave it to this one
    limit, days = int(settings[0]), float(settings[1])
    pid = os.fork()
    if pid:
        os.waitpid(pid, 0)
        return
    try:  # pragma: no cover - in the forked collector
        os.setsid()
        if os.fork():
            os._exit(0)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.closerange(3, 1 << 16)
        try:
            os.nice(10)
        except OSError:
            pass
        collect(cache_dir, limit, days)
    finally:
        os._exit(0)
