"""Whole-file writes into a directory: nothing ever appears under its final name incomplete.

The protocol is maildir's (and gocept.filestore's) ``tmp -> new -> cur``, with the final location inside
the directory playing ``cur``::

    <root>/.store/tmp/<unique>     written, flushed, fsynced, sha256 checked
    <root>/.store/new/<unique>     complete and verified, not yet under its name
    <root>/<name>                  renamed into place; the parent directory is fsynced

Every step after the first is a ``rename(2)`` inside one file system, which is atomic: a reader sees
either the previous file or the complete new one, never a prefix. A writer killed at any point leaves at
most a temporary under ``.store/``; the next :class:`Store` opened on the directory sweeps it (a
temporary whose writer process is gone, or one older than an hour).

Many files at once (a result's tree) take another path to the same guarantee: :meth:`Store.stage` gives a
directory of their own under ``.store/tmp`` to write them in, and :meth:`Store.land_tree` makes them durable
together, then renames them to their names: the whole tree at once when its folder is new, else file by file
(all or none).

The one exception is :meth:`Store.open_append`: live logs (``stdout.log``) grow in place, because a
reader following them wants every line as soon as it is written.

Temporary names carry the writer's pid and host so the sweep can tell a crashed writer's leftovers from
a live writer's work in progress: ``<time_ns>.<pid>.<host>.<random>``.

Example::

    store = Store(run_dir)
    store.write_bytes("result.json", data, sha256=expected)
    store.write_stream("files/model.pt", chunks)
    with store.open_append("stdout.log") as log:
        log.write(b"epoch 1\\n")
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from ..errors import IntegrityError, WorkspaceError

__all__ = ["STALE_AFTER", "STORE_DIR", "Store", "discard_spool", "fsync_dir", "pid_alive"]

logger = logging.getLogger(__name__)

#: Name of the private directory holding ``tmp/`` and ``new/``.
STORE_DIR = ".store"

#: Seconds after which any temporary is considered abandoned, whoever wrote it.
STALE_AFTER = 3600.0

_CHUNK = 1024 * 1024

#: From this many files on, :meth:`Store.land_tree` makes a tree durable with one ``syncfs(2)`` of its file
#: system (Linux) rather than an fsync of each file and directory: 20,000 small files take 0.5 s instead of 5.
SYNCFS_FROM = 64

#: Threads that fsync a large tree's files where there is no ``syncfs`` (the file system batches their
#: journal commits).
_SYNC_THREADS = 8


def _host_token() -> str:
    """This host's name, reduced to characters safe in a file name and free of dots."""
    name = socket.gethostname() or "localhost"
    return "".join(c if c.isalnum() or c == "-" else "_" for c in name)[:64]


def pid_alive(pid: int) -> bool:
    """Tell whether a process with this pid exists on this host (a zombie counts as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return False
    from .procinfo import process_state  # /proc on Linux, ps elsewhere

    return process_state(pid) not in ("Z", "X")


def discard_spool(path: Path) -> None:
    """Remove a spool file and the folder made for it alone (a :meth:`Store.stage`, or a private temporary
    directory): a large value that streamed in as it arrived, once recorded or not wanted."""
    path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        path.parent.rmdir()


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries to disk, so a rename inside it survives a power loss."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - platforms that cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


class Store:
    """Atomic, hash-checked writes of whole files under one directory.

    One store serves one run directory (or any directory). It is safe to use from several threads and
    processes at once: every write has its own temporary, and the last rename wins.

    Attributes:
        root: The directory the names are relative to.
    """

    def __init__(self, root: Path) -> None:
        """Open the store, creating ``.store/tmp`` and ``.store/new``, and sweep stale temporaries.

        Args:
            root: The directory; created if missing.
        """
        self.root = Path(root).absolute()
        self._tmp = self.root / STORE_DIR / "tmp"
        self._new = self.root / STORE_DIR / "new"
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._new.mkdir(parents=True, exist_ok=True)
        self._host = _host_token()
        self.sweep()

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    # -- names -------------------------------------------------------------------------------------

    def path(self, name: str) -> Path:
        """The final path of ``name``, after checking that it stays inside :attr:`root`.

        Args:
            name: A relative POSIX path such as ``result.json`` or ``files/a/b.txt``.

        Raises:
            WorkspaceError: The name is empty, absolute, contains ``..`` or a backslash, points into
                ``.store/``, or resolves (through a symbolic link) outside the root.
        """
        target = self.root.joinpath(*self._parts(name))
        self._refuse_outside(name, target, self.root.resolve())
        return target

    @staticmethod
    def _refuse_outside(name: str, path: Path, root_real: Path) -> None:
        """Raise WorkspaceError unless ``path`` (what ``name`` leads to) resolves to ``root_real`` or below it."""
        real = path.resolve()
        if real != root_real and root_real not in real.parents:
            raise WorkspaceError(f"refusing file name {name!r}: it resolves to {real}, outside {root_real}")

    def _parts(self, name: str) -> list[str]:
        """The parts of ``name`` without ``.``, after checking them as :meth:`path` says (all but links)."""
        if not isinstance(name, str) or not name or "\x00" in name:
            raise WorkspaceError(f"refusing file name {name!r}: empty or not a string")
        if "\\" in name:
            raise WorkspaceError(f"refusing file name {name!r}: backslashes are not allowed")
        if name.startswith("/"):
            raise WorkspaceError(f"refusing file name {name!r}: absolute paths are not allowed")
        parts = [part for part in name.split("/") if part and part != "."]  # as PurePosixPath(name).parts
        if ".." in parts:
            raise WorkspaceError(f"refusing file name {name!r}: '..' would leave {self.root}")
        if not parts:
            raise WorkspaceError(f"refusing file name {name!r}: it names the store root itself")
        if parts[0] == STORE_DIR:
            raise WorkspaceError(f"refusing file name {name!r}: {STORE_DIR}/ is private to the store")
        return parts

    # -- writes ------------------------------------------------------------------------------------

    def write_bytes(self, name: str, data: bytes, *, sha256: str | None = None, sync: bool = True) -> Path:
        """Write ``data`` to ``name`` atomically.

        Args:
            name: Relative POSIX path under the root.
            data: The whole content.
            sha256: Expected hex digest; the write fails and leaves nothing if the content differs.
            sync: fsync the file and its directory (False: still atomic, and safe when the process is
                killed; only a crash of the machine itself may lose it or leave it empty).

        Returns:
            The final path.

        Raises:
            IntegrityError: The content does not match ``sha256``.
            WorkspaceError: The name is refused (see :meth:`path`).
        """
        return self.write_stream(name, (data,), sha256=sha256, sync=sync)

    def write_stream(self, name: str, chunks: Iterable[bytes], *, sha256: str | None = None,
                     sync: bool = True) -> Path:
        """Write the concatenated ``chunks`` to ``name`` atomically.

        The chunks are consumed once, hashed as they go; if the iterable raises, the temporary is
        removed and the exception propagates, leaving the final name untouched.

        Args:
            name: Relative POSIX path under the root.
            chunks: The content, in order.
            sha256: Expected hex digest, checked before anything is renamed.

        Returns:
            The final path.

        Raises:
            IntegrityError: The content does not match ``sha256``.
            WorkspaceError: The name is refused (see :meth:`path`), or the disk write failed.
        """
        target = self.path(name)
        tmp = self._tmp / self._unique()
        digest = hashlib.sha256()
        with self._disk(name):
            out = open(tmp, "xb")  # noqa: SIM115 - closed by the `with out:` below
        try:
            with out:
                for chunk in chunks:  # an error of the source propagates as it is
                    with self._disk(name):
                        if len(chunk) >= 4096 and not chunk[0] and chunk.count(0) == len(chunk):
                            out.seek(len(chunk), os.SEEK_CUR)  # a hole: a sparse file stays sparse
                        else:
                            out.write(chunk)
                    digest.update(chunk)
                with self._disk(name):
                    out.truncate()
                    out.flush()
                    if sync:
                        os.fsync(out.fileno())
            self._check(name, digest.hexdigest(), sha256)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return self._deliver(tmp, target, sync=sync)

    def write_file(self, name: str, source: Path, *, sha256: str | None = None, move: bool = False) -> Path:
        """Copy (or move) the file ``source`` to ``name`` atomically.

        Args:
            name: Relative POSIX path under the root.
            source: An existing local file.
            sha256: Expected hex digest of its content. With ``move``, a mismatch leaves ``source``
                where it was.
            move: Rename ``source`` instead of copying it (falls back to copy and delete across file
                systems).

        Returns:
            The final path.

        Raises:
            IntegrityError: The content does not match ``sha256``.
            WorkspaceError: The name is refused, or ``source`` cannot be read.
        """
        source = Path(source)
        if move:
            return self._move_in(name, source, sha256=sha256)
        try:
            with open(source, "rb") as src:
                return self.write_stream(name, iter(lambda: src.read(_CHUNK), b""), sha256=sha256)
        except OSError as exc:
            raise WorkspaceError(f"cannot read {source}: {exc.strerror or exc}") from exc

    def _move_in(self, name: str, source: Path, *, sha256: str | None) -> Path:
        """:meth:`write_file` with ``move``: rename ``source`` through ``tmp``, or copy it and delete it
        when it lies on another file system."""
        target = self.path(name)
        if sha256 is not None:
            try:
                actual = _file_sha256(source)
            except OSError as exc:
                raise WorkspaceError(f"cannot read {source}: {exc.strerror or exc}") from exc
            self._check(name, actual, sha256)
        tmp = self._tmp / self._unique()
        try:
            os.rename(source, tmp)
        except OSError as exc:
            if exc.errno != errno.EXDEV:  # another file system: copy instead
                raise WorkspaceError(f"cannot move {source} into {self.root}: {exc.strerror or exc}") from exc
            path = self.write_file(name, source, sha256=sha256)
            source.unlink()
            return path
        try:
            with self._disk(name), open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return self._deliver(tmp, target)

    def stage(self) -> Path:
        """A new, empty directory under ``.store/tmp`` (its mode as the umask says: it may become the landed
        folder itself): write a tree in it for :meth:`land_tree`. Swept like any temporary if its writer dies."""
        staged = self._tmp / self._unique()
        with self._disk(STORE_DIR + "/tmp"):
            staged.mkdir()
        return staged

    def land_tree(self, staged: Path, into: str, files: Sequence[str]) -> list[Path]:
        """Move ``files`` (relative POSIX paths of regular files, checked by the caller) from ``staged`` (made
        by :meth:`stage`) to the same paths under the folder ``into``, all of them or none.

        The files are made durable first, together (see :data:`SYNCFS_FROM`). When ``into`` does not exist,
        ``staged`` becomes it in one rename: the whole tree appears at once. Otherwise each file is renamed to
        its name (replacing a file of that name), each directory synced once at the end; if one cannot be,
        those already moved are removed. ``staged`` is gone afterwards either way.

        Returns:
            The final paths, in the order of ``files``.

        Raises:
            WorkspaceError: A name is refused (see :meth:`path`) or a disk operation failed.
        """
        try:
            depth = len(self._parts(into))
            parts = [self._parts(f"{into}/{name}")[depth:] for name in files]
            folder = self.path(into)
            with self._disk(into):
                _sync_tree(staged, files)
                if not os.path.lexists(folder):
                    created = _makedirs(folder.parent)
                    os.rename(staged, folder)
                    for directory in [folder.parent, *(parent.parent for parent in created)]:
                        fsync_dir(directory)
                    return [folder.joinpath(*names) for names in parts]
            return self._merge(staged, into, folder, parts)
        finally:
            if staged.exists():
                shutil.rmtree(staged, ignore_errors=True)

    def _merge(self, staged: Path, into: str, folder: Path, parts: list[list[str]]) -> list[Path]:
        """:meth:`land_tree` into a folder that exists: file by file, each directory checked once."""
        root_real = self.root.resolve()
        checked: dict[Path, None] = {}
        landed: list[Path] = []
        try:
            for names in parts:
                target = folder.joinpath(*names)
                if target.parent not in checked:  # resolved before any folder is made (through a link)
                    self._refuse_outside("/".join([into, *names]), target.parent, root_real)
                    with self._disk(into):
                        _makedirs(target.parent)
                    checked[target.parent] = None
                with self._disk("/".join([into, *names])):
                    os.replace(staged.joinpath(*names), target)
                landed.append(target)
        except BaseException:
            for path in landed:
                with contextlib.suppress(OSError):
                    path.unlink()
            raise
        for directory in checked:
            fsync_dir(directory)
        return landed

    def open_append(self, name: str) -> BinaryIO:
        """Open ``name`` for appending, unbuffered: every ``write`` reaches the file at once.

        This is for live logs, the one kind of file that grows in place so that ``rx logs -f`` can
        follow it while the run is going.

        Raises:
            WorkspaceError: The name is refused (see :meth:`path`).
        """
        target = self.path(name)
        with self._disk(name):
            target.parent.mkdir(parents=True, exist_ok=True)
            return open(target, "ab", buffering=0)

    # -- maintenance -------------------------------------------------------------------------------

    def sweep(self) -> list[Path]:
        """Remove temporaries left by writers that died, and any older than :data:`STALE_AFTER`.

        A temporary of a live writer on this host is left alone, so a store can be opened while another
        process is writing into the same directory.

        Returns:
            The paths removed.
        """
        removed: list[Path] = []
        now = time.time()
        for folder in (self._tmp, self._new):
            try:
                entries = list(folder.iterdir())
            except OSError:
                continue
            for entry in entries:
                if self._is_stale(entry, now):
                    with contextlib.suppress(OSError):
                        if entry.is_dir() and not entry.is_symlink():
                            shutil.rmtree(entry)
                        else:
                            entry.unlink()
                        removed.append(entry)
        if removed:
            logger.debug("swept %d stale temporaries under %s", len(removed), self.root / STORE_DIR)
        return removed

    def temporaries(self) -> list[Path]:
        """The files currently under ``.store/tmp`` and ``.store/new`` (in-flight or stale)."""
        found: list[Path] = []
        for folder in (self._tmp, self._new):
            with contextlib.suppress(OSError):
                found.extend(sorted(folder.iterdir()))
        return found

    # -- internals ---------------------------------------------------------------------------------

    def _unique(self) -> str:
        return f"{time.time_ns()}.{os.getpid()}.{self._host}.{secrets.token_hex(6)}"

    def _is_stale(self, entry: Path, now: float) -> bool:
        try:
            age = now - entry.lstat().st_mtime
        except OSError:
            return False
        if age > STALE_AFTER:
            return True
        parts = entry.name.split(".")
        if len(parts) != 4 or not parts[1].isdigit():
            return False  # not ours to judge before it is old
        pid, host = int(parts[1]), parts[2]
        return host == self._host and not pid_alive(pid)

    @staticmethod
    def _check(name: str, actual: str, expected: str | None) -> None:
        if expected is not None and actual.lower() != expected.lower():
            raise IntegrityError(f"{name}: sha256 mismatch, expected {expected}, got {actual}",
                                 hint="the file was damaged in transit; nothing was written")

    @contextlib.contextmanager
    def _disk(self, name: str) -> Iterator[None]:
        """Turn a failure of our own file operations into a WorkspaceError naming the file."""
        try:
            yield
        except OSError as exc:
            raise WorkspaceError(f"cannot write {name} under {self.root}: {exc.strerror or exc}") from exc

    def _deliver(self, tmp: Path, target: Path, *, sync: bool = True) -> Path:
        if not sync:  # no durability promised: one rename, straight to the final name (still atomic)
            try:
                os.replace(tmp, target)
                return target
            except FileNotFoundError:
                pass  # its directory is missing: the full path below creates it
        staged = self._new / tmp.name
        try:
            with self._disk(target.relative_to(self.root).as_posix()):
                os.rename(tmp, staged)
                created = _makedirs(target.parent)
                os.replace(staged, target)
        except BaseException:
            for leftover in (tmp, staged):
                with contextlib.suppress(OSError):
                    leftover.unlink()
            raise
        if sync or created:
            fsync_dir(target.parent)
        for parent in created:
            fsync_dir(parent.parent)
        return target


def _sync_tree(staged: Path, files: Sequence[str]) -> None:
    """Make the files of ``staged`` and its directories durable: one ``syncfs`` of their file system for a
    large tree on Linux, else an fsync of each (in threads for a large tree)."""
    if len(files) >= SYNCFS_FROM and _syncfs(staged):
        return
    paths = [staged / name for name in files]
    folders = {staged, *(path.parent for path in paths)}

    def sync(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    if len(paths) >= SYNCFS_FROM:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(_SYNC_THREADS) as pool:
            for _ in pool.map(sync, paths):
                pass
    else:
        for path in paths:
            sync(path)
    for folder in folders:
        fsync_dir(folder)


def _syncfs(path: Path) -> bool:
    """``syncfs(2)`` the file system holding ``path`` (Linux); False where there is none to call.

    Raises:
        OSError: The file system reported a write error (a full disk, an I/O error).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        syncfs = ctypes.CDLL(None, use_errno=True).syncfs
    except (ImportError, OSError, AttributeError):  # pragma: no cover - a libc without it
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        if syncfs(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), str(path))
    finally:
        os.close(fd)
    return True


def _makedirs(path: Path) -> list[Path]:
    """Create ``path`` and its missing parents; return the ones created, outermost first."""
    missing: list[Path] = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    path.mkdir(parents=True, exist_ok=True)
    return list(reversed(missing))


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()

