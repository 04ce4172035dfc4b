"""Launchers: how the runner is started on a host, over its backend.

``direct`` (the default) execs the runner's bootstrap as one command over the backend's connection.
``slurm`` submits each call (or an array of calls) with ``sbatch`` through the login node and runs the
runner inside the allocation; the coordinator follows the job's files on the shared filesystem and polls
the scheduler (:class:`Launcher` has that second entry point: submit, poll, verdict, cancel). See
:mod:`remote_exec.launchers.registry` for the names, and docs/architecture.md for the recipe.
"""

from __future__ import annotations

from typing import Any

from .base import Launcher
from .registry import (
    check_launcher_name,
    create_launcher,
    launcher_class,
    launcher_names,
    register_launcher,
    unregister_launcher,
)

__all__ = ["Job", "JobRequest", "JobState", "Launcher", "Verdict", "check_launcher_name", "create_launcher",
           "launcher_class", "launcher_names", "register_launcher", "unregister_launcher"]


def __getattr__(name: str) -> Any:
    """A scheduler's job types, imported on first use (a direct launcher never needs them)."""
    if name in ("Job", "JobRequest", "JobState", "Verdict"):
        from . import jobs

        return getattr(jobs, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
