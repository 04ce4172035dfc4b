"""What runs where the task runs: its stdio and environment, the task itself, and the result pipe.

A process-per-call runner forks the task process (:func:`run_child`), which sends its record, value and
exception back over a pipe (:func:`parse_result` reads them in the runner); a persistent worker runs
:func:`run_task` in its own main thread. Both set up the task's stdio with :func:`task_stdio`.
"""

from __future__ import annotations

import io
import marshal
import os
import sys

from ..protocol import wire
from .channel import EXIT_RUNNER_FAILURE

TYPE_CHECKING = False  # typing is not imported at run time: the runner's start-up is on every call's path
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from ..session import Session

    #: What a task sent back: its record, its serialized value and its pickled exception (bytes or views).
    Loaded = tuple[dict[str, Any], bytes | memoryview, bytes | memoryview]

__all__ = ["enter_project", "fork_task", "parse_result", "run_child", "run_task", "set_call_environ", "task_stdio",
           "work_dir"]


def fork_task(start: Callable[[], None], closed: tuple[int | None, ...]) -> int:
    """Fork the task process: it closes the descriptors ``closed`` (None: none) and calls ``start``, which
    runs the task and ends the process; a failure of its own is printed to its stderr and ends it with
    :data:`~.channel.EXIT_RUNNER_FAILURE`. Returns its pid (in the runner)."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            for fd in closed:
                if fd is not None:
                    os.close(fd)
            start()
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(EXIT_RUNNER_FAILURE)
    return pid


def task_stdio(out_w: int, err_w: int, in_r: int | None = None) -> None:
    """Give the tasks of this process their stdio: stdin from ``in_r`` (the stdin ``rx run`` forwards) or
    /dev/null, stdout and stderr to ``out_w`` and ``err_w`` (as fds 1 and 2, line-buffered text that never
    fails on an odd character)."""
    source = os.open(os.devnull, os.O_RDONLY) if in_r is None else in_r
    os.dup2(source, 0)
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    for fd in (source, out_w, err_w):
        if fd > 2:
            os.close(fd)
    # the tasks' stdin for this process's life
    sys.stdin = open(os.devnull) if in_r is None else open(0, encoding="utf-8", closefd=False)  # noqa: SIM115
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8",
                                  errors="backslashreplace", line_buffering=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8",
                                  errors="backslashreplace", line_buffering=True)
    os.environ["RX_INSIDE_RUNNER"] = "1"
    os.environ.setdefault("PYTHONUNBUFFERED", "1")


def set_call_environ(options: dict[str, Any]) -> None:
    """Set the call's environment variables and secrets (from its G frame) in ``os.environ``."""
    os.environ.update(options.get("env") or {})
    os.environ.update(options.get("secret_env") or {})


def work_dir(run_dir: str, options: dict[str, Any]) -> str:
    """The task's working directory: the call's ``cwd`` (relative, inside the project) in the run directory
    (made if need be)."""
    relative = options.get("cwd") or ""
    if not relative or relative == "." or relative.startswith("/") or ".." in relative.split("/"):
        return run_dir
    path = os.path.join(run_dir, relative)
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def enter_project(run_dir: str, options: dict[str, Any]) -> str | None:
    """In a snapshot of the project (the call names a tree): go to the task's working directory, put the
    project's directories first on ``sys.path`` (the script's, the root, ``src/``: what the call lists),
    and return the script's path in the snapshot (None when there is none, or no tree)."""
    if not options.get("tree"):
        os.chdir(run_dir)
        return None
    os.chdir(work_dir(run_dir, options))
    for relative in reversed(options.get("path") or ()):
        entry = os.path.normpath(os.path.join(run_dir, relative))
        if (entry == run_dir or entry.startswith(run_dir + os.sep)) and os.path.isdir(entry):
            if entry in sys.path:
                sys.path.remove(entry)
            sys.path.insert(0, entry)
    script = options.get("script")
    if script and ".." not in script.split("/") and os.path.isfile(os.path.join(run_dir, script)):
        return os.path.join(run_dir, script)
    return None


def run_child(session_bytes: bytes, run_dir: str, options: dict[str, Any], out_w: int, err_w: int,
              result_w: int, in_r: int | None = None) -> None:
    """In the forked task process: run the task (its stdin from ``in_r``, else empty), send the result to
    the parent over ``result_w``, exit."""
    os.setsid()
    set_call_environ(options)
    # The interpreter read PYTHONPATH before the call's environment was set: apply it to sys.path too
    # (after the archive, which stays first).
    extra_path = (options.get("env") or {}).get("PYTHONPATH", "")
    sys.path[1:1] = [entry for entry in extra_path.split(os.pathsep) if entry and entry not in sys.path]
    os.environ["RX_RUN_DIR"] = run_dir
    task_stdio(out_w, err_w, in_r)
    script = enter_project(run_dir, options)
    record, value, exc_data = run_task(session_bytes, run_dir, bool(options.get("marshal")), script)
    _send_result(result_w, record, value, exc_data)
    os._exit(int(record["exit_code"]))


def _send_result(result_w: int, record: dict[str, Any], value: bytes, exc_data: bytes) -> None:
    """Write the record (marshal, behind its 8-byte size), the value and the exception to the result pipe."""
    record = dict(record, value_size=len(value), exc_size=len(exc_data))
    if len(value) > (1 << 20):
        wire.grow_pipe(result_w)
    header = marshal.dumps(record, 4)
    for data in (len(header).to_bytes(8, "big"), header, value, exc_data):
        view = memoryview(data)
        while view:
            view = view[os.write(result_w, view):]
    os.close(result_w)


def parse_result(buffer: bytearray) -> Loaded | None:
    """What the task process sent on its result pipe: (record, value, exception) — the last two as views
    of ``buffer``, not copies — or None if incomplete."""
    data = memoryview(buffer)
    try:
        size = int.from_bytes(data[:8], "big")
        record: dict[str, Any] = marshal.loads(data[8:8 + size])
        value_end = 8 + size + int(record["value_size"])
        exc_end = value_end + int(record["exc_size"])
    except (ValueError, KeyError, EOFError, TypeError):
        return None
    if exc_end != len(data):
        return None
    return record, data[8 + size:value_end], data[value_end:exc_end]


def run_task(session_bytes: bytes, run_dir: str, marshal_ok: bool = False,
             script: str | None = None) -> tuple[dict[str, Any], bytes, bytes]:
    """Restore the session and run its task here; return (record, serialized value, pickled exception).

    ``script``: a script task's file in the project's snapshot (it runs from there: ``__file__`` is its
    path in the snapshot); None: the script runs from a copy of its source in the private directory.

    The record holds status, exit_code and, when the task raised, the exception's type, message and
    traceback text (which always travel, even when the exception itself cannot be pickled). With
    ``marshal_ok`` (the coordinator reads marshal: it is not in restricted mode), a value of built-in
    data goes as marshal (``value_encoding``), which needs no pickle module here.
    """
    record: dict[str, Any] = {"status": "finished", "exit_code": 0, "exception": None, "value": False,
                              "exc_pickle": False}
    value_data = exc_data = b""
    kind = None
    try:
        from ..session import Session

        session = Session.loads(session_bytes)
        kind = session.task.kind
        value_data = _execute(session, run_dir, marshal_ok, record, script)
    except SystemExit as exc:
        record["exit_code"] = _exit_code(exc.code)
    except BaseException as exc:  # the task's failure, reported as data
        exc_data = _failed(exc, kind or "function", record, run_dir)
        if kind is None and isinstance(exc, (ImportError, AttributeError)):  # the arguments could not be read
            from ..serialization import package_versions, referenced_packages

            record["exception"]["packages"] = package_versions(referenced_packages(session_bytes))
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:
        pass
    return record, value_data, exc_data


def _execute(session: Session, run_dir: str, marshal_ok: bool, record: dict[str, Any], script: str | None) -> bytes:
    """Run the session's task; a function's value comes back serialized (``record`` says how)."""
    from ..serialization import PickleSerializer, get_serializer, marshal_dumps

    value = session.task.execute(session.execution, workdir=run_dir, script=script)
    if session.task.kind != "function":
        return b""
    try:
        marshalled = marshal_dumps(value) if marshal_ok and session.serializer == "pickle" else None
        if marshalled is not None:
            record["value_encoding"] = "marshal"
            value_data = marshalled
        else:
            value_data = (PickleSerializer().dumps_fast(value) if session.serializer == "pickle"
                          else get_serializer(session.serializer).dumps(value))
    except Exception as exc:
        raise TypeError(f"the task's return value ({type(value).__qualname__}) cannot be "
                        f"serialized: {exc}") from exc
    if record.get("value_encoding") != "marshal":  # who wrote it, should the reader's versions differ
        from ..serialization import package_versions, value_packages

        versions = {name: version for name, version in package_versions(value_packages(value), metadata=False).items()
                    if version}
        if versions:
            record["packages"] = versions
    record["value"] = True
    return value_data


def _exit_code(code: object) -> int:
    """The exit status of ``sys.exit(code)``, as the interpreter would give it (a message goes to stderr)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF if code >= 0 else code % 256
    print(code, file=sys.stderr)
    return 1


def _failed(exc: BaseException, kind: str, record: dict[str, Any], run_dir: str) -> bytes:
    """Record the task's exception (type, message, traceback text and frames); return it pickled if it can be.

    The coordinator prints a script's traceback itself (its frames mapped back to the local files), so the
    task's stderr does not get it here. The exception travels as its class, args and attributes (see
    :func:`_exception_payload`), so that the coordinator can rebuild it as pickle would, even when its
    ``__init__`` takes other arguments than its message.
    """
    import traceback

    text = traceback.format_exc()
    record.update(value=False, exit_code=1, status="raised" if kind == "function" else "finished",
                  exception={"type": f"{type(exc).__module__}.{type(exc).__qualname__}",
                             "message": _capped(_safe_str(exc)), "traceback": _capped(text), "chain": _chain(exc),
                             "roots": {"archive": _ARCHIVE, "run_dir": run_dir}})
    if kind != "function":
        return b""
    try:
        from ..serialization import PickleSerializer, exception_parts

        exc_data: bytes = PickleSerializer().dumps_fast(exception_parts(exc))
        record["exc_pickle"] = True
        return exc_data
    except BaseException:  # an exception holding something unpicklable arrives as text
        return b""


#: Characters of an exception's message or traceback text that travel in the result header (its frame
#: must stay under the frame limit); the middle of a longer one is cut.
TEXT_LIMIT = 1 << 16


def _capped(text: str) -> str:
    if len(text) <= TEXT_LIMIT:
        return text
    half = TEXT_LIMIT // 2
    return f"{text[:half]}\n... ({len(text) - 2 * half} characters cut) ...\n{text[-half:]}"


#: Where the archive this runner came from is installed (the parent of the remote_exec package).
_ARCHIVE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _chain(exc: BaseException) -> list[dict[str, Any]] | None:
    """The exception and its causes and contexts, oldest first, as Python prints them: each with its type,
    its last lines (``format_exception_only``), its frames ``[file, line number, function, source line,
    end line, column, end column]`` and how the next one follows from it (``cause``, ``context``, None).
    None for an exception group (its text is all there is)."""
    import builtins
    import traceback

    groups = getattr(builtins, "BaseExceptionGroup", ())
    chain: list[dict[str, Any]] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    link = None
    while current is not None and id(current) not in seen and len(chain) < 32:
        if groups and isinstance(current, groups):
            return None
        seen.add(id(current))
        frames = [[frame.filename, frame.lineno, frame.name, frame.line, getattr(frame, "end_lineno", None),
                   getattr(frame, "colno", None), getattr(frame, "end_colno", None)]
                  for frame in traceback.extract_tb(current.__traceback__)]
        chain.append({"type": f"{type(current).__module__}.{type(current).__qualname__}",
                      "only": "".join(traceback.format_exception_only(type(current), current)),
                      "frames": frames, "then": link})
        if current.__cause__ is not None:
            current, link = current.__cause__, "cause"
        elif current.__context__ is not None and not current.__suppress_context__:
            current, link = current.__context__, "context"
        else:
            current = None
    chain.reverse()
    return chain


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return f"<{type(exc).__name__} whose str() failed>"
