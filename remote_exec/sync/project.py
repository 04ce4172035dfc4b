"""A project on the local disk, scanned into a :class:`~.tree.Tree` as cheaply as its changes allow.

A :class:`Project` keeps its file list while the directories it came from are unchanged, and a
:class:`~.statcache.StatCache` of digests: an unchanged project costs a list (git's, or the walk it remembers),
one ``lstat`` per file and the tree hash. The coordinator keeps one per root for the process's life.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import SyncError
from ..protocol import wire
from .listing import Listing, list_files, submodule_files
from .rules import always_excluded_dir, always_excluded_file
from .statcache import StatCache, hash_files, stat_key
from .tree import Tree, TreeFile

__all__ = ["LISTING_RECHECK", "Project", "ProjectSpec"]

logger = logging.getLogger(__name__)

#: Seconds git's file list is reused while the directories it lists are unchanged (a new file in a
#: directory that held nothing git listed shows after this; a changed file shows at once).
LISTING_RECHECK = 1.0
#: From this many paths, a scan looks at them in two threads.
_THREADED = 2000


@dataclass(frozen=True)
class ProjectSpec:
    """Which project, and how its tree is made.

    Attributes:
        root: The project root (resolved).
        include: gitignore-syntax patterns of ignored paths that travel nevertheless.
        follow_symlinks: Ship what a symlink leading out of the tree points to (else such a link is refused).
        workspace: rx's workspace directory (never travels when it is inside the root).
        private: Other directories that never travel when they are inside the root (rx's cache, the home
            directory).
        always: Relative paths that travel whatever ignores them (the script being run).
    """

    root: Path
    include: tuple[str, ...] = ()
    follow_symlinks: bool = False
    workspace: Path | None = None
    always: tuple[str, ...] = ()
    private: tuple[Path, ...] = ()

    @property
    def outside(self) -> tuple[str, ...]:
        """rx's workspace and the other private directories, relative to the root, when they are inside."""
        found = []
        for folder in (self.workspace, *self.private):
            if folder is None:
                continue
            try:
                relative = Path(os.path.abspath(folder)).relative_to(self.root)
            except ValueError:
                continue
            if relative.parts:
                found.append(relative.as_posix())
        return tuple(found)


class _Scan:
    """One scan's findings: entries so far, files to hash, symlinks leading out."""

    def __init__(self, spec: ProjectSpec, cache: StatCache) -> None:
        self.spec = spec
        self.root = str(spec.root)
        self.cache = cache
        self.files: dict[str, tuple[os.stat_result, str, bytes | None]] = {}
        self.links: list[TreeFile] = []
        self.outside: list[tuple[str, str]] = []
        self.followed: list[tuple[str, str]] = []

    def add_all(self, paths: list[str]) -> None:
        """Look at each path: in two threads for a large project (``lstat`` releases the GIL: half the time),
        the common case (a regular file whose digest is cached) inline: this runs for every file of the
        project on every scan."""
        if len(paths) < _THREADED:
            others = self._regular(paths)
        else:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=2, thread_name_prefix="rx-scan") as pool:
                halves = list(pool.map(self._regular, (paths[:len(paths) // 2], paths[len(paths) // 2:])))
            others = halves[0] + halves[1]
        for relative, full, st in others:
            self.add(relative, full, st)

    def _regular(self, paths: list[str]) -> list[tuple[str, str, os.stat_result | None]]:
        """Record the regular files of ``paths``; return the other ones (symlinks, directories)."""
        root, files, lookup, is_regular = self.root, self.files, self.cache.lookup, stat.S_ISREG
        others: list[tuple[str, str, os.stat_result | None]] = []
        for relative in paths:
            full = f"{root}/{relative}"
            try:
                st = os.lstat(full)
            except OSError:  # listed by git's index, deleted since
                continue
            if is_regular(st.st_mode):
                files[relative] = (st, full, lookup(relative, (st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                                                               st.st_ino, st.st_mode)))
            else:
                others.append((relative, full, st))
        return others

    def add(self, relative: str, full: str | None = None, st: os.stat_result | None = None) -> None:
        full = full or f"{self.root}/{relative}"
        if st is None:
            try:
                st = os.lstat(full)
            except OSError:
                return
        if stat.S_ISREG(st.st_mode):
            self._file(relative, full, st)
        elif stat.S_ISLNK(st.st_mode):
            self._link(relative, full)
        elif stat.S_ISDIR(st.st_mode):  # a git submodule: its own git's files
            for inner in submodule_files(self.spec.root, relative):
                self.add(inner)

    def _file(self, relative: str, path: str, st: os.stat_result) -> None:
        self.files[relative] = (st, path, self.cache.lookup(relative, stat_key(st)))

    def _inside(self, path: str) -> bool:
        return path == self.root or path.startswith(self.root + os.sep)

    def _link(self, relative: str, full: str) -> None:
        try:
            target = os.readlink(full)
        except OSError:
            return
        folder = os.path.dirname(full)
        lexical = os.path.normpath(os.path.join(folder, target))
        if self._inside(lexical):
            link = os.path.relpath(lexical, folder) if os.path.isabs(target) else target
        else:
            real = os.path.realpath(full)
            if not self._inside(real) or not os.path.lexists(real):
                self._leading_out(relative, target, real)
                return
            link = os.path.relpath(real, os.path.realpath(folder))
        data = os.fsencode(link)
        self.links.append(TreeFile(relative, wire.LINK_MODE, len(data), hashlib.sha256(data).digest(), link))

    def _leading_out(self, relative: str, target: str, real: str) -> None:
        if not self.spec.follow_symlinks:
            self.outside.append((relative, target))
            return
        if os.path.isfile(real):
            self.followed.append((relative, target))
            self._file(relative, real, os.stat(real))
        elif os.path.isdir(real):
            self.followed.append((relative, target))
            for directory, dirnames, filenames in os.walk(real):
                dirnames[:] = sorted(name for name in dirnames if not always_excluded_dir(name))
                for name in sorted(filenames):
                    path = os.path.join(directory, name)
                    if always_excluded_file(name) or not os.path.isfile(path) or os.path.islink(path):
                        continue
                    inner = os.path.relpath(path, real).replace(os.sep, "/")
                    self._file(f"{relative}/{inner}", path, os.stat(path))

    def refuse_links_out(self) -> None:
        if not self.outside:
            return
        shown = "; ".join(f"{path} -> {target}" for path, target in self.outside[:3])
        more = f" (and {len(self.outside) - 3} more)" if len(self.outside) > 3 else ""
        raise SyncError(f"symlinks in {self.root} lead out of the project: {shown}{more}",
                        hint="--follow-symlinks ships what they point to; .rxignore leaves them out")

    def entries(self) -> tuple[TreeFile, ...]:
        jobs = [(relative, path, st.st_size) for relative, (st, path, digest) in self.files.items() if digest is None]
        try:
            hashed = hash_files(jobs, self.cache)
        except OSError as exc:
            name = str(exc.filename or "a file")
            if name.startswith(self.root + os.sep):
                name = name[len(self.root) + 1:]
            raise SyncError(f"cannot read {name} of the project {self.root}: {exc.strerror or exc}",
                            hint="fix its permissions, or leave it out with .rxignore") from exc
        found = list(self.links)
        executable = stat.S_IXUSR
        for relative, (st, path, digest) in self.files.items():
            if digest is None:
                digest, st = hashed[relative]
            found.append(TreeFile(relative, 0o100755 if st.st_mode & executable else 0o100644, st.st_size, digest,
                                  "", path, (st.st_mtime_ns, st.st_ctime_ns, st.st_ino)))
        found.sort()
        return tuple(found)


class Project:
    """One project root, scanned on demand; thread-safe (one scan at a time).

    Args:
        spec: The root and how its tree is made.
        cache_dir: Where the stat cache of the project is kept (None: in memory only).
    """

    def __init__(self, spec: ProjectSpec, cache_dir: Path | None = None) -> None:
        self.spec = spec
        key = hashlib.sha256(os.fsencode(str(spec.root))).hexdigest()[:32]
        self.cache = StatCache(cache_dir / "projects" / f"{key}.idx" if cache_dir is not None else None)
        self._lock = threading.Lock()
        self._listing: Listing | None = None
        self._listed_at = 0.0
        self._tree: Tree | None = None

    def listing(self) -> Listing:
        """What travels, by path (reused while the directories it came from are unchanged)."""
        now = time.monotonic()
        known = self._listing
        if known is not None and (known.how == "walk" or now - self._listed_at < LISTING_RECHECK) \
                and known.still_valid(self.spec.root):
            return known
        listing = list_files(self.spec.root, include=self.spec.include, outside=self.spec.outside)
        self._listing, self._listed_at = listing, now
        return listing

    def scan(self) -> Tree:
        """The tree as it is now.

        Raises:
            SyncError: A symlink leads out of the tree (and is not to be followed), or a file cannot be read.
        """
        with self._lock:
            listing = self.listing()
            paths = list(listing.paths)
            known = set(paths)
            paths.extend(path for path in self.spec.always if path not in known)
            scan = _Scan(self.spec, self.cache)
            scan.add_all(paths)
            scan.refuse_links_out()
            entries = scan.entries()
            self.cache.keep_only(set(scan.files))
            self.cache.save()
            tree = self._tree
            if tree is None or tree.entries != entries:
                tree = self._tree = Tree(self.spec.root, entries, listing.how, tuple(scan.followed))
            return tree
