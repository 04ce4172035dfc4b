"""Run a command on a pseudo-terminal as a user would, and press keys (Ctrl-C) at the moment a marker shows.

The command gets the pty as its controlling terminal, so Ctrl-C written to the master is turned into
SIGINT for the terminal's foreground process group by the kernel, exactly as in an interactive shell.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pty
import re
import select
import subprocess
import termios
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CTRL_C", "PtyRun", "run_in_pty"]

#: What the Ctrl-C key sends.
CTRL_C = b"\x03"


@dataclass(frozen=True)
class PtyRun:
    """What the command did: its exit status (``-N`` for a signal) and everything it wrote to the terminal
    (colours taken out, line ends as ``\\n``)."""

    returncode: int
    output: str


def _make_controlling_terminal() -> None:  # pragma: no cover - runs in the child before exec
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def run_in_pty(argv: Sequence[str], *, cwd: Path, env: dict[str, str], keys: Sequence[tuple[bytes, bytes]] = (),
               timeout: float = 60) -> PtyRun:
    """Run ``argv`` on a new pty; for each ``(marker, key)`` in order, wait until ``marker`` has been printed,
    then type ``key``. Returns once the command ended and its output is read."""
    master, slave = pty.openpty()
    process = subprocess.Popen(list(argv), cwd=cwd, env=env, stdin=slave, stdout=slave, stderr=slave,
                               start_new_session=True, preexec_fn=_make_controlling_terminal, close_fds=True)
    os.close(slave)
    output = bytearray()
    pending = list(keys)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if pending and pending[0][0] in output:
                os.write(master, pending.pop(0)[1])
            ready, _, _ = select.select([master], [], [], 0.1)
            if not ready:
                # once it ended, the terminal may still hold output written just before the exit
                if process.poll() is not None and not pending and not select.select([master], [], [], 0.2)[0]:
                    break
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError as exc:  # EIO: every process holding the slave side has closed it
                if exc.errno != errno.EIO:
                    raise
                break
            if not chunk:
                break
            output += chunk
        else:
            process.kill()
            printed = output.decode(errors="replace")
            raise AssertionError(f"{argv} did not end within {timeout} s; it printed:\n{printed}")
        returncode = process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)
    text = _ANSI.sub("", output.decode("utf-8", "replace")).replace("\r\n", "\n")
    return PtyRun(returncode, text)


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
