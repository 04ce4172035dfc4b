"""The launcher interface: start the runner's command on a host and hand back its process."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from ..backends.base import Backend, Process

__all__ = ["Launcher"]


class Launcher(ABC):
    """Decides how the runner is started on a host.

    The protocol (:mod:`remote_exec.protocol`) builds the runner's command line (the bootstrap with its
    arguments) and asks the target's launcher to start it; the process it returns is the protocol's
    channel: frames in on its stdin, frames out on its stdout, the runner's own diagnostics on its
    stderr. A launcher may wrap the command (a scheduler's submit-and-attach), never change it.

    Attributes:
        options: The launcher's settings from the remote's configuration (e.g. a scheduler's
            partition and time limit); the direct launcher has none.
    """

    #: The name a remote's ``scheduler`` key selects this launcher by.
    name: ClassVar[str] = ""
    #: How a pool (:mod:`remote_exec.pool`) places calls on a host this launcher starts runners on, as
    #: ``"module:Class"`` of a :class:`remote_exec.pool.placement.Placement`: by default slots, each with a
    #: persistent worker started through this launcher; a scheduler's launcher may take a whole map at once.
    placement: ClassVar[str] = "remote_exec.pool.slots:SlotPlacement"

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        self.options: Mapping[str, Any] = dict(options or {})

    @abstractmethod
    def start(self, backend: Backend, argv: Sequence[str]) -> Process:
        """Start ``argv`` (the runner's bootstrap) on ``backend``'s host; return its process.

        Raises:
            ConnectError, AuthError, HostKeyError: The host could not be reached.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict(self.options)!r})"
