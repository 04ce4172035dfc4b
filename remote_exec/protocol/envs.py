"""The coordinator's side of a host's environments: probe the host (``envprobe``), and make sure the
environment of a key exists there (``env``: built once, its wheels and uv shipped through the project
store's missing-blob exchange). The host's side is :mod:`remote_exec.runner.envs`."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from ..backends.base import Backend
from ..errors import EnvError, RunnerError
from ..launchers.base import Launcher
from ..packing import DistributionArchive
from ..sync.tree import Tree
from . import wire
from .bootstrap import start_runner
from .channel import reap
from .options import CallOptions, PhaseCallback, ProgressCallback
from .tree import TREE_FRAMES, TreeSender

__all__ = ["BuildPlan", "ensure_env", "probe_host"]

#: What the coordinator sends for a build, once the host said it needs one: the G options and the tree of
#: wheels (and uv) to ship, if any.
BuildPlan = tuple[dict[str, Any], Tree | None]


def _ignore_phase(name: str, state: str) -> None:
    """Environment calls record no phases."""


def probe_host(backend: Backend, archive: DistributionArchive, options: CallOptions, *, launcher: Launcher,
               index: str = "") -> dict[str, Any]:
    """What the host is (see :func:`remote_exec.runner.envs.probe_env`); ``index``: ``host:port`` whose
    reachability is tested from there.

    Raises:
        RunnerError: The probe gave no answer.
    """
    channel = start_runner(launcher, backend, archive, options, "envprobe", _ignore_phase, [index] if index else [])
    answer: dict[str, Any] = {}

    def handle(kind: bytes, payload: bytes) -> bool:
        if kind == b"P":
            answer.update(json.loads(payload))
        return bool(answer)

    try:
        if not channel.pump(handle):
            raise RunnerError(f"probing {backend.host}'s interpreter failed: {channel.stderr_tail() or 'no answer'}",
                              host=backend.host)
    finally:
        reap(channel.process, channel.stderr_reader)
    return answer


def ensure_env(backend: Backend, archive: DistributionArchive, options: CallOptions, key: str,
               plan: Callable[[dict[str, Any]], BuildPlan], *, launcher: Launcher, check: bool = False,
               on_progress: ProgressCallback | None = None, on_phase: PhaseCallback | None = None) -> dict[str, Any]:
    """Make sure the host has the environment ``key``; return its last event (``python``: its interpreter,
    ``built``: whether this call built it). ``plan`` is asked for the build's options (and the tree to
    ship) only when the host has to build it. ``check``: build nothing; the last event says ``absent``, or
    ``ready`` with its ``bytes``.

    Raises:
        EnvError: The build failed (uv's own lines say why).
        RunnerError: The runner failed otherwise.
    """
    channel = start_runner(launcher, backend, archive, options, "env", on_phase or _ignore_phase)
    events: list[dict[str, Any]] = []
    sender: TreeSender | None = None

    def handle(kind: bytes, payload: bytes) -> bool:
        nonlocal sender
        if kind in TREE_FRAMES and sender is not None:
            sender.handle(kind, payload)
        elif kind == b"P":
            event = json.loads(payload)
            events.append(event)
            if event.get("state") == "build":
                build, tree = plan(event)
                if tree is not None:
                    sender = TreeSender(channel, tree, on_progress)
                    build["tree"] = tree.tree_id
                channel.send(b"G", wire.dump_options({**build, "heartbeat": options.heartbeat}))
                return False
            return bool(event.get("state") in ("ready", "absent"))
        return False

    try:
        channel.send(b"G", wire.dump_options({"key": key, "heartbeat": options.heartbeat, "check": check}))
        if not channel.pump(handle):
            tail = channel.stderr_tail()
            if sender is not None:
                sender.join(5)
            if tail.startswith("rx runner: "):
                raise EnvError(f"{backend.host}: {tail[len('rx runner: '):]}")
            raise RunnerError(f"preparing the environment on {backend.host} failed: {tail or 'no reason given'}",
                              host=backend.host)
        if sender is not None:
            sender.join()
    finally:
        reap(channel.process, channel.stderr_reader)
    return events[-1]
