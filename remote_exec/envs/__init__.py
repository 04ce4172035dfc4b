"""A task's dependencies on its host: declared (``@task(deps=...)``, ``rx run --deps``, ``[tool.rx] deps``),
resolved on the coordinator for the host's interpreter and platform, built there once per key with uv
(online, or air-gapped from shipped wheels). The host's side is :mod:`remote_exec.runner.envs`."""

from __future__ import annotations

from typing import Any

from .resolve import EnvSpec, HostTarget, project_requirements

__all__ = ["EnvCall", "EnvSpec", "Environments", "HostTarget", "project_requirements", "refuse_by_value"]


def __getattr__(name: str) -> Any:
    """The manager's names, imported on first use (the coordinator needs only :class:`EnvSpec` for a task
    that declares nothing)."""
    if name in ("EnvCall", "Environments", "refuse_by_value"):
        from . import manager

        return getattr(manager, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
