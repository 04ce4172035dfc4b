"""Maintenance calls on a host: store a project tree without running anything (``rx sync``), collect the
host's garbage (``rx gc``)."""

from __future__ import annotations

import json
from typing import Any

from ..backends.base import Backend
from ..errors import RunnerError, SyncError
from ..launchers.base import Launcher
from ..packing import DistributionArchive
from . import places, wire
from .bootstrap import start_runner
from .channel import reap
from .options import CallOptions, PhaseCallback, ProgressCallback, ProjectCall
from .tree import TREE_FRAMES, TreeSender

__all__ = ["collect_garbage", "sync_tree"]


def _ignore_phase(name: str, state: str) -> None:
    """Maintenance calls record no phases."""


def sync_tree(backend: Backend, archive: DistributionArchive, options: CallOptions, project: ProjectCall, *,
              launcher: Launcher, on_progress: ProgressCallback | None = None,
              on_phase: PhaseCallback | None = None) -> dict[str, Any]:
    """Store ``project``'s tree on the host (only the blobs it lacks travel); return the host's report
    (``{"event": "synced", "tree", "seconds"}``) with the blobs and bytes sent.

    Raises:
        SyncError: A file changed or vanished while it was sent.
        RunnerError: The host could not store the tree (its message says why: a full disk, ...).
    """
    channel = start_runner(launcher, backend, archive, options, "sync", on_phase or _ignore_phase)
    sender = TreeSender(channel, project.tree, on_progress)
    report: dict[str, Any] = {}

    def handle(kind: bytes, payload: bytes) -> bool:
        if kind in TREE_FRAMES:
            sender.handle(kind, payload)
        elif kind == b"P":
            report.update(json.loads(payload))
        return bool(report)

    try:
        channel.send(b"G", wire.dump_options({"tree": project.tree.tree_id, "heartbeat": options.heartbeat}))
        if not channel.pump(handle):
            sender.join(5)
            tail = channel.stderr_tail()
            if sender.error or tail.startswith("rx runner: "):
                raise SyncError(f"{backend.host}: {sender.error or tail[len('rx runner: '):]}")
            raise RunnerError(f"storing the project on {backend.host} failed: {tail or 'no reason given'}",
                              host=backend.host)
        sender.join()
    finally:
        reap(channel.process, channel.stderr_reader)
    places.place(backend, options.python, options.workdir).note_tree(project.tree)
    return {**report, "blobs": sender.sent_files, "bytes": sender.sent_bytes}


def collect_garbage(backend: Backend, archive: DistributionArchive, options: CallOptions, *, launcher: Launcher,
                    dry_run: bool = False) -> dict[str, Any]:
    """Collect the host's garbage now (``dry_run``: only say what would go); return the host's report."""
    extra = [str(options.cache_limit), f"{options.cache_days:g}", *(["dry-run"] if dry_run else [])]
    channel = start_runner(launcher, backend, archive, options, "gc", _ignore_phase, extra)
    data = bytearray(channel.pending)
    try:
        while chunk := channel.process.read_stdout(65536):
            data += chunk
    finally:
        reap(channel.process, channel.stderr_reader)
    lines = bytes(data).decode("utf-8", "replace").strip().splitlines()
    try:
        report: dict[str, Any] = json.loads(lines[-1])
    except (IndexError, ValueError):
        raise RunnerError(f"collecting garbage on {backend.host} failed: "
                          f"{channel.stderr_tail() or 'no report'}", host=backend.host) from None
    return report
