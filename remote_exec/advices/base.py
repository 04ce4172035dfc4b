"""Executing advices: run the session somewhere else and conclude with its result.

:class:`ExecutingAdvice` hands the session to the process's :class:`~remote_exec.coordinator.Coordinator`
(which packs, connects, executes, collects and records); subclasses only say where, as a
:class:`~remote_exec.coordinator.Target`: :class:`~remote_exec.advices.remote.RemoteAdvice` over SSH,
:class:`~remote_exec.advices.subprocess.SubprocessAdvice` in a local interpreter.
"""

from __future__ import annotations

from abc import abstractmethod

from ..advice import Advice
from ..coordinator import Coordinator, Target
from ..session import Session

__all__ = ["ExecutingAdvice", "Target"]


class ExecutingAdvice(Advice):
    """An advice that runs the task elsewhere and concludes with its result (it ends the chain).

    Args:
        coordinator: The coordinator to run through (default: this process's).
    """

    terminal = True

    def __init__(self, *, coordinator: Coordinator | None = None) -> None:
        self._coordinator = coordinator

    @property
    def coordinator(self) -> Coordinator:
        """The coordinator this advice runs calls through."""
        return self._coordinator or Coordinator.current()

    @abstractmethod
    def target(self, session: Session) -> Target:
        """Where this session runs."""

    def before(self, session: Session) -> None:
        coordinator = session.local.get("coordinator")  # a pool running through a coordinator of its own
        if coordinator is not None and coordinator is not self.coordinator:
            session.conclude(coordinator.execute(session, coordinator.resolve_target(session)))
            return
        session.conclude(self.coordinator.execute(session, self.target(session)))
