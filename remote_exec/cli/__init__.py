"""The ``rx`` command line: a thin layer over the library.

It parses options, calls the library, renders with rich, and turns a :class:`RemoteExecError` into one red
line on stderr and its exit status (a Python traceback only with ``-v``). Commands live in the modules of
this package, each registering on :data:`app`: ``run`` (run, rerun), ``ledger`` (runs, show, logs, export,
clean), ``hosts`` (hosts, check). This package is the only place that imports typer or rich.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Annotated, NoReturn

import typer

from .. import __version__
from ..errors import RemoteExecError

__all__ = ["app", "main", "state"]

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
    logging.basicConfig(level=level, format="rx: %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # paramiko logs a failed handshake with a traceback from its transport thread; rx already reports it as
    # one line (and its exit status), so paramiko's own log shows only with -v.
    logging.getLogger("paramiko").setLevel(level if verbose else logging.CRITICAL)


def error_line(message: str) -> None:
    """Print one red ``rx: error: ...`` line on stderr."""
    from rich.console import Console

    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]rx: error:[/] {message}",
                                                                 markup=True, emoji=False)


def _register() -> None:
    # Importing the command modules registers their commands on `app`.
    from . import hosts, ledger, run  # noqa: F401


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> NoReturn:
    """Entry point of the ``rx`` console script."""
    import signal

    # SIGTERM stops a run the way Ctrl-C does: the remote task is stopped, the run recorded cancelled.
    signal.signal(signal.SIGTERM, _terminate)
    _register()
    verbose = "-v" in (argv or sys.argv[1:]) or "--verbose" in (argv or sys.argv[1:]) or bool(
        os.environ.get("RX_DEBUG"))
    try:
        code = app(args=argv, standalone_mode=False)
    except RemoteExecError as exc:
        if verbose or state.verbose:
            import traceback

            traceback.print_exc()
        error_line(str(exc).replace("[", r"\["))
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        error_line("interrupted")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        error_line("aborted")
        sys.exit(130)
    except Exception as exc:  # click usage errors and friends
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(2 if isinstance(exc, click.UsageError) else 3)
        raise
    sys.exit(code if isinstance(code, int) else 0)
