"""SubprocessAdvice: run the session in another local interpreter, through the same archive and runner
as a remote run (the backend is :class:`~remote_exec.backends.local.LocalBackend`)."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..backends.local import LocalBackend
from ..packing import default_cache_dir
from ..session import Session
from .remote import ExecutingAdvice, Target, call_options

__all__ = ["Interpreter", "SubprocessAdvice"]

_backend = LocalBackend()


@dataclass(frozen=True)
class Interpreter:
    """A local Python interpreter to run tasks in.

    Attributes:
        executable: The interpreter (default: the one running rx).
        path: Directories put in front of its module search path (PYTHONPATH).
        environment: Environment variables for the task.
    """

    executable: str = field(default_factory=lambda: sys.executable)
    path: Sequence[str] = ()
    environment: Mapping[str, str] = field(default_factory=dict)


class SubprocessAdvice(ExecutingAdvice):
    """Runs the task in a separate local interpreter process.

    Args:
        interpreter: Which interpreter, with what path and environment (default: this one).
    """

    def __init__(self, interpreter: Interpreter | None = None) -> None:
        self.interpreter = interpreter or Interpreter()

    def target(self, session: Session) -> Target:
        options: dict[str, Any] = dict(session.context.get("options") or {})
        env = dict(self.interpreter.environment)
        if self.interpreter.path:
            existing = [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []
            env["PYTHONPATH"] = os.pathsep.join([*self.interpreter.path, *existing])
        env.update(options.get("env") or {})
        call = call_options(options, python=self.interpreter.executable,
                            workdir=str(default_cache_dir().parent / "local"), env=env)
        return Target(backend=_backend, backend_name="local", host="local", options=call)
