"""RemoteAdvice: run the task on a host over SSH (or, when no host is named anywhere, in a local subprocess)."""

from __future__ import annotations

from ..coordinator import Coordinator, Target
from ..session import Session
from .base import ExecutingAdvice

__all__ = ["RemoteAdvice"]


class RemoteAdvice(ExecutingAdvice):
    """Runs the task on a host over SSH (or, when no host is named anywhere, in a local subprocess).

    The host comes from the session (``@task(remote=...)``, ``rx run --remote``), else from this advice.

    Args:
        remote: Default host: a ``[tool.rx.remotes]`` name, an ssh_config alias or ``[user@]host[:port]``.
        backend: ``openssh`` or ``paramiko`` (default: the configuration's, or RX_BACKEND).
        coordinator: The coordinator to run through (default: this process's).
    """

    def __init__(self, remote: str | None = None, *, backend: str | None = None,
                 coordinator: Coordinator | None = None) -> None:
        super().__init__(coordinator=coordinator)
        self.remote = remote
        self.backend = backend

    def target(self, session: Session) -> Target:
        return self.coordinator.resolve_target(session, remote=self.remote, backend=self.backend)
