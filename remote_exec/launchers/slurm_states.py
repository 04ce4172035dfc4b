"""Reading Slurm: the output of ``squeue``, ``sacct`` and ``scontrol`` as :class:`~.jobs.JobState`, and a
job's end as a :class:`~.jobs.Verdict` in rx's terms.

Pure functions of text, so the mapping is tested from recorded output (tests/unit/test_slurm_states.py),
OUT_OF_MEMORY included, which the Docker testbed cannot produce (it needs cgroups). Times are asked for as
epoch seconds (``SLURM_TIME_FORMAT=%s``), so no time zone is guessed.

The table, and why (submitit and Parsl read these states too; Parsl counts a vanished job COMPLETED,
jobflow-remote calls TIMEOUT, OUT_OF_MEMORY, NODE_FAIL and PREEMPTED all "FAILED"):

    Slurm state          rx status     exit   said
    COMPLETED, FAILED    the task's    its own (the runner's outcome: value, exception, exit code)
    TIMEOUT, DEADLINE    timeout       124    at its time limit, after ELAPSED
    CANCELLED [by UID]   cancelled     130    by whom (accounting only)
    OUT_OF_MEMORY        oom           137    with MaxRSS
    NODE_FAIL, BOOT_FAIL node_fail     3      which node; requeued (then it goes on) or not
    PREEMPTED            preempted     3      requeued (then it goes on) or not
    gone (no record)     lost          3      never "finished"
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from .jobs import ENDED, GONE, PENDING, RUNNING, Job, JobKey, JobState, Verdict

__all__ = ["ACCT_FIELDS", "CLOCK_SLACK", "REQUEUEABLE", "SQUEUE_FORMAT", "ids_of", "merge", "parse_sacct",
           "parse_scontrol", "parse_squeue", "phase_of", "positions", "verdict_for"]


#: squeue's fields, ``|``-separated (the working directory last: it may hold anything). ``%i`` is
#: ``ARRAYID_INDEX`` for an array's element (``%a`` says ``(null)`` for a pending one, and ``%A`` is a
#: started element's own id), ``%F`` the array's id.
SQUEUE_FORMAT = "%i|%F|%T|%r|%P|%N|%V|%M|%Q|%Z"
#: sacct's fields (``--parsable2``: ``|``-separated, nothing truncated).
ACCT_FIELDS = "JobID,JobIDRaw,State,ExitCode,Reason,NodeList,Partition,Elapsed,MaxRSS,Submit,WorkDir"

_PENDING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "CONFIGURING"}
_RUNNING = {"RUNNING", "COMPLETING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "RESIZING"}
_ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
          "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT", "REVOKED"}
#: Ended states after which a job that asked for it (``--requeue``) may come back PENDING.
REQUEUEABLE = {"NODE_FAIL", "PREEMPTED", "BOOT_FAIL"}
#: How far (seconds) the controller's clock may trail the login node's at submission.
CLOCK_SLACK = 60.0


def phase_of(state: str) -> str:
    """The phase of a Slurm state (``CANCELLED by 1000`` is CANCELLED)."""
    word = state.split()[0].rstrip("+") if state.strip() else ""
    if word in _ENDED:
        return ENDED
    if word in _RUNNING:
        return RUNNING
    if word in _PENDING:
        return PENDING
    return RUNNING if word else GONE


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _owned(job: Job, workdir: str | None, submitted: float | None) -> bool:
    """Whether a record under ``job``'s id is ``job`` itself: same working directory (ours alone), submitted
    no earlier than rx submitted it (a requeue only moves that time later)."""
    if workdir is not None and workdir.rstrip("/") != job.workdir.rstrip("/"):
        return False
    return submitted is None or submitted >= job.submitted - CLOCK_SLACK


def _index(job: Job, text: str) -> int | None:
    if not job.array:
        return None
    try:
        return int(text)
    except ValueError:
        return None


def parse_squeue(text: str, jobs: Sequence[Job]) -> dict[JobKey, JobState]:
    """Lines of ``squeue -h -r -t all -o SQUEUE_FORMAT``: the states of the elements of ``jobs`` it shows
    (another job under one of their ids is left out)."""
    by_id = {job.job_id: job for job in jobs}
    states: dict[JobKey, JobState] = {}
    for line in text.splitlines():
        fields = line.split("|", 9)
        base = fields[0].partition("_")[0]
        if len(fields) < 10 or base not in by_id:
            continue
        job = by_id[base]
        element, _, state, reason, partition, nodes, submit, used, priority, workdir = fields
        if not _owned(job, workdir, _float(submit)):
            continue
        index = _index(job, element.partition("_")[2])
        if job.array and index is None:
            continue
        info: dict[str, Any] = {"elapsed": used, "submitted": _float(submit), "priority": _float(priority),
                                "final": False}  # accounting (or scontrol) has the last word
        states[(job.job_id, index)] = JobState(
            index=index, state=state, phase=phase_of(state), reason=None if reason in ("None", "") else reason,
            nodes=nodes or None, partition=partition or None, info=info)
    return states


def positions(text: str, states: Mapping[JobKey, JobState]) -> dict[JobKey, int]:
    """Each pending element's place in its partition's queue, from ``squeue -h -t PD -o '%i|%P|%Q'`` of
    everyone's pending jobs (1: no pending job of higher priority is ahead)."""
    queue: list[tuple[str, str, float]] = []
    for line in text.splitlines():
        fields = line.split("|")
        if len(fields) == 3 and (priority := _float(fields[2])) is not None:
            queue.append((fields[0], fields[1], priority))
    places: dict[JobKey, int] = {}
    for key, state in states.items():
        mine = state.info.get("priority")
        if state.phase != PENDING or mine is None or state.partition is None:
            continue
        me = key[0] if key[1] is None else f"{key[0]}_{key[1]}"
        ahead = sum(1 for job_id, partition, priority in queue
                    if state.partition in partition.split(",") and job_id != me
                    and (priority > mine or (priority == mine and _sort_id(job_id) < _sort_id(me))))
        places[key] = ahead + 1
    return places


def _sort_id(job_id: str) -> tuple[int, int]:
    base, _, index = job_id.partition("_")
    return (int(base) if base.isdigit() else 0, int(index) if index.isdigit() else -1)


_STATE_BY = re.compile(r"^(\w+)(?: by (\S+))?")


def _split_state(text: str) -> tuple[str, str | None]:
    match = _STATE_BY.match(text.strip())
    return (match.group(1), match.group(2)) if match else (text.strip(), None)


def _rss_kib(text: str) -> int | None:
    """sacct's MaxRSS (``1234K``, ``12M``, ``1.5G``, bare bytes) in KiB."""
    match = re.fullmatch(r"([\d.]+)([KMGT]?)", text.strip())
    if not match:
        return None
    scale = {"": 1 / 1024, "K": 1, "M": 1024, "G": 1024 ** 2, "T": 1024 ** 3}[match.group(2)]
    return int(float(match.group(1)) * scale)


def _acct_rows(text: str, jobs: Sequence[Job]) -> dict[JobKey, list[dict[str, str]]]:
    """sacct's rows by element, in order (attempts of a requeued job first to last, each with its steps)."""
    by_id = {job.job_id: job for job in jobs}
    names = ACCT_FIELDS.split(",")
    rows: dict[JobKey, list[dict[str, str]]] = {}
    for line in text.splitlines():
        values = line.split("|")
        if len(values) != len(names):
            continue
        row = dict(zip(names, values, strict=True))
        allocation, _, _step = row["JobID"].partition(".")
        base, _, index_text = allocation.partition("_")
        job = by_id.get(base)
        if job is None or (job.array and not index_text.isdigit()):
            continue  # another job, or a pending array's unsplit remainder (squeue shows those)
        rows.setdefault((base, _index(job, index_text)), []).append(row)
    return rows


def parse_sacct(text: str, jobs: Sequence[Job]) -> dict[JobKey, JobState]:
    """Lines of ``sacct -n -P -D --format=ACCT_FIELDS``: the last attempt of each element of ``jobs``,
    with every state it went through, its exit code, elapsed time and largest MaxRSS."""
    by_id = {job.job_id: job for job in jobs}
    states: dict[JobKey, JobState] = {}
    for key, rows in _acct_rows(text, jobs).items():
        job = by_id[key[0]]
        allocations = [row for row in rows if "." not in row["JobID"]
                       and _owned(job, row["WorkDir"] or None, _float(row["Submit"]))]
        if not allocations:
            continue
        last = allocations[-1]
        state, by = _split_state(last["State"])
        rss = [kib for row in rows if (kib := _rss_kib(row["MaxRSS"])) is not None]
        info: dict[str, Any] = {"elapsed": last["Elapsed"], "exit_code": last["ExitCode"],
                                "submitted": _float(last["Submit"]), "cancelled_by": by,
                                "max_rss_kib": max(rss) if rss else None,
                                "states": [_split_state(row["State"])[0] for row in allocations],
                                "restarts": len(allocations) - 1, "final": phase_of(state) == ENDED}
        states[key] = JobState(index=key[1], state=state, phase=phase_of(state),
                               reason=None if last["Reason"] in ("None", "") else last["Reason"],
                               nodes=last["NodeList"] or None, partition=last["Partition"] or None, info=info)
    return states


def parse_scontrol(text: str, jobs: Sequence[Job]) -> dict[JobKey, JobState]:
    """Lines of ``scontrol -o show job ID`` (without accounting: only while the controller remembers the
    job, MinJobAge)."""
    by_id = {job.job_id: job for job in jobs}
    states: dict[JobKey, JobState] = {}
    for line in text.splitlines():
        fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
        base = fields.get("ArrayJobId") or fields.get("JobId", "")
        job = by_id.get(base)
        if job is None or not _owned(job, fields.get("WorkDir"), _float(fields.get("SubmitTime", ""))):
            continue
        index = _index(job, fields.get("ArrayTaskId", ""))
        state = fields.get("JobState", "")
        info: dict[str, Any] = {"elapsed": fields.get("RunTime"), "exit_code": fields.get("ExitCode"),
                                "submitted": _float(fields.get("SubmitTime", "")),
                                "restarts": int(fields["Restarts"]) if fields.get("Restarts", "").isdigit() else None,
                                "final": phase_of(state) == ENDED}
        reason = fields.get("Reason")
        states[(job.job_id, index)] = JobState(
            index=index, state=state, phase=phase_of(state), reason=None if reason in (None, "None") else reason,
            nodes=None if fields.get("NodeList") in (None, "(null)") else fields.get("NodeList"),
            partition=fields.get("Partition"), info=info)
    return states


def _requeue_note(job: Job) -> str:
    if job.requeue:
        return "Slurm did not requeue it"
    return "not requeued (set requeue = true in the remote's slurm table, or --slurm --requeue, to resume it)"


def _timeout(name: str, job: Job, state: JobState) -> Verdict:
    limit = "its time limit" if state.state == "TIMEOUT" else "its deadline"
    elapsed = state.info.get("elapsed")
    return Verdict("timeout", 124, f"Slurm stopped job {name} at {limit} ({state.state}"
                                   + (f" after {elapsed})" if elapsed else ")"))


def _cancelled(name: str, job: Job, state: JobState) -> Verdict:
    by = state.info.get("cancelled_by")
    who = f" by uid {by}" + (" (you)" if state.info.get("cancelled_by_you") else "") if by else ""
    return Verdict("cancelled", 130, f"Slurm job {name} was cancelled{who} (CANCELLED)")


def _out_of_memory(name: str, job: Job, state: JobState) -> Verdict:
    rss = state.info.get("max_rss_kib")
    peak = f", MaxRSS {rss / 1024:.0f} MiB" if isinstance(rss, (int, float)) else ""
    return Verdict("oom", 137, f"Slurm job {name} ran out of memory (OUT_OF_MEMORY{peak})")


def _node_failed(name: str, job: Job, state: JobState) -> Verdict:
    where = f" ({state.nodes})" if state.nodes else ""
    return Verdict("node_fail", 3, f"the node of Slurm job {name} failed{where} ({state.state}); "
                                   + _requeue_note(job))


def _preempted(name: str, job: Job, state: JobState) -> Verdict:
    return Verdict("preempted", 3, f"Slurm job {name} was preempted by a higher-priority job (PREEMPTED); "
                                   + _requeue_note(job))


#: How each state that the scheduler ended a job in reads (COMPLETED and FAILED: the task's own outcome).
_VERDICTS = {"TIMEOUT": _timeout, "DEADLINE": _timeout, "CANCELLED": _cancelled, "OUT_OF_MEMORY": _out_of_memory,
             "NODE_FAIL": _node_failed, "BOOT_FAIL": _node_failed, "PREEMPTED": _preempted}


def verdict_for(job: Job, state: JobState) -> Verdict | None:
    """How an ended (or gone) element reads in rx's terms; None for COMPLETED and FAILED (the task's own
    outcome says it all: value, exception, exit code)."""
    name = job.job_id if state.index is None else f"{job.job_id}_{state.index}"
    if state.phase == GONE:
        return Verdict("lost", 3, f"Slurm no longer knows job {name} and it left no result")
    if state.state in ("COMPLETED", "FAILED"):
        return None
    reading = _VERDICTS.get(state.state)
    if reading is not None:
        return reading(name, job, state)
    return Verdict("error", 3, f"Slurm job {name} ended {state.state}" + (f": {state.reason}" if state.reason else ""))


def merge(live: Mapping[JobKey, JobState], final: Mapping[JobKey, JobState]) -> dict[JobKey, JobState]:
    """squeue's states, with accounting's (or scontrol's) for the elements it knows more of."""
    merged = dict(live)
    for key, state in final.items():
        current = merged.get(key)
        # Accounting knows more of an ended job (every attempt, MaxRSS, who cancelled); it may lag behind
        # squeue, whose word on a job still in the queue stands.
        if current is None:
            merged[key] = state
        elif current.phase == ENDED and state.phase == ENDED:
            # What accounting has not recorded yet (a short job's partition), squeue said.
            info = {**current.info, **{name: value for name, value in state.info.items() if value not in (None, "")}}
            merged[key] = replace(state, partition=state.partition or current.partition,
                                  nodes=state.nodes or current.nodes, info=info)
    return merged


def ids_of(jobs: Iterable[Job]) -> str:
    """The jobs' ids for ``-j`` (an array's id stands for all its elements)."""
    return ",".join(sorted({job.job_id for job in jobs}, key=lambda text: int(text) if text.isdigit() else 0))
