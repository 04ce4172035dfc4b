"""Collecting a result: the frames that carry it, its checks, the value or exception rebuilt, the files landed.

The runner sends a result as ``R`` (header), ``L`` (the list of pulled files, in as many frames as it
takes), ``V`` (value), ``X`` (pickled exception), ``F`` (a tar stream of the pulled files) and ``Z`` (end: an
HMAC-SHA256 with the per-call key over every R, L, V, X and F frame, each as type byte, 8-byte length and
payload). Nothing lands until all of it checked: the HMAC,
the declared sizes, and a sha256 per file; a result with one bad file lands none.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import json
import logging
import marshal
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any

from ..errors import IntegrityError, LocalDiskFull, WorkspaceError, printable
from ..hints import unreadable_value
from ..serialization import rebuild_exception
from ..session import Result, Session
from ..workspace.store import discard_spool
from .options import CallOptions, FileLander

if TYPE_CHECKING:
    import tarfile

__all__ = ["RESULT_FRAMES", "Received", "collect", "land_files", "rebuild_result", "safe_member_path", "write_sparse"]

logger = logging.getLogger(__name__)

#: The frames that carry a result (:meth:`Received.add` takes them).
RESULT_FRAMES = frozenset((b"R", b"L", b"V", b"X", b"F", b"Z"))
#: A value whose header declares more bytes than this streams to a spool file as it arrives and is rebuilt
#: from there (a 300 MB value then peaks at about twice its size in memory, not four times); smaller ones
#: stay in memory (a small call writes no file).
SPOOL_VALUE = 16 << 20


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
        value: The V payloads (joined once, at the end), unless the value is spooled.
        value_path: The spool file a large value streams into (see :data:`SPOOL_VALUE`), in a folder of its
            own that ``spool()`` makes as for the files (elsewhere if it does not fit there, see
            :meth:`_value_folder`); its owner removes both
            (:func:`~remote_exec.workspace.store.discard_spool`; :meth:`discard` does unless :func:`collect`
            handed it on).
        exc_data: The X payloads.
        files_path: The spool file the F payloads stream into (made when the first arrives): in a directory
            ``spool()`` makes (the run's store: the files' own file system, not a ``/tmp`` that may be
            memory), else a temporary directory.
        end: The Z frame, once the result is complete.
        failed: Why the result could not be spooled locally (a full disk): the frames are then still read
            to their end, so that the runner finishes its result and keeps it for another try.
    """

    def __init__(self, key: bytes, spool: Callable[[], Path] | None = None) -> None:
        self.mac = hmac.new(key, digestmod=hashlib.sha256)
        self.spool = spool
        self.header: dict[str, Any] | None = None
        self.files: list[Any] = []
        self.value: list[bytes] = []
        self.value_path: Path | None = None
        self.value_stream: IO[bytes] | None = None
        self.value_size = 0
        self.exc_data: list[bytes] = []
        self.files_path: Path | None = None
        self.files_stream: IO[bytes] | None = None
        self.end: dict[str, Any] | None = None
        self.failed: OSError | None = None

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
        try:
            self._keep(kind, payload)
        except OSError as exc:  # the local disk: read on to the end, keep nothing (the host keeps it)
            self.failed = exc
            self.discard()

    def _keep(self, kind: bytes, payload: bytes) -> None:
        if self.failed is not None and kind != b"R":
            return
        if kind == b"R":
            try:
                self.header = json.loads(payload)
            except ValueError:  # damaged: the HMAC check in collect() refuses the result
                self.header = {}
            if self._declared_value() > SPOOL_VALUE:
                self.value_path = self._value_folder(self._declared_value()) / "value.pickle"
                self.value_stream = self.value_path.open("xb")
        elif kind == b"L":
            try:
                listed = json.loads(payload)
            except ValueError:  # damaged: the HMAC check refuses the result
                listed = []
            self.files += listed if isinstance(listed, list) else []
        elif kind == b"V":
            self.value_size += len(payload)
            if self.value_stream is not None:
                self.value_stream.write(payload)
            else:
                self.value.append(payload)
        elif kind == b"X":
            self.exc_data.append(payload)
        else:
            write_sparse(self._spool(), payload)

    def _declared_value(self) -> int:
        declared = self.header.get("value") if isinstance(self.header, dict) else None
        try:
            return int(declared.get("size") or 0) if isinstance(declared, dict) else 0
        except (TypeError, ValueError):
            return 0

    def large_value_follows(self) -> bool:
        """True when the header just received declares a value over 1 MiB."""
        return self._declared_value() > (1 << 20)

    def _spool(self) -> IO[bytes]:
        if self.files_stream is None:
            self.files_path = self._spool_folder() / "files.tar"
            self.files_stream = self.files_path.open("wb")
        return self.files_stream

    def _spool_folder(self) -> Path:
        if self.spool is None:
            return Path(tempfile.mkdtemp(prefix="rx-collect-"))
        try:
            return self.spool()
        except WorkspaceError as exc:  # the store's words for a failed disk operation: as a disk's error
            raise exc.__cause__ if isinstance(exc.__cause__, OSError) else OSError(str(exc)) from exc

    def _value_folder(self, size: int) -> Path:
        """Where a value of ``size`` bytes spools: beside the files (the workspace's disk) when it fits there,
        else in a temporary directory when it fits there (the value is the caller's even if it cannot be
        recorded), else beside the files all the same (the full disk then says so)."""
        try:
            folder: Path | None = self._spool_folder()
        except OSError:  # the workspace's disk
            folder = None
        if folder is not None and (self.spool is None or _free(folder) >= size + SPOOL_VALUE):
            return folder
        elsewhere = Path(tempfile.mkdtemp(prefix="rx-collect-"))
        if folder is None or _free(elsewhere) >= size + SPOOL_VALUE:
            if folder is not None:
                folder.rmdir()
            return elsewhere
        elsewhere.rmdir()
        return folder

    def close_spool(self) -> None:
        """The files (and the value) have all arrived (a disk that filled up on the last writes counts as
        :attr:`failed`)."""
        for stream in (self.files_stream, self.value_stream):
            if stream is not None and not stream.closed:
                try:
                    stream.truncate()  # its size, if it ends in a hole
                    stream.close()
                except OSError as exc:
                    self.failed = self.failed or exc
                    with contextlib.suppress(OSError):
                        stream.close()  # closed all the same

    def discard(self) -> None:
        """Remove the spool files (what landed was moved out of them; a value handed on is its owner's)."""
        self.close_spool()
        if self.files_path is not None:
            shutil.rmtree(self.files_path.parent, ignore_errors=True)
        if self.value_path is not None:
            discard_spool(self.value_path)


def _free(folder: Path) -> int:
    """The bytes free on ``folder``'s file system (0 when it cannot be told)."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 0


def write_sparse(stream: IO[bytes], data: bytes) -> None:
    """Write ``data``, or skip over it when it is all zeros (the file keeps a hole there: a sparse file that
    crossed the link as zeros lands sparse). The writer truncates the file at its end."""
    if len(data) >= 4096 and not data[0] and not data[-1] and data.count(0) == len(data):
        stream.seek(len(data), os.SEEK_CUR)
    else:
        stream.write(data)


def _checked_parts(received: Received, host: str) -> tuple[dict[str, Any], bytes | Path, bytes]:
    """The header, the value (its bytes, or the spool file holding them) and the exception bytes, once the
    HMAC and the declared sizes agree."""
    if received.header is None or received.end is None:
        raise IntegrityError(f"{host}: the runner sent no result header")
    if not hmac.compare_digest(received.mac.hexdigest(), str(received.end.get("hmac", ""))):
        raise IntegrityError(f"{host}: the result failed its HMAC check; it was not accepted",
                             hint="something changed the result in transit or on the remote disk")
    header = received.header
    received.close_spool()
    value: bytes | Path = received.value[0] if len(received.value) == 1 else b"".join(received.value)
    if received.value_path is not None:
        value = received.value_path
    exc_data = b"".join(received.exc_data)
    received.value.clear()
    for name, size in (("value", received.value_size), ("exc_pickle", len(exc_data))):
        expected = header.get(name)
        if expected is None and size:
            raise IntegrityError(f"{host}: the result carries an undeclared {name}")
        if expected is not None and size != expected["size"]:  # its content is under the HMAC
            raise IntegrityError(f"{host}: the result's {name} is damaged (size mismatch)")
    return header, value, exc_data


def collect(received: Received, host: str, session: Session, options: CallOptions,
            land_file: FileLander | None) -> tuple[Result, list[Path], bytes | Path]:
    """Check a complete result and rebuild it; land its files.

    Returns:
        The result, the local paths of the landed files, and the value as the runner pickled it: its bytes,
        or a large value's spool file, which the caller then owns (b"" when it came as marshal: it is then
        recorded from the object).

    Raises:
        IntegrityError: A check failed; nothing landed.
    """
    if received.failed is not None:
        raise _disk_full(host, received.failed)
    header, value, exc_data = _checked_parts(received, host)
    try:
        result = rebuild_result(header, value, exc_data, session, options)
    except (ImportError, AttributeError) as exc:  # the value needs a module this side lacks, or has at another version
        pickled = value if isinstance(value, bytes) else b""  # a spooled value: the host's list of packages
        raise unreadable_value(exc, pickled, task=session.task.name, host=host, remote=header.get("packages")) from exc
    _warn_of_leftovers(host, header)
    landed: list[Path] = []
    if land_file is not None and header.get("files"):
        try:
            landed = land_files(received, host, header["files"], land_file)
        except (OSError, WorkspaceError) as exc:
            cause = exc if isinstance(exc, OSError) else exc.__cause__
            if not isinstance(cause, OSError) or cause.errno not in DISK_FULL:
                raise
            raise _disk_full(host, cause) from exc
    if (header.get("value") or {}).get("encoding") == "marshal":
        value = b""
    elif isinstance(value, Path):
        received.value_path = None  # handed on: the caller records it, then removes it
    return result, landed, value


#: The errors of a local disk (or quota) that filled up.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _disk_full(host: str, exc: OSError) -> WorkspaceError:
    """The error for a result that could not be kept locally: :class:`LocalDiskFull` for a full disk."""
    where = f" ({exc.filename})" if exc.filename else ""
    if exc.errno not in DISK_FULL:
        return WorkspaceError(f"{host}: the result could not be kept locally: {exc.strerror or exc}{where}")
    return LocalDiskFull(f"{host}: the result could not be landed: the local disk is full{where}; nothing of "
                         "it landed")


def _warn_of_leftovers(host: str, header: dict[str, Any]) -> None:
    """Say what the result could not carry (unreadable files) and what the runner had to stop after the task
    ended (processes it left running)."""
    skipped = int(header.get("skipped_count") or 0)
    if skipped:
        named = ", ".join(f"{entry.get('path')} ({entry.get('reason')})" for entry in header.get("skipped") or [])
        logger.warning("%s: %d file(s) or folder(s) the task left could not be read and were not brought back: %s",
                       host, skipped, printable(named[:500]))
    stray = header.get("stray") or []
    if stray:
        logger.warning("%s: the task left %d process(es) running; rx stopped them: %s", host,
                       int(header.get("stray_count") or len(stray)), printable(", ".join(map(str, stray))[:500]))



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


def _value(header: dict[str, Any], value: bytes | Path, session: Session, options: CallOptions) -> Any:
    """The value rebuilt from its bytes, or from its spool file: a pickle is read from the file as it goes
    (the value's own bytes are the only large allocation), marshal needs the bytes whole (twice its size)."""
    encoding = (header.get("value") or {}).get("encoding")
    if encoding == "marshal":
        if options.restricted:
            raise IntegrityError(f"{header.get('host', 'the host')}: restricted mode was sent a marshalled "
                                 "value it did not ask for; it was not accepted")
        try:
            return marshal.loads(value if isinstance(value, bytes) else value.read_bytes())
        except (ValueError, EOFError, TypeError) as exc:
            raise IntegrityError(f"the result's value is damaged: {exc}") from exc
    if session.serializer == "pickle" and isinstance(value, Path) and not options.restricted:
        with value.open("rb") as stream:
            return pickle.load(stream)
    data = value if isinstance(value, bytes) else value.read_bytes()
    if session.serializer == "pickle":
        return _unpickler(options)(data)
    from ..serialization import get_serializer

    return get_serializer(session.serializer).loads(data)


def rebuild_result(header: dict[str, Any], value: bytes | Path, exc_data: bytes, session: Session,
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


def _stage_member(host: str, archive: tarfile.TarFile, member: tarfile.TarInfo,
                  expected: dict[str, dict[str, Any]], staged: Path, folders: set[Path]) -> PurePosixPath:
    """Write one member to its path under ``staged`` (``folders``: the directories made there so far),
    checking it against the manifest as it goes; return its path."""
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
    target = staged.joinpath(*relative.parts)
    try:
        if target.parent not in folders:
            os.makedirs(target.parent, exist_ok=True)
            folders.add(target.parent)
        stream = open(target, "xb")  # noqa: SIM115 - closed by the `with stream:` below
    except (FileExistsError, NotADirectoryError, IsADirectoryError):
        raise IntegrityError(f"{host}: the result's file {member.name!r} clashes with another of its files "
                             "(the same name, or a file where a folder is)") from None
    digest = hashlib.sha256()
    with stream:
        while block := source.read(1 << 20):
            digest.update(block)
            write_sparse(stream, block)
        stream.truncate()
    if digest.hexdigest() != listed["sha256"]:
        raise IntegrityError(f"{host}: pulled file {member.name!r} is damaged (sha256 mismatch)")
    return relative


def land_files(received: Received, host: str, manifest: list[dict[str, Any]], land_file: FileLander) -> list[Path]:
    """Check every pulled file as it is written where ``land_file`` stages them, then land them all: a result
    with one bad member lands nothing."""
    expected = _expected_files(host, manifest)
    spool = received.files_path
    if spool is None or not spool.exists():
        raise IntegrityError(f"{host}: the result lists files but carries none")
    import tarfile  # (only a call that brings files back needs it)

    staged = land_file.stage()
    written: list[PurePosixPath] = []
    try:
        folders = {staged}
        with tarfile.open(spool, mode="r:") as archive:
            for member in archive:
                written.append(_stage_member(host, archive, member, expected, staged, folders))
        if expected:
            raise IntegrityError(f"{host}: the result is missing listed files: {', '.join(sorted(expected))}")
    except BaseException as exc:
        shutil.rmtree(staged, ignore_errors=True)
        if isinstance(exc, (tarfile.TarError, EOFError)):
            raise IntegrityError(f"{host}: the result's files are damaged: {exc}") from exc
        raise
    return land_file.land(staged, written)
