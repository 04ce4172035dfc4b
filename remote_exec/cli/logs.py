"""rx's log on stderr: a line per record, ``rx: LEVEL logger: message``, control characters shown as
escapes (a message may quote what a host sent). ``-v`` shows rx's info lines, ``-vv`` its debug lines,
``-vvv`` every library's; without it, warnings only (paramiko's own log not even those: rx reports a failed
handshake as its one error line).

Set up as soon as the command line is known: cli/early.py does it before it connects (what the connection
logs would otherwise go nowhere), the root command again once typer has parsed the line.
"""

from __future__ import annotations

import logging
import sys

from ..errors import printable

__all__ = ["configure"]


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record), lines=True)


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """rx's own handler (replaced, not doubled, when the log is set up again)."""


def configure(verbose: int) -> None:
    """Set up rx's log for ``-v`` given ``verbose`` times. Where something else set up the root logger
    already (a program calling :func:`remote_exec.cli.main`, pytest), only the levels are set."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    root = logging.getLogger()
    ours = [handler for handler in root.handlers if isinstance(handler, _Handler)]
    if ours or not root.handlers:
        for handler in ours:
            root.removeHandler(handler)
        handler = _Handler(sys.stderr)
        handler.setFormatter(_Formatter("rx: %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(level)
    logging.getLogger("paramiko").setLevel(level if verbose else logging.CRITICAL)
    if 0 < verbose < 3:  # -v, -vv: rx's own lines; other libraries' debugging (paramiko's, per packet) with -vvv
        root.setLevel(logging.WARNING)
        logging.getLogger("remote_exec").setLevel(level)
        logging.getLogger("paramiko").setLevel(logging.INFO if verbose == 2 else logging.WARNING)
