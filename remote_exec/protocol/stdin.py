"""Forwarding ``rx run``'s stdin to the task: ``I`` frames as it comes, ``i`` at its end, flow-controlled.

A :class:`StdinPump` thread reads the local stdin (a pipe or a file: ``echo hi | rx run ...``) and sends
what it reads as ``I`` frames; at end of file it sends ``i``, and the task sees the end of its stdin. The
runner answers with ``W`` frames saying how many bytes the task has taken (see
:mod:`remote_exec.runner.stdin`); the pump keeps at most :data:`WINDOW` bytes in flight beyond that, so a
task that reads slowly (or never) holds up only the pump, never the channel's heartbeats or a cancel.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import BinaryIO

from . import wire
from .channel import Channel

__all__ = ["WINDOW", "StdinPump"]

logger = logging.getLogger(__name__)

#: Bytes of stdin in flight (sent, not yet taken by the task) at most.
WINDOW = 1 << 20


class StdinPump:
    """Sends ``source`` to the task on ``channel``; :meth:`taken` hears the runner's ``W`` frames."""

    def __init__(self, channel: Channel, source: BinaryIO) -> None:
        self.channel = channel
        self.source = source
        self.sent = 0
        self.acked = 0
        self.stopped = False
        self._room = threading.Condition()
        self._thread = threading.Thread(target=self._pump, name="rx-stdin", daemon=True)

    def start(self) -> StdinPump:
        """Start sending (in a daemon thread: a stdin that never ends does not keep rx alive)."""
        self._thread.start()
        return self

    def taken(self, payload: bytes) -> None:
        """A ``W`` frame: the task has taken this many bytes in all."""
        try:
            count = int(payload)
        except ValueError:
            return
        with self._room:
            self.acked = max(self.acked, count)
            self._room.notify_all()

    def stop(self) -> None:
        """The call is over: send nothing more."""
        with self._room:
            self.stopped = True
            self._room.notify_all()

    def _read(self) -> bytes:
        try:
            return os.read(self.source.fileno(), 1 << 16)
        except (AttributeError, OSError, ValueError):  # not a file descriptor: read the object
            read = getattr(self.source, "read1", None) or self.source.read
            return bytes(read(1 << 16))

    def _pump(self) -> None:
        try:
            while True:
                chunk = self._read()
                with self._room:
                    while not self.stopped and self.sent - self.acked >= WINDOW:
                        self._room.wait()
                    if self.stopped:
                        return
                    self.sent += len(chunk)
                if not chunk:
                    self.channel.send(b"i")
                    return
                for start in range(0, len(chunk), wire.MAX_FRAME):
                    self.channel.send(b"I", chunk[start:start + wire.MAX_FRAME])
        except Exception:  # the call ended, or the link: the call reports that, not this thread
            logger.debug("forwarding stdin stopped", exc_info=True)
