"""remote_exec: offload Python work to machines reachable over SSH.

    from remote_exec import task

    @task(remote="gpu1")
    def train(cfg): ...

The public names are imported lazily, so that ``import remote_exec.runner`` on the remote and ``rx --help``
on the laptop load only what they use.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing is not imported at run time: the remote runner imports this package per call

__version__ = "0.1.0"

# Bound eagerly: the submodule `remote_exec.task` would otherwise shadow the decorator once imported.
from .api import task  # noqa: E402
from .lazy import install as _install_lazy  # noqa: E402

_install_lazy(__path__[0])  # on a host: the modules only a coordinator uses, unpacked when first imported

__all__ = [
    "Advice",
    "AuthError",
    "BackendError",
    "CachingAdvice",
    "Cancelled",
    "CommandTimeout",
    "ConfigError",
    "Configuration",
    "ConnectError",
    "Execution",
    "Executor",
    "Extension",
    "GpuPolicy",
    "HostKeyError",
    "IntegrityError",
    "Interpreter",
    "LoggingAdvice",
    "PackError",
    "Remote",
    "RemoteAdvice",
    "RemoteError",
    "RemoteExecError",
    "RemoteTraceback",
    "Result",
    "RunnerError",
    "Session",
    "SubprocessAdvice",
    "SyncError",
    "Task",
    "TransferError",
    "__version__",
    "get_run_id",
    "set_run_id",
    "task",
]

_LOCATIONS = {
    "Advice": "advice", "Extension": "advice", "get_run_id": "api", "set_run_id": "api",
    "CachingAdvice": "advices", "Interpreter": "advices", "LoggingAdvice": "advices",
    "RemoteAdvice": "advices", "SubprocessAdvice": "advices",
    "Configuration": "config", "Remote": "config",
    "AuthError": "errors", "BackendError": "errors", "Cancelled": "errors", "CommandTimeout": "errors",
    "ConfigError": "errors",
    "ConnectError": "errors", "HostKeyError": "errors", "IntegrityError": "errors", "PackError": "errors",
    "RemoteError": "errors", "RemoteExecError": "errors", "RemoteTraceback": "errors",
    "RunnerError": "errors", "SyncError": "errors", "TransferError": "errors",
    "Result": "session", "Session": "session",
    "Execution": "task", "Task": "task",
    "Executor": "pool", "GpuPolicy": "pool",
}

if TYPE_CHECKING:
    from typing import Any

    from .advice import Advice, Extension
    from .advices import CachingAdvice, Interpreter, LoggingAdvice, RemoteAdvice, SubprocessAdvice
    from .api import get_run_id, set_run_id
    from .config import Configuration, Remote
    from .errors import (
        AuthError,
        BackendError,
        Cancelled,
        CommandTimeout,
        ConfigError,
        ConnectError,
        HostKeyError,
        IntegrityError,
        PackError,
        RemoteError,
        RemoteExecError,
        RemoteTraceback,
        RunnerError,
        SyncError,
        TransferError,
    )
    from .pool import Executor, GpuPolicy
    from .session import Result, Session
    from .task import Execution, Task


def __getattr__(name: str) -> Any:
    module = _LOCATIONS.get(name)
    if module is None:
        raise AttributeError(f"module 'remote_exec' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
