"""Collecting a result: the frames that carry it, its checks, the value or exception rebuilt, the files landed.

The runner sends a result as ``R`` (header), ``L`` (the list of pulled files, in as many frames as it
takes), ``V`` (value), ``X`` (pickled exception), ``F`` (a tar stream of the pulled files) and ``Z`` (end: an
HMAC-SHA256 with the per-call key over every R, L, V, X and F frame, each as type byte, 8-byte length and
payload). Nothing lands until all of it checked: the HMAC,
the declared sizes, and a sha256 per file; a result with one bad file lands none.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import marshal
import pickle
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import IO, Any

from ..errors import IntegrityError
from ..hints import unreadable_value
from ..serialization import rebuild_exception
from ..session import Result, Session
from .options import CallOptions, FileLander

__all__ = ["RESULT_FRAMES", "Received", "collect", "land_files", "rebuild_result", "safe_member_path"]

logger = logging.getLogger(__name__)

#: The frames that carry a result (:meth:`Received.add` takes them).
RESULT_FRAMES = frozenset((b"R", b"L", b"V", b"X", b"F", b"Z"))


def safe_member_path(name: str) -> PurePosixPath:
    """A file name from a result archive as a safe relative path.

    Raises:
        IntegrityError: Absolute, empty, or climbing out with ``..``.
    """
    path = PurePosixPath(name)
    if not name or path.is_absolute() or ".." in path.parts or "\\" in name or name.startswith("~"):
        raise IntegrityError(f"the result holds a file outside its run directory: {name!r}")
    return path


class Received:
    """The result frames of one call as they arrive, and their running HMAC.

    Attributes:
        header: The R frame (None until it arrived; ``{}`` if it was not JSON: the HMAC check refuses it);
            once the result is complete, its ``files`` hold the list the L frames carried.
        files: The entries of the L frames so far.
        value: The V payloads (joined once, at the end).
        exc_data: The X payloads.
        files_path: The spool file the F payloads stream into (made when the first arrives).
        end: The Z frame, once the result is complete.
    """

    def __init__(self, key: bytes) -> None:
        self.mac = hmac.new(key, digestmod=hashlib.sha256)
        self.header: dict[str, Any] | None = None
        self.files: list[Any] = []
        self.value: list[bytes] = []
        self.exc_data: list[bytes] = []
        self.files_path: Path | None = None
        self.files_stream: IO[bytes] | None = None
        self.end: dict[str, Any] | None = None

    def add(self, kind: bytes, payload: bytes) -> None:
        """Take one of :data:`RESULT_FRAMES`."""
        if kind == b"Z":
            self.end = json.loads(payload)
            if isinstance(self.header, dict):
                listed = self.header.get("files")
                self.header["files"] = (listed if isinstance(listed, list) else []) + self.files
            return
        self.mac.update(kind + len(payload).to_bytes(8, "big"))
        self.mac.update(payload)
        if kind == b"R":
            try:
                self.header = json.loads(payload)
            except ValueError:  # damaged: the HMAC check in collect() refuses the result
                self.header = {}
        elif kind == b"L":
            try:
                listed = json.loads(payload)
            except ValueError:  # damaged: the HMAC check refuses the result
                listed = []
            self.files += listed if isinstance(listed, list) else []
        elif kind == b"V":
            self.value.append(payload)
        elif kind == b"X":
            self.exc_data.append(payload)
        else:
            self._spool().write(payload)

    def large_value_follows(self) -> bool:
        """True when the header just received declares a value over 1 MiB."""
        declared = self.header.get("value") if isinstance(self.header, dict) else None
        return isinstance(declared, dict) and int(declared.get("size") or 0) > (1 << 20)

    def _spool(self) -> IO[bytes]:
        if self.files_stream is None:
            self.files_path = Path(tempfile.mkdtemp(prefix="rx-collect-")) / "files.tar"
            self.files_stream = self.files_path.open("wb")
        return self.files_stream

    def close_spool(self) -> None:
        """The files have all arrived."""
        if self.files_stream is not None and not self.files_stream.closed:
            self.files_stream.close()

    def discard(self) -> None:
        """Remove the spool file (what landed was moved out of it)."""
        self.close_spool()
        if self.files_path is not None:
            shutil.rmtree(self.files_path.parent, ignore_errors=True)


def _checked_parts(received: Received, host: str) -> tuple[dict[str, Any], bytes, bytes]:
    """The header, value and exception bytes, once the HMAC and the declared sizes agree."""
    if received.header is None or received.end is None:
        raise IntegrityError(f"{host}: the runner sent no result header")
    if not hmac.compare_digest(received.mac.hexdigest(), str(received.end.get("hmac", ""))):
        raise IntegrityError(f"{host}: the result failed its HMAC check; it was not accepted",
                             hint="something changed the result in transit or on the remote disk")
    header = received.header
    value = received.value[0] if len(received.value) == 1 else b"".join(received.value)
    exc_data = b"".join(received.exc_data)
    received.value.clear()
    for name, data in (("value", value), ("exc_pickle", exc_data)):
        expected = header.get(name)
        if expected is None and data:
            raise IntegrityError(f"{host}: the result carries an undeclared {name}")
        if expected is not None and len(data) != expected["size"]:  # its content is under the HMAC
            raise IntegrityError(f"{host}: the result's {name} is damaged (size mismatch)")
    return header, value, exc_data


def collect(received: Received, host: str, session: Session, options: CallOptions,
            land_file: FileLander | None) -> tuple[Result, list[Path], bytes]:
    """Check a complete result and rebuild it; land its files.

    Returns:
        The result, the local paths of the landed files, and the value as the runner pickled it (b""
        when it came as marshal: it is then recorded from the object).

    Raises:
        IntegrityError: A check failed; nothing landed.
    """
    header, value, exc_data = _checked_parts(received, host)
    try:
        result = rebuild_result(header, value, exc_data, session, options)
    except (ImportError, AttributeError) as exc:  # the value needs a module this side lacks, or has at another version
        raise unreadable_value(exc, value, task=session.task.name, host=host, remote=header.get("packages")) from exc
    _warn_of_leftovers(host, header)
    landed: list[Path] = []
    if land_file is not None and header.get("files"):
        landed = land_files(received, host, header["files"], land_file)
    if (header.get("value") or {}).get("encoding") == "marshal":
        value = b""
    return result, landed, value


def _warn_of_leftovers(host: str, header: dict[str, Any]) -> None:
    """Say what the result could not carry (unreadable files) and what the runner had to stop after the task
    ended (processes it left running)."""
    skipped = int(header.get("skipped_count") or 0)
    if skipped:
        named = ", ".join(f"{entry.get('path')} ({entry.get('reason')})" for entry in header.get("skipped") or [])
        logger.warning("%s: %d file(s) or folder(s) the task left could not be read and were not brought back: %s",
                       host, skipped, _printable(named[:500]))
    stray = header.get("stray") or []
    if stray:
        logger.warning("%s: the task left %d process(es) running; rx stopped them: %s", host,
                       int(header.get("stray_count") or len(stray)), _printable(", ".join(map(str, stray))[:500]))


def _printable(text: str) -> str:
    return "".join(char if char.isprintable() else f"\\x{ord(char):02x}" for char in text)


def _unpickler(options: CallOptions) -> Any:
    if options.restricted:
        from ..serialization import restricted_loads

        return lambda data: restricted_loads(data, options.allow_unpickle)
    return pickle.loads


def _with_exception_text(result: Result, exception: dict[str, Any] | None) -> Result:
    if exception is not None:
        result.exception_type = exception.get("type")
        result.exception_message = exception.get("message")
        result.traceback = exception.get("traceback")
    return result


def _raised(exception: dict[str, Any], exc_data: bytes, exit_code: int, status: str, options: CallOptions) -> Result:
    """A function task's exception: rebuilt as its own type when it unpickles, else a RemoteError."""
    traceback_text = exception.get("traceback") or ""
    if exc_data:
        try:
            exc = rebuild_exception(_unpickler(options)(exc_data))
            if exc is not None:
                return Result.from_exception(exc, traceback_text, exit_code=exit_code, status=status)
        except Exception:
            logger.debug("remote exception %s could not be rebuilt", exception.get("type"), exc_info=True)
    return Result.from_remote_text(exception.get("type", "Exception"), exception.get("message", ""),
                                   traceback_text, exit_code=exit_code, status=status)


def _value(header: dict[str, Any], value: bytes, session: Session, options: CallOptions) -> Any:
    encoding = (header.get("value") or {}).get("encoding")
    if encoding == "marshal":
        if options.restricted:
            raise IntegrityError(f"{header.get('host', 'the host')}: restricted mode was sent a marshalled "
                                 "value it did not ask for; it was not accepted")
        try:
            return marshal.loads(value)
        except (ValueError, EOFError, TypeError) as exc:
            raise IntegrityError(f"the result's value is damaged: {exc}") from exc
    if session.serializer == "pickle":
        return _unpickler(options)(value)
    from ..serialization import get_serializer

    return get_serializer(session.serializer).loads(value)


def rebuild_result(header: dict[str, Any], value: bytes, exc_data: bytes, session: Session,
                   options: CallOptions) -> Result:
    """The :class:`Result` a checked result header, value and exception stand for."""
    status = header.get("status", "error")
    exit_code = int(header.get("exit_code", 1))
    exception = header.get("exception")
    if exception is not None and session.task.kind == "function":
        return _raised(exception, exc_data, exit_code, status, options)
    if status in ("timeout", "cancelled", "signal", "oom", "error", "lost"):
        return _with_exception_text(Result(status=status, exit_code=exit_code, detail=header.get("detail")),
                                    exception)
    # A script that raised: its traceback was printed, its exit code is 1.
    result = _with_exception_text(Result(status=status, exit_code=exit_code), exception)
    if value:
        result.value = _value(header, value, session, options)
    return result


def _expected_files(host: str, manifest: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    expected: dict[str, dict[str, Any]] = {}
    for entry in manifest:
        try:
            expected[str(safe_member_path(entry["path"]))] = entry
        except IntegrityError as exc:
            raise IntegrityError(f"{host}: {exc}") from None
    return expected


def _check_member(host: str, archive: tarfile.TarFile, member: tarfile.TarInfo,
                  expected: dict[str, dict[str, Any]], folder: Path,
                  checked: list[tuple[PurePosixPath, Path, str]]) -> None:
    """Copy one member out to a temporary file beside the spool (listed in ``checked`` at once, so it is
    removed on any failure) and check it against the manifest."""
    try:
        relative = safe_member_path(member.name)
    except IntegrityError as exc:
        raise IntegrityError(f"{host}: {exc}") from None
    if not member.isfile():
        raise IntegrityError(f"{host}: the result holds a non-regular file {member.name!r}")
    listed = expected.pop(str(relative), None)
    if listed is None:
        raise IntegrityError(f"{host}: the result holds an unlisted file {member.name!r}")
    source = archive.extractfile(member)
    assert source is not None
    with tempfile.NamedTemporaryFile(dir=folder, delete=False) as temporary:
        checked.append((relative, Path(temporary.name), listed["sha256"]))
        digest = hashlib.sha256()
        while block := source.read(1 << 20):
            digest.update(block)
            temporary.write(block)
    if digest.hexdigest() != listed["sha256"]:
        raise IntegrityError(f"{host}: pulled file {member.name!r} is damaged (sha256 mismatch)")


def land_files(received: Received, host: str, manifest: list[dict[str, Any]], land_file: FileLander) -> list[Path]:
    """Check every pulled file, then land them all: a result with one bad member lands nothing."""
    expected = _expected_files(host, manifest)
    spool = received.files_path
    if spool is None or not spool.exists():
        raise IntegrityError(f"{host}: the result lists files but carries none")
    checked: list[tuple[PurePosixPath, Path, str]] = []
    try:
        with tarfile.open(spool, mode="r:") as archive:
            for member in archive:
                _check_member(host, archive, member, expected, spool.parent, checked)
        if expected:
            raise IntegrityError(f"{host}: the result is missing listed files: {', '.join(sorted(expected))}")
    except BaseException as exc:
        for _, temporary_path, _ in checked:
            temporary_path.unlink(missing_ok=True)
        if isinstance(exc, (tarfile.TarError, EOFError)):
            raise IntegrityError(f"{host}: the result's files are damaged: {exc}") from exc
        raise
    return [land_file(relative, temporary_path, sha256) for relative, temporary_path, sha256 in checked]
