"""Each run's own copy of the project: made from the store, diffed at the end, reused only when untouched.

A call with a tree (its G frame's ``tree``) runs in a snapshot of it: its run directory *is* the project
(plus the runner's private ``.rx``), a fresh copy of every file (a reflink where the file system has them,
else ``copy_file_range``), so a run that rewrites or deletes a file cannot touch the store or another
run. ``.rx/baseline`` records each file's stat data as made; :func:`changes` compares the run directory
with it at the end: the files the run created or changed are its outputs, and a run that changed nothing
returns its snapshot to a small pool (``snapshots/<tree>/``) that the next run of that tree takes by
rename instead of copying again. A pooled snapshot is checked whole when it is taken.

The stat data of a file written by the task always differs from the baseline: before the task starts,
:func:`_settle` waits until the file system's clock has moved past the newest change made here.
"""

from __future__ import annotations

import marshal
import os
import time

from ..protocol import wire
from .rundir import PRIVATE, make_run_dir, new_run_path, rmtree
from .store import Inbox, StoreError, blob_path, ensure_tree, forget_tree

TYPE_CHECKING = False  # typing is not imported at run time: the runner's start-up is on every call's path
if TYPE_CHECKING:
    from typing import Any

    from .channel import Out
    from .store import Entries

__all__ = ["BASELINE", "Changes", "changes", "claim", "close_run_dir", "materialize", "open_run_dir",
           "prepare_snapshot", "release", "work_dir"]

#: The baseline's file name in the run's private directory.
BASELINE = "baseline"
#: Directories a run may create that are never its outputs (the coordinator's always-left-out set).
#: ``__pycache__`` does not even spoil a snapshot for reuse: Python checks its bytecode against the sources.
_NOT_OUTPUTS = frozenset({".git", ".hg", ".svn", ".venv", "venv", "node_modules", ".ipynb_checkpoints", ".rx"})
#: Snapshots of one tree kept for reuse.
POOL_SIZE = 4
_FICLONE = 0x40049409


class Changes:
    """How a run directory differs from its snapshot's baseline.

    Attributes:
        outputs: Regular files the run created or changed (relative paths, sorted): what comes back.
        clean: Nothing at all changed (the snapshot may serve another run).
        deleted: Paths of the snapshot the run removed.
    """

    __slots__ = ("clean", "deleted", "outputs")

    def __init__(self, outputs: list[str], clean: bool, deleted: list[str]) -> None:
        self.outputs = outputs
        self.clean = clean
        self.deleted = deleted


def work_dir(run_dir: str, options: dict[str, Any]) -> str:
    """The task's working directory: the call's ``cwd`` (relative, inside the project) in the run directory."""
    relative = options.get("cwd") or ""
    if not relative or relative == "." or relative.startswith("/") or ".." in relative.split("/"):
        return run_dir
    path = os.path.join(run_dir, relative)
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


# -- making a snapshot ---------------------------------------------------------------------------------


class _Copier:
    """Copies blobs out of the store: a reflink while the file system takes them, else copy_file_range,
    else plain reads and writes."""

    def __init__(self) -> None:
        self.reflink = True
        self.ranges = hasattr(os, "copy_file_range")

    def copy(self, source: int, target: int, size: int) -> None:
        if self.reflink:
            try:
                import fcntl

                fcntl.ioctl(target, _FICLONE, source)
                return
            except (OSError, ImportError):
                self.reflink = False
        if self.ranges:
            try:
                while size > 0:
                    copied = os.copy_file_range(source, target, size)
                    if copied == 0:
                        break
                    size -= copied
                return
            except OSError:
                self.ranges = False
                os.lseek(source, 0, os.SEEK_SET)
                os.lseek(target, 0, os.SEEK_SET)
                os.ftruncate(target, 0)
        while True:
            block = os.read(source, 1 << 20)
            if not block:
                return
            view = memoryview(block)
            while view:
                view = view[os.write(target, view):]


class DamagedBlob(Exception):
    """A stored blob is missing or of the wrong size."""


def materialize(cache_dir: str, entries: Entries, run_dir: str, tree_id: str, cwd: str = "") -> None:
    """Make the snapshot of ``entries`` in ``run_dir`` (which exists, empty but for ``.rx``) and record
    its baseline; the working directory ``cwd`` (relative) is made too when no file is in it.

    Raises:
        DamagedBlob: A blob is missing or damaged in the store.
    """
    copier = _Copier()
    made = {""}
    files: dict[str, tuple[int, int, int, int, bytes]] = {}
    links: dict[str, str] = {}
    for path, mode, size, digest, link in entries:
        target = os.path.join(run_dir, path)
        folder = path.rpartition("/")[0]
        if folder not in made:
            os.makedirs(os.path.join(run_dir, folder), mode=0o755, exist_ok=True)
            made.add(folder)
        if mode == wire.LINK_MODE:
            os.symlink(link, target)
            links[path] = link
            continue
        files[path] = _copy_blob(cache_dir, digest, size, target, mode, copier)
    dirs = []
    if work_dir(run_dir, {"cwd": cwd}) != run_dir and cwd not in made:
        dirs.append(cwd)
    record = {"tree": tree_id, "files": files, "links": links, "dirs": dirs}
    _settle(_write_baseline(run_dir, record), max((st[2] for st in files.values()), default=0))


def _copy_blob(cache_dir: str, digest: bytes, size: int, target: str, mode: int,
               copier: _Copier) -> tuple[int, int, int, int, bytes]:
    """Copy one blob to ``target``; return its stat data (size, mtime_ns, ctime_ns, inode) and digest."""
    try:
        source = os.open(blob_path(cache_dir, digest), os.O_RDONLY)
    except FileNotFoundError:
        raise DamagedBlob(digest) from None
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o755 if mode & 0o111 else 0o644)
        try:
            if os.fstat(source).st_size != size:
                raise DamagedBlob(digest)
            if size:
                copier.copy(source, fd, size)
            st = os.fstat(fd)
        finally:
            os.close(fd)
    finally:
        os.close(source)
    if st.st_size != size:
        raise DamagedBlob(digest)
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, digest)


def _write_baseline(run_dir: str, record: dict[str, Any]) -> str:
    private = os.path.join(run_dir, PRIVATE)
    try:
        os.mkdir(private, 0o700)
    except FileExistsError:
        pass
    path = os.path.join(private, BASELINE)
    with open(path, "wb") as stream:
        stream.write(marshal.dumps(record, 4))
    return path


def _settle(marker: str, newest_ns: int) -> None:
    """Return once the file system stamps a change later than ``newest_ns`` (its clock may be coarse, a
    few milliseconds): a file the task writes then never keeps the stat data of the baseline."""
    deadline = time.monotonic() + 0.2
    while os.stat(marker).st_ctime_ns <= newest_ns and time.monotonic() < deadline:
        time.sleep(0.001)
        os.utime(marker)


def _load_baseline(run_dir: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(run_dir, PRIVATE, BASELINE), "rb") as stream:
            record: dict[str, Any] = marshal.loads(stream.read())
    except (OSError, EOFError, ValueError, TypeError):
        return None
    return record


# -- what a run changed --------------------------------------------------------------------------------


class _Walk:
    """A walk of the run directory against its baseline."""

    def __init__(self, run_dir: str, baseline: dict[str, Any]) -> None:
        self.run_dir = run_dir
        self.files: dict[str, tuple[int, int, int, int, bytes]] = baseline["files"]
        self.links: dict[str, str] = baseline["links"]
        self.folders = {""}
        for path in (*self.files, *self.links, *(f"{folder}/" for folder in baseline.get("dirs") or ())):
            folder = path.rpartition("/")[0]
            while folder not in self.folders:
                self.folders.add(folder)
                folder = folder.rpartition("/")[0]
        self.outputs: list[str] = []
        self.seen = 0
        self.clean = True

    def run(self, folder: str) -> None:
        try:
            with os.scandir(os.path.join(self.run_dir, folder) if folder else self.run_dir) as scan:
                entries = list(scan)
        except OSError:  # the task made a directory unreadable: it did change something
            self.clean = False
            return
        for entry in entries:
            relative = f"{folder}/{entry.name}" if folder else entry.name
            if not folder and entry.name == PRIVATE:
                continue
            try:
                self._entry(entry, relative)
            except OSError:
                self.clean = False

    def _entry(self, entry: os.DirEntry[str], relative: str) -> None:
        if entry.is_symlink():
            if self.links.get(relative) != os.readlink(entry.path):
                self.clean = False
            else:
                self.seen += 1
        elif entry.is_dir(follow_symlinks=False):
            if entry.name == "__pycache__" and relative not in self.folders:
                return
            if relative not in self.folders:
                self.clean = False
                name = entry.name
                if name in _NOT_OUTPUTS or (name.startswith(".") and name.endswith("_cache")):
                    return
            self.run(relative)
        elif entry.is_file(follow_symlinks=False):
            self._file(entry, relative)
        else:
            self.clean = False

    def _file(self, entry: os.DirEntry[str], relative: str) -> None:
        recorded = self.files.get(relative)
        if recorded is None:
            self.clean = False
            self.outputs.append(relative)
            return
        self.seen += 1
        st = entry.stat(follow_symlinks=False)
        if (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino) == recorded[:4]:
            return
        self.clean = False
        if st.st_size != recorded[0] or _sha256(entry.path) != recorded[4]:
            self.outputs.append(relative)


def _sha256(path: str) -> bytes:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(1 << 20):
            digest.update(block)
    return digest.digest()


def changes(run_dir: str) -> Changes | None:
    """How ``run_dir`` differs from its baseline; None when it has none (not a snapshot)."""
    baseline = _load_baseline(run_dir)
    if baseline is None:
        return None
    walk = _Walk(run_dir, baseline)
    walk.run("")
    deleted: list[str] = []
    if walk.seen != len(walk.files) + len(walk.links):
        deleted = sorted(path for path in (*walk.files, *walk.links)
                         if not os.path.lexists(os.path.join(run_dir, path)))
        walk.clean = False
    walk.outputs.sort()
    return Changes(walk.outputs, walk.clean and not deleted, deleted)


# -- the pool of untouched snapshots -----------------------------------------------------------------


def claim(cache_dir: str, tree_id: str, run_dir: str) -> bool:
    """Take an untouched snapshot of ``tree_id`` from the pool as ``run_dir`` (which must not exist)."""
    pool = os.path.join(cache_dir, "snapshots", tree_id)
    try:
        names = os.listdir(pool)
    except OSError:
        return False
    for name in names:
        try:
            os.rename(os.path.join(pool, name), run_dir)
        except OSError:  # another run took it first
            continue
        found = changes(run_dir)
        if found is not None and found.clean:
            return True
        rmtree(run_dir)  # something wrote into it while it waited: never used
    return False


def close_run_dir(options: dict[str, Any], run_dir: str, found: Changes | None, *, reuse: bool, empty: bool,
                  skipped: bool) -> bool:
    """Once a call's result went out: keep its run directory for the next call (``reuse``: a persistent
    worker's, left empty, or a snapshot left untouched: True), keep it on the host (``keep``, or files
    over the pull limit stayed in it), or return it to the pool or remove it."""
    if options.get("keep") or skipped:
        return False
    if reuse and (found.clean if found is not None else empty):
        return True
    release(os.path.dirname(os.path.dirname(run_dir)), run_dir, found)
    return False


def release(cache_dir: str, run_dir: str, found: Changes | None) -> None:
    """Return an untouched snapshot to its tree's pool (a small one), else remove the run directory."""
    if found is not None and found.clean:
        baseline = _load_baseline(run_dir)
        if baseline is not None and _to_pool(cache_dir, run_dir, str(baseline["tree"])):
            return
    rmtree(run_dir)


def _to_pool(cache_dir: str, run_dir: str, tree_id: str) -> bool:
    pool = os.path.join(cache_dir, "snapshots", tree_id)
    try:
        if len(os.listdir(pool)) >= POOL_SIZE:
            return False
    except FileNotFoundError:
        os.makedirs(pool, mode=0o700, exist_ok=True)
    except OSError:
        return False
    private = os.path.join(run_dir, PRIVATE)
    for name in os.listdir(private):
        if name != BASELINE:
            rmtree(os.path.join(private, name)) if os.path.isdir(os.path.join(private, name)) \
                else os.unlink(os.path.join(private, name))
    try:
        os.rename(run_dir, os.path.join(pool, os.urandom(6).hex()))
    except OSError:
        return False
    return True


# -- a call's run directory ------------------------------------------------------------------------


def prepare_snapshot(cache_dir: str, options: dict[str, Any], inbox: Inbox, run_dir: str) -> None:
    """Make ``run_dir`` (which must not exist) the snapshot of the call's tree: from the pool, else copied
    from the store (fetching what the store lacks over the channel first).

    Raises:
        StoreError: The tree could not be fetched or stored.
        CoordinatorGone: The coordinator went away or cancelled.
    """
    tree_id = str(options["tree"])
    if claim(cache_dir, tree_id, run_dir):
        _hold(run_dir)
        return
    entries = ensure_tree(cache_dir, tree_id, inbox)
    for attempt in (1, 2):
        os.mkdir(run_dir, 0o700)
        try:
            materialize(cache_dir, entries, run_dir, tree_id, str(options.get("cwd") or ""))
            _hold(run_dir)
            return
        except DamagedBlob:
            rmtree(run_dir)
            if attempt == 2:
                raise StoreError(f"the store under {cache_dir} keeps losing blobs of the project") from None
            forget_tree(cache_dir, tree_id)
            entries = ensure_tree(cache_dir, tree_id, inbox, refetch=True)
        except BaseException:
            rmtree(run_dir)
            raise


def _hold(run_dir: str) -> None:
    """Hold the run's lock (``.rx/lock``, shared) until this process and the task it forks have ended: the
    garbage collector leaves a run directory alone while anyone holds it. The descriptor stays open on
    purpose."""
    import fcntl

    fd = os.open(os.path.join(run_dir, PRIVATE, "lock"), os.O_WRONLY | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_SH)


def open_run_dir(cache_dir: str, options: dict[str, Any], reader: wire.FrameReader, out: Out, *, fd: int = 0,
                 private: bool = True) -> str:
    """The call's run directory: a snapshot of its tree when it names one (fetched over the channel on
    ``fd`` and ``out`` if the host lacks it), else an empty private directory as before. Once a day this
    also starts the host's garbage collector in the background (:func:`.gc.maybe_collect`)."""
    if options.get("gc"):
        from .gc import maybe_collect

        maybe_collect(cache_dir, options)
    if not options.get("tree"):
        return make_run_dir(cache_dir, options, private=private)
    run_dir = new_run_path(cache_dir, options)
    inbox = Inbox(fd, reader, out.send, float(options.get("heartbeat") or 5.0))
    prepare_snapshot(cache_dir, options, inbox, run_dir)
    return run_dir
