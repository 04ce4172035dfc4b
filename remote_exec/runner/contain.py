"""Everything the task starts, found and stopped: process identities, and the task's containment.

A process is named by its pid *and* its start time (and the boot it started in): a pid alone may belong to
another process by the time it is signalled (a supervisor that died, a host that rebooted). :func:`identity`
records one, :func:`alive` checks it; without ``/proc`` (not Linux) both say "unknown".

:class:`Containment` holds one task and all it starts, on every way a call ends (the task's end, a
timeout, a cancel, a lost coordinator, the runner's own SIGTERM):

- the runner is a *child subreaper* (``PR_SET_CHILD_SUBREAPER``): a process the task started that
  double-forks or calls ``setsid`` is re-parented to the runner, not to init, so walking ``/proc`` for the
  runner's descendants (without a subreaper: the task's session and group, a whole scan) finds it;
- and a *cgroup* when the host gives this process a writable (delegated) cgroup v2, as a
  ``systemd-run --user --scope`` or a container with its own cgroup namespace does: a task that ran for
  :data:`ENCLOSE_AFTER` seconds is moved into a child cgroup of its own, whose ``cgroup.procs`` lists what
  it starts from then on, whatever it does, and whose ``cgroup.kill`` ends them all at once (a fork bomb
  does not outrun it); short calls never pay for one.

``RX_CONTAIN=proc`` in the runner's environment skips the cgroup (tests use it to try the walk where a
cgroup is available). Either way the task's process gets the parent-death signal SIGKILL: if the runner itself is killed
(``kill -9``, the OOM killer) the task does not run on unsupervised. What had to be stopped after the
task's own process ended is reported (``stray`` in the result header).

Standard library only; ``prctl`` is called through ``_ctypes``, loaded only where ``/proc`` exists.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing is not imported at run time: the per-call runner imports this module
if TYPE_CHECKING:
    import signal
    from collections.abc import Callable, Iterable, Mapping
    from typing import Any
else:
    import _signal as signal

__all__ = ["ENCLOSE_AFTER", "Containment", "alive", "boot_id", "descendants", "end_stale_cgroup", "identity",
           "prctl_function", "signal_process", "start_time"]

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
#: Processes named in a result's ``stray`` list (the count says how many there were).
STRAY_LISTED = 20
#: Seconds a task runs before it is moved into a cgroup of its own (see :meth:`Containment.enclose`).
ENCLOSE_AFTER = 0.2


def boot_id() -> str:
    """This boot's id (Linux), or "" when unknown: a pid recorded in another boot names no process now."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as stream:
            return stream.read().strip()
    except OSError:
        return ""


def _stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (state first); None if there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stream:
            data = stream.read()
    except OSError:
        return None
    return data[data.rfind(b")") + 2:].decode("ascii", "replace").split()


def start_time(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot, as text); None if no such process runs (or it is a
    zombie), "" when this system cannot tell (no ``/proc``)."""
    fields = _stat(pid)
    if fields is None:
        if os.path.isdir("/proc/self"):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return ""
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]


def identity(pid: int) -> dict[str, Any]:
    """``pid`` with its start time and the boot id, as recorded in a run's status file."""
    return {"pid": pid, "start": start_time(pid) or "", "boot": boot_id()}


def alive(recorded: Mapping[str, Any]) -> bool:
    """Whether the process an :func:`identity` names still runs: the same pid, start time and boot. Where
    the system cannot tell start times (no ``/proc``), a live pid counts."""
    pid = recorded.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    boot = recorded.get("boot") or ""
    if boot and boot_id() not in ("", boot):
        return False
    started = start_time(pid)
    if started is None:
        return False
    return not (started and recorded.get("start") and started != recorded.get("start"))


def signal_process(recorded: Mapping[str, Any], sig: int, *, group: bool = False) -> bool:
    """Send ``sig`` to the process (its group, with ``group``) an :func:`identity` names, only if it is still
    that process; True when it was sent."""
    if not alive(recorded):
        return False
    try:
        if group:
            os.killpg(int(recorded["pid"]), sig)
        else:
            os.kill(int(recorded["pid"]), sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def prctl_function() -> Callable[[int, int], bool] | None:
    """Linux's ``prctl(option, value)`` as a function (True on success); None where there is none.

    Through ``_ctypes`` (a third of a millisecond to load; ``ctypes`` itself costs four times that).
    """
    if not os.path.isdir("/proc/self"):
        return None
    try:
        import _ctypes

        address = _ctypes.dlsym(_ctypes.dlopen(None), "prctl")  # type: ignore[arg-type]  # None: this process
        call = _ctypes.call_function
    except (ImportError, OSError, AttributeError):
        return None

    def prctl(option: int, value: int) -> bool:
        try:
            return int(call(address, (option, value, 0, 0, 0))) == 0
        except Exception:
            return False

    return prctl


# -- the process tree --------------------------------------------------------------------------------------


def _children(pid: int) -> list[int] | None:
    """The children of ``pid`` from ``/proc/PID/task/*/children`` (None where that file does not exist)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    found: list[int] = []
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as stream:
                found += [int(word) for word in stream.read().split()]
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            continue
    return found


def _scan_all() -> dict[int, tuple[int, int, int]]:
    """Every process: pid -> (parent, process group, session), from ``/proc/*/stat``."""
    table: dict[int, tuple[int, int, int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat(int(name))
        if fields is not None and len(fields) > 4 and fields[0] not in ("Z", "X"):
            table[int(name)] = (int(fields[1]), int(fields[2]), int(fields[3]))
    return table


def descendants(root: int, sessions: Iterable[int] = ()) -> set[int]:
    """Every live process below ``root`` (not ``root`` itself), plus every process of ``sessions`` (a
    session or process group id), and below those; empty where there is no ``/proc``."""
    if not os.path.isdir("/proc/self"):
        return set()
    wanted = set(sessions)
    if not wanted:
        fast = _walk_children(root)
        if fast is not None:
            return fast
    table = _scan_all()
    found = {pid for pid, (_, group, session) in table.items() if group in wanted or session in wanted}
    children: dict[int, list[int]] = {}
    for pid, (parent, _, _) in table.items():
        children.setdefault(parent, []).append(pid)
    stack = [root, *found]
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in found:
                found.add(child)
                stack.append(child)
    found.discard(root)
    found.discard(os.getpid())
    return found


def _walk_children(root: int) -> set[int] | None:
    """The descendants of ``root`` by the kernel's children lists (a few reads, not a whole /proc scan)."""
    found: set[int] = set()
    stack = [root]
    while stack:
        children = _children(stack.pop())
        if children is None:
            return None
        for child in children:
            if child not in found:
                found.add(child)
                stack.append(child)
    return {pid for pid in found if start_time(pid) is not None}


def _command(pid: int) -> str:
    """What ``pid`` runs, in a few words (its name where its command line is a program text: a fork of a
    ``python -c`` process shows the runner's bootstrap)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as stream:
            words = [word.decode("utf-8", "replace") for word in stream.read().split(b"\0") if word]
    except OSError:
        words = []
    text = " ".join(words)
    if not text or "\n" in text:
        try:
            with open(f"/proc/{pid}/comm") as stream:
                text = stream.read().strip()
        except OSError:
            text = text.split("\n")[0]
    return text[:80] or "?"


# -- cgroup v2 -------------------------------------------------------------------------------------------


def _own_cgroup() -> str | None:
    """This process's cgroup v2 directory when it may make children there (delegated to this user)."""
    try:
        with open("/proc/self/cgroup") as stream:
            lines = stream.read().splitlines()
        with open("/proc/self/mountinfo") as stream:
            mounts = stream.read().splitlines()
    except OSError:
        return None
    path = next((line[3:] for line in lines if line.startswith("0::")), None)
    root = next((line.split(" - ")[0].split()[4] for line in mounts
                 if " - cgroup2 " in line and len(line.split(" - ")[0].split()) > 4), None)
    if path is None or root is None or path.endswith("(deleted)"):
        return None
    directory = os.path.join(root, path.lstrip("/"))
    procs = os.path.join(directory, "cgroup.procs")
    if os.access(directory, os.W_OK) and os.access(procs, os.W_OK):
        return directory
    return None


def end_stale_cgroup(name: str) -> None:
    """Stop what is left in the cgroup of a run whose runner died (``name``: its run directory's), and remove
    it; nothing where there is no such cgroup next to this process's."""
    parent = _own_cgroup()
    if parent is None:
        return
    directory = os.path.join(parent, f"rx-{name}")
    try:
        with open(os.path.join(directory, "cgroup.kill"), "w") as stream:
            stream.write("1")
    except OSError:
        return
    for _ in range(50):
        try:
            os.rmdir(directory)
            return
        except OSError:
            import time

            time.sleep(0.01)


class Containment:
    """One task process and everything it starts (see the module docstring).

    Attributes:
        cgroup: The task's own cgroup directory (None: the /proc walk contains it).
        task: The task process's :func:`identity` (None until :meth:`adopt`).
        stray: ``command (pid N)`` of what was stopped after the task's own process had ended.
        stray_count: How many such processes there were.
    """

    def __init__(self, name: str, *, cgroups: bool = True) -> None:
        self.name = name
        self.cgroups = cgroups and os.environ.get("RX_CONTAIN") != "proc"
        self.cgroup: str | None = None
        self.task: dict[str, Any] | None = None
        self.stray: list[str] = []
        self.stray_count = 0
        self.subreaper = False
        self._prctl = prctl_function()

    def join(self) -> None:
        """In the task process, right after the fork: die with the runner (whatever kills it)."""
        if self._prctl is not None:
            self._prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)

    def adopt(self, pid: int, *, group: bool = True) -> None:
        """In the runner, once the task process is forked (it starts up meanwhile): become the subreaper of
        what it leaves. A persistent worker adopts itself (``group`` False: its own process group is not the
        task's)."""
        self.task = identity(pid) if group else None
        if self._prctl is not None and not self.subreaper:
            self.subreaper = self._prctl(_PR_SET_CHILD_SUBREAPER, 1)

    def enclose(self) -> None:
        """Move the task into a cgroup of its own, where the host delegates one. Called once the task ran
        for a moment (:data:`ENCLOSE_AFTER`): a cgroup costs a small call milliseconds of the kernel's time,
        and what the task forked before the move is found by the walk all the same."""
        if self.cgroup is not None or not self.cgroups or self.task is None:
            return
        self.cgroups = False  # once
        parent = _own_cgroup()
        if parent is None:
            return
        directory = os.path.join(parent, f"rx-{self.name}")
        try:
            os.mkdir(directory)
            with open(os.path.join(directory, "cgroup.procs"), "w") as stream:
                stream.write(str(self.task["pid"]))
        except OSError:
            try:
                os.rmdir(directory)
            except OSError:
                pass
            return
        self.cgroup = directory

    def members(self) -> set[int]:
        """Every live process of the task (its own one too, while it runs)."""
        found: set[int] = set()
        if self.cgroup is not None:
            try:
                with open(os.path.join(self.cgroup, "cgroup.procs")) as stream:
                    found = {int(word) for word in stream.read().split()}
            except (OSError, ValueError):
                pass
        # As the subreaper, every process the task started is below this one (its cgroup also lists what it
        # started elsewhere); without, its session and group find what left the tree (a whole /proc scan).
        task_pid = int(self.task["pid"]) if self.task and not self.subreaper else 0
        found |= descendants(os.getpid(), [task_pid] if task_pid else [])
        found.discard(os.getpid())
        return found

    def signal(self, sig: int) -> int:
        """Send ``sig`` to the task's group, and to every member outside it (once each, as a terminal's
        Ctrl-C reaches a process group: a second SIGINT would cut the task's ``finally`` short); return how
        many processes there were."""
        group = int(self.task["pid"]) if self.task is not None else 0
        if group:
            try:
                os.killpg(group, sig)
            except (ProcessLookupError, PermissionError):
                pass
        if sig == signal.SIGKILL and self.cgroup is not None:
            try:
                with open(os.path.join(self.cgroup, "cgroup.kill"), "w") as stream:
                    stream.write("1")
            except OSError:
                pass
        members = self.members()
        for pid in members:
            try:
                if os.getpgid(pid) != group:
                    os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        return len(members)

    def sweep(self) -> None:
        """The task's own process ended: stop (SIGKILL) whatever it left running, note it as ``stray`` and
        reap what was re-parented here."""
        members = self.members()
        if members:
            self.stray_count += len(members)
            self.stray += [f"{_command(pid)} (pid {pid})" for pid in sorted(members)[:STRAY_LISTED]]
            self.signal(signal.SIGKILL)
        self.reap()

    def reap(self) -> None:
        """Collect the exit of every child re-parented to this process (never the task's: the caller has
        waited for it already)."""
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass

    def close(self) -> None:
        """Remove the task's cgroup (once empty)."""
        if self.cgroup is not None:
            for _ in range(50):
                try:
                    os.rmdir(self.cgroup)
                    break
                except OSError:
                    import time

                    time.sleep(0.01)
            self.cgroup = None

    def report(self) -> dict[str, Any]:
        """What goes into the result header: what had to be stopped after the task ended."""
        if not self.stray_count:
            return {}
        return {"stray": self.stray[:STRAY_LISTED], "stray_count": self.stray_count}
