"""The functions every contender runs remotely: standard library only, one small top-level module.

It lives alone in its folder (put on ``sys.path`` by the agents; a ``pyproject.toml`` makes the folder a
project of its own), so rx ships exactly this module, mitogen serves exactly this module, and bandsaw's task
is the same one-liner. Not a package on purpose: a task
in the ``benchmarks`` package would make rx ship the whole package.
"""

from __future__ import annotations

import os
import time


def noop(i: int = 0) -> int:
    """The trivial call: returns its argument (distinct arguments keep rx's per-call records apart)."""
    return i


def nap(seconds: float) -> float:
    """The long call: sleeps ``seconds`` (the pool's wall-time row)."""
    time.sleep(seconds)
    return seconds


def echo(data: bytes) -> bytes:
    """The round trip: the argument comes back as the result."""
    return data


def where(i: int = 0) -> tuple[int, int, str, int]:
    """Which remote process ran the call: (pid, parent pid, parent's command name, i).

    Two calls served by one persistent worker share a pid (a worker that runs calls in place) or a parent
    that is a Python process (a worker that forks per call); process-per-call runners share neither.
    """
    parent = os.getppid()
    try:
        with open(f"/proc/{parent}/comm", encoding="ascii", errors="replace") as stream:
            comm = stream.read().strip()
    except OSError:
        comm = ""
    return os.getpid(), parent, comm, i
