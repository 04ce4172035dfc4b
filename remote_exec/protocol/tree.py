"""The coordinator's end of a tree transfer: the manifest and the blobs a runner asks for, on the call's channel.

A call names its tree in the G frame; a host that has it stored asks nothing, and nothing more travels.
A host that lacks it sends ``T``; :class:`TreeSender` answers with the manifest (``M``... ``m``); the host
answers with the digests of the blobs it lacks (``N``... ``n``), and a thread streams exactly those, back to
back in the order asked, as ``D`` frames, then ``d`` (see :mod:`.wire`). The channel's frame loop goes on
reading meanwhile (heartbeats, the runner's own frames), and the watcher's heartbeats interleave with the
blobs frame by frame.

Where rx's record of the host (:mod:`.places`) says no call there ran in the tree, the call sends the
manifest and the blobs new since the last tree seen there unasked, right behind its G frame
(:func:`ahead_frames`): the runner asks only for what is still missing (see
:func:`remote_exec.runner.store.take_ahead`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time

from ..errors import ConnectError, RunnerError
from ..sync.tree import Tree, TreeFile
from . import wire
from .channel import Channel
from .options import ProgressCallback, SyncProgress

__all__ = ["TREE_FRAMES", "TreeAhead", "TreeSender", "ahead_frames"]

logger = logging.getLogger(__name__)

#: The runner's frames of a tree transfer.
TREE_FRAMES = frozenset((b"T", b"N", b"n"))
#: Seconds between progress reports.
_PROGRESS_EVERY = 0.1


class TreeSender:
    """Answers one runner's requests for a tree.

    Attributes:
        error: Why the blobs could not all be sent (a file changed or vanished meanwhile), once known.
        sent_files: Blobs sent.
        sent_bytes: Bytes of blobs sent.
        requested: How many times the runner asked for the tree.
    """

    def __init__(self, channel: Channel, tree: Tree | None, on_progress: ProgressCallback | None = None,
                 pushed: TreeAhead | None = None) -> None:
        self.channel = channel
        self.tree = tree
        self.on_progress = on_progress
        self.error: str | None = None
        self.sent_files = 0
        self.sent_bytes = 0
        self.requested = 1 if pushed else 0  # (a tree sent unasked counts as asked for)
        self.pushed = pushed
        self._wanted = bytearray()
        self._thread: threading.Thread | None = None

    def report_pushed(self) -> None:
        """Tell the progress callback of the blobs that went unasked with the call (once it went)."""
        if self.pushed is not None and self.pushed.files:
            _Progress(self.on_progress, self.pushed.files, self.pushed.size).update(
                self.pushed.files, self.pushed.size, done=True)

    @property
    def synced(self) -> tuple[int, int] | None:
        """(blobs, bytes) sent when the runner asked for the tree, or with the call unasked; None when the host
        had it."""
        if not self.requested:
            return None
        pushed = self.pushed or TreeAhead(b"", 0, 0)
        return self.sent_files + pushed.files, self.sent_bytes + pushed.size

    def handle(self, kind: bytes, payload: bytes) -> None:
        """Take one of :data:`TREE_FRAMES` from the runner.

        Raises:
            RunnerError: The runner asked for a tree this call does not carry.
        """
        if kind == b"T":
            self._manifest(json.loads(payload).get("tree"))
        elif kind == b"N":
            self._wanted += payload
        else:
            wanted, self._wanted = bytes(self._wanted), bytearray()
            if wanted:
                self.join()
                self._thread = threading.Thread(target=self._send_blobs, args=(wanted,), name="rx-tree-upload",
                                                daemon=True)
                self._thread.start()

    def _manifest(self, tree_id: object) -> None:
        tree = self.tree
        if tree is None or tree_id != tree.tree_id:
            raise RunnerError(f"the runner on {self.channel.backend.host} asked for an unknown tree {tree_id!r}",
                              reason="protocol", host=self.channel.backend.host)
        self.requested += 1
        manifest = tree.manifest
        for start in range(0, len(manifest), wire.MAX_FRAME):
            self.channel.send(b"M", manifest[start:start + wire.MAX_FRAME])
        self.channel.send(b"m", wire.dump_options({"size": len(manifest)}))

    def join(self, timeout: float | None = None) -> None:
        """Wait for the blobs being sent (if any)."""
        if self._thread is not None:
            self._thread.join(timeout)

    def _send_blobs(self, wanted: bytes) -> None:
        """Stream the asked blobs (in a thread); a file that changed since the scan ends it with an error."""
        assert self.tree is not None
        digests = [wanted[start:start + 32] for start in range(0, len(wanted), 32)]
        sources = self.tree.sources
        total = sum(sources[digest].size for digest in digests if digest in sources)
        progress = _Progress(self.on_progress, len(digests), total)
        if total > wire.MAX_FRAME:
            self.channel.process.grow_buffers()
        out = _FrameWriter(self.channel)
        try:
            for digest in digests:
                entry = sources.get(digest)
                if entry is None:
                    raise _Unsendable(f"the host asked for a blob the tree does not hold ({digest.hex()[:12]})")
                self._send_one(entry, out)
                self.sent_files += 1
                progress.update(self.sent_files, self.sent_bytes)
            out.flush()
            self.channel.send(b"d", wire.dump_options({"count": len(digests), "bytes": self.sent_bytes}))
        except _Unsendable as exc:
            self.error = str(exc)
            self._abort(out)
        except ConnectError:  # the runner has gone; the call's loop reports why
            logger.debug("tree upload to %s cut short", self.channel.backend.host, exc_info=True)
        except Exception as exc:  # never left unreported in a thread
            self.error = f"sending the project failed: {exc}"
            self._abort(out)
        finally:
            progress.update(self.sent_files, self.sent_bytes, done=True)

    def _abort(self, out: _FrameWriter) -> None:
        try:
            out.drop()
            self.channel.send(b"d", wire.dump_options({"error": self.error or "aborted"}))
        except Exception:
            logger.debug("could not tell the runner the upload failed", exc_info=True)

    def _send_one(self, entry: TreeFile, out: _FrameWriter) -> None:
        """The bytes of one blob, exactly as many as the manifest says. A file whose stat data is still the
        one its digest was taken with is sent as it is (the host checks every blob's sha256 anyway);
        another is hashed as it goes, so that a change is named here."""
        assert entry.source is not None
        digest = None
        remaining = entry.size
        try:
            with open(entry.source, "rb") as stream:
                if _stamp(os.fstat(stream.fileno())) != entry.stamp:
                    digest = hashlib.sha256()
                while remaining:
                    block = stream.read(min(remaining, wire.MAX_FRAME))
                    if not block:
                        break
                    if digest is not None:
                        digest.update(block)
                    out.write(block)
                    remaining -= len(block)
                    self.sent_bytes += len(block)
                changed = _stamp(os.fstat(stream.fileno())) != entry.stamp
        except OSError as exc:
            raise _Unsendable(f"{entry.path} could not be read while it was sent: {exc.strerror or exc}") from exc
        if remaining or (digest.digest() != entry.digest if digest is not None else changed):
            raise _Unsendable(f"{entry.path} changed while it was sent; run again")


class TreeAhead:
    """A tree's frames sent unasked behind a call's G frame: ``M`` (the manifest), ``m`` (its size and the
    digests of the blobs that follow), ``D``... and ``d`` (those blobs' bytes, in that order)."""

    __slots__ = ("files", "frames", "size")

    def __init__(self, frames: bytes, files: int, size: int) -> None:
        self.frames = frames
        self.files = files
        self.size = size


def ahead_frames(tree: Tree, previous: bytes | None, limit: int) -> TreeAhead | None:
    """The frames that send ``tree`` unasked to a host that lacks it, or None when its manifest is larger
    than ``limit``. The blobs sent are those not in ``previous`` (the manifest of the last tree the host
    was seen with; None: every blob), when they come to at most ``limit`` bytes in all (else none: the
    runner asks for what it lacks). A file that changed since the scan is left for the runner to ask for
    (and then reported)."""
    manifest = tree.manifest
    if len(manifest) > min(limit, wire.MAX_FRAME):
        return None
    known: set[bytes] = set()
    if previous is not None:
        try:
            known = {entry[3] for entry in wire.load_manifest(previous)}
        except ValueError:
            pass
    wanted = [entry for digest, entry in tree.sources.items() if digest not in known]
    if sum(entry.size for entry in wanted) > limit:
        wanted = []
    blobs: list[bytes] = []
    sent: list[str] = []
    for entry in wanted:
        data = _read_unchanged(entry)
        if data is not None:
            blobs.append(data)
            sent.append(entry.digest.hex())
    body = b"".join(blobs)
    frames = [wire.encode(b"M", manifest), wire.encode(b"m", wire.dump_options({"size": len(manifest),
                                                                               "blobs": sent}))]
    frames += [wire.encode(b"D", body[start:start + wire.MAX_FRAME]) for start in range(0, len(body), wire.MAX_FRAME)]
    frames.append(wire.encode(b"d", wire.dump_options({"count": len(sent), "bytes": len(body)})))
    return TreeAhead(b"".join(frames), len(sent), len(body))


def _read_unchanged(entry: TreeFile) -> bytes | None:
    """The bytes of ``entry``'s source as its digest was taken (its stamp unchanged before and after the
    read, and its size the manifest's), else None."""
    if entry.source is None:
        return None
    try:
        with open(entry.source, "rb") as stream:
            if _stamp(os.fstat(stream.fileno())) != entry.stamp:
                return None
            data = stream.read(entry.size + 1)
            if len(data) != entry.size or _stamp(os.fstat(stream.fileno())) != entry.stamp:
                return None
    except OSError:
        return None
    return data


def _stamp(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


class _Unsendable(Exception):
    """A blob cannot be sent as the manifest describes it."""


class _FrameWriter:
    """Gathers blob bytes into D frames of at most :data:`wire.MAX_FRAME` bytes (a full block of a large
    file goes as it is; small files are joined once)."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.parts: list[bytes] = []
        self.size = 0

    def write(self, data: bytes) -> None:
        if self.size + len(data) > wire.MAX_FRAME:
            self.flush()
        if len(data) == wire.MAX_FRAME:
            self.channel.send(b"D", data)
            return
        self.parts.append(data)
        self.size += len(data)

    def flush(self) -> None:
        if self.parts:
            self.channel.send(b"D", self.parts[0] if len(self.parts) == 1 else b"".join(self.parts))
            self.parts, self.size = [], 0

    def drop(self) -> None:
        self.parts, self.size = [], 0


class _Progress:
    """Reports an upload's progress at most every :data:`_PROGRESS_EVERY` seconds (and at its end)."""

    def __init__(self, callback: ProgressCallback | None, files: int, total: int) -> None:
        self.callback = callback
        self.files = files
        self.total = total
        self.last = 0.0

    def update(self, files: int, sent: int, *, done: bool = False) -> None:
        if self.callback is None:
            return
        now = time.monotonic()
        if done or now - self.last >= _PROGRESS_EVERY:
            self.last = now
            try:
                self.callback(SyncProgress(files, self.files, sent, self.total, done))
            except Exception:  # a progress display must not break the upload
                logger.debug("progress callback failed", exc_info=True)
