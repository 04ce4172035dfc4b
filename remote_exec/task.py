"""Tasks, executions and their identifiers, and the ``@task`` decorator.

A :class:`Task` is what runs: a function (an importable one by reference, a closure, lambda or ``__main__``
function by value with cloudpickle), a script's source, or a module run as ``python -m``. Its id is
derived from the code itself, so a changed function body is a different task (and never hits a stale
cache entry). An :class:`Execution` is one call: the arguments, and an id derived from the task id and
the serialized arguments.

This module travels to the remote: standard library only at import time.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # neither typing nor dataclasses at run time: the runner imports this on every call
if TYPE_CHECKING:
    import types
    from collections.abc import Callable
    from pathlib import Path
    from typing import Any, Generic, TypeVar, overload

    R = TypeVar("R")
else:
    R = None

    class Generic:
        """Stands in for typing.Generic at run time: ``TaskFunction[int]`` stays subscriptable."""

        def __class_getitem__(cls, item: object) -> type:
            return cls

    def overload(function: object) -> object:
        return function

__all__ = ["Execution", "Task", "TaskFunction", "task"]

#: Set by the runner: a @task function called inside a running task runs in place.
INSIDE_RUNNER_ENV = "RX_INSIDE_RUNNER"



# What ``types`` and ``importlib`` would give (neither is imported: the runner imports this module per call).
if TYPE_CHECKING:
    from types import CodeType as _CodeType
    from types import FunctionType as _FunctionType
else:
    _FunctionType = type(lambda: None)
    _CodeType = type((lambda: None).__code__)


def _import_module(name: str) -> Any:
    import importlib

    return importlib.import_module(name)

def _const_repr(value: object) -> str:
    if isinstance(value, (frozenset, set)):
        return "{" + ",".join(sorted(_const_repr(item) for item in value)) + "}"
    if isinstance(value, tuple):
        return "(" + ",".join(_const_repr(item) for item in value) + ")"
    return repr(value)


def _fingerprint_code(code: types.CodeType, digest: Any) -> None:
    digest.update(code.co_code)
    digest.update(repr((code.co_names, code.co_varnames, code.co_argcount, code.co_kwonlyargcount,
                        code.co_flags)).encode())
    for const in code.co_consts:
        if isinstance(const, _CodeType):
            _fingerprint_code(const, digest)
        else:
            digest.update(_const_repr(const).encode())


def _fingerprint_function(function: types.FunctionType, digest: Any, seen: set[int]) -> None:
    if id(function) in seen:
        return
    seen.add(id(function))
    digest.update(f"{function.__module__}:{function.__qualname__}".encode())
    _fingerprint_code(function.__code__, digest)
    digest.update(_const_repr(function.__defaults__).encode())
    digest.update(_const_repr(sorted((function.__kwdefaults__ or {}).items())).encode())
    for cell in function.__closure__ or ():
        try:
            content = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        _fingerprint_value(content, digest, seen)
    # Functions of the same module that this one calls: a changed helper is a changed task.
    module_globals = function.__globals__
    for name in _global_names(function.__code__):
        value = module_globals.get(name)
        if isinstance(value, TaskFunction):
            value = value.function
        if isinstance(value, _FunctionType) and value.__module__ == function.__module__:
            _fingerprint_function(value, digest, seen)


def _global_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, _CodeType):
            names |= _global_names(const)
    return names


def _fingerprint_value(value: object, digest: Any, seen: set[int]) -> None:
    if isinstance(value, TaskFunction):
        value = value.function
    if isinstance(value, _FunctionType):
        _fingerprint_function(value, digest, seen)
        return
    if isinstance(value, (set, frozenset)):  # pickled in hash order, which differs between processes
        digest.update(f"{type(value).__name__}:{_const_repr(value)}".encode())
        return
    try:
        import hashlib

        import cloudpickle

        digest.update(hashlib.sha256(cloudpickle.dumps(value)).digest())
    except Exception:
        digest.update(repr(value).encode())


def function_id(function: Callable[..., Any]) -> str:
    """The task id of a function: a sha256 over its qualified name, code, defaults, closure and the
    same-module functions it calls."""
    import hashlib

    digest = hashlib.sha256(b"rx-function-1\0")
    if isinstance(function, _FunctionType):
        _fingerprint_function(function, digest, set())
    else:
        _fingerprint_value(function, digest, set())
    return digest.hexdigest()


def _by_reference(function: Callable[..., Any]) -> tuple[str, str] | None:
    """``(module, qualname)`` when the function can be imported back by name on the other side."""
    module = getattr(function, "__module__", None)
    qualname = getattr(function, "__qualname__", "")
    if not module or module == "__main__" or "<" in qualname:
        return None
    try:
        obj: Any = _import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except Exception:
        return None
    if obj is function or (isinstance(obj, TaskFunction) and obj.function is function):
        return module, qualname
    return None


def _load_by_reference(module: str, qualname: str) -> Callable[..., Any]:
    obj: Any = _import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if isinstance(obj, TaskFunction):
        return obj.function
    return obj  # type: ignore[no-any-return]


def _restore_task(kind: str, name: str, task_id: str, function: Callable[..., Any] | None, source: str | None,
                  filename: str | None, module: str | None) -> Task:
    return Task(kind, name, task_id, function, source, filename, module)


def _restore_function_task(module: str, qualname: str, task_id: str, name: str) -> Task:
    return Task(kind="function", name=name, task_id=task_id, function=_load_by_reference(module, qualname))


class Record:
    """Equality by the fields named in ``_FIELDS`` (what dataclasses would give, without importing them:
    the runner loads these classes on every call). Records are mutable, so not hashable."""

    _FIELDS: tuple[str, ...] = ()

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in self._FIELDS)

    __hash__ = None  # type: ignore[assignment]


class Task(Record):
    """What runs.

    Attributes:
        kind: ``function``, ``script`` or ``module``.
        name: For people: ``module:qualname``, the script's file name, or ``-m module``.
        task_id: sha256 derived from the code.
        function: The function to call (kind ``function``).
        source: The script's source text (kind ``script``).
        filename: The script's file name (kind ``script``) or the module's file (kind ``module``).
        module: The module to run as ``__main__`` (kind ``module``), or the function's module.
    """

    _FIELDS = ("kind", "name", "task_id", "function", "source", "filename", "module")

    def __init__(self, kind: str, name: str, task_id: str, function: Callable[..., Any] | None = None,
                 source: str | None = None, filename: str | None = None, module: str | None = None) -> None:
        self.kind = kind
        self.name = name
        self.task_id = task_id
        self.function = function
        self.source = source
        self.filename = filename
        self.module = module

    def __repr__(self) -> str:
        return f"Task(kind={self.kind!r}, name={self.name!r}, task_id={self.task_id[:12]!r}...)"

    @classmethod
    def from_function(cls, function: Callable[..., Any]) -> Task:
        """A task for a function, closure or lambda."""
        if isinstance(function, TaskFunction):
            function = function.function
        name = f"{getattr(function, '__module__', '?')}:{getattr(function, '__qualname__', repr(function))}"
        return cls(kind="function", name=name, task_id=function_id(function), function=function,
                   module=getattr(function, "__module__", None))

    @classmethod
    def from_script(cls, path: Path) -> Task:
        """A task that runs a script file as ``__main__``.

        Raises:
            OSError: The script cannot be read.
        """
        import hashlib

        source = path.read_text(encoding="utf-8")
        digest = hashlib.sha256(b"rx-script-1\0" + path.name.encode() + b"\0" + source.encode())
        return cls(kind="script", name=path.name, task_id=digest.hexdigest(), source=source,
                   filename=str(path))

    @classmethod
    def from_module(cls, module: str, origin: Path | None = None) -> Task:
        """A task that runs a module as ``python -m module`` does."""
        import hashlib

        digest = hashlib.sha256(b"rx-module-1\0" + module.encode())
        if origin is not None and origin.is_file():
            digest.update(origin.read_bytes())
        return cls(kind="module", name=f"-m {module}", task_id=digest.hexdigest(), module=module,
                   filename=str(origin) if origin else None)

    def __reduce__(self) -> Any:
        if self.kind == "function" and self.function is not None:
            reference = _by_reference(self.function)
            if reference is not None:
                return _restore_function_task, (*reference, self.task_id, self.name)
        return _restore_task, (self.kind, self.name, self.task_id, self.function, self.source, self.filename,
                               self.module)

    def execute(self, execution: Execution, *, workdir: str | Path | None = None) -> Any:
        """Run the task here with the call's arguments; return its value.

        Scripts and modules see ``sys.argv`` as ``[name, *args]`` and run as ``__main__``; their
        ``SystemExit`` propagates, as it does for ``python script.py``.
        """
        if self.kind == "function":
            assert self.function is not None
            return self.function(*execution.args, **execution.kwargs)
        import runpy

        argv = [str(arg) for arg in execution.args]
        saved_argv = sys.argv
        try:
            if self.kind == "script":
                assert self.source is not None and self.filename is not None
                private = os.path.join(str(workdir or "."), ".rx")
                os.makedirs(private, exist_ok=True)
                script = os.path.join(private, os.path.basename(self.filename))
                with open(script, "w", encoding="utf-8") as stream:
                    stream.write(self.source)
                sys.argv = [script, *argv]
                runpy.run_path(script, run_name="__main__")
            elif self.kind == "module":
                assert self.module is not None
                sys.argv = [self.module, *argv]
                runpy.run_module(self.module, run_name="__main__", alter_sys=True)
            else:
                raise ValueError(f"unknown task kind {self.kind!r}")
        finally:
            sys.argv = saved_argv
        return None


class Execution(Record):
    """One call of a task: its arguments and an id derived from the task id and the arguments.

    Attributes:
        execution_id: sha256 of the task id and the serialized arguments.
        args: Positional arguments (for scripts and modules: the command-line arguments).
        kwargs: Keyword arguments.
    """

    _FIELDS = ("execution_id", "args", "kwargs")

    def __init__(self, execution_id: str, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> None:
        self.execution_id = execution_id
        self.args = args
        self.kwargs: dict[str, Any] = {} if kwargs is None else kwargs

    def __repr__(self) -> str:
        return f"Execution(execution_id={self.execution_id[:12]!r}..., args={self.args!r}, kwargs={self.kwargs!r})"


    @classmethod
    def create(cls, task: Task, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None,
               *, serialized: bytes | None = None) -> Execution:
        """An execution of ``task``; ``serialized`` are the already serialized arguments, if at hand."""
        kwargs = dict(kwargs or {})
        if serialized is None:
            from .serialization import PickleSerializer

            try:
                serialized = PickleSerializer().dumps((args, kwargs))
            except TypeError:
                serialized = repr((args, kwargs)).encode()
        import hashlib

        digest = hashlib.sha256(task.task_id.encode() + b"\0")
        digest.update(serialized)
        return cls(execution_id=digest.hexdigest(), args=tuple(args), kwargs=kwargs)


class TaskFunction(Generic[R]):
    """What ``@task`` returns: calling it runs the function through the configured advice chain.

    Attributes:
        function: The undecorated function.
        remote: The host (alias, ``[tool.rx.remotes]`` name or ``[user@]host[:port]``), or None for the
            configuration's default.
        chain: The name of the advice chain to use.
        config: A :class:`remote_exec.config.Configuration`, or None for the project's configuration.
        options: Further per-task options (``timeout``, ``python``, ``backend``, ``keep_warm``, ...),
            available to advices in the session context.
    """

    def __init__(self, function: Callable[..., R], *, remote: str | None = None, chain: str = "default",
                 config: Any = None, options: dict[str, Any] | None = None) -> None:
        for attribute in ("__module__", "__name__", "__qualname__", "__doc__"):
            try:
                setattr(self, attribute, getattr(function, attribute))
            except AttributeError:
                pass
        self.__dict__.update(getattr(function, "__dict__", {}))
        self.__wrapped__ = function
        self.function = function
        self.remote = remote
        self.chain = chain
        self.config = config
        self.options = dict(options or {})
        self._task: Task | None = None

    @property
    def task(self) -> Task:
        """The :class:`Task` for the function (computed once)."""
        if self._task is None:
            self._task = Task.from_function(self.function)
        return self._task

    def __call__(self, *args: Any, **kwargs: Any) -> R:
        if os.environ.get(INSIDE_RUNNER_ENV):
            return self.function(*args, **kwargs)
        from .advice import run_task

        return run_task(self, args, kwargs)  # type: ignore[no-any-return]

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        if instance is None:
            return self
        import types

        return types.MethodType(self, instance)

    def __repr__(self) -> str:
        return f"<task {self.function.__module__}:{self.function.__qualname__} remote={self.remote!r}>"


@overload
def task(function: Callable[..., R], /) -> TaskFunction[R]: ...


@overload
def task(*, remote: str | None = None, chain: str = "default", config: Any = None,  # noqa: F811
         **options: Any) -> Callable[[Callable[..., R]], TaskFunction[R]]: ...


def task(function: Callable[..., R] | None = None, /, *, remote: str | None = None, chain: str = "default",  # noqa: F811
         config: Any = None, **options: Any) -> TaskFunction[R] | Callable[[Callable[..., R]], TaskFunction[R]]:
    """Make a function a task: calling it runs it through an advice chain (remotely, cached, logged).

    Use bare (``@task``) or with options (``@task(remote="gpu1", timeout=600)``).

    Args:
        function: The function (when used bare).
        remote: The host to run on; None runs through the chain's own default (a local subprocess when
            the chain has no remote advice).
        chain: Name of the advice chain in the configuration.
        config: A Configuration to use instead of the project's.
        **options: Per-task options for advices: ``timeout`` (seconds), ``python`` (remote interpreter),
            ``backend`` (openssh or paramiko), ``env`` (a dict), ``secret_env`` (names of local variables
            passed over the channel only), ``workdir`` (remote cache dir), ``keep_warm`` (a persistent
            worker), ``pull`` (file globs), ``no_pull``, ``restricted`` and ``allow_unpickle`` (unpickle
            results through an allow-list), ``keepalive_interval`` / ``keepalive_count``.
    """
    if function is not None:
        if not callable(function):
            raise TypeError("@task decorates a function")
        return TaskFunction(function)

    def decorate(fn: Callable[..., R]) -> TaskFunction[R]:
        if not callable(fn):
            raise TypeError("@task decorates a function")
        return TaskFunction(fn, remote=remote, chain=chain, config=config, options=options)

    return decorate

