"""Reading Slurm honestly, from output recorded on Slurm 22.05 (the Docker testbed, and for OUT_OF_MEMORY,
which needs cgroups the testbed cannot give, the form accounting gives it): every ending maps to the
status and exit code a user expects, a job under a reused id is never taken for ours, accounting that
lags behind squeue never hides what squeue said."""

from __future__ import annotations

import pytest

from remote_exec.launchers.jobs import ENDED, GONE, PENDING, RUNNING, Job, JobState
from remote_exec.launchers.slurm_states import (
    merge,
    parse_sacct,
    parse_scontrol,
    parse_squeue,
    phase_of,
    positions,
    verdict_for,
)

WORKDIR = "/home/rx/.cache/remote_exec/runs/20261206-071504-2203e6-51dd98f5"
JOB = Job(scheduler="slurm", job_id="4", submitted=1796539650.0, workdir=WORKDIR)
REQUEUE = Job(scheduler="slurm", job_id="4", submitted=1796539650.0, workdir=WORKDIR, requeue=True)
ARRAY = Job(scheduler="slurm", job_id="146", submitted=1796542060.0, workdir=WORKDIR + "-0", array=6)

# squeue -h -r -t all -o '%i|%F|%T|%r|%P|%N|%V|%M|%Q|%Z' (SLURM_TIME_FORMAT=%s)
SQUEUE_ARRAY = f"""\
146_4|146|PENDING|JobArrayTaskLimit|debug||1796542067|0:00|4294901654|{WORKDIR}-0
146_5|146|PENDING|JobArrayTaskLimit|debug||1796542067|0:00|4294901654|{WORKDIR}-0
146_3|146|RUNNING|None|debug|c1|1796542067|0:01|4294901654|{WORKDIR}-0
146_0|146|COMPLETED|None|debug|c1|1796542067|0:01|4294901654|{WORKDIR}-0
"""

# sacct -n -P -D --format=JobID,JobIDRaw,State,ExitCode,Reason,NodeList,Partition,Elapsed,MaxRSS,Submit,WorkDir
SACCT_REQUEUED = f"""\
4|4|NODE_FAIL|0:0|None|c1|debug|00:00:27||1796539658|{WORKDIR}
4.batch|4.batch|CANCELLED|||c1||00:00:27|1500K|1796539658|
4|4|COMPLETED|0:0|None|c1|debug|00:00:19||1796539685|{WORKDIR}
4.batch|4.batch|COMPLETED|0:0||c1||00:00:19|22600K|1796539717|
"""
SACCT_CANCELLED = f"4|4|CANCELLED by 1000|0:15|None|c2|debug|00:00:03||1796539660|{WORKDIR}\n"
SACCT_OOM = f"""\
4|4|OUT_OF_MEMORY|0:125|None|c1|gpu|00:00:07||1796539660|{WORKDIR}
4.batch|4.batch|OUT_OF_MEMORY|0:125||c1||00:00:07|1048576K|1796539661|
"""


def ended(state: str, **info: object) -> JobState:
    return JobState(index=None, state=state, phase=phase_of(state), nodes="c1", info=dict(info))


@pytest.mark.parametrize(("state", "phase"), [
    ("PENDING", PENDING), ("REQUEUED", PENDING), ("RUNNING", RUNNING), ("COMPLETING", RUNNING),
    ("COMPLETED", ENDED), ("CANCELLED by 1000", ENDED), ("CANCELLED+", ENDED), ("OUT_OF_MEMORY", ENDED),
    ("", GONE)])
def test_every_state_has_its_phase(state: str, phase: str) -> None:
    assert phase_of(state) == phase


@pytest.mark.parametrize(("state", "status", "exit_code", "said"), [
    (ended("TIMEOUT", elapsed="00:01:03"), "timeout", 124, "at its time limit (TIMEOUT after 00:01:03)"),
    (ended("CANCELLED", cancelled_by="1000", cancelled_by_you=True), "cancelled", 130,
     "cancelled by uid 1000 (you)"),
    (ended("OUT_OF_MEMORY", max_rss_kib=1048576), "oom", 137, "ran out of memory (OUT_OF_MEMORY, MaxRSS 1024 MiB)"),
    (ended("NODE_FAIL"), "node_fail", 3, "failed (c1) (NODE_FAIL); not requeued"),
    (ended("PREEMPTED"), "preempted", 3, "preempted by a higher-priority job (PREEMPTED); not requeued"),
    (JobState(index=None, state="", phase=GONE), "lost", 3, "Slurm no longer knows job 4 and it left no result"),
    (ended("BOOT_FAIL"), "node_fail", 3, "(BOOT_FAIL)"),
])
def test_each_ending_reads_as_the_status_and_exit_code_a_user_expects(state: JobState, status: str, exit_code: int,
                                                                     said: str) -> None:
    verdict = verdict_for(JOB, state)

    assert verdict is not None
    assert (verdict.status, verdict.exit_code) == (status, exit_code)
    assert said in verdict.detail


def test_a_completed_or_failed_job_keeps_the_tasks_own_outcome() -> None:
    assert verdict_for(JOB, ended("COMPLETED")) is None
    assert verdict_for(JOB, ended("FAILED", exit_code="3:0")) is None


def test_a_job_that_asked_for_a_requeue_and_was_not_says_so() -> None:
    verdict = verdict_for(REQUEUE, ended("NODE_FAIL"))

    assert verdict is not None and verdict.detail.endswith("Slurm did not requeue it")


def test_accounting_gives_every_attempt_of_a_requeued_job() -> None:
    [(key, state)] = parse_sacct(SACCT_REQUEUED, [JOB]).items()

    assert key == ("4", None)
    assert state.state == "COMPLETED" and state.phase == ENDED
    assert state.info["states"] == ["NODE_FAIL", "COMPLETED"] and state.info["restarts"] == 1
    assert state.info["max_rss_kib"] == 22600 and state.info["elapsed"] == "00:00:19"
    assert state.info["submitted"] == 1796539685.0 and state.info["final"] is True


def test_who_cancelled_and_out_of_memory_come_from_accounting() -> None:
    cancelled = parse_sacct(SACCT_CANCELLED, [JOB])[("4", None)]
    oom = parse_sacct(SACCT_OOM, [JOB])[("4", None)]

    assert cancelled.state == "CANCELLED" and cancelled.info["cancelled_by"] == "1000"
    verdict = verdict_for(JOB, oom)
    assert verdict is not None and verdict.status == "oom" and "MaxRSS 1024 MiB" in verdict.detail
    assert oom.info["exit_code"] == "0:125" and oom.partition == "gpu"


def test_a_reused_job_id_is_never_taken_for_ours() -> None:
    elsewhere = SACCT_CANCELLED.replace(WORKDIR, "/home/rx/other")  # a later job under the same id
    older = SACCT_CANCELLED.replace("1796539660", "1796400000")  # an old job, from before a reset
    squeue_other = "4|4|RUNNING|None|debug|c1|1796539700|0:05|1|/tmp/other\n"

    assert parse_sacct(elsewhere, [JOB]) == {}
    assert parse_sacct(older, [JOB]) == {}
    assert parse_squeue(squeue_other, [JOB]) == {}


def test_an_arrays_elements_are_read_by_index_pending_ones_included() -> None:
    states = parse_squeue(SQUEUE_ARRAY, [ARRAY])

    assert sorted(states) == [("146", 0), ("146", 3), ("146", 4), ("146", 5)]
    assert states[("146", 4)].reason == "JobArrayTaskLimit" and states[("146", 4)].phase == PENDING
    assert states[("146", 3)].nodes == "c1" and states[("146", 0)].phase == ENDED
    assert all(state.info["final"] is False for state in states.values())  # accounting has the last word


def test_accounting_of_an_array_skips_the_pending_remainder() -> None:
    text = (f"146_[4-5%4]|146|PENDING|0:0|JobArrayTaskLimit||debug|00:00:00||1796542067|{WORKDIR}-0\n"
            f"146_0|147|COMPLETED|0:0|None|c1|debug|00:00:01||1796542067|{WORKDIR}-0\n"
            "146_0.batch|147.batch|COMPLETED|0:0||c1||00:00:01|2992K|1796542068|\n")

    assert list(parse_sacct(text, [ARRAY])) == [("146", 0)]


def test_without_accounting_scontrol_tells_how_a_job_ended() -> None:
    line = (f"JobId=4 JobName=rx:job.py UserId=rx(1000) JobState=TIMEOUT Reason=TimeLimit Restarts=0 "
            f"ExitCode=0:15 RunTime=00:01:04 SubmitTime=1796539660 Partition=debug NodeList=c2 WorkDir={WORKDIR}")

    state = parse_scontrol(line, [JOB])[("4", None)]

    assert state.state == "TIMEOUT" and state.reason == "TimeLimit" and state.nodes == "c2"
    assert state.info["elapsed"] == "00:01:04" and state.info["final"] is True


def test_lagging_accounting_never_hides_what_squeue_said() -> None:
    live = {("4", None): JobState(index=None, state="COMPLETED", phase=ENDED, nodes="c1", partition="debug",
                                  info={"final": False, "elapsed": "0:01"})}
    running = {("4", None): JobState(index=None, state="RUNNING", phase=RUNNING, info={"final": False})}
    short = {("4", None): JobState(index=None, state="COMPLETED", phase=ENDED, partition=None,
                                   info={"final": True, "exit_code": "0:0", "max_rss_kib": None})}

    assert merge(live, running) == live  # accounting has not seen it end yet
    merged = merge(live, short)[("4", None)]
    assert merged.partition == "debug" and merged.info["exit_code"] == "0:0" and merged.info["final"] is True


def test_a_pending_jobs_place_counts_the_jobs_ahead_in_its_partition() -> None:
    mine = {("9", None): JobState(index=None, state="PENDING", phase=PENDING, partition="debug",
                                  info={"priority": 100.0})}
    queue = "7|debug|200\n8|debug|100\n9|debug|100\n10|debug|100\n11|urgent|900\n12|debug,urgent|50\n"

    assert positions(queue, mine) == {("9", None): 3}  # 7 (higher priority) and 8 (same, older)


def test_a_runs_job_reads_in_one_line_in_its_reports() -> None:
    from remote_exec.workspace.export import job_fact

    job = {"scheduler": "slurm", "job_id": "42", "state": "TIMEOUT", "nodes": "c1", "partition": "debug",
           "elapsed": "00:01:04", "max_rss_kib": 22600, "states": ["NODE_FAIL", "TIMEOUT"], "seen": ["RUNNING"]}

    assert job_fact(job) == ("slurm job 42: TIMEOUT on c1 (debug), elapsed 00:01:04, MaxRSS 22 MiB; "
                             "states NODE_FAIL, TIMEOUT")
    assert job_fact(None) is None
