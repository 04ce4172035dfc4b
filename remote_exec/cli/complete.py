"""Shell completion of hosts and runs (``rx --install-completion`` for bash, zsh and fish).

The shell asks ``rx`` itself (typer's completion protocol, ``_RX_COMPLETE=complete_<shell>``); these
functions answer for a HOST (ssh_config aliases of the ssh_config rx reads, ``[tool.rx.remotes]`` names)
and a RUN (the workspace's run ids, newest first, and ``latest``). They never fail: a completion that
cannot be worked out offers nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

__all__ = ["complete_hosts", "complete_runs"]

logger = logging.getLogger(__name__)


def _param(ctx: click.Context, name: str) -> object:
    value = ctx.params.get(name)
    return value if value is not None else None


def complete_hosts(ctx: click.Context, incomplete: str) -> list[str]:
    """Hosts that start with ``incomplete``: ``[tool.rx.remotes]`` names, then ssh_config aliases."""
    try:
        from ..backends.ssh import list_aliases
        from ..config import Configuration

        config = Configuration.load()
        requested = _param(ctx, "ssh_config")
        names = [*config.remotes,
                 *list_aliases(config.effective_ssh_config(requested if isinstance(requested, Path) else None))]
    except Exception:  # a broken pyproject or ssh_config: nothing to offer, and no traceback in the prompt
        logger.debug("completing hosts failed", exc_info=True)
        return []
    return [name for name in dict.fromkeys(names) if name.startswith(incomplete)]


def complete_runs(ctx: click.Context, incomplete: str) -> list[str]:
    """Run ids that start with ``incomplete``, newest first, and ``latest``."""
    try:
        from ..workspace import Workspace

        workspace = _param(ctx, "workspace")
        ids = Workspace.resolve(workspace if isinstance(workspace, Path) else None).ids()
    except Exception:
        logger.debug("completing runs failed", exc_info=True)
        return []
    return [run_id for run_id in ["latest", *reversed(ids)] if run_id.startswith(incomplete)]
