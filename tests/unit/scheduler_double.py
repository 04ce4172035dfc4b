"""A batch scheduler that lives outside rx, as a plug-in would: it exists for rx only once
``remote_exec.launchers.register_launcher("queue", "scheduler_double:QueueLauncher")`` has run.

Its "cluster" is this machine: a submitted job is the runner's ``batch`` command started at once as a
local process per array element (the job's environment as a real script exports it), its state what that
process did. A test can make the scheduler forget a job (it vanishes) or hold it pending.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from remote_exec.backends.base import Backend, Process
from remote_exec.launchers.base import Launcher
from remote_exec.launchers.jobs import ENDED, GONE, PENDING, RUNNING, Job, JobKey, JobRequest, JobState, Verdict

__all__ = ["TARGET", "QueueLauncher"]

TARGET = "scheduler_double:QueueLauncher"
"""Where the registry finds it (``tests/unit`` is on sys.path while the unit tests run)."""


class QueueLauncher(Launcher):
    """Runs each submitted job's elements as local processes; polls them; cancels them with SIGTERM.

    Attributes (class-wide, for the tests to look at and steer):
        processes: Job id -> the element processes.
        cancelled: Ids of the jobs cancelled.
        forgotten: Ids of the jobs the scheduler no longer knows.
        held: Ids of the jobs held pending (submitted, not started: a test starts them with release).
        polls: How many polls ran.
    """

    name: ClassVar[str] = "queue"
    schedules: ClassVar[bool] = True
    processes: ClassVar[dict[str, list[subprocess.Popen[bytes]]]] = {}
    requests: ClassVar[dict[str, JobRequest]] = {}
    cancelled: ClassVar[set[str]] = set()
    forgotten: ClassVar[set[str]] = set()
    held: ClassVar[set[str]] = set()
    polls: ClassVar[int] = 0
    _ids = itertools.count(100)

    @classmethod
    def reset(cls) -> None:
        for processes in cls.processes.values():
            for process in processes:
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        cls.processes.clear()
        cls.requests.clear()
        cls.cancelled.clear()
        cls.forgotten.clear()
        cls.held.clear()
        cls.polls = 0

    def start(self, backend: Backend, argv: Sequence[str]) -> Process:
        return backend.start(argv)

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Takes any per-call options."""

    def poll_intervals(self) -> tuple[float, float]:
        return (0.05, 0.2)

    def submit(self, backend: Backend, request: JobRequest) -> Job:
        job_id = str(next(self._ids))
        self.requests[job_id] = request
        self.processes[job_id] = []
        if request.options.get("hold"):
            self.held.add(job_id)
        else:
            self._run(job_id)
        return Job(scheduler=self.name, job_id=job_id, submitted=time.time(), workdir=request.run_dir,
                   array=request.array, log="double.out")

    @classmethod
    def _run(cls, job_id: str) -> None:
        request = cls.requests[job_id]
        for index in range(max(request.array, 1)):
            run_dir = request.argv[-1].replace("{index}", str(index))
            env = {**os.environ, "RX_JOB_ID": job_id, "RX_ARRAY_INDEX": str(index) if request.array else "",
                   "RX_JOB_ATTEMPT": "0", "RX_JOB_REQUEUE": "0"}
            with open(os.path.join(run_dir, ".rx", "double.out"), "ab") as log:
                cls.processes[job_id].append(subprocess.Popen(list(request.argv), env=env, stdin=subprocess.DEVNULL,
                                                              stdout=log, stderr=log, start_new_session=True))

    @classmethod
    def release(cls, job_id: str) -> None:
        """Start a held job."""
        cls.held.discard(job_id)
        cls._run(job_id)

    def poll(self, backend: Backend, jobs: Sequence[Job], previous: Mapping[JobKey, JobState],
             memo: dict[str, Any]) -> dict[JobKey, JobState]:
        type(self).polls += 1
        states: dict[JobKey, JobState] = {}
        for job in jobs:
            for index in range(max(job.array, 1)):
                key = (job.job_id, index if job.array else None)
                states[key] = self._state(job, key)
        return states

    def _state(self, job: Job, key: JobKey) -> JobState:
        if job.job_id in self.forgotten:
            return JobState(index=key[1], state="", phase=GONE, info={"final": True})
        if job.job_id in self.held:
            return JobState(index=key[1], state="PENDING", phase=PENDING, reason="Held", position=1)
        process = self.processes[job.job_id][key[1] or 0]
        code = process.poll()
        if code is None:
            return JobState(index=key[1], state="RUNNING", phase=RUNNING, nodes="local")
        if job.job_id in self.cancelled:
            return JobState(index=key[1], state="CANCELLED", phase=ENDED, info={"final": True})
        return JobState(index=key[1], state="COMPLETED" if code == 0 else "FAILED", phase=ENDED,
                        info={"final": True, "exit_code": f"{code}:0"})

    def verdict(self, job: Job, state: JobState) -> Verdict | None:
        if state.phase == GONE:
            return Verdict("lost", 3, f"the queue forgot job {job.job_id}")
        if state.state == "CANCELLED":
            return Verdict("cancelled", 130, f"job {job.job_id} was cancelled")
        return None

    def cancel_jobs(self, backend: Backend, jobs: Sequence[Job]) -> None:
        for job in jobs:
            self.cancelled.add(job.job_id)
            for process in self.processes.get(job.job_id, []):
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGTERM)

    @classmethod
    def kill(cls, job_id: str) -> None:
        """SIGKILL the job's processes, runner and task alike (a node that died under it)."""
        import json

        request = cls.requests[job_id]
        for index, process in enumerate(cls.processes[job_id]):
            status = os.path.join(request.argv[-1].replace("{index}", str(index)), ".rx", "status.json")
            with open(status) as stream:
                task = json.load(stream).get("task_pid")
            for group in (task, process.pid):
                if group:
                    try:
                        os.killpg(group, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            process.wait()
