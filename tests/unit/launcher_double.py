"""A launcher that lives outside rx, as a scheduler plug-in would: it exists for rx only once
``remote_exec.launchers.register_launcher("wrapped", "launcher_double:WrappingLauncher")`` has run.

It wraps the runner's command the way a scheduler's launcher does (here in ``env RX_LAUNCHED_BY=wrapped``)
and remembers every command it started.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from remote_exec.backends.base import Backend, Process
from remote_exec.launchers.base import Launcher

__all__ = ["TARGET", "WrappingLauncher"]

TARGET = "launcher_double:WrappingLauncher"
"""Where the registry finds it (``tests/unit`` is on sys.path while the unit tests run)."""


class WrappingLauncher(Launcher):
    """Starts the runner inside ``env RX_LAUNCHED_BY=wrapped``."""

    name: ClassVar[str] = "wrapped"
    started: ClassVar[list[list[str]]] = []

    def start(self, backend: Backend, argv: Sequence[str]) -> Process:
        command = ["env", "RX_LAUNCHED_BY=wrapped", *argv]
        WrappingLauncher.started.append(command)
        return backend.start(command)
