"""Advices and extensions, and the chain runner that drives a session through them.

An advice wraps every execution of a task: its ``before(session)`` runs in chain order and must call
``session.proceed()`` (go on) or ``session.conclude(result)`` (this is the result: skip the task and the
later advices); its ``after(session)`` runs in reverse order for every advice that was entered, including
the one that concluded, and may replace the result with ``session.conclude``. An advice that neither
proceeds nor concludes is an error that names it.

Executing advices (``RemoteAdvice``, ``SubprocessAdvice``) conclude with the result of running the task
elsewhere, so they end the chain: advices after them would never run, and a chain that puts any there is
refused.

Extensions observe: ``on_init(configuration)`` once, ``on_before_advice`` / ``on_after_advice`` around
every advice call.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .errors import ConfigError, RemoteExecError
from .session import Result, Session

if TYPE_CHECKING:
    from .config import Configuration

__all__ = ["Advice", "Extension", "check_chain", "run_chain"]

logger = logging.getLogger(__name__)


class Advice:
    """Code that runs around every execution of a task. Override either method; both default to
    proceeding."""

    #: Executing advices end the chain (nothing may follow them).
    terminal: bool = False

    @property
    def name(self) -> str:
        """The advice's name in messages."""
        return type(self).__name__

    def before(self, session: Session) -> None:
        """Called before the task; must call ``session.proceed()`` or ``session.conclude(result)``."""
        session.proceed()

    def after(self, session: Session) -> None:
        """Called after the task (or after a later advice concluded), in reverse order."""


class Extension:
    """Observes configuration and every advice call. Override what you need."""

    def on_init(self, configuration: Configuration) -> None:
        """Called once when the extension is added to a configuration."""

    def on_before_advice(self, advice: Advice, session: Session) -> None:
        """Called before ``advice.before(session)``."""

    def on_after_advice(self, advice: Advice, session: Session) -> None:
        """Called after ``advice.after(session)``."""


def _run_locally(session: Session) -> Result:
    try:
        value = session.task.execute(session.execution)
    except Exception as exc:
        return Result.from_exception(exc, traceback.format_exc())
    return Result(value=value)


def check_chain(advices: Sequence[Advice]) -> None:
    """Refuse a chain with an advice after an executing (terminal) one.

    Raises:
        ConfigError: Such an advice would never run.
    """
    for index, advice in enumerate(advices[:-1]):
        if advice.terminal:
            later = ", ".join(a.name for a in advices[index + 1:])
            raise ConfigError(f"advice chain: {later} after {advice.name} would never run",
                              hint=f"put {advice.name} last")


def run_chain(session: Session, advices: Sequence[Advice], extensions: Sequence[Extension] = ()) -> Result:
    """Drive ``session`` through ``advices`` and the task; return the result.

    Raises:
        RemoteExecError: An advice neither proceeded nor concluded (named), or an advice failed.
    """
    check_chain(advices)
    entered: list[Advice] = []
    concluded = False
    for advice in advices:
        session.await_decision()
        for extension in extensions:
            extension.on_before_advice(advice, session)
        advice.before(session)
        decision = session.decision
        if decision is None:
            raise RemoteExecError(f"advice {advice.name} neither proceeded nor concluded in before()",
                                  hint="call session.proceed() or session.conclude(result)")
        entered.append(advice)
        if decision == "conclude":
            concluded = True
            break
    if not concluded:
        session.result = _run_locally(session)
    for advice in reversed(entered):
        session.enter_after()
        advice.after(session)
        for extension in extensions:
            extension.on_after_advice(advice, session)
    session.leave_chain()
    assert session.result is not None
    return session.result
