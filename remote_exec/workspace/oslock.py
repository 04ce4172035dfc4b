"""A lock between processes: ``flock`` on a lock file, released by the OS when its holder dies.

The workspace takes one on every state rewrite, so it sits on the path of every ``rx`` command; this is the
whole of what it needs (the ``filelock`` package, which does the same on POSIX, costs ~10 ms to import, a
tenth of a second ``rx run``). POSIX only, as the coordinator is (Linux and macOS). Reentrant per object;
threads are kept apart by the caller (:class:`~remote_exec.workspace.state.StateFile` holds a per-path
``threading.RLock`` around it).
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path

__all__ = ["LockTimeout", "ProcessLock"]


class LockTimeout(Exception):
    """Another process held the lock longer than the timeout."""


class ProcessLock:
    """An exclusive advisory lock on ``path`` (created when missing, never removed: removing a lock file
    another process has open would let a third one lock a new file of the same name)."""

    def __init__(self, path: Path, *, poll: float = 0.002) -> None:
        self.path = Path(path)
        self.poll = poll
        self._fd: int | None = None
        self._depth = 0

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, timeout: float) -> None:
        """Take the lock, waiting up to ``timeout`` seconds (0: do not wait).

        Raises:
            LockTimeout: Another process holds it still.
            OSError: The lock file cannot be opened.
        """
        if self._fd is not None:
            self._depth += 1
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = time.monotonic() + timeout
        delay = self.poll
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                        raise
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LockTimeout(f"{self.path} is locked by another process")
                time.sleep(min(delay, left))
                delay = min(delay * 2, 0.05)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._depth = 1

    def release(self) -> None:
        """Let go (the outermost release of a reentrant hold unlocks)."""
        if self._fd is None:
            return
        self._depth -= 1
        if self._depth > 0:
            return
        fd, self._fd = self._fd, None
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
