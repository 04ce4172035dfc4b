"""The runner's end of the channel: the call's frames in (G, S, s), frames out (:class:`Out`, signed with the
per-call HMAC), and the poller the loops wait on."""

from __future__ import annotations

import errno
import os
import select
import time

from ..protocol import wire

TYPE_CHECKING = False  # typing is not imported at run time: the runner's start-up is on every call's path
if TYPE_CHECKING:
    from typing import Any, Protocol

    class Sink(Protocol):
        """Where a watched task's frames go: :class:`Out`, or a detached run's files."""

        last: float

        def send(self, kind: bytes, payload: bytes = b"", *, signed: bool = False) -> None:
            """Send one frame."""

        def event(self, fields: dict[str, Any]) -> None:
            """Send a progress event."""

__all__ = ["EXIT_RUNNER_FAILURE", "CoordinatorGone", "Out", "Poller", "read_answer", "read_call"]

#: The runner's exit status when it failed (not the task); the coordinator reads its stderr's last line.
EXIT_RUNNER_FAILURE = 70


class CoordinatorGone(Exception):
    """stdout or stdin of the runner closed: nobody is listening any more."""


class Out:
    """Frames to the coordinator on the runner's stdout, with the running HMAC of the result.

    Between :meth:`hold` and :meth:`release`, frames are gathered and written together (a result's R, V
    and Z frames leave in one write: one packet, one wake-up of the coordinator for a small result).

    Attributes:
        last: When a frame last went out (monotonic clock): heartbeats are due from there.
        openssl: Always sign with OpenSSL's HMAC (a persistent worker paid for its import once).
        json_text: Writes the JSON of the P, R and Z frames: wire's small encoder (json costs a
            process-per-call runner too much to import); a persistent worker swaps in json's C encoder.
    """

    def __init__(self, fd: int, key: bytes = b"") -> None:
        self.fd = fd
        self.key = key
        self.mac: Any = None  # made by sign() once the result's size is known
        self.last = time.monotonic()
        self.held: bytearray | None = None
        self.openssl = False
        self.json_text: Any = wire.json_text

    def new_call(self, key_hex: str) -> None:
        """Sign the next result with the call's key (from its G frame)."""
        self.key, self.mac = bytes.fromhex(key_hex), None

    def sign(self, key: bytes | None = None, size: int = 0) -> None:
        """Start the HMAC of a result of about ``size`` bytes (OpenSSL's only when it is large)."""
        if key is not None:
            self.key = key
        self.mac = wire.new_hmac(self.key, bulk=self.openssl or size > (1 << 20))

    def send(self, kind: bytes, payload: bytes | memoryview = b"", *, signed: bool = False) -> None:
        """Send one frame (``signed``: under the result's HMAC)."""
        if signed:
            if self.mac is None:
                self.sign()
            self.mac.update(kind + len(payload).to_bytes(8, "big"))
            self.mac.update(payload)
        frame = wire.encode(kind, payload)
        if self.held is not None:
            if len(frame) < 65536:
                self.held += frame
                if len(self.held) < 65536:
                    return
                frame, self.held = bytes(self.held), bytearray()
            elif self.held:  # a large frame goes as it is, after what was gathered
                self._write(bytes(self.held))
                self.held = bytearray()
        self._write(frame)

    def event(self, fields: dict[str, Any]) -> None:
        """Send a progress event (P frame)."""
        self.send(b"P", self.json_text(fields).encode())

    def _write(self, frame: bytes) -> None:
        data = memoryview(frame)
        try:
            while data:
                written = os.write(self.fd, data)
                data = data[written:]
        except OSError as exc:
            if exc.errno in (errno.EPIPE, errno.EBADF, errno.ECONNRESET):
                raise CoordinatorGone() from exc
            raise
        self.last = time.monotonic()

    def hold(self) -> None:
        """Gather the frames from here on (until :meth:`release`)."""
        if self.held is None:
            self.held = bytearray()

    def release(self) -> None:
        """Write what was gathered since :meth:`hold`."""
        held, self.held = self.held, None
        if held:
            self._write(bytes(held))

    def send_chunks(self, kind: bytes, data: bytes | memoryview) -> None:
        """Send ``data`` as signed frames of ``kind`` of at most :data:`wire.MAX_FRAME` bytes."""
        with memoryview(data) as view:
            for start in range(0, len(view), wire.MAX_FRAME):
                self.send(kind, view[start:start + wire.MAX_FRAME], signed=True)


def read_call(stdin_fd: int, reader: wire.FrameReader | None = None,
              idle_timeout: float | None = None) -> tuple[dict[str, Any], bytes, wire.FrameReader]:
    """Read the G frame, the session frames and the s frame (frames already buffered in ``reader`` first).

    Raises:
        CoordinatorGone: stdin closed, a Q frame arrived, or nothing came for ``idle_timeout`` seconds.
    """
    reader = reader or wire.FrameReader()
    options = None
    parts: list[bytes] = []
    wait = idle_timeout  # only for the call's first bytes
    while True:
        data = _read_input(stdin_fd, reader, wait)
        wait = None
        frames = reader.feed(data)
        for index, (kind, payload) in enumerate(frames):
            if kind == b"G":
                options = wire.load_options(payload)
            elif kind == b"S":
                if not parts and len(payload) == wire.MAX_FRAME:  # a large session: larger reads
                    wire.grow_pipe(stdin_fd)
                parts.append(payload)
            elif kind == b"s":
                reader.unread(frames[index + 1:])  # what came right behind (stdin, a cancel) is the call's
                return _checked(options, parts, wire.load_options(payload)), b"".join(parts), reader
            elif kind == b"Q":
                raise CoordinatorGone()


def _read_input(stdin_fd: int, reader: wire.FrameReader, idle_timeout: float | None) -> bytes:
    if idle_timeout is not None and not reader.pending and not select.select([stdin_fd], [], [], idle_timeout)[0]:
        raise CoordinatorGone()
    data = os.read(stdin_fd, 1 << 20)
    if not data:
        raise CoordinatorGone()
    return data


def _checked(options: dict[str, Any] | None, parts: list[bytes], check: dict[str, Any]) -> dict[str, Any]:
    """The call's options, once its session arrived whole (the s frame's size, and sha256 if sent)."""
    if options is None:
        raise RuntimeError("protocol: session before options")
    size = sum(len(part) for part in parts)
    if size != check.get("size", size) or ("sha256" in check and _sha256_hex(parts) != check["sha256"]):
        raise RuntimeError("protocol: the session arrived damaged")
    return options


def _sha256_hex(parts: list[bytes]) -> str:
    import hashlib  # loads OpenSSL: only for a coordinator that sends a sha256 (tests do)

    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


class Poller:
    """select.poll with a tag per fd (the selectors module costs the runner too much to import)."""

    def __init__(self) -> None:
        self._poll = select.poll()
        self._tags: dict[int, bytes] = {}

    def register(self, fd: int, tag: bytes, events: int = select.POLLIN) -> None:
        """Wait for ``fd`` to be readable (or ``events``); :meth:`select` names it by ``tag``."""
        self._poll.register(fd, events)
        self._tags[fd] = tag

    def unregister(self, fd: int) -> None:
        """Stop waiting for ``fd``."""
        self._poll.unregister(fd)
        del self._tags[fd]

    def select(self, timeout: float) -> list[tuple[int, bytes]]:
        """The (fd, tag) of every registered fd that is readable (or closed) within ``timeout`` seconds."""
        return [(fd, self._tags[fd]) for fd, _ in self._poll.poll(timeout * 1000) if fd in self._tags]

    def close(self) -> None:
        """Forget every fd."""
        self._tags.clear()


def read_answer(reader: wire.FrameReader, wait: float, kinds: tuple[bytes, ...] = (b"A", b"K")) -> bytes:
    """The coordinator's answer after a result: the first frame on stdin of one of ``kinds``, or b"" when
    its channel closed first or nothing came within ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if not select.select([0], [], [], min(5.0, max(0.0, deadline - time.monotonic())))[0]:
            continue
        try:
            data = os.read(0, 1 << 16)
        except BlockingIOError:
            continue
        except OSError:
            return b""
        if not data:
            return b""
        for kind, _ in reader.feed(data):
            if kind in kinds:
                return kind
    return b""
