"""The only list of launcher names: a remote's ``scheduler`` key, validated here, selects one.

Adding a launcher is its own module plus one line in :data:`LAUNCHERS` (or, from outside the package,
one :func:`register_launcher` call). Launchers are imported on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError
from .base import Launcher

__all__ = ["LAUNCHERS", "check_launcher_name", "create_launcher", "launcher_class", "launcher_names",
           "register_launcher", "unregister_launcher"]

#: Launcher name -> ``"module:Class"``.
LAUNCHERS: dict[str, str] = {
    "direct": "remote_exec.launchers.direct:DirectLauncher",
    "slurm": "remote_exec.launchers.slurm:SlurmLauncher",
}


def register_launcher(name: str, target: str) -> None:
    """Make the launcher class ``target`` (``"module:Class"``) selectable as ``scheduler = name``."""
    if ":" not in target:
        raise ConfigError(f"launcher {target!r} must be written module:Class")
    LAUNCHERS[name] = target


def unregister_launcher(name: str) -> None:
    """Forget the launcher ``name`` (a test double's, say); the built-in ``direct`` stays."""
    if name != "direct":
        LAUNCHERS.pop(name, None)


def launcher_names() -> list[str]:
    """The launcher names a remote's ``scheduler`` key may take."""
    return sorted(LAUNCHERS)


def check_launcher_name(name: str) -> str:
    """``name`` if it is a launcher's.

    Raises:
        ConfigError: No launcher has that name (the hint lists those that exist).
    """
    if name not in LAUNCHERS:
        raise ConfigError(f"unknown scheduler {name!r}", hint=f"choose one of {', '.join(launcher_names())}")
    return name


def launcher_class(name: str) -> type[Launcher]:
    """The launcher class registered under ``name``, imported on first use.

    Raises:
        ConfigError: No launcher has that name, or it cannot be imported.
    """
    module_name, _, attribute = LAUNCHERS[check_launcher_name(name)].partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load the {name} launcher: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, Launcher)):
        raise ConfigError(f"{LAUNCHERS[name]} is not a Launcher")
    return cls


def create_launcher(name: str, options: Mapping[str, Any] | None = None) -> Launcher:
    """A launcher of kind ``name`` with its settings."""
    return launcher_class(name)(options)
