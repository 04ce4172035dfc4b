"""A file's sha256 by its stat data, as git's index keeps it: an unchanged tree is checked with ``lstat`` calls.

One cache per project, on the local disk (``<cache>/projects/<key>.idx``, marshal). An entry holds a file's
size, ``st_mtime_ns``, ``st_ctime_ns``, inode and mode, its digest and when the digest was computed. It is
trusted while all four stat fields are the same, and only if the file had not been touched for
:data:`RACY_SECONDS` when it was hashed: a write within the file system's timestamp granularity of the
hashing could otherwise leave the stat data unchanged with new content (git's "racily clean" entries).
"""

from __future__ import annotations

import hashlib
import logging
import marshal
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["RACY_SECONDS", "StatCache", "hash_file", "hash_files", "stat_key"]

logger = logging.getLogger(__name__)

#: A file modified less than this before it was hashed is hashed again next time.
RACY_SECONDS = 2.0
_VERSION = 1
#: Hash in threads when this many bytes need hashing (hashlib releases the GIL on large buffers).
_PARALLEL_BYTES = 8 << 20

StatKey = tuple[int, int, int, int, int]


def stat_key(st: os.stat_result) -> StatKey:
    """(size, mtime_ns, ctime_ns, inode, mode): what must stay the same for a cached digest to hold."""
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_mode)


class StatCache:
    """Digests of a project's files by their stat data; thread-safe; saved atomically.

    Args:
        path: The cache file (None: kept in memory only).
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[StatKey, bytes, int]] = {}
        self._dirty = False
        self.racy_ns = int(RACY_SECONDS * 1e9)
        if path is not None:
            self._load(path)

    def _load(self, path: Path) -> None:
        try:
            version, entries = marshal.loads(path.read_bytes())
        except (OSError, EOFError, ValueError, TypeError):
            return
        if version == _VERSION and isinstance(entries, dict):
            self._entries = entries

    def lookup(self, relative: str, key: StatKey) -> bytes | None:
        """The cached digest of ``relative`` if its stat data is unchanged and it was not racy."""
        entry = self._entries.get(relative)
        if entry is None or entry[0] != key:
            return None
        if max(key[1], key[2]) >= entry[2] - self.racy_ns:
            return None
        return entry[1]

    def store(self, relative: str, key: StatKey, digest: bytes, verified_ns: int) -> None:
        """Remember ``digest`` of ``relative`` read at ``verified_ns`` (wall clock, before reading)."""
        with self._lock:
            self._entries[relative] = (key, digest, verified_ns)
            self._dirty = True

    def keep_only(self, paths: set[str]) -> None:
        """Forget the entries of files no longer in the project."""
        with self._lock:
            gone = [path for path in self._entries if path not in paths]
            for path in gone:
                del self._entries[path]
            self._dirty = self._dirty or bool(gone)

    def save(self) -> None:
        """Write the cache if it changed (a temporary, then a rename: a reader never sees half of it)."""
        with self._lock:
            if self.path is None or not self._dirty:
                return
            data = marshal.dumps((_VERSION, self._entries), 4)
            self._dirty = False
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_bytes(data)
            os.replace(temporary, self.path)
        except OSError as exc:  # a cache: losing it costs a re-hash, nothing else
            logger.debug("cannot save the stat cache %s: %s", self.path, exc)
            temporary.unlink(missing_ok=True)


def hash_file(path: Path | str) -> tuple[bytes, os.stat_result, int]:
    """(sha256 digest, the stat data it belongs to, wall time before reading) of the file at ``path``.

    A file that changes while it is read is read again (three times at most, then its last digest stands
    and the stat data taken after it, so the next scan hashes it again).
    """
    for _ in range(3):
        verified_ns = time.time_ns()
        before = os.stat(path)
        digest = hashlib.sha256()
        with open(path, "rb") as stream:
            if before.st_size <= (1 << 20):
                digest.update(stream.read())
            else:
                while block := stream.read(1 << 20):
                    digest.update(block)
        after = os.stat(path)
        if stat_key(after) == stat_key(before):
            return digest.digest(), after, verified_ns
    return digest.digest(), after, 0


def hash_files(jobs: Sequence[tuple[str, str, int]], cache: StatCache) -> dict[str, tuple[bytes, os.stat_result]]:
    """Hash each (relative path, file, size) of ``jobs`` (in threads when there is much to read); record
    the digests in ``cache``; return relative path -> (digest, stat data).

    Raises:
        OSError: A file could not be read.
    """
    results: dict[str, tuple[bytes, os.stat_result]] = {}

    def one(job: tuple[str, str, int]) -> None:
        relative, path, _ = job
        digest, st, verified_ns = hash_file(path)
        results[relative] = (digest, st)
        cache.store(relative, stat_key(st), digest, verified_ns)

    total = sum(size for _, _, size in jobs)
    if len(jobs) > 1 and total >= _PARALLEL_BYTES:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1, len(jobs)),
                                thread_name_prefix="rx-hash") as pool:
            list(pool.map(one, jobs))
    else:
        for job in jobs:
            one(job)
    return results
