"""The ``rx`` application object, the options shared by every command, and the one-line error printer.

The command modules (``run``, ``ledger``, ``hosts``) register their commands on :data:`app`;
:mod:`remote_exec.cli` imports them and runs the application.
"""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer

from .. import __version__
from ..errors import printable

__all__ = ["app", "error_line", "state"]

app = typer.Typer(
    name="rx",
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
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_PrintableFormatter("rx: %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    # paramiko logs a failed handshake with a traceback from its transport thread; rx already reports it as
    # one line (and its exit status), so paramiko's own log shows only with -v.
    logging.getLogger("paramiko").setLevel(level if verbose else logging.CRITICAL)


class _PrintableFormatter(logging.Formatter):
    """Log records as lines without control characters (a log message may quote what a host sent)."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record), lines=True)


def error_line(message: str) -> None:
    """Print one red ``rx: error: ...`` line on stderr (``message`` is rich markup; control characters
    in it, from a host's text, are shown as escapes)."""
    from rich.console import Console

    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]rx: error:[/] {printable(message)}",
                                                                 markup=True, emoji=False)
