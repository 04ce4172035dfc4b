"""The ``rx`` application object, the options shared by every command, and the one-line error printer.

The command modules (``run``, ``ledger``, ``hosts``) register their commands on :data:`app`;
:mod:`remote_exec.cli` imports them and runs the application.
"""

import os
from typing import Annotated, Any

import click
import typer
import typer.core

from .. import __version__
from ..errors import Interrupted, printable
from .logs import configure as configure_log

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

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """Each command with the first sentence of its help, wrapped (click would cut it at 80 columns)."""
        rows = []
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, command.get_short_help_str(limit=500)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


app = typer.Typer(
    name="rx",
    cls=_Group,
    help="Offload Python work to machines reachable over SSH, and keep a record of every run.",
    epilog="After a command, rx keeps one process of yours with rx imported for RX_SERVER seconds (default 300), "
           "so that the next command starts at once; RX_SERVER=0 turns it off, 'python -m remote_exec.cli.server "
           "stop' ends it now.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    # Plain click help: rich markup would eat [tool.rx.remotes], [user@] and host[:port], and its panels
    # cut long option names at 80 columns. Click suggests a command for a typo itself (typer would twice).
    rich_markup_mode=None,
    suggest_commands=False,
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
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, show_default=False,
                                         help="Show rx's log and Python tracebacks (-vv: its debug lines, "
                                              "-vvv: every library's).")] = 0,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    state.verbose = verbose
    if verbose:
        os.environ["RX_DEBUG"] = "1"  # rx's debug switch: remote tracebacks keep rx's own frames too
    configure_log(verbose)


def error_line(message: str) -> None:
    """Print one red ``rx: error: ...`` line on stderr (``message`` is rich markup; control characters
    in it, from a host's text, are shown as escapes)."""
    from rich.console import Console

    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]rx: error:[/] {printable(message)}",
                                                                 markup=True, emoji=False)
