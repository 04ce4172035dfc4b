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

TYPE_CHECKING = False  # rx run starts its ssh before typing, contextlib and the rest are imported
if TYPE_CHECKING:
    import contextlib
    from collections.abc import Callable, Iterator
    from typing import Any, NoReturn

__all__ = ["COMMAND_MODULES", "app", "before_exit", "error_line", "exit_now", "main", "state"]


#: The module of this package that registers each command (tests/unit/test_cli_lean.py keeps it whole).
COMMAND_MODULES = {
    "run": "run", "rerun": "run", "attach": "run", "cancel": "run",
    "runs": "ledger", "show": "ledger", "logs": "ledger", "export": "ledger", "clean": "ledger",
    "hosts": "hosts", "top": "hosts", "check": "hosts",
    "sync": "sync", "gc": "sync",
    "env": "envs",
    "map": "pool",
}


def _register(argv: list[str] | None = None) -> str | None:
    """Import the command modules, each registering its commands on `app`: only the named command's when
    the command line names one (``rx run`` starts without the ledger's, hosts' ... imports); all of them
    for ``--help``, completion or a mistyped command. Returns the named command (None: all are needed)."""
    import importlib

    command = next((word for word in argv or () if not word.startswith("-")), None)
    completing = any(name.startswith("_RX_COMPLETE") or name == "_TYPER_COMPLETE_ARGS" for name in os.environ)
    named = command if command in COMMAND_MODULES and not completing else None
    modules = {COMMAND_MODULES[named]} if named is not None else set(COMMAND_MODULES.values())
    for module in sorted(modules):
        importlib.import_module(f"{__name__}.{module}")
    return named


def _only(app: Any, command: str | None) -> contextlib.AbstractContextManager[None]:
    """typer builds every registered command's click parameters on each invocation (evaluating their
    annotations: ~1 ms per command, `rx run`'s most): let it see only ``command`` (None: all)."""
    import contextlib

    @contextlib.contextmanager
    def only() -> Iterator[None]:
        registered = app.registered_commands
        if command is not None:
            app.registered_commands = [info for info in registered
                                       if (info.name or info.callback.__name__.replace("_", "-")) == command]
        try:
            yield
        finally:
            app.registered_commands = registered

    return only()


#: Called with the exit status when the command has ended, just before the process does (a server's worker
#: reports it to its client: :mod:`remote_exec.cli.server`).
before_exit: Callable[[int], None] | None = None


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> NoReturn:
    """Entry point of the ``rx`` console script (``argv``: the arguments, for a call from Python; None: the
    process's own, and the process ends as soon as the command has, see :func:`exit_now`)."""
    if argv is not None:
        _command(argv)
    if os.name == "posix":
        from .server import delegate

        delegate(sys.argv[1:])  # a resident rx runs the command, and this process ends with its status
    early = None
    try:
        import _signal  # type: ignore[import-not-found]  # (signal imports enum: ~1 ms before the ssh starts)

        _signal.signal(_signal.SIGTERM, _terminate)  # from the start: what rx started early is stopped too
        from .words import peek_run

        seen = peek_run(sys.argv[1:])
        if seen is not None:
            from ..prestart import start

            key = start(seen)  # the ssh master the last such line led to, from a memo (checked before it is used)
            from .early import connect_from_argv

            early = connect_from_argv(sys.argv[1:], seen, key)  # before typer and the rest of rx are imported
        _command(None, early)
    except SystemExit as exc:
        if early is not None:
            early.close()  # a runner started for a run that never came (a usage error)
        exit_now(exc.code)
    except KeyboardInterrupt:  # Ctrl-C while rx itself was still being imported
        if early is not None:
            early.close()
        from .say import say

        say("rx: error: interrupted", "bold red")
        exit_now(130)


def exit_now(code: object) -> NoReturn:
    """End the process with ``code`` as ``sys.exit`` would, without the interpreter's teardown.

    What must happen at exit still happens, in the same order: the other non-daemon threads are waited
    for, the ``atexit`` callbacks run (the coordinator's close, the @task recorder's last writes, logging's
    flush), stdout and stderr are flushed. What is skipped is tearing down every module and collecting
    every object one by one: ~15 ms of a ~150 ms ``rx run``, for nothing the OS does not do anyway.
    """
    import atexit
    import threading

    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # sys.exit("message"): Python prints it and exits 1
        sys.stderr.write(f"{code}\n")
        status = 1
    current = threading.current_thread()
    for thread in threading.enumerate():
        if thread is not current and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that went away (rx ... | head), a closed stream
            pass
    if before_exit is not None:
        before_exit(status)
    server = sys.modules.get(f"{__name__}.server")
    if server is not None:
        server.spawn()  # for the next command, if this one found no rx server (and may have one)
    os._exit(status)


# shape: one except clause per way a command ends, each with its exit status of DESIGN.md section 4
def _command(argv: list[str] | None, early: Any = None) -> NoReturn:
    import signal

    import typer

    from ..errors import Interrupted, RemoteExecError
    from .application import Stopped, app, error_line, state

    # SIGTERM stops a run the way Ctrl-C does: the remote task is stopped, the run recorded cancelled.
    signal.signal(signal.SIGTERM, _terminate)
    words = sys.argv[1:] if argv is None else argv
    command = _register(words)
    verbose = "-v" in words or "--verbose" in words or bool(os.environ.get("RX_DEBUG"))
    try:
        with _only(app, command):
            code = app(args=argv, prog_name="rx", standalone_mode=False, obj={"early": early})
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


def __getattr__(name: str) -> Any:
    """The application and its helpers, imported on first use (``rx run`` starts connecting first)."""
    if name in ("app", "error_line", "state"):
        import importlib

        return getattr(importlib.import_module(f"{__name__}.application"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
