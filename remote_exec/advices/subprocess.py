"""SubprocessAdvice: run the session in another local interpreter, through the same archive and runner
as a remote run (the backend is :class:`~remote_exec.backends.local.LocalBackend`)."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..coordinator import Coordinator, Target
from ..session import Session
from .base import ExecutingAdvice

__all__ = ["Interpreter", "SubprocessAdvice"]


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
        coordinator: The coordinator to run through (default: this process's).
    """

    def __init__(self, interpreter: Interpreter | None = None, *, coordinator: Coordinator | None = None) -> None:
        super().__init__(coordinator=coordinator)
        self.interpreter = interpreter or Interpreter()

    def target(self, session: Session) -> Target:
        env = dict(self.interpreter.environment)
        if self.interpreter.path:
            existing = [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []
            env["PYTHONPATH"] = os.pathsep.join([*self.interpreter.path, *existing])
        return self.coordinator.local_target(session, python=self.interpreter.executable, env=env)
