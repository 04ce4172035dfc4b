"""What ``rx hosts --status`` shows of each host: its GPUs and who holds them, the slots rx holds there
(this workspace's marked), free memory and load.

Each host answers with ``runner probe`` (:func:`remote_exec.runner.slot.probe`), started over the usual
connection with rx's own archive (no user code), all hosts at once.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config import Configuration
    from ..coordinator import Coordinator

__all__ = ["gpu_rows", "probe_host", "probe_hosts"]


def probe_host(coordinator: Coordinator, config: Configuration, name: str, options: dict[str, Any]) -> dict[str, Any]:
    """One host's facts (``ok: False`` and ``error`` when it did not answer)."""
    from ..protocol.bootstrap import start_runner

    try:
        target = coordinator.host_target(name, config, options=options)
        archive = coordinator.packer.build()
        channel = start_runner(target.launcher, target.backend, archive, target.options, "probe",
                               lambda phase, state: None)
        found: dict[str, Any] = {}

        def handle(kind: bytes, payload: bytes) -> bool:
            if kind == b"P":
                found.update(json.loads(payload))
                return True
            return False

        try:
            channel.pump(handle)
        finally:
            channel.reap_later()
        if not found:
            return {"host": name, "ok": False, "error": channel.stderr_tail() or "the probe sent nothing"}
        found.pop("event", None)
        return {"host": name, "ok": True, **found}
    except Exception as exc:
        return {"host": name, "ok": False, "error": str(exc)}


def probe_hosts(coordinator: Coordinator, config: Configuration, names: Sequence[str], options: dict[str, Any],
                workspace: str) -> list[dict[str, Any]]:
    """Every host's facts, probed at once; the slots of ``workspace``'s runs are marked ``mine``."""
    results: dict[str, dict[str, Any]] = {}

    def one(name: str) -> None:
        results[name] = probe_host(coordinator, config, name, options)

    threads = [threading.Thread(target=one, args=(name,), daemon=True) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    rows = [results[name] for name in names]
    for row in rows:
        for lock in row.get("locks") or []:
            owner = lock.get("owner") or {}
            lock["mine"] = owner.get("workspace") == workspace
    return rows


def gpu_rows(facts: dict[str, Any]) -> list[dict[str, Any]]:
    """A host's GPUs with who uses each: ``rx`` (a slot; ``mine`` if of this workspace), ``foreign`` (pids
    of processes rx did not start) or ``free``."""
    held = {}
    for lock in facts.get("locks") or []:
        gpu = lock.get("gpu") or {}
        if lock.get("kind") == "gpu" and gpu.get("uuid"):
            held[gpu["uuid"]] = lock
    rows = []
    for gpu in facts.get("gpus") or []:
        apps = [app for app in facts.get("apps") or [] if app.get("gpu_uuid") == gpu.get("uuid")]
        lock = held.get(gpu.get("uuid"))
        if lock is not None:
            owner = lock.get("owner") or {}
            user = {"kind": "rx", "mine": bool(lock.get("mine")), "slot": owner.get("slot"),
                    "run_id": owner.get("run_id"), "coordinator": owner.get("coordinator")}
        elif apps:
            user = {"kind": "foreign", "pids": [app.get("pid") for app in apps]}
        else:
            user = {"kind": "free"}
        rows.append({**gpu, "user": user, "processes": len(apps)})
    return rows
