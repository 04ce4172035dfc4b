"""The host's store of project trees, under the rx workdir (never /tmp): ``blobs/`` and ``trees/``.

- ``blobs/<aa>/<sha256>``: a file's bytes, named by their sha256, read-only (0444). A blob lands under its
  name only after its bytes were checked against it (written to ``tmp/``, hashed, renamed).
- ``trees/<id>``: a manifest (:func:`remote_exec.protocol.wire.dump_manifest`) whose entries hash to
  ``id``; written (temporary, fsync, rename) only once every blob it names is stored and made durable. Its
  modification time is its last use (for the garbage collector).

When a call's tree (its G frame's ``tree``) is not stored, :func:`ensure_tree` fetches it over the call's
channel: ``T`` (which tree) out, ``M``... ``m`` (the manifest) in, ``N``... ``n`` (the blobs missing here)
out, ``D``... ``d`` (those blobs' bytes, in that order) in. An interrupted transfer leaves only temporaries,
which nothing trusts and the garbage collector removes.

A call whose G frame says ``tree_ahead`` brings the manifest and some blobs unasked, right behind its
session (``M``... ``m`` with the digests of the blobs that follow, ``D``... ``d``): :func:`take_ahead`
reads and stores them before anything else, and :func:`ensure_tree` then asks only for the blobs still
missing (``N``... ``n``, when any are).
"""

from __future__ import annotations

import os
import time

from ..protocol import wire
from .channel import CoordinatorGone

TYPE_CHECKING = False  # typing is not imported at run time: the runner's start-up is on every call's path
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    Entries = list[tuple[str, int, int, bytes, str]]

__all__ = ["Inbox", "StoreError", "blob_path", "ensure_tree", "first_options", "forget_tree", "load_tree", "take_ahead",
           "tree_path"]

#: Digests per N frame (32 bytes each).
_PER_FRAME = wire.MAX_FRAME // 32
#: A tree's use is recorded (its mtime touched) at most this often.
_TOUCH_EVERY = 3600


class StoreError(Exception):
    """The tree could not be stored or read here; the message is for the user (one line)."""


def blob_path(cache_dir: str, digest: bytes) -> str:
    """Where the blob of ``digest`` lives."""
    name = digest.hex()
    return os.path.join(cache_dir, "blobs", name[:2], name)


def tree_path(cache_dir: str, tree_id: str) -> str:
    """Where the manifest of tree ``tree_id`` lives."""
    return os.path.join(cache_dir, "trees", tree_id)


def load_tree(cache_dir: str, tree_id: str) -> Entries | None:
    """The stored manifest of ``tree_id`` (its use recorded), or None when it is not stored (or damaged)."""
    path = tree_path(cache_dir, tree_id)
    try:
        with open(path, "rb") as stream:
            data = stream.read()
            mtime = os.fstat(stream.fileno()).st_mtime
    except OSError:
        return None
    try:
        entries = wire.load_manifest(data)
    except ValueError:
        forget_tree(cache_dir, tree_id)
        return None
    if time.time() - mtime > _TOUCH_EVERY:
        try:
            os.utime(path)
        except OSError:
            pass
    return entries


def forget_tree(cache_dir: str, tree_id: str) -> None:
    """Remove a tree's manifest (a blob it names was found damaged: the next use fetches it again)."""
    try:
        os.unlink(tree_path(cache_dir, tree_id))
    except OSError:
        pass


class Inbox:
    """The coordinator's frames during a transfer: read from ``fd`` through the call's frame reader.

    Heartbeats (H) are dropped; a cancel (C) or quit (Q), or the end of stdin, stops the transfer; the
    task's stdin (I, i), which may come meanwhile, is put back in the reader by :meth:`done` for the call.
    ``send`` writes a frame to the coordinator; a heartbeat (B) goes out at least every ``heartbeat``
    seconds while the transfer lasts.
    """

    def __init__(self, fd: int, reader: wire.FrameReader, send: Callable[[bytes, bytes], None],
                 heartbeat: float = 5.0) -> None:
        self.fd = fd
        self.reader = reader
        self.send = send
        self.heartbeat = heartbeat
        self.sent = time.monotonic()
        self.frames: list[tuple[bytes, bytes]] = []
        self.held: list[tuple[bytes, bytes]] = []
        #: The tree that came unasked with the call (:func:`take_ahead`): its id, manifest, entries and the
        #: paths of the blobs stored from it.
        self.ahead: tuple[str, bytes, Entries, list[str]] | None = None

    def done(self) -> None:
        """The transfer is over: the frames that were not its own go back to the reader, in order."""
        frames, self.held, self.frames = self.held + self.frames, [], []
        if frames:
            self.reader.unread(frames)

    def out(self, kind: bytes, payload: bytes = b"") -> None:
        """Send one frame to the coordinator."""
        self.send(kind, payload)
        self.sent = time.monotonic()

    def alive(self) -> None:
        """Send a heartbeat if one is due."""
        if time.monotonic() - self.sent >= self.heartbeat:
            self.out(b"B")

    def next(self) -> tuple[bytes, bytes]:
        """The coordinator's next frame (not a heartbeat).

        Raises:
            CoordinatorGone: stdin ended, or a cancel or quit arrived.
        """
        while True:
            while self.frames:
                kind, payload = self.frames.pop(0)
                if kind in (b"C", b"Q"):
                    raise CoordinatorGone("the transfer was cancelled")
                if kind in (b"I", b"i"):  # the task's stdin, early: the call's, after the transfer
                    self.held.append((kind, bytes(payload)))
                elif kind != b"H":
                    return kind, payload
            self.alive()
            if self.reader.pending:  # frames held (put back, or come with the call) first, then more bytes
                self.frames = self.reader.feed(b"")
                if not self.frames:
                    data = os.read(self.fd, 1 << 20)
                    if not data:
                        raise CoordinatorGone("the coordinator went away during the transfer")
                    self.frames = self.reader.feed(data)
            else:  # at a frame's start: its payload straight into one buffer (no copies of a blob's bytes)
                kind, size = wire.HEADER.unpack(self._exact(wire.HEADER.size))
                if size > wire.MAX_FRAME:
                    raise StoreError(f"protocol: a frame of {size} bytes during the transfer")
                self.frames = [(kind, self._exact(size))]

    def _exact(self, size: int) -> Any:
        buffer = bytearray(size)
        view = memoryview(buffer)
        got = 0
        while got < size:
            count = os.readv(self.fd, [view[got:]])
            if not count:
                raise CoordinatorGone("the coordinator went away during the transfer")
            got += count
        return buffer

    def until(self, end: bytes, kind: bytes) -> tuple[list[bytes], dict[str, Any]]:
        """The payloads of ``kind`` frames up to the ``end`` frame, and that frame's options."""
        parts: list[bytes] = []
        while True:
            got, payload = self.next()
            if got == end:
                return parts, wire.load_options(payload)
            if got != kind:
                raise StoreError(f"protocol: {got!r} frame during the transfer of a tree")
            parts.append(payload)


def first_options(send: Callable[[bytes, bytes], None]) -> tuple[Inbox, dict[str, Any]]:
    """A maintenance mode's inbox on stdin and the options of its first frame, a G (its ``heartbeat``
    applied to the inbox).

    Raises:
        RuntimeError: Another frame came first.
    """
    inbox = Inbox(0, wire.FrameReader(), send)
    kind, payload = inbox.next()
    if kind != b"G":
        raise RuntimeError(f"protocol: {kind!r} frame before the G frame")
    options = wire.load_options(payload)
    inbox.heartbeat = float(options.get("heartbeat") or 5.0)
    return inbox, options


def ensure_tree(cache_dir: str, tree_id: str, inbox: Inbox, *, refetch: bool = False,
                known: frozenset[bytes] = frozenset(), later: list[Callable[[], None]] | None = None) -> Entries:
    """The manifest of ``tree_id``, fetched with the blobs this host lacks when it is not stored yet
    (``known``: blobs a snapshot here was just made of, taken as stored without a look).

    With ``later``, what makes a fetched tree durable (an fsync of each new blob, then the manifest
    written) is appended to it instead of done now: a call runs it once its result is out (a millisecond
    or two of waiting on the disk no caller waits for), and a runner that dies first leaves only blobs,
    whose manifest the next call fetches again.

    Raises:
        StoreError: The tree or a blob arrived damaged, or storing it failed (a full disk).
        CoordinatorGone: The coordinator went away or cancelled.
    """
    ahead, inbox.ahead = inbox.ahead, None
    if not refetch:
        entries = load_tree(cache_dir, tree_id)
        if entries is not None:
            return entries
    if ahead is not None and ahead[0] == tree_id and not refetch:
        _, data, entries, came = ahead
    else:
        inbox.out(b"T", wire.json_bytes({"tree": tree_id}))
        data, came = _manifest(inbox)[0], []
        entries = _checked(tree_id, data)
    wanted = _missing(cache_dir, entries, frozenset() if refetch else known, sizes=refetch)
    if wanted or not came:
        _ask(inbox, wanted)
    try:
        stored = came + (_receive(cache_dir, wanted, inbox) if wanted else [])
        if later is None:
            _sync(cache_dir, stored)
            _write_tree(cache_dir, tree_id, data)
    except OSError as exc:
        raise StoreError(_storing_failed(cache_dir, exc)) from exc
    if later is not None:
        later.append(lambda: _make_durable(cache_dir, tree_id, data, stored))
    return entries


def _ask(inbox: Inbox, wanted: list[tuple[bytes, int]]) -> None:
    """Ask the coordinator for the blobs ``wanted`` (``N``... ``n``)."""
    for start in range(0, len(wanted), _PER_FRAME):
        inbox.out(b"N", b"".join(digest for digest, _ in wanted[start:start + _PER_FRAME]))
    inbox.out(b"n", wire.json_bytes({"count": len(wanted), "bytes": sum(size for _, size in wanted)}))


def _manifest(inbox: Inbox) -> tuple[bytes, dict[str, Any]]:
    """The manifest's bytes from its ``M`` frames, checked whole against the ``m`` frame's size, and the
    ``m`` frame's options."""
    parts, end = inbox.until(b"m", b"M")
    data = b"".join(parts)
    if len(data) != end.get("size", len(data)):
        raise StoreError("protocol: the tree's manifest arrived cut short")
    return data, end


def _checked(tree_id: str, data: bytes) -> Entries:
    """The entries of the manifest ``data``, which must hash to ``tree_id``."""
    try:
        entries = wire.load_manifest(data)
    except ValueError as exc:
        raise StoreError(f"protocol: the manifest of tree {tree_id[:12]} is damaged ({exc})") from None
    if wire.tree_id(entries) != tree_id:
        raise StoreError(f"the manifest of tree {tree_id[:12]} does not hash to its id; it was not stored")
    return entries


def take_ahead(cache_dir: str, options: dict[str, Any], inbox: Inbox) -> None:
    """Read the tree the call brought unasked (its G frame's ``tree_ahead``), if it did: the manifest,
    checked against the call's tree id, and the blobs that follow it, each checked against its digest and
    stored; kept in ``inbox`` for :func:`ensure_tree` (which then asks only for what is still missing).
    Read whole even where the tree is stored already: those frames are the call's, before any other.

    Raises:
        StoreError: The manifest or a blob arrived damaged, or storing a blob failed (a full disk).
        CoordinatorGone: The coordinator went away or cancelled.
    """
    if not options.get("tree_ahead"):
        return
    tree_id = str(options["tree"])
    data, end = _manifest(inbox)
    entries = _checked(tree_id, data)
    sizes = {digest: size for _path, mode, size, digest, _link in entries if mode != wire.LINK_MODE}
    try:
        coming = [(bytes.fromhex(name), 0) for name in end.get("blobs") or ()]
    except (TypeError, ValueError):
        raise StoreError("protocol: the blobs sent with the tree are misnamed") from None
    if any(digest not in sizes for digest, _ in coming):
        raise StoreError("protocol: a blob sent with the tree is not in its manifest")
    try:
        stored = _receive(cache_dir, [(digest, sizes[digest]) for digest, _ in coming], inbox)
    except OSError as exc:
        raise StoreError(_storing_failed(cache_dir, exc)) from exc
    inbox.ahead = (tree_id, data, entries, stored)


def _make_durable(cache_dir: str, tree_id: str, data: bytes, stored: list[str]) -> None:
    """:func:`ensure_tree`'s last step, run later: the blobs synced, then the manifest written. A failure
    (a full disk) leaves the manifest out, to be fetched again; the call that runs this goes on."""
    try:
        _sync(cache_dir, stored)
        _write_tree(cache_dir, tree_id, data)
    except OSError:
        pass


def _storing_failed(cache_dir: str, exc: OSError) -> str:
    import errno

    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left to store the project under {cache_dir} (free some there, or run rx gc on the host)"
    return f"storing the project under {cache_dir} failed: {exc.strerror or exc}"


def _missing(cache_dir: str, entries: Entries, known: frozenset[bytes], *, sizes: bool = False
             ) -> list[tuple[bytes, int]]:
    """(digest, size) of each distinct blob not stored here: a listing per ``blobs/<aa>`` directory, not a
    ``stat`` per blob (a blob stored with a wrong size is found when a snapshot is made; then, with
    ``sizes``, each blob's size is checked too)."""
    wanted = []
    seen = set(known)
    present: dict[str, set[str]] = {}
    for _path, mode, size, digest, _link in entries:
        if mode == wire.LINK_MODE or digest in seen:
            continue
        seen.add(digest)
        if sizes:
            try:
                stored = os.stat(blob_path(cache_dir, digest)).st_size
            except OSError:
                stored = -1
            if stored != size:
                wanted.append((digest, size))
            continue
        name = digest.hex()
        names = present.get(name[:2])
        if names is None:
            try:
                names = present[name[:2]] = set(os.listdir(os.path.join(cache_dir, "blobs", name[:2])))
            except OSError:
                names = present[name[:2]] = set()
        if name not in names:
            wanted.append((digest, size))
    return wanted


class _Blob:
    """One blob being received: a temporary file, its running hash, the bytes still to come."""

    def __init__(self, tmp_dir: str, digest: bytes, size: int, sha256: Any) -> None:
        self.digest = digest
        self.remaining = size
        self.hash = sha256()
        self.path = os.path.join(tmp_dir, f"{digest.hex()}.{os.urandom(4).hex()}")
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)

    def write(self, data: memoryview) -> None:
        self.hash.update(data)
        self.remaining -= len(data)
        while data:
            data = data[os.write(self.fd, data):]

    def store(self, cache_dir: str) -> None:
        """Check the bytes against the digest, then give the blob its name (read-only)."""
        os.fchmod(self.fd, 0o444)
        os.close(self.fd)
        self.fd = -1
        if self.hash.digest() != self.digest:
            self.discard()
            raise StoreError(f"a file of the project arrived damaged (sha256 {self.digest.hex()[:12]} "
                             "mismatch): it changed while it was sent, or the link corrupted it; run again")
        target = blob_path(cache_dir, self.digest)
        try:
            os.rename(self.path, target)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
            os.rename(self.path, target)

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            os.unlink(self.path)
        except OSError:
            pass


#: Bytes below which received blobs are checked with the interpreter's built-in sha256: OpenSSL's is ~5x
#: faster per byte, but loading it costs ~2 ms (a small project's first call on a host pays that otherwise).
BUILTIN_SHA256_BELOW = 512 * 1024


def _hasher(total: int) -> Any:
    """The sha256 constructor for checking ``total`` bytes of blobs."""
    if total < BUILTIN_SHA256_BELOW:
        return wire.builtin_sha256()
    import hashlib

    return hashlib.sha256


class _Receiver:
    """The blobs asked for, stored one after another from the bytes of the D frames."""

    def __init__(self, cache_dir: str, wanted: list[tuple[bytes, int]]) -> None:
        self.cache_dir = cache_dir
        self.tmp_dir = os.path.join(cache_dir, "tmp")
        os.makedirs(self.tmp_dir, mode=0o700, exist_ok=True)
        self.sha256 = _hasher(sum(size for _, size in wanted))
        self.wanted = wanted
        self.index = 0
        self.blob: _Blob | None = None
        self._open_next()

    def _open_next(self) -> None:
        """Start the next blob (storing empty ones at once)."""
        while self.blob is None and self.index < len(self.wanted):
            digest, size = self.wanted[self.index]
            self.index += 1
            self.blob = _Blob(self.tmp_dir, digest, size, self.sha256)
            if size == 0:
                self.blob.store(self.cache_dir)
                self.blob = None

    def feed(self, payload: bytes) -> None:
        view = memoryview(payload)
        while view:
            blob = self.blob
            if blob is None:
                raise StoreError("protocol: more blob bytes than were asked for")
            take = min(blob.remaining, len(view))
            blob.write(view[:take])
            view = view[take:]
            if blob.remaining == 0:
                self.blob = None
                blob.store(self.cache_dir)
                self._open_next()

    def end(self, options: dict[str, Any]) -> None:
        if options.get("error"):
            raise StoreError(f"{wire.COORDINATOR_SEND_FAILED}: {options['error']}")
        if self.blob is not None or self.index < len(self.wanted):
            raise StoreError("protocol: the blobs ended before every one asked for arrived")

    def close(self) -> None:
        if self.blob is not None:
            self.blob.discard()
            self.blob = None


def _receive(cache_dir: str, wanted: list[tuple[bytes, int]], inbox: Inbox) -> list[str]:
    """Store the blobs of ``wanted`` from the D frames (their bytes back to back, in that order); return
    their paths."""
    wire.grow_pipe(inbox.fd)
    receiver = _Receiver(cache_dir, wanted)
    try:
        while True:
            kind, payload = inbox.next()
            if kind == b"d":
                receiver.end(wire.load_options(payload))
                return [blob_path(cache_dir, digest) for digest, _ in wanted]
            if kind != b"D":
                raise StoreError(f"protocol: {kind!r} frame among the blobs")
            receiver.feed(payload)
            inbox.alive()
    finally:
        receiver.close()


#: Up to this many blobs are made durable one by one (fsync); more, by one syncfs of the store's file system.
_FSYNC_AT_MOST = 64


def _sync(cache_dir: str, paths: list[str]) -> None:
    """Make the blobs just stored durable: an fsync each when they are few, else one syncfs of the store's
    file system (thousands of fsyncs would each commit the journal). Their directories are not synced: a
    blob whose name a crash lost is fetched again when a snapshot finds it missing."""
    if len(paths) <= _FSYNC_AT_MOST:
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(cache_dir, os.O_RDONLY)
        try:
            if getattr(libc, "syncfs", None) is not None and libc.syncfs(fd) == 0:
                return
        finally:
            os.close(fd)
    except (ImportError, OSError, AttributeError):
        pass
    os.sync()


def _write_tree(cache_dir: str, tree_id: str, data: bytes) -> None:
    """Store the manifest under its id: a temporary, fsync, rename (a manifest a crash lost is fetched again;
    one that is damaged fails to load and is fetched again too)."""
    trees = os.path.join(cache_dir, "trees")
    os.makedirs(trees, mode=0o700, exist_ok=True)
    temporary = os.path.join(trees, f".{tree_id}.{os.urandom(4).hex()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.rename(temporary, tree_path(cache_dir, tree_id))
    except OSError:
        os.unlink(temporary)
        raise
