"""Built-in advices: run elsewhere (:class:`RemoteAdvice`, :class:`SubprocessAdvice`), cache, log.

Each is imported on first use (``rx run --remote`` needs only :class:`RemoteAdvice`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .base import ExecutingAdvice, Target
    from .cache import CachingAdvice
    from .log import LoggingAdvice
    from .remote import RemoteAdvice
    from .subprocess import Interpreter, SubprocessAdvice

__all__ = ["CachingAdvice", "ExecutingAdvice", "Interpreter", "LoggingAdvice", "RemoteAdvice",
           "SubprocessAdvice", "Target"]

_WHERE = {"ExecutingAdvice": "base", "Target": "base", "CachingAdvice": "cache", "LoggingAdvice": "log",
          "RemoteAdvice": "remote", "Interpreter": "subprocess", "SubprocessAdvice": "subprocess"}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
