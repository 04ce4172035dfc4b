"""A pool slot on this host: the worker's lock, the GPUs it holds, and what ``rx hosts --status`` reads.

A pool's worker (``runner worker IDLE SLOT_JSON``) takes its slot before it serves any call:

- a lock file of its own, ``<workdir>/locks/worker-<pid>-<token>.lock``, saying who it serves (the
  coordinator's host and pid, its workspace and run, the slot's name) and which GPUs it holds;
- with ``gpus: N``, N GPUs, each by an exclusive ``flock`` on ``<workdir>/locks/gpu-<uuid>.lock``.

The worker holds these locks for its whole life: the kernel releases a ``flock`` when the last process
holding its open file ends, so a worker that dies (killed, its host rebooted, its coordinator gone)
frees its GPUs without anyone cleaning up, and a task process it forked keeps them while it runs. Two
coordinators, or two users of one account, never hold one GPU: the lock is taken first, and only then is
the GPU looked at. A GPU rx does not hold but some other process uses (``nvidia-smi``'s compute
processes, over the request's ``foreign_mib``; or a utilization over ``max_utilization``) counts as
taken. When fewer GPUs than asked are free the worker says so (a ``waiting`` event naming what holds
each GPU) and looks again every ``interval`` seconds, until they are free or its coordinator goes.

GPU lock files are never removed (their names are the GPUs' UUIDs: a handful per host); removing a lock
file while another process opens it would let two processes hold "the" lock on two files.

Standard library only; imported only by a pool worker and by ``runner probe``.
"""

from __future__ import annotations

import fcntl
import json
import os
import time

TYPE_CHECKING = False  # typing is not imported at run time
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

__all__ = ["APP_QUERY", "GPU_QUERY", "Held", "SlotError", "parse_apps", "parse_gpus", "probe", "sweep_dead_workers",
           "take_slot"]

#: What rx asks nvidia-smi about the GPUs, and about the processes using them (csv, no header, no units).
GPU_QUERY = ("--query-gpu=index,uuid,memory.used,memory.total,utilization.gpu", "--format=csv,noheader,nounits")
APP_QUERY = ("--query-compute-apps=pid,gpu_uuid,used_memory,process_name", "--format=csv,noheader,nounits")
LOCKS = "locks"


class SlotError(Exception):
    """The slot can never be had here (no GPUs, fewer than asked for): the worker reports it and exits."""


def _number(text: str) -> int | None:
    """An integer field of nvidia-smi's csv (``[N/A]``, ``[Not Supported]`` and the like: None)."""
    text = text.strip()
    for unit in (" MiB", " %"):
        if text.endswith(unit):
            text = text[: -len(unit)]
    try:
        return int(float(text))
    except ValueError:
        return None


def _rows(text: str, fields: int) -> list[list[str]]:
    """The csv rows of nvidia-smi's output; a last field with commas in it (a process name) kept whole."""
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = [part.strip() for part in line.split(",")]
        if len(parts) < fields:
            continue
        rows.append([*parts[: fields - 1], ", ".join(parts[fields - 1:])])
    return rows


def parse_gpus(text: str) -> list[dict[str, Any]]:
    """The GPUs of :data:`GPU_QUERY`'s output: index, uuid, memory used and total (MiB), utilization (%)."""
    gpus = []
    for index, uuid, used, total, utilization in _rows(text, 5):
        number = _number(index)
        if number is None or not uuid:
            continue
        gpus.append({"index": number, "uuid": uuid, "memory_used": _number(used), "memory_total": _number(total),
                     "utilization": _number(utilization)})
    return gpus


def parse_apps(text: str) -> list[dict[str, Any]]:
    """The compute processes of :data:`APP_QUERY`'s output: pid, GPU uuid, memory used (MiB), name."""
    apps = []
    for pid, uuid, used, name in _rows(text, 4):
        number = _number(pid)
        if number is not None:
            apps.append({"pid": number, "gpu_uuid": uuid, "used_memory": _number(used), "name": name})
    return apps


def _nvidia_smi(args: tuple[str, ...]) -> str | None:
    """nvidia-smi's output, or None when there is none here (or it failed: no driver, say)."""
    import subprocess

    try:
        done = subprocess.run(["nvidia-smi", *args], capture_output=True, stdin=subprocess.DEVNULL, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.decode("utf-8", "replace")


def query_gpus() -> list[dict[str, Any]] | None:
    """The host's GPUs (None: no nvidia-smi, or it failed)."""
    text = _nvidia_smi(GPU_QUERY)
    return None if text is None else parse_gpus(text)


def query_apps() -> list[dict[str, Any]]:
    """The processes using the host's GPUs, as far as nvidia-smi sees them."""
    text = _nvidia_smi(APP_QUERY)
    return [] if text is None else parse_apps(text)


def _lock_dir(cache_dir: str) -> str:
    path = os.path.join(cache_dir, LOCKS)
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def _try_lock(path: str) -> int | None:
    """An fd holding an exclusive flock on ``path`` (created if missing), or None if another holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _write(fd: int, record: dict[str, Any]) -> None:
    data = json.dumps(record).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _read(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as stream:
            record = json.loads(stream.read() or b"{}")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _held(path: str) -> bool:
    """True when some process holds the flock on ``path``."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def _gpu_lock(lock_dir: str, uuid: str) -> str:
    return os.path.join(lock_dir, "gpu-" + "".join(c if c.isalnum() or c in "-_" else "_" for c in uuid) + ".lock")


class Held:
    """The locks a worker holds (its own and its GPUs'), open for its whole life.

    Attributes:
        gpus: The GPUs it holds (nvidia-smi's fields), in the order CUDA_VISIBLE_DEVICES lists them.
    """

    def __init__(self, worker_fd: int, worker_path: str, gpus: list[dict[str, Any]], gpu_fds: list[int]) -> None:
        self.worker_fd = worker_fd
        self.worker_path = worker_path
        self.gpus = gpus
        self.gpu_fds = gpu_fds
        self.record: dict[str, Any] = {}

    def note_run_dir(self, run_dir: str | None) -> None:
        """Say in the worker's lock file which run directory it works in (a worker killed without cleaning
        up has it removed by the next worker of the account: see :func:`sweep_dead_workers`)."""
        self.record["run_dir"] = run_dir
        _write(self.worker_fd, self.record)

    def visible_devices(self) -> str:
        """CUDA_VISIBLE_DEVICES for the GPUs held (nvidia-smi's indices, which are in PCI bus order)."""
        return ",".join(str(gpu["index"]) for gpu in self.gpus)

    def release(self) -> None:
        """Drop every lock (a worker that exits need not: the kernel does it)."""
        for fd in self.gpu_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            os.unlink(self.worker_path)
        except OSError:
            pass
        try:
            os.close(self.worker_fd)
        except OSError:
            pass


def _foreign_use(gpu: dict[str, Any], apps: list[dict[str, Any]], request: dict[str, Any]) -> str | None:
    """Why a GPU no rx worker holds counts as taken (processes rx did not start on it), or None."""
    mine = [app for app in apps if app.get("gpu_uuid") == gpu["uuid"]]
    limit = int(request.get("foreign_mib") or 0)
    used = sum(app.get("used_memory") or 0 for app in mine)
    if mine and used >= limit:
        pids = ", ".join(str(app["pid"]) for app in mine[:3]) + (" ..." if len(mine) > 3 else "")
        return f"used by {len(mine)} process(es) rx did not start (pid {pids}; {used} MiB)"
    ceiling = request.get("max_utilization")
    utilization = gpu.get("utilization")
    if ceiling is not None and utilization is not None and utilization > int(ceiling):
        return f"{utilization}% busy"
    return None


def _holder(path: str) -> str:
    owner = _read(path).get("owner") or {}
    who = owner.get("slot") or "another rx worker"
    where = owner.get("coordinator")
    return f"held by rx ({who}{', from ' + str(where) if where else ''})"


def _grab(lock_dir: str, gpus: list[dict[str, Any]],
          request: dict[str, Any]) -> tuple[list[tuple[dict[str, Any], int]], dict[int, str]]:
    """Lock as many free GPUs as asked for (emptiest first); return those locked and why each other is not."""
    wanted = int(request["gpus"])
    allowed = request.get("devices")
    apps: list[dict[str, Any]] | None = None
    taken: list[tuple[dict[str, Any], int]] = []
    busy: dict[int, str] = {}
    for gpu in sorted(gpus, key=lambda g: (g.get("memory_used") or 0, g["index"])):
        if len(taken) == wanted:
            break
        if allowed is not None and gpu["index"] not in allowed:
            continue
        path = _gpu_lock(lock_dir, gpu["uuid"])
        fd = _try_lock(path)
        if fd is None:
            busy[gpu["index"]] = _holder(path)
            continue
        if apps is None:
            apps = query_apps()  # looked at once a lock is held: nothing of rx's can start on it meanwhile
        why = _foreign_use(gpu, apps, request)
        if why is not None:
            os.close(fd)
            busy[gpu["index"]] = why
            continue
        _write(fd, {"pid": os.getpid(), "owner": request.get("owner") or {}, "gpu": gpu, "since": time.time()})
        taken.append((gpu, fd))
    return taken, busy


def take_slot(cache_dir: str, request: dict[str, Any], wait: Callable[[dict[str, Any]], None]) -> Held:
    """Take this worker's slot: its lock file, and ``request["gpus"]`` GPUs when asked for.

    ``wait(event)`` is called with a ``waiting`` event when not enough GPUs are free; it returns after
    ``request["interval"]`` seconds, or raises when the coordinator is gone.

    Raises:
        SlotError: The host cannot ever give the slot (no nvidia-smi, fewer GPUs than asked for).
    """
    lock_dir = _lock_dir(cache_dir)
    sweep_dead_workers(cache_dir)
    worker_path = os.path.join(lock_dir, f"worker-{os.getpid()}-{os.urandom(4).hex()}.lock")
    worker_fd = _try_lock(worker_path)
    if worker_fd is None:  # pragma: no cover - a fresh unique name
        raise SlotError(f"cannot lock {worker_path}")
    owner = dict(request.get("owner") or {})
    held = Held(worker_fd, worker_path, [], [])
    try:
        if int(request.get("gpus") or 0):
            taken = _take_gpus(lock_dir, request, wait)
            held.gpus = [gpu for gpu, _ in taken]
            held.gpu_fds = [fd for _, fd in taken]
        held.record = {"pid": os.getpid(), "owner": owner, "gpus": [gpu["index"] for gpu in held.gpus],
                       "since": time.time()}
        _write(worker_fd, held.record)
    except BaseException:
        held.release()
        raise
    return held


def _take_gpus(lock_dir: str, request: dict[str, Any],
               wait: Callable[[dict[str, Any]], None]) -> list[tuple[dict[str, Any], int]]:
    """Lock the GPUs asked for, looking again after each ``wait`` while too few are free; by index."""
    wanted = int(request["gpus"])
    allowed = request.get("devices")
    while True:
        gpus = query_gpus()
        if gpus is None:
            raise SlotError("no GPUs here: nvidia-smi is missing or failed")
        usable = [gpu for gpu in gpus if allowed is None or gpu["index"] in allowed]
        if len(usable) < wanted:
            raise SlotError(f"the host has {len(usable)} GPU(s), the call asks for {wanted}")
        taken, busy = _grab(lock_dir, usable, request)
        if len(taken) == wanted:
            return sorted(taken, key=lambda pair: pair[0]["index"])
        for _, fd in taken:
            os.close(fd)
        wait({"event": "waiting", "gpus": wanted, "busy": {str(k): v for k, v in sorted(busy.items())},
              "free": len(taken)})


def sweep_dead_workers(cache_dir: str) -> int:
    """Remove what pool workers that died without cleaning up (SIGKILL, a reboot) left: their lock files and
    the run directories those name. Returns how many dead workers were swept.

    A worker lock file nobody holds belongs to a dead worker (the kernel dropped its flock): its name is
    unique to that worker, so nobody can be opening it now, and removing it is safe.
    """
    lock_dir = os.path.join(cache_dir, LOCKS)
    runs = os.path.realpath(os.path.join(cache_dir, "runs"))
    swept = 0
    try:
        names = [name for name in os.listdir(lock_dir) if name.startswith("worker-") and name.endswith(".lock")]
    except OSError:
        return 0
    for name in names:
        path = os.path.join(lock_dir, name)
        if _held(path):
            continue
        run_dir = _read(path).get("run_dir")
        if isinstance(run_dir, str) and os.path.dirname(os.path.realpath(run_dir)) == runs:
            from .rundir import rmtree

            rmtree(run_dir)
        try:
            os.unlink(path)
        except OSError:
            pass
        swept += 1
    return swept


def _locks(lock_dir: str) -> list[dict[str, Any]]:
    """The lock files some process holds now."""
    found = []
    try:
        names = sorted(os.listdir(lock_dir))
    except OSError:
        return []
    for name in names:
        path = os.path.join(lock_dir, name)
        if not name.endswith(".lock") or not _held(path):
            continue
        record = _read(path)
        record["kind"] = "gpu" if name.startswith("gpu-") else "worker"
        found.append(record)
    return found


def _memory() -> dict[str, int]:
    """Total and available memory (bytes), from /proc/meminfo."""
    found: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as stream:
            for line in stream:
                name, _, value = line.partition(":")
                if name in ("MemTotal", "MemAvailable"):
                    found["total" if name == "MemTotal" else "available"] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return found


def probe(cache_dir: str) -> dict[str, Any]:
    """What ``rx hosts --status`` shows of this host: GPUs and their processes, held locks, memory, load."""
    import sys

    try:
        load = list(os.getloadavg())
    except OSError:
        load = []
    sweep_dead_workers(cache_dir)
    return {"event": "probe", "hostname": os.uname().nodename, "python": "{}.{}.{}".format(*sys.version_info[:3]),
            "cpus": os.cpu_count(), "load": load, "memory": _memory(), "gpus": query_gpus(), "apps": query_apps(),
            "locks": _locks(os.path.join(cache_dir, LOCKS))}
