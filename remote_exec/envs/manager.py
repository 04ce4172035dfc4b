"""The coordinator's environments: for a call that declares dependencies, the host probed (once per host
and interpreter, kept a day on the local disk), the lock resolved for it, the environment made sure of on
the host (built once per key), and the call's interpreter replaced by the environment's."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..backends.base import Backend
from ..errors import SerializationError
from ..launchers.base import Launcher
from ..packing import DistributionArchive
from ..protocol.envs import BuildPlan, ensure_env, probe_host
from ..protocol.options import CallOptions, PhaseCallback, ProgressCallback
from ..task import Task, by_reference
from .resolve import EnvSpec, HostTarget, env_key, lock_for, uv_for_host, wheel_tree

__all__ = ["EnvCall", "Environments", "index_address", "refuse_by_value"]

logger = logging.getLogger(__name__)

#: A host's probe is asked again after this many seconds.
PROBE_TTL = 24 * 3600.0


def index_address(spec: EnvSpec) -> str:
    """``host:port`` of the index the host would install from (tested from the host by the probe); empty
    when the spec names only local wheel directories (the host cannot read those: it gets them shipped)."""
    from urllib.parse import urlsplit

    url = spec.index_url or ("" if spec.find_links else "https://pypi.org/simple")
    if not url:
        return ""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.hostname}:{port}"


class EnvCall:
    """One call's way to its host: backend, launcher, archive, options, and where its phases and progress
    go."""

    def __init__(self, host: str, backend: Backend, launcher: Launcher, archive: DistributionArchive,
                 options: CallOptions, *, on_phase: PhaseCallback | None = None,
                 on_progress: ProgressCallback | None = None, on_status: Callable[[str], None] | None = None) -> None:
        self.host = host
        self.backend = backend
        self.launcher = launcher
        self.archive = archive
        self.options = options
        self.on_phase = on_phase
        self.on_progress = on_progress
        self.on_status = on_status

    def status(self, line: str) -> None:
        """Tell the user (the CLI prints it; a library call logs it)."""
        if self.on_status is not None:
            self.on_status(line)
        else:
            logger.info("%s", line)


class Environments:
    """Probes, locks and ready environments of one coordinator (its process-wide state).

    Args:
        cache: The local cache root (``<cache>/envs``: probes, locks, wheels, tools).
    """

    def __init__(self, cache: Path) -> None:
        self.cache = cache
        self._lock = threading.Lock()
        self._probes: dict[tuple[str, str, str], dict[str, Any]] = {}
        self._ready: dict[tuple[str, str, str], str] = {}

    def known_probe(self, host: str, python: str, workdir: str) -> dict[str, Any] | None:
        """The host's probe if one was made (in this process, or within :data:`PROBE_TTL` on the local disk);
        nothing is asked."""
        with self._lock:
            known = self._probes.get((host, python, workdir))
        if known is not None:
            return known
        try:
            stored: dict[str, Any] = json.loads(self._probe_path(host, python, workdir).read_text())
        except (OSError, ValueError):
            return None
        return stored if time.time() - float(stored.get("at", 0)) < PROBE_TTL else None

    def _probe_path(self, host: str, python: str, workdir: str) -> Path:
        return self.cache / "probes" / (_safe(f"{host}-{python}-{workdir}") + ".json")

    def probe(self, call: EnvCall, index: str = "", *, fresh: bool = False) -> dict[str, Any]:
        """The host's probe (memory, then the local disk within :data:`PROBE_TTL`, else asked now)."""
        key = (call.host, call.options.python, call.options.workdir)
        with self._lock:
            known = self._probes.get(key)
        if known is not None and not fresh and known.get("asked_index") == index:
            return known
        path = self._probe_path(call.host, call.options.python, call.options.workdir)
        if not fresh:
            try:
                stored: dict[str, Any] = json.loads(path.read_text())
                if time.time() - float(stored.get("at", 0)) < PROBE_TTL and stored.get("asked_index") == index:
                    with self._lock:
                        self._probes[key] = stored
                    return stored
            except (OSError, ValueError):
                pass
        answer = probe_host(call.backend, call.archive, call.options, launcher=call.launcher, index=index)
        answer.update(at=time.time(), asked_index=index)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(answer))
        os.replace(tmp, path)
        with self._lock:
            self._probes[key] = answer
        return answer

    def resolve(self, spec: EnvSpec, call: EnvCall) -> tuple[EnvSpec, HostTarget, str, str]:
        """The spec as it applies to this host (offline when the host reaches no index), its target, lock
        and key."""
        index = "" if spec.offline else index_address(spec)
        probe = self.probe(call, index)
        if not spec.offline and (not index or probe.get("index") is False):
            spec = replace(spec, offline=True)
        target = HostTarget.from_probe(probe)
        lock = lock_for(spec, target, self.cache, call.host)
        return spec, target, lock, env_key(lock, target, spec)

    def prepare(self, spec: EnvSpec, call: EnvCall, settings: Mapping[str, Any]) -> CallOptions:
        """The call's options with its interpreter replaced by the environment's (built on the host first if
        it lacks it).

        Raises:
            EnvError: Resolution, the wheels or the build failed (one line naming what).
        """
        spec, target, lock, key = self.resolve(spec, call)
        memo = (call.host, call.options.workdir, key)
        with self._lock:
            python = self._ready.get(memo)
        if python is None:
            if call.on_phase:
                call.on_phase("env", "started")
            try:
                event = ensure_env(call.backend, call.archive, call.options, key,
                                   self._planner(spec, target, lock, call, settings), launcher=call.launcher,
                                   on_progress=call.on_progress)
            except BaseException:
                if call.on_phase:
                    call.on_phase("env", "failed")
                raise
            if call.on_phase:
                call.on_phase("env", "finished")
            if event.get("built"):
                call.status(f"{call.host}: environment {key[:12]} built in {event.get('seconds', 0):.1f} s")
            python = str(event["python"])
            with self._lock:
                self._ready[memo] = python
        return replace(call.options, python=python)

    def describe(self, spec: EnvSpec, call: EnvCall, settings: Mapping[str, Any], *,
                 build: bool = False) -> dict[str, Any]:
        """What ``rx env`` shows: the host's probe, the lock resolved for it, the key, whether the
        environment exists there and its size (``build``: build it first if it does not)."""
        spec, target, lock, key = self.resolve(spec, call)
        if build:
            self.prepare(spec, call, settings)
        event = ensure_env(call.backend, call.archive, call.options, key, self._planner(spec, target, lock, call,
                                                                                         settings),
                           launcher=call.launcher, check=True)
        probe = self.probe(call, "" if spec.offline else index_address(spec))
        return {"host": call.host, "probe": {k: v for k, v in probe.items() if k not in ("event", "at")},
                "target": target.describe(), "offline": spec.offline, "inherit_site": spec.inherit_site,
                "lock": lock, "key": key, "exists": event.get("state") == "ready", "path": event.get("path"),
                "bytes": event.get("bytes")}

    def forget(self, host: str) -> None:
        """Forget what is known of ``host`` (its environments may have been collected)."""
        with self._lock:
            for memo in [memo for memo in self._ready if memo[0] == host]:
                del self._ready[memo]

    def _planner(self, spec: EnvSpec, target: HostTarget, lock: str, call: EnvCall,
                 settings: Mapping[str, Any]) -> Callable[[dict[str, Any]], BuildPlan]:
        def plan(event: dict[str, Any]) -> BuildPlan:
            uv = None
            if not event.get("uv"):
                configured = os.environ.get("RX_UV_BINARY") or settings.get("uv_binary")
                uv = uv_for_host(target, self.cache, configured)
            packages = sum(1 for line in lock.splitlines() if "==" in line and not line.startswith(" "))
            call.status(f"{call.host}: building an environment of {packages} package(s) for {target.describe()}"
                        f"{' from wheels sent from here' if spec.offline else ''}")
            tree = wheel_tree(lock, spec, target, self.cache, call.host, uv=uv)
            build = {"lock": lock, "offline": spec.offline, "index_url": spec.index_url,
                     "find_links": [link for link in spec.find_links if "://" in link],
                     "inherit_site": spec.inherit_site}
            return build, (tree if tree.entries else None)

        return plan


def refuse_by_value(task: Task, probe: Mapping[str, Any] | None, host: str) -> None:
    """Refuse a function task that travels by value (a closure, lambda or ``__main__`` function) to a host
    whose Python is another minor version than this one's: cloudpickle's by-value code does not load there
    (``code expected at most 16 arguments``). Nothing is refused without a probe of the host.

    Raises:
        SerializationError: It would travel by value to another minor version.
    """
    if probe is None or task.kind != "function" or task.function is None:
        return
    import sys

    there = ".".join(str(probe.get("python", "")).split(".")[:2])
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if not there or there == here or by_reference(task.function) is not None:
        return
    raise SerializationError(
        f"{host}: {task.name} travels by value (a closure, lambda or __main__ function) and Python {there} "
        f"there cannot load what Python {here} pickles by value",
        hint=f"define it in a module of the project (it then travels by reference), or use a Python {here} "
             "there (--python)")


def _safe(name: str) -> str:
    return "".join(char if char.isalnum() or char in "-_." else "_" for char in name)[:150]
