"""Each run's own copy of the project: made from the store, diffed at the end, brought up to date when reused.

A call with a tree (its G frame's ``tree``) runs in a snapshot of it: its run directory *is* the project
(plus the runner's private ``.rx``), a copy of every file (a reflink where the file system has them, else
``copy_file_range``), so a run that rewrites or deletes a file cannot touch the store or another run.
``.rx/baseline`` records each file's stat data as made; :func:`changes` compares the run directory with it
at the end: the files the run created or changed are its outputs.

Making a copy costs a file creation per file (hundreds of microseconds each on a busy disk: seconds for
ten thousand files), so a finished run's snapshot goes to its project's pool (``snapshots/<project>/``,
the G frame's ``project``) once what the run created is removed, with the list of files the run changed
or deleted (``.rx/stale``). The next run of that project takes one by rename and brings it to exactly its
tree (:func:`retarget`): stale files, and files that differ between the two trees, are copied again; the
rest is kept. A pooled snapshot is claimed by one run only (rename), so deleted files never reappear and no
two runs share one; it is trusted to be as its baseline and stale list say (it sits in the user's private
workdir, and the task that used it was stopped with its process group), not walked again.

The stat data of a file written by the task always differs from the baseline: before the task starts,
:func:`_settle` waits until the file system's clock has moved past the newest change made here.
"""

from __future__ import annotations

import marshal
import os
import time

from ..protocol import wire
from .child import work_dir
from .rundir import PRIVATE, collection_due, make_run_dir, new_run_path, rmtree
from .store import Inbox, StoreError, blob_path, ensure_tree, forget_tree, take_ahead

TYPE_CHECKING = False  # typing is not imported at run time: the runner's start-up is on every call's path
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from .channel import Out
    from .store import Entries

    FileStat = tuple[int, int, int, int, bytes, int]  # size, mtime_ns, ctime_ns, inode, digest, mode

__all__ = ["BASELINE", "POOL_SIZE", "Changes", "changes", "close_run_dir", "materialize", "open_run_dir",
           "prepare_snapshot", "release", "retarget"]

#: The baseline's file name in the run's private directory.
BASELINE = "baseline"
#: A pooled snapshot's list of the files its last run changed or deleted (to be copied again).
STALE = "stale"
#: Directories a run may create that are never its outputs (the coordinator's always-left-out set).
#: ``__pycache__`` does not even spoil a snapshot for reuse: Python checks its bytecode against the sources.
_NOT_OUTPUTS = frozenset({".git", ".hg", ".svn", ".venv", "venv", "node_modules", ".ipynb_checkpoints", ".rx"})
#: Snapshots kept per project for reuse.
POOL_SIZE = 4
_FICLONE = 0x40049409


class Changes:
    """How a run directory differs from its snapshot's baseline.

    Attributes:
        outputs: Regular files the run created or changed (relative paths, sorted): what comes back.
        clean: Nothing at all changed (``__pycache__`` aside).
        deleted: Files and links of the snapshot the run removed.
        created: Files and other entries the run added (outside new directories).
        changed: Files of the snapshot whose stat data changed (their content may be the same).
        new_dirs: Directories the run added.
        broken: Something cannot be read (the snapshot cannot be repaired).
        skipped: The directories the run made unreadable (path with a final ``/``, and the reason): their
            files cannot come back.
    """

    __slots__ = ("broken", "changed", "clean", "created", "deleted", "new_dirs", "outputs", "skipped")

    def __init__(self, outputs: list[str], clean: bool, deleted: list[str], created: list[str] | None = None,
                 changed: list[str] | None = None, new_dirs: list[str] | None = None, broken: bool = False,
                 skipped: list[dict[str, str]] | None = None) -> None:
        self.outputs = outputs
        self.clean = clean
        self.deleted = deleted
        self.created = created or []
        self.changed = changed or []
        self.new_dirs = new_dirs or []
        self.broken = broken
        self.skipped = skipped or []


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


class _Maker:
    """Creates entries of a tree in a run directory, parents first; ``tick`` is called every few hundred
    files (the runner's heartbeat: a large copy on a slow disk takes longer than the link's silence limit)."""

    def __init__(self, cache_dir: str, run_dir: str, tick: Any = None) -> None:
        self.cache_dir = cache_dir
        self.run_dir = run_dir
        self.copier = _Copier()
        self.made = {""}
        self.tick = tick
        self.count = 0

    def folder(self, folder: str) -> None:
        if folder not in self.made:
            os.makedirs(os.path.join(self.run_dir, folder), mode=0o755, exist_ok=True)
            self.made.add(folder)

    def link(self, path: str, link: str) -> None:
        self.folder(path.rpartition("/")[0])
        os.symlink(link, os.path.join(self.run_dir, path))

    def file(self, path: str, mode: int, size: int, digest: bytes) -> FileStat:
        """Copy one blob to ``path``; return its stat data (size, mtime_ns, ctime_ns, inode), digest, mode."""
        self.count += 1
        if self.tick is not None and not self.count % 256:
            self.tick()
        self.folder(path.rpartition("/")[0])
        try:
            source = os.open(blob_path(self.cache_dir, digest), os.O_RDONLY)
        except FileNotFoundError:
            raise DamagedBlob(digest) from None
        try:
            fd = os.open(os.path.join(self.run_dir, path), os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                         0o755 if mode & 0o111 else 0o644)
            try:
                if os.fstat(source).st_size != size:
                    raise DamagedBlob(digest)
                if size:
                    self.copier.copy(source, fd, size)
                st = os.fstat(fd)
            finally:
                os.close(fd)
        finally:
            os.close(source)
        if st.st_size != size:
            raise DamagedBlob(digest)
        return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, digest, mode)

    def make(self, entries: Entries, files: dict[str, FileStat], links: dict[str, str]) -> None:
        """Create every entry that is neither in ``files`` nor in ``links`` (recording it there)."""
        for path, mode, size, digest, link in entries:
            if path in files or path in links:
                continue
            if mode == wire.LINK_MODE:
                self.link(path, link)
                links[path] = link
            else:
                files[path] = self.file(path, mode, size, digest)


def materialize(cache_dir: str, entries: Entries, run_dir: str, tree_id: str, cwd: str = "",
                pool: str = "", tick: Any = None) -> None:
    """Make the snapshot of ``entries`` in ``run_dir`` (which exists, empty but for ``.rx``) and record
    its baseline; the working directory ``cwd`` (relative) is made too when no file is in it.

    Raises:
        DamagedBlob: A blob is missing or damaged in the store.
    """
    files: dict[str, FileStat] = {}
    links: dict[str, str] = {}
    _Maker(cache_dir, run_dir, tick).make(entries, files, links)
    _record(run_dir, tree_id, pool, cwd, files, links)


def _record(run_dir: str, tree_id: str, pool: str, cwd: str, files: dict[str, FileStat],
            links: dict[str, str]) -> None:
    """Write the snapshot's baseline (making the working directory first), then wait for the clock."""
    dirs = [cwd] if work_dir(run_dir, {"cwd": cwd}) != run_dir else []
    record = {"tree": tree_id, "pool": pool or tree_id, "files": files, "links": links, "dirs": dirs}
    private = os.path.join(run_dir, PRIVATE)
    try:
        os.mkdir(private, 0o700)
    except FileExistsError:
        pass
    path = os.path.join(private, BASELINE)
    with open(path, "wb") as stream:
        stream.write(marshal.dumps(record, 4))
    _settle(path, max((st[2] for st in files.values()), default=0))


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
    return record if isinstance(record, dict) and "files" in record else None


def _folders(paths: Any) -> set[str]:
    """Every directory the relative ``paths`` are in (``""`` for the root)."""
    folders = {""}
    for path in paths:
        folder = path.rpartition("/")[0]
        while folder not in folders:
            folders.add(folder)
            folder = folder.rpartition("/")[0]
    return folders


def _remove(run_dir: str, path: str) -> None:
    full = os.path.join(run_dir, path)
    try:
        os.unlink(full)
    except IsADirectoryError:
        rmtree(full)
    except FileNotFoundError:
        pass
    except PermissionError:  # a directory on some systems
        rmtree(full)


def retarget(cache_dir: str, entries: Entries, run_dir: str, tree_id: str, found: Changes, cwd: str = "",
             pool: str = "", baseline: dict[str, Any] | None = None, tick: Any = None) -> None:
    """Bring a used snapshot (``found``: how it differs from its baseline) to exactly the tree ``entries``,
    touching only what differs: what the last run added goes, what it changed or deleted and what the
    two trees hold differently is copied again, the rest stays.

    Raises:
        DamagedBlob: A blob is missing or damaged in the store.
    """
    baseline = baseline or _load_baseline(run_dir) or {"files": {}, "links": {}}
    target = {path: (mode, size, digest, link) for path, mode, size, digest, link in entries}
    for path in found.created:
        _remove(run_dir, path)
    for folder in sorted(found.new_dirs, key=len, reverse=True):
        rmtree(os.path.join(run_dir, folder))
    files, links = _still_right(run_dir, baseline, target, set(found.changed) | set(found.deleted))
    old = (*baseline["files"], *baseline["links"], *(f"{folder}/" for folder in baseline.get("dirs") or ()))
    for folder in sorted(_folders(old) - _folders(target), key=len, reverse=True):
        rmtree(os.path.join(run_dir, folder))  # its files are gone; what is left is the old run's
    maker = _Maker(cache_dir, run_dir, tick)
    maker.made |= _folders((*files, *links))
    maker.make(entries, files, links)
    _record(run_dir, tree_id, pool, cwd, files, links)


def _still_right(run_dir: str, baseline: dict[str, Any], target: dict[str, tuple[int, int, bytes, str]],
                 stale: set[str]) -> tuple[dict[str, FileStat], dict[str, str]]:
    """The files and links of the baseline that are as the target wants them and untouched (kept, with
    their stat data); every other one is removed."""
    files: dict[str, FileStat] = {}
    links: dict[str, str] = {}
    for path, recorded in baseline["files"].items():
        want = target.get(path)
        if path not in stale and want is not None and want[0] == recorded[5] and want[2] == recorded[4]:
            files[path] = recorded
        else:
            _remove(run_dir, path)
    for path, link in baseline["links"].items():
        want = target.get(path)
        if path not in stale and want is not None and want[0] == wire.LINK_MODE and want[3] == link:
            links[path] = link
        else:
            _remove(run_dir, path)
    return files, links


# -- what a run changed --------------------------------------------------------------------------------


class _Walk:
    """A walk of the run directory against its baseline."""

    def __init__(self, run_dir: str, baseline: dict[str, Any]) -> None:
        self.run_dir = run_dir
        self.files: dict[str, FileStat] = baseline["files"]
        self.links: dict[str, str] = baseline["links"]
        self.folders = _folders((*self.files, *self.links, *(f"{folder}/" for folder in baseline.get("dirs") or ())))
        self.outputs: list[str] = []
        self.created: list[str] = []
        self.changed: list[str] = []
        self.new_dirs: list[str] = []
        self.seen = 0
        self.clean = True
        self.broken = False
        self.skipped: list[dict[str, str]] = []
        #: Files of the baseline found, whose stat data is compared after the walk (in threads when many).
        self.found: list[tuple[os.DirEntry[str], str, FileStat]] = []

    def run(self, folder: str) -> None:
        try:
            with os.scandir(os.path.join(self.run_dir, folder) if folder else self.run_dir) as scan:
                entries = list(scan)
        except OSError as exc:  # the task made a directory unreadable: it did change something
            self.clean = False
            self.broken = True
            self.skipped.append({"path": f"{folder}/" if folder else "./", "reason": exc.strerror or str(exc)})
            return
        for entry in entries:
            relative = f"{folder}/{entry.name}" if folder else entry.name
            if not folder and entry.name == PRIVATE:
                continue
            try:
                self._entry(entry, relative)
            except OSError:
                self.clean = False
                self.broken = True

    def _entry(self, entry: os.DirEntry[str], relative: str) -> None:
        if entry.is_symlink():
            if self.links.get(relative) != os.readlink(entry.path):
                self.clean = False
                (self.changed if relative in self.links else self.created).append(relative)
            else:
                self.seen += 1
        elif entry.is_dir(follow_symlinks=False):
            if entry.name == "__pycache__" and relative not in self.folders:
                return
            if relative not in self.folders:
                self.clean = False
                self.new_dirs.append(relative)
                name = entry.name
                if name in _NOT_OUTPUTS or (name.startswith(".") and name.endswith("_cache")):
                    return
            self.run(relative)
        elif entry.is_file(follow_symlinks=False):
            self._file(entry, relative)
        else:  # a fifo, a socket, a device
            self.clean = False
            self.created.append(relative)

    def _file(self, entry: os.DirEntry[str], relative: str) -> None:
        recorded = self.files.get(relative)
        if recorded is None:
            self.clean = False
            self.outputs.append(relative)
            self.created.append(relative)
            if relative in self.links:  # a link the run replaced by a file
                self.seen += 1
            return
        self.seen += 1
        self.found.append((entry, relative, recorded))

    def compare(self) -> None:
        """Compare the stat data of the baseline's files found with the recorded one (``stat`` releases the
        GIL: two threads for a large tree take half the time)."""
        found = self.found
        if len(found) < 2000:
            changed = _stale(found)
        else:
            import threading

            half: list[list[tuple[str, bool]]] = []
            thread = threading.Thread(target=lambda: half.append(_stale(found[len(found) // 2:])))
            thread.start()
            changed = _stale(found[:len(found) // 2])
            thread.join()
            changed += half[0] if half else _stale(found[len(found) // 2:])
        for relative, content in changed:
            self.clean = False
            self.changed.append(relative)
            if content:
                self.outputs.append(relative)


def _stale(found: list[tuple[os.DirEntry[str], str, FileStat]]) -> list[tuple[str, bool]]:
    """(path, its content changed) of each file of ``found`` whose stat data is not the recorded one."""
    changed = []
    for entry, relative, recorded in found:
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            changed.append((relative, False))
            continue
        if (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino) != recorded[:4]:
            changed.append((relative, _content_differs(entry.path, st.st_size, recorded)))
    return changed


def _content_differs(path: str, size: int, recorded: FileStat) -> bool:
    """Whether the file at ``path`` no longer holds the recorded content (one the task made unreadable
    counts as changed: it is then named among the files that could not come back)."""
    if size != recorded[0]:
        return True
    try:
        return _sha256(path) != recorded[4]
    except OSError:
        return True


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
    walk.compare()
    deleted: list[str] = []
    if walk.seen != len(walk.files) + len(walk.links):
        deleted = sorted(path for path in (*walk.files, *walk.links)
                         if not os.path.lexists(os.path.join(run_dir, path)))
        walk.clean = walk.clean and not deleted
    walk.outputs.sort()
    return Changes(walk.outputs, walk.clean, deleted, walk.created, walk.changed, walk.new_dirs, walk.broken,
                   walk.skipped)


# -- the pool ------------------------------------------------------------------------------------------


def _take(cache_dir: str, pool: str, tree_id: str, run_dir: str) -> bool:
    """Take a pooled snapshot of the project ``pool`` as ``run_dir`` (which must not exist), one of
    ``tree_id`` first. Another run may take the same one at the same moment: the rename decides."""
    folder = os.path.join(cache_dir, "snapshots", pool)
    try:
        names = os.listdir(folder)
    except OSError:
        return False
    prefix = tree_id[:16] + "-"
    for name in sorted(names, key=lambda name: not name.startswith(prefix)):
        try:
            os.rename(os.path.join(folder, name), run_dir)
        except OSError:
            continue
        return True
    return False


def close_run_dir(options: dict[str, Any], run_dir: str, found: Changes | None, *, reuse: bool, empty: bool,
                  keep: bool) -> bool:
    """Once a call's result went out: keep its run directory for the next call (``reuse``: a persistent
    worker's, left empty, or a snapshot left untouched: True), leave it where it is (``keep``: files over
    the pull limit stayed in it, or a detached run's directory waits for the coordinator's
    acknowledgement; or the ``keep`` option), or return it to its project's pool or remove it."""
    if options.get("keep") or keep:
        return False
    if reuse and (found.clean if found is not None else empty):
        return True
    release(os.path.dirname(os.path.dirname(run_dir)), run_dir, found)
    return False


def release(cache_dir: str, run_dir: str, found: Changes | None) -> None:
    """Return a snapshot to its project's pool, without what the run added (its outputs have gone out);
    remove it instead when the pool is full or the snapshot cannot be repaired."""
    baseline = _load_baseline(run_dir) if found is not None and not found.broken else None
    if baseline is not None:
        try:
            for path in found.created:  # type: ignore[union-attr]
                _remove(run_dir, path)
            for folder in sorted(found.new_dirs, key=len, reverse=True):  # type: ignore[union-attr]
                rmtree(os.path.join(run_dir, folder))
            found.created, found.new_dirs = [], []  # type: ignore[union-attr]
            stale = sorted({*found.changed, *found.deleted})  # type: ignore[union-attr]
            if _to_pool(cache_dir, run_dir, str(baseline.get("pool") or baseline["tree"]), str(baseline["tree"]),
                        stale):
                return
        except OSError:
            pass
    rmtree(run_dir)


def _to_pool(cache_dir: str, run_dir: str, pool: str, tree_id: str, stale: list[str]) -> bool:
    folder = os.path.join(cache_dir, "snapshots", pool)
    try:
        if len(os.listdir(folder)) >= POOL_SIZE:
            return False
    except FileNotFoundError:
        os.makedirs(folder, mode=0o700, exist_ok=True)
    private = os.path.join(run_dir, PRIVATE)
    for name in os.listdir(private):
        if name != BASELINE:
            _remove(private, name)
    if stale:  # what the next run must copy again (whatever else it finds as the baseline says)
        with open(os.path.join(private, STALE), "wb") as stream:
            stream.write(marshal.dumps(stale, 4))
    os.utime(run_dir)  # its last use, for the garbage collector
    try:
        os.rename(run_dir, os.path.join(folder, f"{tree_id[:16]}-{os.urandom(6).hex()}"))
    except OSError:
        return False
    return True


# -- a call's run directory ------------------------------------------------------------------------


def _pooled_state(run_dir: str) -> tuple[dict[str, Any], list[str]] | None:
    """A taken snapshot's baseline and the files its last run left changed or deleted; None when it has no
    baseline (then it is not used)."""
    baseline = _load_baseline(run_dir)
    if baseline is None:
        return None
    try:
        with open(os.path.join(run_dir, PRIVATE, STALE), "rb") as stream:
            stale: list[str] = marshal.loads(stream.read())
        os.unlink(os.path.join(run_dir, PRIVATE, STALE))
    except FileNotFoundError:
        stale = []
    except (OSError, EOFError, ValueError, TypeError):
        return None
    return baseline, stale


def _from_pool(cache_dir: str, options: dict[str, Any], inbox: Inbox, run_dir: str,
               later: list[Callable[[], None]] | None = None) -> bool:
    """Make ``run_dir`` the call's snapshot from a pooled one of its project, if there is one: as it is
    when it is of the call's tree and its last run left nothing to undo, else brought to the tree.

    A pooled snapshot is trusted to be as its baseline and stale list say (it sits in the user's private
    workdir, and the task that used it was stopped with its process group): it is not walked again.
    """
    tree_id = str(options["tree"])
    pool = str(options.get("project") or tree_id)
    while _take(cache_dir, pool, tree_id, run_dir):
        state = _pooled_state(run_dir)
        if state is None:
            rmtree(run_dir)
            continue
        baseline, stale = state
        if baseline["tree"] == tree_id and not stale:
            return True
        found = Changes([], False, [], changed=stale)
        known = frozenset(recorded[4] for recorded in baseline["files"].values())
        try:
            entries = ensure_tree(cache_dir, tree_id, inbox, known=known, later=later)
            retarget(cache_dir, entries, run_dir, tree_id, found, str(options.get("cwd") or ""), pool,
                     baseline=baseline, tick=inbox.alive)
            return True
        except (DamagedBlob, OSError):
            rmtree(run_dir)  # made afresh from the store below
            return False
    return False


def prepare_snapshot(cache_dir: str, options: dict[str, Any], inbox: Inbox, run_dir: str,
                     later: list[Callable[[], None]] | None = None) -> None:
    """Make ``run_dir`` (which must not exist) the snapshot of the call's tree: from its project's pool,
    else copied from the store (fetching what the store lacks over the channel first; ``later``: see
    :func:`.store.ensure_tree`).

    Raises:
        StoreError: The tree could not be fetched or stored.
        CoordinatorGone: The coordinator went away or cancelled.
    """
    tree_id = str(options["tree"])
    if _from_pool(cache_dir, options, inbox, run_dir, later):
        _hold(run_dir)
        return
    entries = ensure_tree(cache_dir, tree_id, inbox, later=later)
    for attempt in (1, 2):
        os.mkdir(run_dir, 0o700)
        try:
            materialize(cache_dir, entries, run_dir, tree_id, str(options.get("cwd") or ""),
                        str(options.get("project") or ""), tick=inbox.alive)
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
                 private: bool = True, later: list[Callable[[], None]] | None = None) -> str:
    """The call's run directory: a snapshot of its tree when it names one (fetched over the channel on
    ``fd`` and ``out`` if the host lacks it; ``later``: see :func:`.store.ensure_tree`), else an empty
    private directory as before. Once a day this also starts the host's garbage collector in the
    background (:func:`.gc.maybe_collect`)."""
    if options.get("gc") and collection_due(cache_dir):
        from .gc import maybe_collect

        maybe_collect(cache_dir, options)
    if not options.get("tree"):
        return make_run_dir(cache_dir, options, private=private)
    run_dir = new_run_path(cache_dir, options)
    inbox = Inbox(fd, reader, out.send, float(options.get("heartbeat") or 5.0))
    take_ahead(cache_dir, options, inbox)
    prepare_snapshot(cache_dir, options, inbox, run_dir, later)
    inbox.done()
    return run_dir
