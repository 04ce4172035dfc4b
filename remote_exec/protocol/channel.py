"""The coordinator's end of one runner: its process, the one frame-reading loop, and the liveness watcher.

A :class:`Channel` wraps the process a launcher started (stdin carries frames to the runner, stdout
frames from it, stderr the runner's own diagnostics). A process-per-call runner serves one call; a
persistent worker (``keep_warm``) serves many, one at a time (its pool lends it to one call at a time).
:meth:`Channel.pump` is the only loop that reads frames; :meth:`Channel.watch` starts the one watcher
thread that, about every second, lets the current call send its heartbeat and give up a silent link or a
call past its deadline.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from ..backends.base import Backend, Process
from . import wire

__all__ = ["Channel", "Flag", "Watched", "drain_stderr", "reap"]

logger = logging.getLogger(__name__)


class Flag:
    """A flag one thread sets and another polls (an Event without its lock and condition: nobody waits)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = False

    def set(self) -> None:
        self.value = True

    def is_set(self) -> bool:
        return self.value


class Watched(Protocol):
    """What the watcher thread polices: the call in progress on a channel."""

    def check(self, deadline: float | None) -> None:
        """Called about every second: send a heartbeat, or give up the link."""


class Channel:
    """One runner process on a host: its frames, its stderr and its liveness clock.

    Attributes:
        backend: The connection the runner was started over.
        process: The runner's process.
        reader: Decodes the frames of its stdout.
        pending: Bytes read past the bootstrap's handshake, not yet fed to :attr:`reader`.
        uploaded: True when starting it sent the archive.
        last_read: ``time.monotonic()`` of the last bytes from the runner (stdout or stderr).
        broken: The channel must not take another call.
        closed: Set when the channel is done; the watcher thread ends.
        placement: A pool slot's worker: its ``worker`` event (the slot, the GPUs it holds); else None.
        call_sent: The call's frames went right behind the runner's command (see
            :func:`.bootstrap.start_runner`).
        prompt: The bootstrap itself answered (no replaced login shell), with the archive in place.
    """

    def __init__(self, backend: Backend, process: Process, rest: bytes, uploaded: bool) -> None:
        self.backend = backend
        self.process = process
        self.reader = wire.FrameReader()
        self.pending = rest
        self.uploaded = uploaded
        self.stderr = bytearray()
        self.last_read = time.monotonic()
        self.write_lock = threading.Lock()
        self.broken = False
        self.current: tuple[Watched, float | None] | None = None
        self.closed = threading.Event()
        self.placement: dict[str, Any] | None = None
        self.call_sent = False
        self.prompt = False
        self._keys = b""
        self._watcher: threading.Thread | None = None
        self.stderr_reader = threading.Thread(target=self._pump_stderr, daemon=True)
        self.stderr_reader.start()

    def _pump_stderr(self) -> None:
        while chunk := self.process.read_stderr(65536):
            self.stderr += chunk
            self.last_read = time.monotonic()

    def call_key(self) -> bytes:
        """A fresh random key for the next call's HMAC (drawn from the OS 8 KiB at a time: a persistent
        worker's small calls do not pay a getrandom each)."""
        if len(self._keys) < 32:
            self._keys = os.urandom(8192)
        key, self._keys = self._keys[:32], self._keys[32:]
        return key

    def send(self, kind: bytes, payload: bytes = b"") -> None:
        """Write one frame to the runner (a large payload after its header, not copied behind it)."""
        with self.write_lock:
            if len(payload) < 65536:
                self.process.write_stdin(wire.encode(kind, payload))
            else:
                self.process.write_stdin(wire.HEADER.pack(kind, len(payload)))
                self.process.write_stdin(payload)

    def pump(self, handle: Callable[[bytes, bytes], bool], *, size: int = 1 << 20) -> bool:
        """Feed the runner's frames to ``handle`` until it returns True (frames after that one stay
        buffered for the next call); return False if the stream ended first."""
        data, self.pending = self.pending, b""
        while True:
            if data:
                self.last_read = time.monotonic()
            for kind, payload in self.reader.feed(data):
                if handle(kind, payload):
                    return True
            data = self.process.read_stdout(size)
            if not data:
                return False

    def stderr_tail(self) -> str:
        """The runner's last stderr line (its own diagnostics), once the stream has ended."""
        self.stderr_reader.join(2)
        text = bytes(self.stderr).decode("utf-8", "replace").strip()
        return text.splitlines()[-1] if text else ""

    def watch(self, call: Watched | None, deadline: float | None = None) -> None:
        """Watch ``call`` (None: no call is running) until ``deadline``.

        One watcher thread per channel, started with its first call, serves every call of a persistent
        worker: a call starts no thread of its own.
        """
        self.current = None if call is None else (call, deadline)
        if call is not None and self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="rx-watch", daemon=True)
            self._watcher.start()

    def _watch(self) -> None:
        while not self.closed.wait(1.0):
            current = self.current
            if current is not None:
                current[0].check(current[1])

    def reap_later(self) -> None:
        """Collect the runner's exit in the background (it cleaned up before its last frame)."""
        threading.Thread(target=reap, args=(self.process, self.stderr_reader), daemon=True).start()

    def close(self) -> None:
        """Ask a worker to quit and drop the channel."""
        self.broken = True
        self.closed.set()
        try:
            self.send(b"Q")
        except Exception:
            pass
        reap(self.process, self.stderr_reader)


def reap(process: Process, stderr_reader: threading.Thread) -> None:
    """Collect a finished runner's exit (or end it if it lingers), then release its pipes."""
    try:
        process.close_stdin()
        if process.wait(10) is None:
            process.kill()
        stderr_reader.join(10)
        if not stderr_reader.is_alive():
            process.kill()  # the process has ended: this only closes the pipes nobody reads any more
            while process.read_stdout(65536):  # to its end, so the backend closes that pipe too
                pass
    except Exception:
        logger.debug("reaping the runner failed", exc_info=True)


def drain_stderr(process: Process, seconds: float = 2.0) -> bytes:
    """What the process still writes to stderr, for at most ``seconds``."""
    parts = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        chunk = process.read_stderr(65536)
        if not chunk:
            break
        parts.append(chunk)
    return b"".join(parts)
