"""What the workspace asks about local processes and the machine, on Linux and elsewhere.

On Linux the answers come from ``/proc`` (a process's state letter and start time in clock ticks, the
boot id). Where there is no ``/proc`` (macOS, the BSDs) they come from ``ps`` (only the ``-o KEYWORD=`` and
``-p PID`` flags both BSD and procps ``ps`` take) and ``sysctl`` (``kern.bootsessionuuid`` on macOS, else
``kern.boottime``): a subprocess each, on the path of a liveness check only. What cannot be known is None,
and callers then trust what they can (``kill(pid, 0)``).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

__all__ = ["PROC", "boot_id", "boot_time", "process_start", "process_state", "start_ticks"]

#: Where Linux shows processes (tests point it elsewhere to run the paths of a machine without it).
PROC = Path("/proc")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()  # fields from the 3rd (state) on


def _ask(argv: list[str]) -> str | None:
    """The stripped output of a short command, None when it fails or is missing."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=5, check=False,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    output = done.stdout.strip()
    return output if done.returncode == 0 and output else None


def _has_proc() -> bool:
    return (PROC / "self" / "stat").exists()


def process_state(pid: int) -> str | None:
    """The process's state letter (``Z`` for a zombie), or None when it cannot be read."""
    fields = _stat_fields(pid)
    if fields:
        return fields[0]
    if _has_proc():
        return None  # /proc is there and the process is not
    state = _ask(["ps", "-o", "stat=", "-p", str(pid)])
    return state[0] if state else None


def start_ticks(pid: int) -> int | None:
    """When the process started, in clock ticks since boot (Linux; None elsewhere)."""
    fields = _stat_fields(pid)
    if fields is None or len(fields) < 20:
        return None
    try:
        return int(fields[19])  # field 22, starttime
    except ValueError:
        return None


def process_start(pid: int) -> str | None:
    """When the process started, as ``ps`` says (``lstart``, to the second): what tells a reused pid where
    there are no clock ticks to compare."""
    return _ask(["ps", "-o", "lstart=", "-p", str(pid)])


def boot_id() -> str | None:
    """Something that changes when the machine boots again: Linux's boot id, macOS's boot session uuid,
    else the boot time ``sysctl`` reports."""
    try:
        return (PROC / "sys" / "kernel" / "random" / "boot_id").read_text().strip() or None
    except OSError:
        pass
    if _has_proc():
        return None
    return _ask(["sysctl", "-n", "kern.bootsessionuuid"]) or _ask(["sysctl", "-n", "kern.boottime"])


def boot_time() -> float | None:
    """When the machine booted (seconds since the epoch), from ``/proc/stat`` (None elsewhere)."""
    try:
        for line in (PROC / "stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def clock_ticks() -> float:
    """Clock ticks per second (what :func:`start_ticks` counts in)."""
    try:
        return float(os.sysconf("SC_CLK_TCK"))
    except (ValueError, OSError, AttributeError):
        return 100.0
