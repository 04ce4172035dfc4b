"""The ``rx`` application object, the options shared by every command, and the one-line error printer.

The command modules (``run``, ``ledger``, ``hosts``) register their commands on :data:`app`;
:mod:`remote_exec.cli` imports them and runs the application.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Annotated, Any

import click
import typer
import typer.core

from .. import __version__
from ..errors import Interrupted

__all__ = ["Stopped", "app", "error_line", "state"]

class Stopped(click.ClickException):
    """An :class:`~remote_exec.errors.Interrupted` on its way out of typer, which would otherwise turn a
    ``KeyboardInterrupt`` into a silent exit 130; :func:`remote_exec.cli.main` prints its one line."""

    exit_code = 130


class _Group(typer.core.TyperGroup):
    """rx's command group: an interrupted command keeps its message (see :class:`Stopped`)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Interrupted as exc:
            raise Stopped(str(exc)) from exc


app = typer.Typer(
    name="rx",
    cls=_Group,
    help="Offload Python work to machines reachable over SSH, and keep a record of every run.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class _State:
    """Options given before the command, shared by every command."""

    verbose: int = 0


state = _State()


def _version(value: bool) -> None:
    if value:
        typer.echo(f"rx {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True,
                                         help="Show debug logs and Python tracebacks (-vv: more).")] = 0,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    state.verbose = verbose
    if verbose:
        os.environ["RX_DEBUG"] = "1"  # rx's debug switch: remote tracebacks keep rx's own frames too
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="rx: %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # paramiko logs a failed handshake with a traceback from its transport thread; rx already reports it as
    # one line (and its exit status), so paramiko's own log shows only with -v.
    logging.getLogger("paramiko").setLevel(level if verbose else logging.CRITICAL)


def error_line(message: str) -> None:
    """Print one red ``rx: error: ...`` line on stderr."""
    from rich.console import Console

    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]rx: error:[/] {message}",
                                                                 markup=True, emoji=False)
