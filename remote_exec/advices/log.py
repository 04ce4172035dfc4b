"""LoggingAdvice: one log line when a task starts and one when it ends, with its duration."""

from __future__ import annotations

import logging
import time

from ..advice import Advice
from ..session import Session

__all__ = ["LoggingAdvice"]


class LoggingAdvice(Advice):
    """Logs each execution through :mod:`logging` (logger ``remote_exec.advices.log``).

    Args:
        level: The level of the start and success lines; failures log at WARNING.
    """

    def __init__(self, level: int = logging.INFO) -> None:
        self.level = level
        self.logger = logging.getLogger(__name__)

    def before(self, session: Session) -> None:
        session.context["log_started"] = time.monotonic()
        self.logger.log(self.level, "task %s (execution %s) starting on %s", session.task.name,
                        session.execution.execution_id[:12], session.context.get("remote") or "local")
        session.proceed()

    def after(self, session: Session) -> None:
        elapsed = time.monotonic() - session.context.pop("log_started", time.monotonic())
        result = session.result
        if result is None:
            return
        if result.ok:
            self.logger.log(self.level, "task %s finished in %.3f s%s", session.task.name, elapsed,
                            " (cached)" if result.cached else "")
        else:
            self.logger.log(self.level, "task %s ended %s (exit %s) after %.3f s%s", session.task.name, result.status,
                                result.exit_code, elapsed,
                                f": {result.exception_type}: {result.exception_message}"
                                if result.exception_type else "")
