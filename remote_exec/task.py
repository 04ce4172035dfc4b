"""Tasks, executions and their identifiers.

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
    from typing import Any

__all__ = ["INSIDE_RUNNER_ENV", "Execution", "Record", "Task", "by_reference", "function_id", "import_module",
           "restore_function_task", "run_script", "travels_by_value", "unwrap"]

#: Set by the runner: a @task function called inside a running task runs in place.
INSIDE_RUNNER_ENV = "RX_INSIDE_RUNNER"


def unwrap(value: Any) -> Any:
    """The plain function behind a ``@task`` wrapper (anything else as it is).

    A wrapper marks itself with a true class attribute ``rx_task_function`` and holds the function in
    ``function`` (see :class:`remote_exec.api.TaskFunction`); this module does not import it, as it
    travels to the remote and stays a leaf.
    """
    if getattr(type(value), "rx_task_function", False):
        return value.function
    return value



# What ``types`` and ``importlib`` would give (neither is imported: the runner imports this module per call).
if TYPE_CHECKING:
    from types import CodeType as _CodeType
    from types import FunctionType as _FunctionType
else:
    _FunctionType = type(lambda: None)
    _CodeType = type((lambda: None).__code__)


def import_module(name: str) -> Any:
    """``importlib.import_module(name)`` for an absolute name, without importing ``importlib`` (and the
    ``warnings`` it imports: ~0.3 ms on the host at each call)."""
    __import__(name)
    return sys.modules[name]

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
        value = unwrap(module_globals.get(name))
        if isinstance(value, _FunctionType) and value.__module__ == function.__module__:
            _fingerprint_function(value, digest, seen)


def _global_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, _CodeType):
            names |= _global_names(const)
    return names


def _fingerprint_value(value: object, digest: Any, seen: set[int]) -> None:
    value = unwrap(value)
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


def by_reference(function: Callable[..., Any]) -> tuple[str, str] | None:
    """``(module, qualname)`` when the function can be imported back by name on the other side."""
    module = getattr(function, "__module__", None)
    qualname = getattr(function, "__qualname__", "")
    if not module or module == "__main__" or "<" in qualname:
        return None
    try:
        obj: Any = import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except Exception:
        return None
    if obj is function or unwrap(obj) is function:
        return module, qualname
    return None


def travels_by_value(task: Any) -> bool:
    """Whether ``task`` is a function that travels by value (a closure, lambda or ``__main__`` function)."""
    function = getattr(task, "function", None)
    return getattr(task, "kind", None) == "function" and function is not None and by_reference(function) is None


def _load_by_reference(module: str, qualname: str) -> Callable[..., Any]:
    obj: Any = import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    function: Callable[..., Any] = unwrap(obj)
    return function


def restore_task(kind: str, name: str, task_id: str, function: Callable[..., Any] | None, source: str | None,
                 filename: str | None, module: str | None) -> Task:
    """A task from its fields (what a pickled :class:`Task` is rebuilt with)."""
    return Task(kind, name, task_id, function, source, filename, module)


def restore_function_task(module: str, qualname: str, task_id: str, name: str) -> Task:
    """A function task whose function is imported back by ``module`` and ``qualname``."""
    return Task(kind="function", name=name, task_id=task_id, function=_load_by_reference(module, qualname))


# The names that sessions saved by earlier versions refer to in their pickles.
_restore_task = restore_task
_restore_function_task = restore_function_task


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

    #: The task as a session's wire section, once made (a function task by reference; never pickled).
    wire_section: tuple[bytes, bytes] | None = None

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
        function = unwrap(function)
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
            reference = by_reference(self.function)
            if reference is not None:
                return restore_function_task, (*reference, self.task_id, self.name)
        return restore_task, (self.kind, self.name, self.task_id, self.function, self.source, self.filename,
                               self.module)

    def execute(self, execution: Execution, *, workdir: str | Path | None = None, script: str | None = None) -> Any:
        """Run the task here with the call's arguments; return its value.

        Scripts and modules see ``sys.argv`` as ``[name, *args]`` and run as ``__main__``; their
        ``SystemExit`` propagates, as it does for ``python script.py``. A script runs from ``script``
        when given (its file in the project's snapshot), else from a copy of its source under
        ``workdir/.rx``.
        """
        if self.kind == "function":
            assert self.function is not None
            return self.function(*execution.args, **execution.kwargs)
        argv = [str(arg) for arg in execution.args]
        saved_argv = sys.argv
        try:
            if self.kind == "script":
                assert self.source is not None and self.filename is not None
                if script is None:
                    private = os.path.join(str(workdir or "."), ".rx")
                    os.makedirs(private, exist_ok=True)
                    script = os.path.join(private, os.path.basename(self.filename))
                    with open(script, "w", encoding="utf-8") as stream:
                        stream.write(self.source)
                sys.argv = [script, *argv]
                run_script(script)
            elif self.kind == "module":
                import runpy

                assert self.module is not None
                sys.argv = [self.module, *argv]
                runpy.run_module(self.module, run_name="__main__", alter_sys=True)
            else:
                raise ValueError(f"unknown task kind {self.kind!r}")
        finally:
            sys.argv = saved_argv
        return None


def run_script(path: str) -> None:
    """Run the file ``path`` as ``__main__``, exactly as ``runpy.run_path(path, run_name="__main__")`` does,
    without importing runpy (its import and pkgutil's, which loads typing and re, cost a script's run on
    the host ~8 ms): its code (compiled, or a ``.pyc``'s) runs in a fresh ``__main__`` module with
    ``sys.argv[0]`` set to ``path``, and both are restored after. A path one of ``sys.path_hooks`` takes
    (a zip archive, a directory with a ``__main__.py``) goes to runpy itself."""
    if _importer(path) is not None:
        import runpy

        runpy.run_path(path, run_name="__main__")
        return
    import io
    import marshal
    from _frozen_importlib_external import MAGIC_NUMBER  # importlib.util's, loaded with the interpreter

    with io.open_code(os.path.abspath(path)) as stream:
        data = stream.read()
    # (dont_inherit: the script's own __future__ imports, not this module's, as runpy's compile has them)
    code = marshal.loads(data[16:]) if data[:4] == MAGIC_NUMBER else compile(data, path, "exec", dont_inherit=True)
    main = type(sys)("__main__")
    saved: Any = sys.modules.get("__main__", _MISSING)
    sys.modules["__main__"] = main
    saved_argv0, sys.argv[0] = sys.argv[0], path
    try:
        main.__dict__.update(__name__="__main__", __file__=path, __cached__=None, __doc__=None, __loader__=None,
                             __package__="", __spec__=None)
        exec(code, main.__dict__)
    finally:
        sys.argv[0] = saved_argv0
        if saved is _MISSING:
            del sys.modules["__main__"]
        else:
            sys.modules["__main__"] = saved


_MISSING = object()


def _importer(path: str) -> object | None:
    """What ``pkgutil.get_importer(path)`` returns (and caches): the first of ``sys.path_hooks`` that takes
    ``path``, else None."""
    try:
        return sys.path_importer_cache[path]
    except KeyError:
        pass
    for hook in sys.path_hooks:
        try:
            importer = hook(path)
        except ImportError:
            continue
        sys.path_importer_cache.setdefault(path, importer)
        return importer
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
            serialized = _serialize_arguments((args, kwargs))
        import hashlib

        digest = hashlib.sha256(task.task_id.encode() + b"\0")
        digest.update(serialized)
        return cls(execution_id=digest.hexdigest(), args=tuple(args), kwargs=kwargs)


def _serialize_arguments(value: object) -> bytes:
    """Arguments as bytes for the execution id, when the caller has not serialized them already: a pickle
    (cloudpickle's for what plain pickle cannot write), else their repr."""
    import pickle

    try:
        return pickle.dumps(value, protocol=5)
    except Exception:
        pass
    try:
        import cloudpickle

        return bytes(cloudpickle.dumps(value, protocol=5))
    except Exception:
        return repr(value).encode()
