"""Slots: how a pool places calls on a host reached directly (the ``direct`` launcher's placement).

A host gets ``per_host`` slots, or, when each call asks for GPUs and ``per_host`` is not given, one slot per
``gpus`` GPUs its ``nvidia-smi`` lists. Each slot is a thread with a persistent worker of its own on the
host (``WorkerPool.slot``): the worker first takes the slot there (its lock, and its GPUs: see
:mod:`remote_exec.runner.slot`), then serves the slot's calls one at a time, so a sweep of small calls
costs what a ``keep_warm`` call costs and a long call just occupies its slot.

A slot starts its worker before it takes a call (with the code of the call it would take next): a slot
that waits for a GPU holds no call, and the calls go to slots that are ready.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from ..errors import ConnectError, RunnerError
from .engine import classify_failure
from .placement import Placement, Slot

if TYPE_CHECKING:
    from ..session import Session
    from .work import Work

__all__ = ["SlotPlacement", "gpu_count"]

logger = logging.getLogger(__name__)

#: Seconds a call may take to be interrupted before its channel is dropped.
INTERRUPT_GRACE = 3.0
#: Failed starts of a slot's worker in a row after which its host counts as down.
WORKER_FAILURES = 3


def gpu_count(engine: Any, host: str) -> int:
    """How many GPUs ``host``'s nvidia-smi lists (0: none, or no nvidia-smi)."""
    from ..runner.slot import GPU_QUERY, parse_gpus

    settings = engine.settings
    target = engine.coordinator.host_target(host, settings.config, options=settings.options)
    result = target.backend.run(["nvidia-smi", *GPU_QUERY], timeout=settings.config.connect_timeout + 30)
    if result.failed:
        return 0
    return len(parse_gpus(result.stdout.decode("utf-8", "replace")))


class SlotPlacement(Placement):
    """A host's slots, each a thread with its own persistent worker there."""

    def __init__(self, engine: Any, host: Any) -> None:
        super().__init__(engine, host)
        self._threads: list[threading.Thread] = []
        self._ready = threading.Event()
        self._starter: threading.Thread | None = None

    def start(self) -> None:
        self._starter = threading.Thread(target=self._open, name=f"rx-pool-{self.host.name}", daemon=True)
        self._starter.start()

    def _slot_count(self) -> int:
        settings = self.engine.settings
        if settings.per_host is not None:
            return settings.per_host
        if not settings.gpus:
            return 1
        found = gpu_count(self.engine, self.host.name)
        if found < settings.gpus:
            raise RunnerError(f"{self.host.name} has {found} GPU(s); each call asks for {settings.gpus}",
                              reason="no-slot", host=self.host.name)
        return found // settings.gpus

    def _open(self) -> None:
        """Decide the host's slots (probing its GPUs if need be), then start one thread per slot."""
        engine = self.engine
        try:
            count = self._slot_count()
        except Exception as exc:  # the host could not even be probed: a slot stands for it
            count = 1
            probe_failure: BaseException | None = exc
        else:
            probe_failure = None
        for number in range(count):
            name = f"{engine.pool_id}/{self.host.name}#{number}"
            slot = Slot(host=self.host.name, number=number, name=name)
            placement = engine.request(f"{self.host.name}#{number}", self.host.name)
            slot.placement = _json(placement)
            self.host.slots.append(slot)
            engine.observer.slot_state(slot, "starting", None)
            thread = threading.Thread(target=self._serve, args=(slot,), name=f"rx-slot-{slot.label}", daemon=True)
            self._threads.append(thread)
        if probe_failure is not None:
            self.engine.trouble(self.host.slots[0], probe_failure)
        for thread in self._threads:
            thread.start()
        self._ready.set()

    def _serve(self, slot: Slot) -> None:
        """The slot's loop: start its worker for the next call, take the call, run it; until the pool ends."""
        engine = self.engine
        prepared: tuple[Work, Session] | None = None
        try:
            while self.host.wait_usable(engine.finished):
                work = engine.feed.peek(self.host.name, self._others_up, 0.5)
                if work is None:
                    if engine.idle():
                        break
                    continue
                if not self._serves(slot, work) and (prepared is None or prepared[0] is not work):
                    prepared = self._prepare(slot, work)
                    if prepared is None:
                        self._pause(slot)
                        continue
                    slot.failures = 0
                taken = engine.feed.take(self.host.name, self._others_up)
                if taken is None:
                    continue
                if not taken.future.running() and not taken.future.set_running_or_notify_cancel():
                    engine.cancelled(taken)
                    continue
                try:
                    session = (prepared[1] if prepared is not None and prepared[0] is taken
                               else taken.make_session(slot))
                except Exception as exc:  # its arguments cannot be serialized, say: the call's own failure
                    engine.settle_failure(taken, slot, exc, 0.0)
                    continue
                finally:
                    prepared = None
                engine.attempt(taken, slot, session)
        except Exception:  # a bug here must not leave the pool waiting for this slot forever
            logger.exception("slot %s failed", slot.label)
        finally:
            slot.state = "stopped"
            engine.coordinator.workers.close_slot(slot.name)
            engine.observer.slot_state(slot, "stopped", None)

    def _pause(self, slot: Slot) -> None:
        """After a failed start: wait a little longer each time (a worker that keeps failing on a host
        that answers is given up as if the host were down)."""
        slot.failures += 1
        if slot.state == "down":
            return  # the host's own wait applies
        if slot.failures >= WORKER_FAILURES:
            slot.failures = 0
            self.engine.trouble(slot, ConnectError(self.host.name, f"its worker failed to start {WORKER_FAILURES} "
                                                                   f"times: {slot.detail}"))
            return
        self.engine.finished.wait(min(0.5 * 2 ** slot.failures, 10.0))

    def _serves(self, slot: Slot, work: Work) -> bool:
        """Whether the slot's worker is up and runs ``work``'s code already (no need to start it again)."""
        if slot.code is None or slot.code != work.code:
            return False
        channel = self.engine.coordinator.workers.slot_channel(slot.name)
        return channel is not None and not channel.broken

    def _others_up(self) -> bool:
        return self.engine.others_up(self.host.name)

    def _prepare(self, slot: Slot, work: Work) -> tuple[Work, Session] | None:
        """Start the slot's worker for ``work``'s code (connect, upload, take the slot's GPUs, waiting while
        they are busy); the session made for it, or None when the host failed (the engine was told)."""
        engine = self.engine
        coordinator = engine.coordinator
        try:
            session = work.make_session(slot)
            engine.plan(work, session)
            target = coordinator.resolve_target(session)
            with engine.pack_lock:  # one build for all slots (and ast.parse is not thread-safe before 3.11.8)
                project, _ = coordinator.project_for(session)  # the archive and tree its calls will use
                archive = coordinator.archive_for(session, project=project is not None)

            def waiting(event: dict[str, Any]) -> None:
                slot.state, slot.detail = "waiting", _waiting_text(event)
                engine.observer.slot_state(slot, "waiting", slot.detail)

            channel = coordinator.workers.slot(target.launcher, target.backend, archive, target.options,
                                               lambda name, state: None, on_event=waiting,
                                               tree=project.tree.tree_id if project is not None else None)
        except Exception as exc:
            if classify_failure(exc) == "call":  # the call's own fault (its code, its arguments)
                engine.reject(work, exc)
            else:
                engine.trouble(slot, exc)
            return None
        slot.gpus = list((channel.placement or {}).get("gpus") or [])
        slot.code = work.code
        engine.reached(slot)
        return work, session

    def interrupt(self) -> None:
        for slot in self.host.slots:
            if slot.current is None:
                continue
            channel = self.engine.coordinator.workers.slot_channel(slot.name)
            if channel is None:
                continue
            try:
                channel.send(b"C")
            except Exception:
                pass
            timer = threading.Timer(INTERRUPT_GRACE, channel.process.kill)
            timer.daemon = True
            timer.start()

    def join(self, timeout: float | None = None) -> None:
        self._ready.wait(timeout)
        for thread in self._threads:
            thread.join(timeout)


def _json(value: Any) -> str:
    import json

    return json.dumps(value, sort_keys=True)


def _waiting_text(event: dict[str, Any]) -> str:
    """``waiting for 1 GPU: GPU 0 used by 1 process(es) rx did not start (pid 42; 2048 MiB); GPU 1 held by rx``"""
    busy = event.get("busy") or {}
    wanted = event.get("gpus")
    parts = [f"GPU {index} {why}" for index, why in busy.items()]
    return f"waiting for {wanted} GPU(s): " + ("; ".join(parts) if parts else "none free")
