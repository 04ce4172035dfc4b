"""One styled line on stderr without rich: the lines ``rx run`` prints on its way (the project summary, the
run's end) would otherwise import rich (~15 ms) for a single line.

Colour follows the conventions rich follows: ``NO_COLOR`` turns it off, ``FORCE_COLOR`` on, otherwise only a
terminal (not ``TERM=dumb``) gets it. The text is printed as given: sanitize what a host sent first
(:func:`remote_exec.errors.printable`).
"""

from __future__ import annotations

import os
import sys
from typing import IO

__all__ = ["STYLES", "say", "wants_color"]

#: The styles rx's lines use, as SGR parameters.
STYLES = {"dim": "2", "yellow": "33", "red": "31", "bold red": "1;31"}


def wants_color(stream: IO[str]) -> bool:
    """Whether ``stream`` gets ANSI colour (``NO_COLOR``, ``FORCE_COLOR``, a terminal, ``TERM``)."""
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    if os.environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or fake stream
        return False


def say(text: str, style: str | None = None, *, stream: IO[str] | None = None) -> None:
    """Print ``text`` and a newline on ``stream`` (default stderr), in ``style`` when colour is wanted."""
    out = stream if stream is not None else sys.stderr
    if style and wants_color(out):
        text = f"\x1b[{STYLES[style]}m{text}\x1b[0m"
    out.write(text + "\n")
    out.flush()
