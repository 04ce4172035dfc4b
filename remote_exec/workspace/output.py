"""A task's live output: on local streams, written by a thread of its own so that a slow reader never holds
up the link; and in the run's logs, capped.

The loop that reads the runner's frames must never block on the local reader: ``rx run big.py | less``,
``| (sleep 30; wc -c)`` or a terminal paused with Ctrl-S would otherwise stop it from reading the link, and
the watchdog, seeing no bytes come, would give up a healthy run. So the loop hands each chunk to an
:class:`OutputPump` and goes on; the pump's thread writes the chunks to their streams, in the order they
came (stdout and stderr interleaved as the task wrote them). What the reader has not taken yet waits in
memory up to :attr:`OutputPump.memory` bytes, beyond that in an unlinked spill file, so memory stays
bounded whatever the task prints. :meth:`OutputPump.drain` waits until the reader took everything (the end
of a call, before rx prints its own summary). A reader that went away (``| head``) gets nothing more; the
run goes on, and its log keeps everything.

A run's ``stdout.log`` and ``stderr.log`` are :class:`CappedLog` files: past twice their cap the head is
dropped and the last ``cap`` bytes kept after one note line saying how many bytes were dropped (a 500 MB
print leaves the cap's worth on disk, not 500 MB).
"""

from __future__ import annotations

import codecs
import collections
import logging
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import IO, BinaryIO

__all__ = ["CappedLog", "OutputPump", "StreamWriter", "log_origin"]

logger = logging.getLogger(__name__)

#: Bytes of output held in memory for a slow reader before the rest goes to the spill file.
MEMORY = 8 << 20
#: The largest piece written to a stream at once (a spilled stretch is read back in pieces of this size).
PIECE = 1 << 20
#: The note at the head of a log whose head was dropped.
NOTE = "[rx: the first {dropped} bytes of this output were dropped (log_cap); the last {kept} follow]\n"
_NOTE = re.compile(rb"\[rx: the first (\d+) bytes of this output were dropped [^\n]*\]\n")


def log_origin(path: Path) -> tuple[int, int]:
    """(bytes of output dropped from the head of the log at ``path``, length of the note saying so)."""
    try:
        with open(path, "rb") as stream:
            match = _NOTE.match(stream.read(200))
    except OSError:
        return 0, 0
    return (int(match.group(1)), match.end()) if match else (0, 0)


class CappedLog:
    """A run's live log, kept to about ``cap`` bytes: past twice the cap (and at :meth:`close`, past the cap)
    the head is dropped and the tail kept after a :data:`NOTE`; a log opened again goes on from where it was.

    Attributes:
        path: The log file.
        cap: The most it keeps, in bytes (0: everything).
        dropped: Bytes of output dropped from its head so far.
        error: Why it stopped taking output (a full disk), or None: the run goes on, its output still
            reaches the terminal, and a later ``rx attach`` of a detached run fills in what is missing.
    """

    def __init__(self, stream: BinaryIO, path: Path, cap: int) -> None:
        self.path = path
        self.cap = cap
        self.file = stream
        self.dropped, self._note = log_origin(path)
        self._size = stream.tell()
        self.error: OSError | None = None

    @property
    def offset(self) -> int:
        """Bytes of output written to this log ever (where a resumed ``rx attach`` asks the host from)."""
        return self.dropped + self._size - self._note

    def tell(self) -> int:
        """The same as :attr:`offset`."""
        return self.offset

    def write(self, data: bytes) -> None:
        if self.error is not None:
            return
        try:
            self.file.write(data)
            self._size += len(data)
            if self.cap and self._size - self._note > 2 * self.cap:
                self._trim()
        except OSError as exc:
            self.error = exc
            logger.warning("%s is incomplete from byte %d on: %s", self.path, self.offset, exc.strerror or exc)

    def flush(self) -> None:
        self.file.flush()

    def _trim(self) -> None:
        """Keep the last ``cap`` bytes after a note of what was dropped (through a temporary and a rename)."""
        drop = self._size - self._note - self.cap
        note = NOTE.format(dropped=self.dropped + drop, kept=self.cap).encode()
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.trim")
        try:
            with open(self.path, "rb") as source, open(temporary, "wb") as target:
                source.seek(self._note + drop)
                target.write(note)
                shutil.copyfileobj(source, target, 1 << 20)
            os.replace(temporary, self.path)
        except OSError:
            temporary.unlink(missing_ok=True)
            raise
        self.file.close()
        self.file = open(self.path, "ab", buffering=0)  # noqa: SIM115 - closed by close()
        self.dropped += drop
        self._note = len(note)
        self._size = self._note + self.cap

    def close(self) -> None:
        """Trim to the cap, then close."""
        try:
            if self.cap and self._size - self._note > self.cap and self.error is None:
                self._trim()
        except OSError as exc:
            logger.warning("%s could not be trimmed to its cap: %s", self.path, exc.strerror or exc)
        finally:
            self.file.close()


class StreamWriter:
    """Writes bytes to one local text stream: to its binary buffer when it has one, else decoded as UTF-8
    (incrementally: a character split between two chunks stays whole). Called by the pump's thread only.

    Attributes:
        stream: The text stream.
        gone: The reader went away (a broken pipe, a closed stream): nothing more is written.
    """

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.gone = False
        self._buffer = getattr(stream, "buffer", None)
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def write(self, data: bytes) -> None:
        if self.gone:
            return
        try:
            if self._buffer is not None:
                self.stream.flush()  # text written to it before stays before
                self._buffer.write(data)
                self._buffer.flush()
            else:
                self.stream.write(self._decoder.decode(data))
                self.stream.flush()
        except (OSError, ValueError):  # the reader went away (| head), or the stream was closed
            self.gone = True


class OutputPump:
    """Writes chunks of output to their streams on a thread of its own, in order; never blocks the caller.

    Attributes:
        memory: Bytes held in memory for a slow reader; more waits in an unlinked spill file.
    """

    def __init__(self, memory: int = MEMORY, spill_dir: str | None = None) -> None:
        self.memory = memory
        self.spill_dir = spill_dir
        self._queue: collections.deque[tuple[StreamWriter, bytes | tuple[int, int]]] = collections.deque()
        self._changed = threading.Condition()
        self._held = 0  # bytes queued in memory
        self._busy = False  # the thread is writing a chunk it took off the queue
        self._spill: int | None = None  # fd of the spill file
        self._spill_end = 0
        self._thread: threading.Thread | None = None
        self._closing = False

    def sink(self, stream: IO[str]) -> StreamWriter:
        """A writer for ``stream``, to pass to :meth:`write`."""
        return StreamWriter(stream)

    def write(self, writer: StreamWriter, data: bytes) -> None:
        """Queue ``data`` for ``writer``'s stream; returns at once (the reader takes it when it can)."""
        if not data or writer.gone:
            return
        with self._changed:
            try:
                if self._held + len(data) > self.memory:
                    self._queue_spilled(writer, data)
                    data = b""
            except OSError:  # no room to spill (a full disk): it waits in memory
                logger.debug("spilling output failed", exc_info=True)
            if data:
                self._queue.append((writer, data))
                self._held += len(data)
            self._closing = False
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="rx-output", daemon=True)
                self._thread.start()
            self._changed.notify_all()

    def _queue_spilled(self, writer: StreamWriter, data: bytes) -> None:
        """Put ``data`` in the spill file and queue where it is (joined to the last stretch when it follows
        it for the same stream). The caller holds the lock."""
        if self._spill is None:
            with tempfile.TemporaryFile(prefix="rx-output-", dir=self.spill_dir, buffering=0) as spill:
                self._spill = os.dup(spill.fileno())  # the file is unlinked; this fd keeps it until close()
        offset = self._spill_end
        view = memoryview(data)
        while view:
            written = os.pwrite(self._spill, view, self._spill_end)
            view = view[written:]
            self._spill_end += written
        last = self._queue[-1] if self._queue else None
        if last is not None and last[0] is writer and isinstance(last[1], tuple) and sum(last[1]) == offset:
            self._queue[-1] = (writer, (last[1][0], last[1][1] + len(data)))
        else:
            self._queue.append((writer, (offset, len(data))))

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._queue:
                    if self._closing:
                        self._thread = None
                        return
                    self._changed.wait()
                writer, item = self._queue.popleft()
                self._busy = True
            try:
                if isinstance(item, bytes):
                    writer.write(item)
                else:
                    self._write_spilled(writer, *item)
            except Exception:  # a pump that dies would hang drain(): drop the chunk, keep going
                logger.debug("writing output failed", exc_info=True)
            with self._changed:
                if isinstance(item, bytes):
                    self._held -= len(item)
                self._busy = False
                if not self._queue and self._spill is not None:
                    os.ftruncate(self._spill, 0)  # nothing waits in it any more: start it over
                    self._spill_end = 0
                self._changed.notify_all()

    def _write_spilled(self, writer: StreamWriter, offset: int, size: int) -> None:
        assert self._spill is not None
        end = offset + size
        while offset < end and not writer.gone:
            piece = os.pread(self._spill, min(PIECE, end - offset), offset)
            if not piece:
                break
            writer.write(piece)
            offset += len(piece)

    def pending(self) -> int:
        """Bytes the reader has not taken yet (in memory and spilled)."""
        with self._changed:
            spilled = sum(item[1] for _, item in self._queue if isinstance(item, tuple))
            return self._held + spilled

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until the reader took everything queued so far; False if ``timeout`` came first."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._queue and not self._busy, timeout)

    def close(self) -> None:
        """Drain, then end the thread and release the spill file (a later :meth:`write` starts over)."""
        self.drain()
        with self._changed:
            self._closing = True
            self._changed.notify_all()
            if self._spill is not None:
                os.close(self._spill)
                self._spill = None
                self._spill_end = 0
