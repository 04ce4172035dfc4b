"""The direct launcher: one exec of the runner per call over the backend's connection."""

from __future__ import annotations

from collections.abc import Sequence

from ..backends.base import Backend, Process
from .base import Launcher

__all__ = ["DirectLauncher"]


class DirectLauncher(Launcher):
    """Runs the runner's command as it is (``backend.start(argv)``)."""

    name = "direct"

    def start(self, backend: Backend, argv: Sequence[str]) -> Process:
        return backend.start(argv)
