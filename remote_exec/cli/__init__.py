"""The ``rx`` command line: a thin layer over the library.

It parses options, calls the library, renders with rich, and turns a :class:`RemoteExecError` into one red
line on stderr and its exit status (a Python traceback only with ``-v``). Commands live in the modules of
this package, each registering on :data:`app`: ``run`` (run, rerun), ``ledger`` (runs, show, logs, export,
clean), ``hosts`` (hosts, top, check), ``sync`` (sync, gc), ``pool`` (map), ``envs`` (env). This package is
the only place that imports typer (and, with pool/progress.py, rich).
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

import typer

from ..errors import Interrupted, RemoteExecError
from .app import Stopped, app, error_line, state

__all__ = ["app", "error_line", "main", "state"]


def _register() -> None:
    # Importing the command modules registers their commands on `app`.
    from . import envs, hosts, ledger, pool, run, sync  # noqa: F401


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# shape: one except clause per way a command ends, each with its exit status of DESIGN.md section 4
def main(argv: list[str] | None = None) -> NoReturn:
    """Entry point of the ``rx`` console script."""
    import signal

    # SIGTERM stops a run the way Ctrl-C does: the remote task is stopped, the run recorded cancelled.
    signal.signal(signal.SIGTERM, _terminate)
    _register()
    verbose = "-v" in (argv or sys.argv[1:]) or "--verbose" in (argv or sys.argv[1:]) or bool(
        os.environ.get("RX_DEBUG"))
    try:
        code = app(args=argv, prog_name="rx", standalone_mode=False)
    except RemoteExecError as exc:
        if verbose or state.verbose:
            import traceback

            traceback.print_exc()
        error_line(str(exc).replace("[", r"\["))
        sys.exit(exc.exit_code)
    except KeyboardInterrupt as exc:
        error_line(str(exc).replace("[", r"\[") if isinstance(exc, Interrupted) else "interrupted")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        error_line("aborted")
        sys.exit(130)
    except Stopped as exc:
        error_line(exc.message.replace("[", r"\["))
        sys.exit(exc.exit_code)
    except Exception as exc:  # click usage errors and friends
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(2 if isinstance(exc, click.UsageError) else 3)
        raise
    sys.exit(code if isinstance(code, int) else 0)
