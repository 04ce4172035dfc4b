"""Sessions: one call of a task with its context and result, saved and restored as a versioned zip.

A :class:`Session` is what travels: the task, the execution (arguments), the context (a dict advices use
to pass information along, e.g. the host), the run id, and once known the :class:`Result`. While it goes
through the advice chain it also carries the chain's position: advices call :meth:`Session.proceed` or
:meth:`Session.conclude` in ``before()``.

This module travels to the remote: standard library only at import time.
"""

from __future__ import annotations

from .errors import Cancelled, CommandTimeout, RemoteError, RemoteTraceback, RunnerError, SessionError
from .serialization import PickleSerializer, get_serializer
from .task import Execution, Record, Task

TYPE_CHECKING = False  # typing is not imported at run time: the runner loads this module on every call
if TYPE_CHECKING:
    from typing import IO, Any

__all__ = ["FORMAT", "VERSION", "Result", "Session", "wire_pickles"]

FORMAT = "rx-session"
VERSION = 1
_META = "rx-session.json"
#: The session as it crosses the wire to the runner: this magic, then four length-prefixed sections
#: (metadata, task, arguments, context), so the runner needs neither zipfile nor json to read it. Each
#: section starts with how it is written: ``m`` marshal (built-in data, and a function task by reference:
#: the runner then needs no pickle module at all), ``p`` pickle, ``s`` the session's serializer.
_WIRE_MAGIC = b"RXS2"
_WIRE_MAGIC_V1 = b"RXS1"  # untagged pickles (sessions recorded by earlier versions)


class Result(Record):
    """The outcome of a task.

    Attributes:
        value: The returned value (None for scripts and modules, and when the task raised).
        exception: The exception the task raised, rebuilt locally when possible (else a RemoteError);
            its ``__cause__`` is a RemoteTraceback with the remote traceback text.
        exit_code: For scripts and modules, the process exit status (1 for an uncaught exception); for
            functions 0 or 1.
        status: ``finished`` (ran to the end, even with a non-zero exit code), ``raised``, ``timeout``,
            ``cancelled``, ``signal``, ``oom``, ``lost``, ``error`` (the runner failed).
        exception_type: Qualified name of the remote exception type, if any.
        exception_message: ``str()`` of the remote exception, if any.
        traceback: The remote traceback text, if any: as the user reads it (the frames of their code, at
            their local files) once the coordinator mapped it, else as the host printed it.
        remote_traceback: The traceback as the host printed it (every frame, remote paths), once
            :attr:`traceback` was mapped.
        detail: A human sentence for statuses other than finished/raised (which signal, what failed).
        cached: True when the value came from a cache rather than a run.
        host: Where it ran, when it ran elsewhere.
    """

    _FIELDS = ("value", "exception", "exit_code", "status", "exception_type", "exception_message", "traceback",
               "detail", "cached", "host", "remote_traceback")

    def __init__(self, value: Any = None, exception: BaseException | None = None, exit_code: int = 0,
                 status: str = "finished", exception_type: str | None = None,
                 exception_message: str | None = None, traceback: str | None = None, detail: str | None = None,
                 cached: bool = False, host: str | None = None, remote_traceback: str | None = None) -> None:
        self.value = value
        self.exception = exception
        self.exit_code = exit_code
        self.status = status
        self.exception_type = exception_type
        self.exception_message = exception_message
        self.traceback = traceback
        self.detail = detail
        self.cached = cached
        self.host = host
        self.remote_traceback = remote_traceback

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._FIELDS)
        return f"Result({fields})"


    @property
    def ok(self) -> bool:
        """True when the task finished without raising and with exit code 0."""
        return self.status == "finished" and self.exit_code == 0 and self.exception is None

    def unwrap(self) -> Any:
        """The value, or raise the task's exception (with the remote traceback as its cause).

        Raises:
            BaseException: The task's own exception (or a RemoteError standing for it).
            CommandTimeout: The task ran past its timeout.
            Cancelled: The task was cancelled where it ran (this process's own Ctrl-C raises
                :class:`~remote_exec.errors.Interrupted` before any result).
            RunnerError: The task was killed (by a signal, out of memory) or ended without a result.
        """
        if self.exception is not None:
            raise self.exception
        if self.status == "timeout":
            raise CommandTimeout(self.host or "local", self.detail or "the task timed out")
        if self.status == "cancelled":
            raise Cancelled(self.detail or "the task was cancelled")
        if self.status not in ("finished", "raised"):
            where = f" on {self.host}" if self.host else ""
            raise RunnerError(f"the task{where} ended: {self.detail or 'no result'}", reason=self.status,
                              host=self.host or "local")
        return self.value

    @classmethod
    def from_exception(cls, exc: BaseException, traceback_text: str, *, exit_code: int = 1,
                       status: str = "raised") -> Result:
        """A result for a task that raised ``exc`` (its traceback attached as the cause)."""
        exc.__cause__ = RemoteTraceback(traceback_text)
        return cls(exception=exc, exit_code=exit_code, status=status,
                   exception_type=f"{type(exc).__module__}.{type(exc).__qualname__}",
                   exception_message=str(exc), traceback=traceback_text)

    @classmethod
    def from_remote_text(cls, type_name: str, message: str, traceback_text: str, *, exit_code: int = 1,
                         status: str = "raised") -> Result:
        """A result for an exception that only arrived as text: a RemoteError."""
        error = RemoteError(type_name, message, traceback_text)
        error.__cause__ = RemoteTraceback(traceback_text)
        return cls(exception=error, exit_code=exit_code, status=status, exception_type=type_name,
                   exception_message=message, traceback=traceback_text)

    def record(self) -> dict[str, Any]:
        """JSON-able summary (``result.json`` in a run directory)."""
        value_repr = None
        if self.exception is None and self.value is not None:
            value_repr = repr(self.value)
            if len(value_repr) > 2000:
                value_repr = value_repr[:2000] + "..."
        return {
            "ok": self.ok,
            "status": self.status,
            "exit_code": self.exit_code,
            "value_repr": value_repr,
            "cached": self.cached,
            "detail": self.detail,
            "exception": None if self.exception_type is None else {
                "type": self.exception_type,
                "message": self.exception_message,
                "traceback": self.traceback,
                **({"remote_traceback": self.remote_traceback} if self.remote_traceback else {}),
            },
        }


def _task_section(task: Task) -> tuple[bytes, bytes]:
    """``task`` as a (tag, body) wire section: marshal for a function task by reference and for a script or
    module (its fields: what its pickle would rebuild it from; kept on the task: the same bytes every call),
    else a pickle (one written by value is pickled again each time, as its globals may have changed)."""
    section: tuple[bytes, bytes] | None = getattr(task, "wire_section", None)
    if section is not None:
        return section
    from .serialization import MARSHAL_VERSION
    from .task import by_reference

    fields: tuple[Any, ...] | None = None
    if task.kind == "function":
        reference = by_reference(task.function) if task.function is not None else None
        fields = None if reference is None else ("ref", *reference, task.task_id, task.name)
    else:
        script = _script_fields(task)
        if all(value is None or type(value) is str for value in script):
            fields = ("task", *script)
    if fields is None:
        return b"p", PickleSerializer().dumps(task)
    import marshal

    section = (b"m", marshal.dumps(fields, MARSHAL_VERSION))
    task.wire_section = section
    return section


def _script_fields(task: Task) -> tuple[Any, ...]:
    """What a script or module task is rebuilt from (as its ``__reduce__`` gives it, but the function)."""
    return task.kind, task.name, task.task_id, task.source, task.filename, task.module


def wire_pickles(data: bytes) -> bool:
    """Whether restoring a session in its wire form (:meth:`Session.to_wire`) needs the C pickle module: a
    section other than marshal (arguments or context beyond built-in data, a task pickle), but for a task
    that is a small function by value, which :class:`~.serialization.PickleSerializer` reads without it."""
    from .serialization import reads_without_pickle

    if data[:len(_WIRE_MAGIC)] != _WIRE_MAGIC:
        return True
    offset = len(_WIRE_MAGIC)
    for index in range(4):
        size = int.from_bytes(data[offset:offset + 8], "big")
        tag = data[offset + 8:offset + 9]
        task_by_value = index == 1 and tag == b"p" and reads_without_pickle(data[offset + 9:offset + 8 + size])
        if tag != b"m" and not task_by_value:
            return True
        offset += 8 + size
    return False


def _check_version(meta: dict[str, Any]) -> None:
    """Refuse what is not a session, or a session of a format version this rx does not read."""
    if meta.get("format") != FORMAT:
        raise SessionError(f"not an rx session: format {meta.get('format')!r}")
    if meta.get("version") != VERSION:
        raise SessionError(f"session format version {meta.get('version')!r} is not supported "
                           f"(this rx reads version {VERSION})", hint="run it with the rx that wrote it")


def _tagged(tag: bytes, body: Any, what: str) -> Any:
    """Read a marshal (``m``) or pickle (``p``) wire section body (bytes or a view; see
    :data:`_WIRE_MAGIC`)."""
    if tag == b"m":
        import marshal

        try:
            return marshal.loads(body)
        except (ValueError, EOFError, TypeError) as exc:
            raise SessionError(f"damaged session ({what}): {exc}") from exc
    if tag == b"p":
        try:
            return PickleSerializer().loads(body)  # a function by value without cloudpickle (or the C pickle)
        except Exception as exc:
            import _pickle  # (loaded by then, unless a function by value failed: its error is the task's)

            if isinstance(exc, (ValueError, EOFError, _pickle.UnpicklingError)):
                raise SessionError(f"damaged session ({what}): {exc}") from exc
            raise
    raise SessionError(f"damaged session ({what}): unknown encoding {tag!r}")


def _plain_paths(value: Any) -> Any:
    """``value`` with each path in it (``os.PathLike``, in dicts, lists and tuples) as its string."""
    import os

    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if type(value) is dict:
        return {key: _plain_paths(item) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_plain_paths(item) for item in value)
    return value


class Session(Record):
    """One call of a task on its way through the advice chain.

    Attributes:
        task: What runs.
        execution: The call's arguments and execution id.
        context: Free-form data for advices (JSON-able values are safest; saved with the session).
        run_id: The run this call belongs to.
        serializer: Name of the serializer for arguments and results (``pickle`` or ``json``).
        result: The result, once known.
    """

    # The saved parts: config, local objects and the chain's position are not compared.
    _FIELDS = ("task", "execution", "context", "run_id", "serializer", "result")

    def __init__(self, task: Task, execution: Execution, context: dict[str, Any] | None = None, run_id: str = "",
                 serializer: str = "pickle", result: Result | None = None, config: Any = None,
                 local: dict[str, Any] | None = None, arguments: bytes | None = None) -> None:
        self.task = task
        self.execution = execution
        self.context: dict[str, Any] = {} if context is None else context
        self.run_id = run_id
        self.serializer = serializer
        self.result = result
        #: The Configuration in force on the coordinator (never saved: it stays local).
        self.config = config
        #: A scratch area for advices and the coordinator (workspace run, outcome): stays on the coordinator,
        #: never saved, never sent.
        self.local: dict[str, Any] = {} if local is None else local
        self._decision: str | None = None  # proceed, conclude, or after (see the chain protocol below)
        # The serialized arguments, when the caller has them already (they can be large: serialize once).
        self._arguments = arguments
        self._sections_cache: tuple[tuple[bytes, bytes], tuple[bytes, bytes], tuple[bytes, bytes]] | None = None

    def __repr__(self) -> str:
        return (f"Session(task={self.task!r}, execution={self.execution!r}, context={self.context!r}, "
                f"run_id={self.run_id!r}, serializer={self.serializer!r}, result={self.result!r})")


    # -- the chain protocol --------------------------------------------------------------------------

    def proceed(self) -> None:
        """Called by an advice's ``before()``: go on to the next advice (or the task)."""
        self._decide("proceed")

    def conclude(self, result: Result) -> None:
        """Called by an advice's ``before()``: this is the result; skip the task and later advices.

        In ``after()`` it replaces the result.
        """
        self.result = result
        self._decide("conclude")

    def _decide(self, decision: str) -> None:
        if self._decision is not None and self._decision != "after":
            raise SessionError(f"advice already chose to {self._decision}; proceed or conclude once")
        if self._decision != "after":
            self._decision = decision

    # The chain runner's side of the protocol (:func:`remote_exec.advice.run_chain`).

    def await_decision(self) -> None:
        """Before an advice's ``before()``: it has not decided yet."""
        self._decision = None

    @property
    def decision(self) -> str | None:
        """What the current advice's ``before()`` chose: ``proceed``, ``conclude``, or None (nothing yet)."""
        return self._decision if self._decision in ("proceed", "conclude") else None

    def enter_after(self) -> None:
        """Before an advice's ``after()``: ``conclude`` now replaces the result, ``proceed`` does nothing."""
        self._decision = "after"

    def leave_chain(self) -> None:
        """The chain is done with this session."""
        self._decision = None

    # -- save and restore ----------------------------------------------------------------------------

    def _meta(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "run_id": self.run_id,
            "task_id": self.task.task_id,
            "task_name": self.task.name,
            "task_kind": self.task.kind,
            "execution_id": self.execution.execution_id,
            "serializer": self.serializer,
        }

    def _sections(self) -> tuple[tuple[bytes, bytes], tuple[bytes, bytes], tuple[bytes, bytes]]:
        """Task, arguments and context as (tag, body) wire sections (made once per session: arguments can
        be large). Small built-in data goes as marshal, anything else as a pickle (large arguments keep the
        pickle already made for the execution id: no second copy)."""
        if self._sections_cache is None:
            from .serialization import PickleSerializer, marshal_dumps

            arguments: tuple[bytes, bytes] | None = None
            if self.serializer == "pickle" and (self._arguments is None or len(self._arguments) <= 65536):
                marshalled = marshal_dumps([list(self.execution.args), self.execution.kwargs])
                arguments = None if marshalled is None else (b"m", marshalled)
            if arguments is None:
                serialized = self._arguments
                if serialized is None:
                    serialized = get_serializer(self.serializer).dumps([list(self.execution.args),
                                                                         self.execution.kwargs])
                arguments = (b"s", serialized)
            context = marshal_dumps(self.context)
            if context is None:  # a Path among the task's options: as a string it needs no pathlib (~4 ms) and
                context = marshal_dumps(_plain_paths(self.context))  # no pickle on the host, which never reads it
            self._sections_cache = (_task_section(self.task), arguments,
                                    (b"m", context) if context is not None
                                    else (b"p", PickleSerializer().dumps(self.context)))
        return self._sections_cache

    def to_wire(self) -> bytes:
        """The session in its wire form (what :meth:`loads` reads fastest; the result is not included)."""
        import marshal

        from .serialization import MARSHAL_VERSION

        pieces = [_WIRE_MAGIC]
        for tag, body in ((b"m", marshal.dumps(self._meta(), MARSHAL_VERSION)), *self._sections()):
            pieces += [(len(body) + 1).to_bytes(8, "big"), tag, body]
        return b"".join(pieces)  # one copy of the (possibly large) arguments

    @classmethod
    def _from_wire(cls, data: bytes) -> Session:
        view = memoryview(data)  # sections are read in place, not copied out first
        tagged = data[:len(_WIRE_MAGIC)] == _WIRE_MAGIC
        try:
            parts = []
            offset = len(_WIRE_MAGIC)
            for default in (b"p", b"p", b"s", b"p"):
                size = int.from_bytes(data[offset:offset + 8], "big")
                offset += 8
                if offset + size > len(data) or (tagged and size < 1):
                    raise ValueError("truncated")
                if tagged:  # this rx's: a tag, then the body
                    parts.append((bytes(view[offset:offset + 1]), view[offset + 1:offset + size]))
                else:  # an earlier rx's: untagged pickles (and the arguments in the serializer's form)
                    parts.append((default, view[offset:offset + size]))
                offset += size
        except ValueError as exc:
            raise SessionError(f"damaged session: {exc}") from exc
        meta = _tagged(*parts[0], "metadata")
        if not isinstance(meta, dict):
            raise SessionError("damaged session: no metadata")
        return cls._build(meta, parts[1], parts[2], parts[3])

    @classmethod
    def _build(cls, meta: dict[str, Any], task_data: tuple[bytes, Any], arguments: tuple[bytes, Any],
               context_data: tuple[bytes, Any]) -> Session:
        _check_version(meta)
        try:
            task = _tagged(*task_data, "task")
            if isinstance(task, tuple) and task[:1] == ("ref",):  # a function task by reference
                from .task import restore_function_task

                task = restore_function_task(*task[1:])
            elif isinstance(task, tuple) and task[:1] == ("task",):  # a script or module
                kind, name, task_id, source, filename, module = task[1:]
                task = Task(kind, name, task_id, None, source, filename, module)
            if arguments[0] == b"s":
                serializer = get_serializer(meta["serializer"])
                body = arguments[1] if serializer.name == "pickle" else bytes(arguments[1])
                args, kwargs = serializer.loads(body)
            else:
                args, kwargs = _tagged(*arguments, "arguments")
            context = _tagged(*context_data, "context")
        except (ValueError, KeyError, EOFError) as exc:  # a serializer's own error: damaged or foreign
            raise SessionError(f"damaged session: {type(exc).__name__}: {exc}") from exc
        execution = Execution(execution_id=meta["execution_id"], args=tuple(args), kwargs=dict(kwargs))
        return cls(task=task, execution=execution, context=context, run_id=meta["run_id"],
                   serializer=meta["serializer"])

    def save(self, stream: IO[bytes]) -> None:
        """Write the session as a zip: metadata, task, execution, context and result when known."""
        import json
        import zipfile

        from .serialization import PickleSerializer

        pickler = PickleSerializer()
        task, context = pickler.dumps(self.task), pickler.dumps(self.context)
        arguments = self._arguments
        if arguments is None:
            arguments = get_serializer(self.serializer).dumps([list(self.execution.args), self.execution.kwargs])
        with zipfile.ZipFile(stream, "w", compression=zipfile.ZIP_STORED) as archive:
            archive.writestr(_META, json.dumps(self._meta(), indent=1))
            archive.writestr("task.pkl", task)
            archive.writestr("arguments", arguments)
            archive.writestr("context.pkl", context)
            if self.result is not None:
                archive.writestr("result.json", json.dumps(self.result.record()))

    def dumps(self) -> bytes:
        """The saved session as bytes."""
        import io

        buffer = io.BytesIO()
        self.save(buffer)
        return buffer.getvalue()

    @classmethod
    def restore(cls, stream: IO[bytes]) -> Session:
        """Read a session written by :meth:`save`.

        Raises:
            SessionError: Not a session, damaged, or of an unknown format version.
        """
        import json
        import pickle
        import zipfile

        try:
            with zipfile.ZipFile(stream) as archive:
                try:
                    meta = json.loads(archive.read(_META))
                except KeyError:
                    raise SessionError("not an rx session: no rx-session.json inside") from None
                _check_version(meta)
                serializer = get_serializer(meta["serializer"])
                from .serialization import PickleSerializer

                pickler = PickleSerializer()
                task = pickler.loads(archive.read("task.pkl"))
                args, kwargs = serializer.loads(archive.read("arguments"))
                context = pickler.loads(archive.read("context.pkl"))
        except SessionError:
            raise
        except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, OSError, ValueError, KeyError) as exc:
            raise SessionError(f"damaged session: {exc}") from exc
        execution = Execution(execution_id=meta["execution_id"], args=tuple(args), kwargs=dict(kwargs))
        return cls(task=task, execution=execution, context=context, run_id=meta["run_id"],
                   serializer=meta["serializer"])

    @classmethod
    def loads(cls, data: bytes) -> Session:
        """Restore a session from bytes: a saved zip, or the wire form of :meth:`to_wire`."""
        if data[:len(_WIRE_MAGIC)] in (_WIRE_MAGIC, _WIRE_MAGIC_V1):
            return cls._from_wire(data)
        import io

        return cls.restore(io.BytesIO(data))
