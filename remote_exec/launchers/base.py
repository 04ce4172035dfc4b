"""The launcher interface: start the runner's command on a host and hand back its process; a scheduler
launcher also submits calls as jobs, polls them and cancels them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from ..backends.base import Backend, Process
from ..errors import ConfigError

if TYPE_CHECKING:  # only a scheduler's launcher deals in jobs: a direct one never imports them
    from .jobs import Job, JobKey, JobRequest, JobState, Verdict

__all__ = ["Launcher"]


class Launcher(ABC):
    """Decides how the runner is started on a host.

    The protocol (:mod:`remote_exec.protocol`) builds the runner's command line (the bootstrap with its
    arguments) and asks the target's launcher to start it; the process it returns is the protocol's
    channel: frames in on its stdin, frames out on its stdout, the runner's own diagnostics on its
    stderr. A launcher may wrap the command, never change it.

    A scheduler launcher (:attr:`schedules`) has a second entry point: the coordinator stores each call
    on the host (the runner's ``prepare``, started with :meth:`start` on the login node), then
    :meth:`submit` turns the runner's ``batch`` command into a job; :meth:`poll` says what the scheduler
    knows of every followed job of a cluster in one go; :meth:`verdict` reads a job's end in rx's terms;
    :meth:`cancel_jobs` asks the scheduler to stop jobs. Their defaults refuse: a launcher that runs calls
    at once (``direct``) submits nothing.

    Attributes:
        options: The launcher's settings from the remote's configuration (e.g. a scheduler's
            partition and time limit); the direct launcher has none.
    """

    #: The name a remote's ``scheduler`` key selects this launcher by.
    name: ClassVar[str] = ""
    #: True for a batch scheduler: calls become jobs (:meth:`submit`, :meth:`poll`, :meth:`cancel_jobs`),
    #: attached by following their files; False: one exec per call over :meth:`start`.
    schedules: ClassVar[bool] = False
    #: How a pool (:mod:`remote_exec.pool`) places calls on a host of this launcher, as ``"module:Class"``
    #: of a :class:`remote_exec.pool.placement.Placement`; None: slots with a persistent worker each for a
    #: launcher that runs calls at once, job arrays for a scheduler.
    placement: ClassVar[str | None] = None

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        self.options: Mapping[str, Any] = dict(options or {})

    def same(self, other: Launcher) -> bool:
        """Whether ``other`` starts runners exactly as this one does (same kind, same options)."""
        return type(other) is type(self) and dict(other.options) == dict(self.options)

    @abstractmethod
    def start(self, backend: Backend, argv: Sequence[str]) -> Process:
        """Start ``argv`` (the runner's bootstrap) on ``backend``'s host; return its process. For a
        scheduler launcher this runs the runner's helpers (``prepare``, ``attach``, ``seal``) on the login
        node; the calls themselves are submitted.

        Raises:
            ConnectError, AuthError, HostKeyError: The host could not be reached.
        """

    # -- schedulers ------------------------------------------------------------------------------------

    def _refuse(self, what: str) -> ConfigError:
        return ConfigError(f"the {self.name or type(self).__name__} launcher runs calls at once; it cannot {what}",
                           hint="choose a scheduler for the remote, e.g. scheduler = \"slurm\"")

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Refuse per-call settings (``@task(slurm=...)``, ``rx run --slurm``) this launcher cannot honour.

        Raises:
            ConfigError: With the setting and why.
        """
        if options:
            raise self._refuse("take scheduler options")

    def submit(self, backend: Backend, request: JobRequest) -> Job:
        """Submit ``request`` as one job (an array for ``request.array``); return it.

        Raises:
            RunnerError: The scheduler refused the job (its message says why).
            ConfigError: The launcher submits no jobs, or an option cannot be honoured.
        """
        raise self._refuse("submit jobs")

    def poll(self, backend: Backend, jobs: Sequence[Job], previous: Mapping[JobKey, JobState],
             memo: dict[str, Any]) -> dict[JobKey, JobState]:
        """What the scheduler says of every element of ``jobs``, by (job id, array index), in one call.

        ``previous`` is what the last poll said (what to ask follows from it: the queue of a pending job's
        partition, accounting once for what just ended); ``memo`` is the cluster's: what the launcher
        learned of it once (whether accounting answers). A job the scheduler does not know (or knows only
        as another job under its id) is gone (:data:`~.jobs.GONE`).

        Raises:
            RunnerError: The scheduler did not answer (the caller keeps the last states and asks again).
        """
        raise self._refuse("poll jobs")

    def verdict(self, job: Job, state: JobState) -> Verdict | None:
        """How ``state`` (an ended job) reads in rx's terms; None when the task's own outcome says it all
        (the job completed or failed as its task did)."""
        return None

    def cancel_jobs(self, backend: Backend, jobs: Sequence[Job]) -> None:
        """Ask the scheduler to stop ``jobs`` (pending ones never start)."""
        raise self._refuse("cancel jobs")

    def poll_intervals(self) -> tuple[float, float]:
        """Seconds between polls: while states change, and at most while nothing does."""
        return (1.0, 30.0)

    def describe(self, backend: Backend, workdir: str) -> dict[str, Any]:
        """What ``rx check`` shows of the scheduler behind ``backend`` (nothing for a direct launcher)."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict(self.options)!r})"
