"""Where a pool's calls run: hosts that are up, down or lost, slots on them, and the GPU rules.

A pool has one :class:`Placement` per host. It takes calls from the pool's feed and runs them; which kind
of placement a host gets is its launcher's choice (``Launcher.placement``, else by ``Launcher.schedules``):
for a launcher that runs calls at once (``direct``), :class:`~remote_exec.pool.slots.SlotPlacement` (a few
slots, each with a persistent worker); for a scheduler (``slurm``),
:class:`~remote_exec.pool.arrays.ArrayPlacement` (the waiting calls as one job array).

A host is ``up`` until a call or a connect fails for a reason of the link; then it is ``down`` (its slots
take no calls) and looked at again after :data:`RECHECK_AFTER` seconds; after as many failed looks it is
``lost``, as is a host that can never run the calls (authentication, host key, no interpreter, no GPUs).
"""

from __future__ import annotations

import importlib
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["RECHECK_AFTER", "GpuPolicy", "HostState", "Placement", "Slot", "placement_class"]

#: Seconds a down host waits before each new look; after the last, it is lost.
RECHECK_AFTER = (2.0, 5.0, 10.0, 20.0, 40.0)


@dataclass(frozen=True)
class GpuPolicy:
    """When a GPU that no rx worker holds counts as taken anyway.

    Attributes:
        foreign_mib: Processes rx did not start (nvidia-smi's compute processes) holding at least this
            much memory on a GPU make it taken; 0: any such process does.
        max_utilization: A GPU busier than this (percent) counts as taken, whoever uses it; None: no limit.
        interval: Seconds between two looks while every GPU is taken.
        devices: Only these GPU indices may be used (None: any).
    """

    foreign_mib: int = 0
    max_utilization: int | None = None
    interval: float = 5.0
    devices: tuple[int, ...] | None = None

    def request(self, gpus: int) -> dict[str, Any]:
        """The slot request's GPU part (see :mod:`remote_exec.runner.slot`)."""
        return {"gpus": gpus, "foreign_mib": self.foreign_mib, "max_utilization": self.max_utilization,
                "interval": self.interval, "devices": list(self.devices) if self.devices is not None else None}


@dataclass(eq=False)
class Slot:
    """One place on a host where a pool's calls run one at a time.

    Attributes:
        host: The host as the user named it.
        number: Its number on the host (0, 1, ...).
        name: Unique in the process: its persistent worker is keyed by it.
        placement: What its worker takes on the host first (JSON; see :mod:`remote_exec.runner.slot`).
        state: ``starting``, ``waiting`` (for GPUs), ``ready``, ``running``, ``down``, ``stopped``.
        detail: Why it waits, what failed.
        gpus: The GPUs its worker holds (nvidia-smi's fields).
        current: The call it runs now, if any.
        failures: Failed starts of its worker in a row.
        code: What its worker runs (the ``code`` of the call it was started for).
        warm: Its calls run in a persistent worker of its own (False: a scheduler's jobs run them).
    """

    host: str
    number: int
    name: str
    placement: str | None = None
    state: str = "starting"
    detail: str | None = None
    gpus: list[dict[str, Any]] = field(default_factory=list)
    current: Any = None
    failures: int = 0
    code: Any = None
    warm: bool = True

    @property
    def label(self) -> str:
        """``host#number``."""
        return f"{self.host}#{self.number}"

    @property
    def gpu_indices(self) -> list[int]:
        """The indices of the GPUs it holds."""
        return [int(gpu["index"]) for gpu in self.gpus]


class HostState:
    """One host of a pool: up, down (looked at again later) or lost, and why.

    Attributes:
        name: The host as the user named it.
        status: ``up``, ``down`` or ``lost``.
        reason: The last failure, one line.
        failures: Failed looks in a row.
        retry_at: When a down host is looked at again (monotonic clock).
        slots: Its slots.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.status = "up"
        self.reason: str | None = None
        self.failures = 0
        self.retry_at = 0.0
        self.slots: list[Slot] = []
        self._changed = threading.Condition()

    def down(self, reason: str, *, lost: bool = False) -> str:
        """A call or a connect failed for a reason of the link (``lost``: it never will work); return the
        new status."""
        with self._changed:
            if self.status == "lost":
                return "lost"
            if self.status == "up" or time.monotonic() >= self.retry_at:
                self.failures += 1  # slots failing together count once
            self.reason = reason
            if lost or self.failures > len(RECHECK_AFTER):
                self.status = "lost"
            else:
                self.status = "down"
                self.retry_at = time.monotonic() + RECHECK_AFTER[self.failures - 1]
            self._changed.notify_all()
            return self.status

    def up(self) -> bool:
        """A slot reached the host; True when it was down."""
        with self._changed:
            was = self.status == "down"
            if self.status != "lost":
                self.status, self.failures, self.reason = "up", 0, None
            self._changed.notify_all()
            return was

    def wait_usable(self, finished: threading.Event) -> bool:
        """Wait while the host is down and not due for another look; False once it is lost or the pool is
        finished."""
        with self._changed:
            while self.status == "down" and not finished.is_set():
                left = self.retry_at - time.monotonic()
                if left <= 0:
                    return True
                self._changed.wait(min(left, 0.5))
            return self.status != "lost" and not finished.is_set()

    def wake(self) -> None:
        """Wake the slots waiting on this host."""
        with self._changed:
            self._changed.notify_all()


class Placement(ABC):
    """How one host of a pool takes its calls from the pool's feed and runs them.

    Args:
        engine: The pool.
        host: The host's state (its slots are listed there).
    """

    def __init__(self, engine: Engine, host: HostState) -> None:
        self.engine = engine
        self.host = host

    @abstractmethod
    def start(self) -> None:
        """Start taking calls (in threads of its own); returns at once."""

    @abstractmethod
    def interrupt(self) -> None:
        """Stop the calls running now (they end as interrupted)."""

    @abstractmethod
    def join(self, timeout: float | None = None) -> None:
        """Wait until it took and ran its last call and released the host."""


def placement_class(scheduler: str) -> type[Placement]:
    """The placement a host whose remote has this ``scheduler`` gets (its launcher's ``placement``).

    Raises:
        ConfigError: No such launcher, or its placement cannot be loaded.
    """
    from ..launchers.registry import launcher_class

    launcher = launcher_class(scheduler)
    spec = launcher.placement or ("remote_exec.pool.arrays:ArrayPlacement" if launcher.schedules
                                  else "remote_exec.pool.slots:SlotPlacement")
    module_name, _, attribute = spec.partition(":")
    try:
        found = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load the placement {spec!r} of the {scheduler} launcher: {exc}") from exc
    if not (isinstance(found, type) and issubclass(found, Placement)):
        raise ConfigError(f"{spec} is not a Placement")
    return found
