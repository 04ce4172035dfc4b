"""Built-in advices: run elsewhere (:class:`RemoteAdvice`, :class:`SubprocessAdvice`), cache, log."""

from __future__ import annotations

from .base import ExecutingAdvice, Target
from .cache import CachingAdvice
from .log import LoggingAdvice
from .remote import RemoteAdvice
from .subprocess import Interpreter, SubprocessAdvice

__all__ = ["CachingAdvice", "ExecutingAdvice", "Interpreter", "LoggingAdvice", "RemoteAdvice",
           "SubprocessAdvice", "Target"]
