"""A task's dependencies on its host: declared (``@task(deps=...)``, ``rx run --deps``, ``[tool.rx] deps``),
resolved on the coordinator for the host's interpreter and platform, built there once per key with uv
(online, or air-gapped from shipped wheels). The host's side is :mod:`remote_exec.runner.envs`."""

from __future__ import annotations

from .manager import EnvCall, Environments, refuse_by_value
from .resolve import EnvSpec, HostTarget, project_requirements

__all__ = ["EnvCall", "EnvSpec", "Environments", "HostTarget", "project_requirements", "refuse_by_value"]
