"""The task's stdin, forwarded from the coordinator (``rx run`` with a pipe or a file on its stdin).

The coordinator sends the bytes as ``I`` frames and their end as an ``i`` frame (see
:mod:`remote_exec.protocol.wire`); :class:`StdinFeed` writes them into the task's stdin pipe as fast as
the task reads, never blocking the runner's loop, and tells the coordinator with ``W`` frames how many
bytes the task has taken, so that the coordinator keeps at most a window of bytes in flight. When the
task closes its stdin or ends, what is left is dropped (and counted as taken: the coordinator never
waits for a reader that is gone).
"""

from __future__ import annotations

import errno
import os
import select

TYPE_CHECKING = False  # typing is not imported at run time: the runner's start-up is on every call's path
if TYPE_CHECKING:
    from collections.abc import Iterable

    from .channel import Poller, Sink

__all__ = ["ACK_EVERY", "StdinFeed"]

#: Bytes the task takes between two ``W`` frames (at least; one also goes when all it was sent is taken).
ACK_EVERY = 1 << 16
#: The poller's name for the stdin pipe's write end (waited on only while bytes wait for room in it).
TAG = b"w"


class StdinFeed:
    """Writes ``I`` frames into the task's stdin pipe (non-blocking) and acknowledges what it took.

    Attributes:
        fd: The write end of the task's stdin pipe (None once closed).
        taken: Bytes written into the pipe (or dropped for a reader that is gone) so far.
    """

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self.fd: int | None = fd
        self.pending = bytearray()
        self.eof = False
        self.taken = 0
        self.acked = 0
        self.waiting = False

    def take(self, frames: Iterable[tuple[bytes, bytes]], poller: Poller, out: Sink) -> None:
        """Take the ``I`` and ``i`` frames among ``frames``; write what the pipe has room for."""
        for kind, payload in frames:
            if kind == b"I":
                if self.fd is None:
                    self.taken += len(payload)  # nobody reads any more: taken, so the sender goes on
                else:
                    self.pending += payload
            elif kind == b"i":
                self.eof = True
        self.flush(poller, out)

    def flush(self, poller: Poller, out: Sink) -> None:
        """Write what is pending while the pipe has room; wait for room (poller) when it has none; close the
        pipe after the end of stdin; send a ``W`` frame when enough was taken."""
        while self.pending and self.fd is not None:
            try:
                written = os.write(self.fd, self.pending[:65536])
            except BlockingIOError:
                break
            except OSError as exc:  # EPIPE: the task closed its stdin, or ended
                if exc.errno not in (errno.EPIPE, errno.EBADF):
                    raise
                written = len(self.pending)
                self._close(poller)
            del self.pending[:written]
            self.taken += written
        wait = bool(self.pending) and self.fd is not None
        if wait != self.waiting and self.fd is not None:
            if wait:
                poller.register(self.fd, TAG, select.POLLOUT)
            else:
                poller.unregister(self.fd)
            self.waiting = wait
        if self.eof and not self.pending:
            self._close(poller)
        if self.taken - self.acked >= ACK_EVERY or (self.taken > self.acked and not self.pending):
            out.send(b"W", str(self.taken).encode())
            self.acked = self.taken

    def _close(self, poller: Poller) -> None:
        if self.fd is None:
            return
        if self.waiting:
            poller.unregister(self.fd)
            self.waiting = False
        try:
            os.close(self.fd)
        except OSError:
            pass
        self.fd = None

    def close(self) -> None:
        """Close the pipe (the task ended)."""
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None
