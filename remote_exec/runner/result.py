"""How a task ended, and its result on the wire: classify the ending (status, exit code, signal, OOM), list
the files it left (what cannot be read is skipped and named), send the R, L, V, X and F frames and the Z frame
with the HMAC over them."""

from __future__ import annotations

import io
import os
import sys
import time

from ..protocol import wire
from .rundir import PRIVATE, keep_for_pull_limit

TYPE_CHECKING = False  # typing is not imported at run time: the runner's start-up is on every call's path
if TYPE_CHECKING:
    import signal
    from collections.abc import Callable
    from typing import Any

    from .channel import Out
    from .child import Loaded
    from .snapshot import Changes
else:
    import _signal as signal

__all__ = ["Ending", "classify", "oom_kills", "send_classified", "send_result"]

_PYTHON = "{}.{}.{}".format(*sys.version_info[:3])


class Ending:
    """How a call's task ended, as the runner saw it (what :func:`classify` turns into a result header).

    Attributes:
        started: When the call started (monotonic clock): the result's duration counts from there.
        exit_status: The task process's wait status (None: it was not waited for, or ran in this process
            and was cut short).
        status: The status the runner decided (timeout, cancelled), None when the task decides it.
        detail: The detail of that status.
        oom_before: The cgroup's count of OOM kills before the task started (None: unknown).
        loaded: What the task sent: (record, value, exception); None if nothing arrived whole.
        contained: What had to be stopped after the task's own process ended (``stray``, ``stray_count``).
        release: Called once the result went out: removes what held the task (its cgroup), off the
            result's path.
    """

    __slots__ = ("contained", "detail", "exit_status", "loaded", "oom_before", "release", "started", "status")

    def __init__(self, started: float, *, exit_status: int | None = None, status: str | None = None,
                 detail: str | None = None, oom_before: int | None = None, loaded: Loaded | None = None,
                 contained: dict[str, Any] | None = None, release: Callable[[], None] | None = None) -> None:
        self.started = started
        self.release = release or _nothing
        self.exit_status = exit_status
        self.status = status
        self.detail = detail
        self.oom_before = oom_before
        self.loaded = loaded
        self.contained = contained or {}


def _nothing() -> None:
    """Nothing to release."""


def oom_kills() -> int | None:
    """How many processes the kernel's OOM killer ended in this cgroup so far (None: unknown)."""
    for path in ("/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control"):
        try:
            with open(path) as stream:
                for line in stream:
                    name, _, value = line.partition(" ")
                    if name == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            continue
    return None


def _signal_name(number: int) -> str:
    """``SIGKILL`` for 9 (the signal module, with its enum, is imported only on this rare path)."""
    import signal as signals

    try:
        return signals.Signals(number).name
    except ValueError:
        return f"signal {number}"


def send_result(options: dict[str, Any], run_dir: str, ending: Ending, out: Out, *, reuse: bool = False) -> bool:
    """Classify how the task ended, then send its result (see :func:`send_classified`).

    Returns True when the run directory was kept for the next call (``reuse``, and the task left it empty).
    """
    header, value, exc_data = classify(options, ending)
    return send_classified(options, run_dir, header, value, exc_data, out, reuse=reuse)


def classify(options: dict[str, Any], ending: Ending) -> Loaded:
    """The result header (status, exit code, signal, exception) and the value and exception bytes."""
    loaded = ending.loaded
    record = loaded[0] if loaded is not None else None
    exit_code, signal_number = _exit_of(ending.exit_status)
    status, detail = ending.status, ending.detail
    if status is None and record is not None:
        status, exit_code = record["status"], record["exit_code"]
    elif status is None:
        status, detail = _without_record(options, ending, exit_code, signal_number)
    header: dict[str, Any] = {"protocol": wire.PROTOCOL, "duration": time.monotonic() - ending.started,
                              "python": _PYTHON, "host": os.uname().nodename, "status": status,
                              "exit_code": exit_code, "detail": detail,
                              "signal": _signal_name(signal_number) if signal_number else None}
    if record is not None:
        header["exception"] = record.get("exception")
        if record.get("packages"):
            header["packages"] = record["packages"]
    header.update(ending.contained)
    value, exc_data = (loaded[1], loaded[2]) if loaded is not None else (b"", b"")
    # Sizes only: the content of both is under the result's HMAC.
    header["value"] = ({"size": len(value), "encoding": (record or {}).get("value_encoding", "serializer")}
                       if value else None)
    header["exc_pickle"] = {"size": len(exc_data)} if exc_data else None
    return header, value, exc_data


def _exit_of(exit_status: int | None) -> tuple[int, int | None]:
    """(exit code, signal number) of a wait status; not waited for counts as killed by SIGKILL."""
    if exit_status is None:
        return 128 + signal.SIGKILL, None
    if os.WIFSIGNALED(exit_status):
        return 128 + os.WTERMSIG(exit_status), os.WTERMSIG(exit_status)
    return os.WEXITSTATUS(exit_status), None


def _without_record(options: dict[str, Any], ending: Ending, exit_code: int,
                    signal_number: int | None) -> tuple[str, str | None]:
    """(status, detail) of a task process that ended without sending its record."""
    if signal_number is not None:
        oom_after = oom_kills()
        name = _signal_name(signal_number)
        if ending.oom_before is not None and oom_after is not None and oom_after > ending.oom_before:
            return "oom", f"killed by the kernel's out-of-memory killer ({name})"
        return "signal", f"killed by {name}"
    if options.get("kind") in ("script", "module"):
        return "finished", None  # os._exit(N) in a script: its exit code is its result
    return "error", f"the task process exited with status {exit_code} without a result"


def send_classified(options: dict[str, Any], run_dir: str, header: dict[str, Any], value: bytes | memoryview,
                    exc_data: bytes | memoryview, out: Out, *, reuse: bool = False, remove: bool = True,
                    answer: Callable[[], bool] | None = None) -> bool:
    """Send R, L, V, X, F frames, clean the run directory, send Z (the HMAC over the result).

    With ``reuse``, a run directory the task left empty (a project's snapshot: untouched) is kept
    (creating and removing a directory costs a persistent worker's small call more than all the rest);
    returns True when it was. In a project's snapshot, the files are those the task created or changed.
    Without ``remove`` (a detached run's collection) the run directory stays until the coordinator
    acknowledges. With ``answer`` (a held call's) the coordinator says, after Z, what becomes of the result:
    ``answer()`` waits for that and returns True when the run directory must stay (kept for ``rx attach``).
    """
    from .snapshot import changes

    names = os.listdir(run_dir)
    found = changes(run_dir) if options.get("tree") else None
    files: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    if names and not options.get("no_pull"):
        files, skipped = _files(options, run_dir, found, _Beat(out))
    files, over = _capped(files, options.get("pull_limit"))
    header = dict(header, file_count=len(files), skipped=skipped[:_SKIPPED_LISTED], skipped_count=len(skipped),
                  **_over_limit(over),
                  **({"kept": run_dir} if options.get("keep") or over else {}))  # over the limit: it stays
    size = len(value) + len(exc_data) + sum(entry["size"] for entry in files)
    out.sign(size=size)
    if size > (1 << 20):
        wire.grow_pipe(out.fd)
    out.hold()
    out.send(b"R", out.json_text(header).encode(), signed=True)
    if value:
        out.send_chunks(b"V", value)
    if exc_data:
        out.send_chunks(b"X", exc_data)
    if files:
        _send_files(run_dir, files, out)  # each hashed as it is read for the tar stream: read once
        _send_file_list(files, out)  # (the coordinator takes L frames at any point before Z)
    if over:
        keep_for_pull_limit(run_dir)
    return _end(options, run_dir, found, out, reuse=reuse and remove, empty=not names, keep=bool(over) or not remove,
                answer=answer)


def _end(options: dict[str, Any], run_dir: str, found: Changes | None, out: Out, *, reuse: bool, empty: bool,
         keep: bool, answer: Callable[[], bool] | None) -> bool:
    """Settle the run directory (see :func:`.snapshot.close_run_dir`) and send Z; with ``answer``, Z first,
    then the coordinator's answer says whether the directory stays."""
    from .snapshot import close_run_dir

    if answer is None:
        kept = close_run_dir(options, run_dir, found, reuse=reuse, empty=empty, keep=keep)
    out.send(b"Z", out.json_text({"hmac": out.mac.hexdigest()}).encode())
    out.release()
    if answer is not None:
        stays = answer()
        kept = close_run_dir(options, run_dir, found, reuse=False, empty=empty, keep=keep or stays)
    return kept


def _files(options: dict[str, Any], run_dir: str, found: Changes | None,
           beat: Callable[[], None]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The files to send and those that could not be read: a project run's outputs, or every file the
    task left; those matching the ``pull`` globs if there are any."""
    patterns = options.get("pull") or []
    if found is None:
        return _manifest(run_dir, patterns, beat)
    entries: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = list(found.skipped)
    for relative in found.outputs:
        if patterns and not _matches(relative, patterns):
            continue
        try:
            entries.append(_file_entry(os.path.join(run_dir, relative), relative, beat))
        except OSError as exc:
            skipped.append({"path": relative, "reason": exc.strerror or str(exc)})
    return entries, skipped


def _capped(files: list[dict[str, Any]], limit: int | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The files that fit in ``limit`` bytes (in order), and those left behind (path and size)."""
    if limit is None or sum(entry["size"] for entry in files) <= limit:
        return files, []
    kept, over, total = [], [], 0
    for entry in files:
        if total + entry["size"] <= limit:
            kept.append(entry)
            total += entry["size"]
        else:
            over.append({"path": entry["path"], "size": entry["size"]})
    return kept, over


def _over_limit(over: list[dict[str, Any]]) -> dict[str, Any]:
    """The header's account of the files left behind by the pull limit (the first ones named)."""
    if not over:
        return {}
    return {"over_limit": over[:_SKIPPED_LISTED], "over_limit_count": len(over),
            "over_limit_bytes": sum(entry["size"] for entry in over)}


#: Skipped files named in a result header (the count says how many there were in all).
_SKIPPED_LISTED = 100
#: Bytes of file list per L frame (well under the frame limit, whatever the path lengths).
_LIST_CHUNK = 1 << 18


def _send_file_list(files: list[dict[str, Any]], out: Out) -> None:
    """The manifest in signed L frames, each a JSON array of at most :data:`_LIST_CHUNK` bytes or so."""
    chunk: list[str] = []
    size = 0
    for entry in files:
        text = out.json_text(entry)
        if chunk and size + len(text) > _LIST_CHUNK:
            out.send(b"L", ("[" + ",".join(chunk) + "]").encode(), signed=True)
            chunk, size = [], 0
        chunk.append(text)
        size += len(text) + 1
    if chunk:
        out.send(b"L", ("[" + ",".join(chunk) + "]").encode(), signed=True)


class _Beat:
    """Heartbeats while the result is prepared (hashing 20,000 files or a 10 GB one takes longer than the
    coordinator waits for a sign of life): a B frame whenever nothing went out for a second."""

    def __init__(self, out: Out) -> None:
        self.out = out

    def __call__(self) -> None:
        if time.monotonic() - self.out.last > 1.0:
            self.out.send(b"B")


def _manifest(run_dir: str, patterns: list[str],
              beat: Callable[[], None]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Path and size of each regular file the task left (matching one of ``patterns``, if any), for
    :func:`_send_files` to hash; and the files and directories that could not be read (path and reason),
    which are skipped."""
    entries: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []

    def unreadable(error: OSError) -> None:
        path = os.path.relpath(error.filename or run_dir, run_dir).replace(os.sep, "/")
        skipped.append({"path": path + "/", "reason": error.strerror or str(error)})

    for directory, dirnames, filenames in os.walk(run_dir, onerror=unreadable):
        relative_dir = os.path.relpath(directory, run_dir)
        if relative_dir == ".":
            dirnames[:] = [d for d in dirnames if d != PRIVATE]
        dirnames.sort()
        for filename in sorted(filenames):
            path = os.path.join(directory, filename)
            relative = os.path.normpath(os.path.join(relative_dir, filename)).replace(os.sep, "/")
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            if patterns and not _matches(relative, patterns):
                continue
            try:
                entries.append(_file_entry(path, relative, beat))
            except OSError as exc:
                skipped.append({"path": relative, "reason": exc.strerror or str(exc)})
    return entries, skipped


def _matches(relative: str, patterns: list[str]) -> bool:
    """Whether ``relative`` matches one of the ``pull`` globs (fnmatch loads re: only a call with globs
    pays for it)."""
    import fnmatch

    return any(fnmatch.fnmatch(relative, pattern) for pattern in patterns)


def _file_entry(path: str, relative: str, beat: Callable[[], None]) -> dict[str, Any]:
    """The file's entry (its sha256 comes as it is sent); opened, so that one that cannot be read is skipped
    and listed as such before anything is sent."""
    beat()
    with open(path, "rb") as stream:
        return {"path": relative, "size": os.fstat(stream.fileno()).st_size}


class _FrameStream(io.RawIOBase):
    """A writable stream whose bytes go out as signed F frames."""

    def __init__(self, out: Out) -> None:
        self.out = out

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.out.send_chunks(b"F", bytes(data))
        return len(data)


class _Hashed:
    """A file read through a sha256 of what was read."""

    def __init__(self, stream: Any, digest: Any) -> None:
        self.stream, self.digest = stream, digest

    def read(self, size: int = -1) -> bytes:
        data: bytes = self.stream.read(size)
        self.digest.update(data)
        return data


def _send_files(run_dir: str, files: list[dict[str, Any]], out: Out) -> None:
    """The files as an uncompressed tar stream in F frames; each entry gets the sha256 of the bytes that
    went (a file changed since it was listed is then sent as it was read, whole or not at all: tarfile
    refuses one that shrank)."""
    import hashlib
    import tarfile

    stream = io.BufferedWriter(_FrameStream(out), buffer_size=wire.MAX_FRAME)
    # (tarfile's own 16 KiB reads: a larger copybufsize makes its stream mode copy its buffer over and over)
    with tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT) as archive:
        for entry in files:
            info = tarfile.TarInfo(entry["path"])
            info.size = entry["size"]
            info.mode = 0o644
            digest = hashlib.sha256()
            with open(os.path.join(run_dir, entry["path"]), "rb") as source:
                archive.addfile(info, _Hashed(source, digest))
            entry["sha256"] = digest.hexdigest()
    stream.flush()
