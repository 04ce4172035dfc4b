"""The runner protocol's frames, their encodings and the result's HMAC (standard library only).

This module travels to the remote inside the distribution archive and is imported by the runner on every
call. After the bootstrap's handshake (:mod:`remote_exec.protocol.bootstrap`), the coordinator writes
frames to the runner's stdin and the runner writes frames to its stdout (a private copy of it: fd 1 of the
runner's process points at stderr, so nothing printed by mistake lands between frames); the runner's stderr
carries only its own diagnostics. One exec of the runner serves one call (``serve``), many (``worker``, for
``keep_warm``), or a detached run (``detach``, ``attach``).

A frame is one type byte, a 4-byte big-endian payload length, and the payload (at most
:data:`MAX_FRAME` bytes; longer data goes as several frames of the same type). Frames from the
coordinator:

    G  go: the call's options as marshal (see :func:`dump_options`): the per-call HMAC key, run id,
       timeout, heartbeat and dead_after seconds, env, secret_env, pull globs, no_pull, keep, the task's
       kind, whether the value may come back as marshal, ``stdin`` (true: I and i frames follow, the task
       reads them on its stdin; absent: its stdin is empty), ``hold`` (after the result, wait for A or K),
       pull_limit (bytes, or None), gc ([cache limit in bytes, days]: the host's garbage collector's
       settings); for ``attach``, stdout/stderr offsets.
       A call in a project also carries tree (the tree's id, see :func:`tree_id`), project (the project's
       name on hosts: the pool its snapshots are reused from), cwd (the task's working directory relative
       to the project root, "" for the root), path (directories relative to the root put first on
       ``sys.path``, in order) and script (a script task's path in the tree, or None). ``sync`` mode reads
       a G frame of tree and heartbeat only. ``tree_ahead``: the tree follows the session unasked (M...
       m, D... d; see below), where rx's record says the host lacks it.
    S  the session in its wire form (``Session.to_wire``), in one or more frames
    s  end of session: marshal ``{"size": N}`` (the runner also accepts a ``sha256``); the task starts
       (once the call's tree is stored and its snapshot made)
    I  bytes for the task's stdin (``rx run`` forwards its own when it is a pipe or a file)
    i  end of the task's stdin (empty): the runner closes the pipe once the task read what came before
    H  heartbeat (empty)
    C  cancel: stop the task and all it started (SIGINT, then SIGTERM, then SIGKILL, each after a grace);
       during a tree's transfer: stop the transfer
    Q  quit: a persistent worker exits (a running call is cancelled)
    A  acknowledged (empty): the coordinator landed the result it was sent (or, after a held call's result,
       refused it), so the runner may now remove what it kept of it: the run directory of a detached run
       (``attach ... collect``), or of a process-per-call run whose G frame said ``hold``. Without it (the
       coordinator refused the result, or went away) a detached run stays on the host and a later
       ``attach`` collects it again; a held call's run directory goes once the runner stops waiting
    K  keep (empty): the coordinator could not land the result (its disk was full): a runner whose G frame
       said ``hold`` keeps it in the run directory the way a detached run keeps its outcome, for a later
       ``attach RUN_DIR collect``
    M  the tree's manifest (:func:`dump_manifest`), in one or more frames, answering T (or unasked,
       right behind the session, when G said ``tree_ahead``)
    m  end of manifest: marshal ``{"size": N}`` (the manifest's bytes); sent unasked, also ``"blobs"``:
       the sha256 (hex) of the blobs whose D... d follow at once, unasked (the runner still asks for
       the rest with N... n)
    D  blob bytes: exactly the blobs the runner listed in its N frames (or the m frame named), in that
       order, back to back (each as long as the manifest says), cut into frames of at most
       :data:`MAX_FRAME` bytes
    d  end of blobs: marshal ``{"count": N, "bytes": N}``, or ``{"error": text}`` when the coordinator
       could not send them as the manifest describes (a file changed or vanished since it was hashed)

Frames from the runner:

    O  task stdout bytes          E  task stderr bytes          B  heartbeat (empty)
    W  the task has taken this many bytes of its stdin in all (ASCII digits): the coordinator keeps at
       most a window of stdin in flight beyond that (see :mod:`remote_exec.protocol.stdin`)
    P  an event as JSON: ``{"event": "started", "pid", "run_dir", "host"}`` (a call's task started),
       ``{"event": "worker", "pid", "host"}`` (a persistent worker is ready),
       ``{"event": "detached", "run_dir", "supervisor_pid", "host"}`` (a detached run started),
       ``{"event": "synced", "tree", "seconds"}`` (``sync`` mode stored the tree)
    T  tree wanted, JSON ``{"tree": id}``: the call's tree is not stored on the host (the coordinator
       answers M... m). A host that has it sends nothing: no round trip is added.
    N  blobs wanted: raw 32-byte sha256 digests back to back (one or more frames), the distinct blobs of
       the manifest this host lacks, after the manifest hashed to the tree's id
    n  end of blobs wanted: JSON ``{"count": N, "bytes": N}``; when N > 0 the coordinator sends D... d
    R  result header, JSON: protocol, status, exit_code, detail, signal, exception (type, message and
       traceback text, each at most 64 Ki characters; ``chain``: the exception and its causes, oldest
       first, each with ``type``, ``only`` (its last lines), ``frames`` ([file, line, function, source, end
       line, column, end column]) and ``then`` (cause, context or null); ``roots``: where the archive and the
       run directory are), value (size and encoding: ``marshal`` or ``serializer``) or null, exc_pickle
       (size) or null, file_count (in a project's snapshot, the files the task created or changed count),
       skipped (files and folders that could not be read: path and reason, at most 100) and skipped_count,
       over_limit (files over pull_limit, not sent: path and size, at most 100), over_limit_count and
       over_limit_bytes when there was any, stray (what was still running when the task's process ended
       and had to be stopped: command and pid, at most 20) and stray_count when there was any, duration,
       python, host; ``kept``: the run directory, when the call asked to keep it or files over the limit
       stayed
    L  the manifest of the pulled files, a JSON array of {path, size, sha256}, in as many frames as it
       takes (each well under MAX_FRAME), anywhere between R and Z (today's runner sends it after the F
       frames: each file is hashed as it is read for the tar stream, read once)
    V  the value's bytes
    X  the pickled exception: ``("rx-exception-1", class, args, attributes)`` for a class that pickles the
       default way (see ``serialization.exception_parts``), else the exception itself
    F  the pulled files as an uncompressed tar stream, in manifest order
    Z  end of result, JSON ``{"hmac": hex}``: HMAC-SHA256 with the call's key over every R, L, V, X and F
       frame, each fed as type byte + 8-byte big-endian length + payload. When ``attach`` only follows a
       detached run, ``Z`` is ``{"done": status, "exit_code": N, "detail": text}`` instead and no result
       precedes it (``{"done": null}`` when its G frame asked with ``once`` for the output so far of a run
       still going).

A persistent worker that a signal ended (the out-of-memory killer, a kill -9) can send nothing; its
guardian process then writes one line on the runner's stderr, :data:`WORKER_DIED` and the result header of
the call it was running as JSON (status ``oom`` or ``signal``, exit_code, detail, signal), and exits 128 +
the signal's number.
"""

from __future__ import annotations

import struct

TYPE_CHECKING = False  # the runner imports this module on every call: no typing at run time
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any, BinaryIO

__all__ = [
    "COORDINATOR_SEND_FAILED",
    "HEADER",
    "MAX_FRAME",
    "PROTOCOL",
    "WORKER_DIED",
    "FrameReader",
    "builtin_sha256",
    "encode",
    "read_frame",
]

PROTOCOL = 1
HEADER = struct.Struct(">cI")
MAX_FRAME = 1 << 20
#: Starts the stderr line of a persistent worker's guardian when a signal ended the worker (see above).
WORKER_DIED = "RXWORKER-DIED "
#: Starts a runner's error when the coordinator aborted the project's upload (its ``d`` frame's error).
COORDINATOR_SEND_FAILED = "the coordinator could not send the project"
def encode(kind: bytes, payload: bytes | memoryview = b"") -> bytes:
    """One frame: type byte, length, payload."""
    return HEADER.pack(kind, len(payload)) + payload


def grow_pipe(fd: int) -> None:
    """Ask for a 1 MiB pipe buffer on ``fd`` (Linux; elsewhere, or if not a pipe, nothing happens): large
    transfers then move in fewer, larger reads and writes."""
    import sys

    try:
        import fcntl

        # F_SETPIPE_SZ is Linux's (1031; Python names it from 3.10): on macOS that number is not it
        command = getattr(fcntl, "F_SETPIPE_SZ", 1031 if sys.platform.startswith("linux") else None)
        if command is not None:
            fcntl.fcntl(fd, command, 1 << 20)
    except (ImportError, OSError, ValueError):
        pass


def read_exact(stream: BinaryIO, size: int) -> bytes:
    """Read exactly ``size`` bytes; fewer only at end of stream."""
    parts = []
    while size:
        chunk = stream.read(size)
        if not chunk:
            break
        parts.append(chunk)
        size -= len(chunk)
    return b"".join(parts)


def read_frame(stream: BinaryIO) -> tuple[bytes, bytes] | None:
    """Read one frame from a blocking stream; None at a clean end of stream.

    Raises:
        EOFError: The stream ended inside a frame.
        ValueError: The frame is larger than :data:`MAX_FRAME`.
    """
    header = read_exact(stream, HEADER.size)
    if not header:
        return None
    if len(header) < HEADER.size:
        raise EOFError("stream ended inside a frame header")
    kind, size = HEADER.unpack(header)
    if size > MAX_FRAME:
        raise ValueError(f"frame of {size} bytes is larger than {MAX_FRAME}")
    payload = read_exact(stream, size)
    if len(payload) < size:
        raise EOFError("stream ended inside a frame")
    return kind, payload


class FrameReader:
    """Incremental frame decoder for bytes arriving in arbitrary chunks."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        """Add bytes; return the frames they complete.

        Raises:
            ValueError: A frame is larger than :data:`MAX_FRAME` (the stream is not a runner's).
        """
        self._buffer += data
        frames = []
        while len(self._buffer) >= HEADER.size:
            kind, size = HEADER.unpack_from(self._buffer)
            if size > MAX_FRAME:
                raise ValueError(f"frame of {size} bytes is larger than {MAX_FRAME}")
            end = HEADER.size + size
            if len(self._buffer) < end:
                break
            with memoryview(self._buffer) as view:  # one copy of the payload, not two
                frames.append((kind, bytes(view[HEADER.size:end])))
            del self._buffer[:end]
        return frames

    def unread(self, frames: list[tuple[bytes, bytes]]) -> None:
        """Put ``frames`` back in front: the next :meth:`feed` returns them first."""
        self._buffer[:0] = b"".join(encode(kind, payload) for kind, payload in frames)

    @property
    def pending(self) -> int:
        """Bytes held that are not yet returned as frames."""
        return len(self._buffer)


# -- encodings that keep the runner's start-up small ----------------------------------------------------
# The runner reads the coordinator's options as marshal (built-in data; the coordinator is who it works for)
# and writes its own messages as JSON, which the coordinator reads with the json module: nothing the remote
# side sends is ever unpickled or unmarshalled as protocol data. Importing json costs the runner more than
# all the rest of its start-up (it pulls in re and enum), so it writes JSON with the small encoder below.

_JSON_ESCAPES = {code: f"\\u{code:04x}" for code in range(0x20)}
_JSON_ESCAPES.update({ord('"'): '\\"', ord("\\"): "\\\\", ord("\n"): "\\n", ord("\t"): "\\t"})
_JSON_ESCAPES_WIDE: dict[int, str] = {}  # with the lone surrogates too; built on first need


def _json_string(value: str) -> str:
    table = _JSON_ESCAPES
    if not value.isascii():
        if not _JSON_ESCAPES_WIDE:
            _JSON_ESCAPES_WIDE.update(_JSON_ESCAPES)
            _JSON_ESCAPES_WIDE.update({code: f"\\u{code:04x}" for code in range(0xD800, 0xE000)})
        table = _JSON_ESCAPES_WIDE
    return '"' + value.translate(table) + '"'


def json_text(value: object) -> str:
    """``value`` (None, bool, int, float, str, list, tuple, dict with str keys) as JSON text."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        return repr(value) if value == value and value not in (float("inf"), float("-inf")) else "null"
    if isinstance(value, str):
        return _json_string(value)
    if isinstance(value, dict):
        return "{" + ",".join(json_text(str(key)) + ":" + json_text(item) for key, item in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(json_text(item) for item in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def json_bytes(value: object) -> bytes:
    """:func:`json_text` encoded as UTF-8."""
    return json_text(value).encode("utf-8")


# -- the result's HMAC ------------------------------------------------------------------------------------


_IPAD = int.from_bytes(b"\x36" * 64, "big")
_OPAD = int.from_bytes(b"\x5c" * 64, "big")


class SmallHMAC:
    """HMAC-SHA256 (RFC 2104) over the interpreter's built-in sha256.

    ``hmac`` and ``hashlib`` load OpenSSL, which costs a process-per-call runner's start more than the
    rest of its imports; for a small result this gives the same digest without it.
    """

    def __init__(self, key: bytes) -> None:
        sha256 = builtin_sha256()
        if len(key) > 64:
            key = sha256(key).digest()
        number = int.from_bytes(key.ljust(64, b"\0"), "big")
        self._inner = sha256((number ^ _IPAD).to_bytes(64, "big"))
        self._outer = sha256((number ^ _OPAD).to_bytes(64, "big"))

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._inner.update(data)

    def hexdigest(self) -> str:
        outer = self._outer.copy()
        outer.update(self._inner.digest())
        return str(outer.hexdigest())


def builtin_sha256() -> Any:
    """The interpreter's own sha256 constructor (no OpenSSL to load: ~2 ms on a host), else hashlib's."""
    try:
        from _sha256 import sha256  # type: ignore[import-not-found,unused-ignore]  # CPython <= 3.11
    except ImportError:
        try:
            from _sha2 import sha256  # type: ignore[import-not-found,unused-ignore]  # CPython >= 3.12
        except ImportError:
            from hashlib import sha256
    return sha256


def new_hmac(key: bytes, *, bulk: bool = False) -> Any:
    """An HMAC-SHA256 of ``key``: OpenSSL's for ``bulk`` data (several times faster per byte), else
    :class:`SmallHMAC` (no OpenSSL to load)."""
    if bulk:
        import hashlib
        import hmac

        return hmac.new(key, digestmod=hashlib.sha256)
    return SmallHMAC(key)


def dump_options(options: Mapping[str, object]) -> bytes:
    """The payload of a coordinator's G or s frame (marshal: built-in data, read with no import)."""
    import marshal

    return marshal.dumps(dict(options), 4)


def load_options(payload: bytes) -> dict[str, Any]:
    """Read a G or s frame's payload (from :func:`dump_options`, or JSON)."""
    if payload[:2] in (b'{"', b"{}"):  # JSON (a marshalled dict never has a '"' as its second byte)
        import json

        data = json.loads(payload)
    else:
        import marshal

        data = marshal.loads(payload)
    if not isinstance(data, dict):
        raise ValueError("protocol: options are not a mapping")
    return data


# -- project trees: the manifest and its hash -----------------------------------------------------------

#: The format version of a tree manifest (:func:`dump_manifest`).
MANIFEST_VERSION = 1
#: A manifest entry's mode for a symbolic link (git's); a regular file's is 0o100644 or 0o100755.
LINK_MODE = 0o120000


def dump_manifest(entries: list[tuple[str, int, int, bytes, str]]) -> bytes:
    """A tree manifest (the payload of M frames and the content of the host's ``trees/<id>``): marshal of
    ``(MANIFEST_VERSION, entries)``, each entry ``(path, mode, size, sha256 digest, link target)``, sorted
    by path. ``path`` is relative, ``/``-separated; ``mode`` is 0o100644, 0o100755 or :data:`LINK_MODE`;
    a file's digest is the sha256 of its bytes (its blob), a link's the sha256 of its target (``size`` is
    the target's length), and only a link has a target."""
    import marshal

    return marshal.dumps((MANIFEST_VERSION, entries), 4)


def load_manifest(data: bytes) -> list[tuple[str, int, int, bytes, str]]:
    """The entries of a manifest made by :func:`dump_manifest`.

    Raises:
        ValueError: Not a manifest of this version.
    """
    import marshal

    try:
        version, entries = marshal.loads(data)
    except (EOFError, TypeError, ValueError) as exc:
        raise ValueError(f"not a tree manifest: {exc}") from None
    if version != MANIFEST_VERSION or not isinstance(entries, (list, tuple)):
        raise ValueError(f"tree manifest of version {version!r}; this runner reads {MANIFEST_VERSION}")
    return list(entries)


def tree_id(entries: list[tuple[str, int, int, bytes, str]]) -> str:
    """The tree's id: the sha256 (hex) over its sorted (path, mode, blob hash) list, each entry as the
    path's UTF-8 bytes, NUL, the mode in octal, NUL, then the 32-byte digest (fixed length)."""
    parts = [b"%s\0%o\0%s" % (path.encode("utf-8", "surrogateescape"), mode, blob)
             for path, mode, _size, blob, _link in entries]
    return str(builtin_sha256()(b"rx-tree-1\0" + b"".join(parts)).hexdigest())
