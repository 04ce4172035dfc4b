"""The words a scheduler launcher and the coordinator share: what to submit, the job it became, what the
scheduler says of it at each poll, and how it ended in rx's terms.

All of it is plain data: a :class:`Job` is stored in the run's record (``to_record``/``from_record``), so
a later ``rx attach`` from another process finds and checks the same job.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ENDED", "GONE", "PENDING", "RUNNING", "Job", "JobKey", "JobRequest", "JobState", "Verdict"]

#: Phases of a job, whatever the scheduler calls its states.
PENDING = "pending"
RUNNING = "running"
ENDED = "ended"
#: The scheduler no longer knows the job (or knows only another job under its id).
GONE = "gone"

#: (job id, array index or None): how a poll names one job or one array element.
JobKey = tuple[str, "int | None"]


@dataclass(frozen=True)
class JobRequest:
    """One submission.

    Attributes:
        argv: The runner's command to run inside the allocation (``batch RUN_DIR``); for an array, its
            run directory holds ``{index}``, which the runner fills in from ``RX_ARRAY_INDEX``.
        run_dir: The run directory of the (first) call: the job's own files (its script, the scheduler's
            log) go in its private ``.rx``.
        name: A label for the job (the rx run id and what runs).
        array: 0 for one call; N for an array of N calls, indices 0 .. N-1.
        parallel: At most this many elements of an array at once (None: no limit).
        options: Per-call settings over the launcher's own (``@task(slurm={...})``, ``rx run --slurm``).
    """

    argv: tuple[str, ...]
    run_dir: str
    name: str
    array: int = 0
    parallel: int | None = None
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Job:
    """A submitted job.

    Attributes:
        scheduler: The launcher's name.
        job_id: The scheduler's id of the job (of the whole array, for an array).
        submitted: The cluster's clock just before the submission (seconds since the epoch): a job under
            this id submitted earlier is another job.
        workdir: The job's working directory (the first call's run directory): no other job has it, so
            with the id it names the job even after the scheduler reused the id.
        requeue: The job may be requeued (node failure, preemption) and then runs again in the same rx run.
        array: Its number of array elements (0: not an array).
        log: The scheduler's own log of the job, relative to a run's private ``.rx`` (``{index}`` for an
            array's element).
        details: What else the launcher recorded (the submission's command line, the partition asked for).
    """

    scheduler: str
    job_id: str
    submitted: float
    workdir: str
    requeue: bool = False
    array: int = 0
    log: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        """The job as JSON data (for the run's record)."""
        return {"scheduler": self.scheduler, "job_id": self.job_id, "submitted": self.submitted,
                "workdir": self.workdir, "requeue": self.requeue, "array": self.array, "log": self.log,
                "details": dict(self.details)}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Job:
        """The job :meth:`to_record` wrote."""
        return cls(scheduler=str(record["scheduler"]), job_id=str(record["job_id"]),
                   submitted=float(record["submitted"]), workdir=str(record["workdir"]),
                   requeue=bool(record.get("requeue")), array=int(record.get("array") or 0),
                   log=str(record.get("log") or ""), details=dict(record.get("details") or {}))

    def element_log(self, index: int | None) -> str:
        """The scheduler's log of one element (or of the job)."""
        return self.log.replace("{index}", str(index or 0))


#: Fields of :attr:`JobState.info` for the launcher's own bookkeeping, left out of records.
_INTERNAL = frozenset({"final", "priority", "missing_since"})


@dataclass(frozen=True)
class JobState:
    """What the scheduler said of one job, or one array element, at one poll.

    Attributes:
        index: The array index (None for a job that is not an array).
        state: The scheduler's own word: PENDING, RUNNING, COMPLETED, CANCELLED, TIMEOUT, ...
        phase: :data:`PENDING`, :data:`RUNNING`, :data:`ENDED` or :data:`GONE`.
        reason: Why it waits, or why it ended, as the scheduler puts it.
        nodes: Where it runs or ran.
        partition: Its partition (queue).
        position: Its place among the pending jobs of its partition (1: next).
        info: What else the scheduler said: ``elapsed``, ``max_rss_kib``, ``exit_code``, ``cancelled_by``,
            ``submitted``, ``restarts``, ``states`` (every state of every attempt, from accounting);
            ``final``: False while the launcher expects to learn more of an ended element (its
            accounting has not answered yet); ``may_requeue``: it ended in a state the scheduler may
            requeue it from.
    """

    index: int | None
    state: str
    phase: str
    reason: str | None = None
    nodes: str | None = None
    partition: str | None = None
    position: int | None = None
    info: Mapping[str, Any] = field(default_factory=dict)

    @property
    def ended(self) -> bool:
        """The scheduler is done with it (ended, or gone)."""
        return self.phase in (ENDED, GONE)

    def summary(self) -> dict[str, Any]:
        """Its fields as JSON data, for the run's record (empty ones left out)."""
        fields: dict[str, Any] = {"state": self.state, "phase": self.phase, "reason": self.reason,
                                  "nodes": self.nodes, "partition": self.partition, "position": self.position,
                                  **self.info}
        if self.index is not None:
            fields["index"] = self.index
        return {name: value for name, value in fields.items()
                if value not in (None, "", [], {}) and name not in _INTERNAL}


@dataclass(frozen=True)
class Verdict:
    """How a job's end reads in rx's terms, when the task's own outcome does not say it all.

    Attributes:
        status: The result status (``timeout``, ``cancelled``, ``oom``, ``preempted``, ``node_fail``,
            ``lost``, ``error``).
        exit_code: What ``rx run`` exits with.
        detail: One sentence: what the scheduler said, and what happens next (requeued or not).
    """

    status: str
    exit_code: int
    detail: str

    def to_record(self) -> dict[str, Any]:
        """As JSON data (for the runner's ``seal``)."""
        return {"status": self.status, "exit_code": self.exit_code, "detail": self.detail}
