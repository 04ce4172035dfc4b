"""Launchers: how the runner is started on a host, over its backend.

``direct`` (the default) execs the runner's bootstrap as one command over the backend's connection. A
scheduler launcher (Slurm's ``sbatch``/``srun``) plugs in beside it: it wraps the same command, and
everything above it (the protocol, the advices, the workspace) stays as it is. See
:mod:`remote_exec.launchers.registry` for the names, and docs/architecture.md for the recipe.
"""

from __future__ import annotations

from .base import Launcher
from .registry import (
    check_launcher_name,
    create_launcher,
    launcher_class,
    launcher_names,
    register_launcher,
    unregister_launcher,
)

__all__ = ["Launcher", "check_launcher_name", "create_launcher", "launcher_class", "launcher_names",
           "register_launcher", "unregister_launcher"]
