"""How a pool places calls on a scheduler remote (a Slurm login node): job arrays, not slots.

The calls waiting for such a host leave together: every waiting call of one code (up to
:data:`ARRAY_MAX`) becomes one job array (``Coordinator.run_array``: ``sbatch --array=0-(N-1)%P``, P the
pool's ``per_host``, default :data:`PARALLEL`), and each element's result settles its call. A sweep's runs
(each records into a child run of its own) go as single jobs instead, up to P at once, each through its
advice chain as ``rx run --remote CLUSTER`` would send it. GPUs are the scheduler's to give (``gres``), so a
pool's ``gpus`` does not lock anything here.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from .placement import Placement, Slot

if TYPE_CHECKING:
    from .work import Work

__all__ = ["ARRAY_MAX", "GATHER", "PARALLEL", "ArrayPlacement"]

logger = logging.getLogger(__name__)

#: The most calls one job array carries (a longer map is several arrays, one after another).
ARRAY_MAX = 1000
#: Elements of an array running at once (and single jobs in flight) when the pool gives no ``per_host``.
PARALLEL = 16
#: Seconds a first waiting call waits for the calls submitted right after it, to leave in one array.
GATHER = 0.5


class ArrayPlacement(Placement):
    """A scheduler remote: the waiting calls of one code leave as one job array at a time."""

    def __init__(self, engine: Any, host: Any) -> None:
        super().__init__(engine, host)
        self.parallel = engine.settings.per_host or PARALLEL
        self.slot = Slot(host=host.name, number=0, name=f"{engine.pool_id}/{host.name}#jobs", warm=False,
                         state="ready")
        host.slots.append(self.slot)
        self._thread: threading.Thread | None = None
        self._singles = threading.Semaphore(self.parallel)
        self._running: list[threading.Thread] = []

    def start(self) -> None:
        self.engine.observer.slot_state(self.slot, "ready", None)
        self._thread = threading.Thread(target=self._serve, name=f"rx-jobs-{self.host.name}", daemon=True)
        self._thread.start()

    def _others_up(self) -> bool:
        return self.engine.others_up(self.host.name)

    def _serve(self) -> None:
        engine = self.engine
        try:
            while self.host.wait_usable(engine.finished):
                head = engine.feed.peek(self.host.name, self._others_up, 0.5)
                if head is None:
                    if engine.idle():
                        break
                    continue
                if head.begin is not None:  # a sweep's run: a single job, its own recording
                    self._single()
                    continue
                engine.finished.wait(GATHER)  # the calls submitted with it (a map's window) join its array
                batch = self._batch(head)
                if batch:
                    engine.run_array(batch, self.slot, self.parallel)
        except Exception:  # a bug here must not leave the pool waiting for this host forever
            logger.exception("the job placement of %s failed", self.host.name)
        finally:
            for thread in list(self._running):
                thread.join()
            self.slot.state = "stopped"
            engine.observer.slot_state(self.slot, "stopped", None)

    def _batch(self, head: Work) -> list[Work]:
        """Every waiting call of ``head``'s code (up to :data:`ARRAY_MAX`), each marked running."""
        batch: list[Work] = []
        while len(batch) < ARRAY_MAX:
            work = self.engine.feed.take(self.host.name, self._others_up)
            if work is None:
                break
            if work.code != head.code or work.begin is not None:
                self.engine.feed.put(work, again=True)  # for the next round
                break
            if work.future.running() or work.future.set_running_or_notify_cancel():
                batch.append(work)
            else:
                self.engine.cancelled(work)
        return batch

    def _single(self) -> None:
        """Take the next call and run it as one job, in a thread of its own (at most ``parallel`` at once)."""
        self._singles.acquire()
        work = self.engine.feed.take(self.host.name, self._others_up)
        if work is None:
            self._singles.release()
            return
        if not work.future.running() and not work.future.set_running_or_notify_cancel():
            self.engine.cancelled(work)
            self._singles.release()
            return

        def run() -> None:
            try:
                session = work.make_session(self.slot)
            except Exception as exc:
                self.engine.settle_failure(work, self.slot, exc, 0.0)
                self._singles.release()
                return
            try:
                self.engine.attempt(work, self.slot, session)
            finally:
                self._singles.release()

        thread = threading.Thread(target=run, name=f"rx-job-{work.label}", daemon=True)
        self._running = [t for t in self._running if t.is_alive()] + [thread]
        thread.start()

    def interrupt(self) -> None:
        """Nothing to do here: an interrupted array or job is cancelled by the thread waiting for it
        (``Coordinator.run_array`` cancels its job on Ctrl-C), and the pool's calls end as interrupted."""

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
