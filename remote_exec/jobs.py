"""The coordinator's calls through batch schedulers (a launcher that :attr:`~Launcher.schedules`).

:class:`Jobs` belongs to the process's :class:`~remote_exec.coordinator.Coordinator` (its ``jobs``): it
keeps one :class:`~remote_exec.protocol.jobs.JobWatch` per cluster (every job this process follows there,
polled together), submits calls (:func:`~remote_exec.protocol.scheduled.store_and_submit`), follows them
to their result while telling the call's recorder and the CLI's status line what the scheduler says,
decides what Ctrl-C does to a job (cancel it and bring back what it left, or leave it to ``rx attach``),
and runs arrays.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, ConnectError, Interrupted
from .launchers.jobs import Job, JobState
from .packing import DistributionArchive
from .protocol.jobs import JobWatch
from .protocol.options import Outcome, OutputSink, ProjectCall, root_of
from .protocol.scheduled import (
    ElementSinks,
    JobCallback,
    collect_array,
    element_key,
    follow_job,
    seal,
    store_and_submit,
)
from .session import Result, Session
from .workspace.recorder import CallRecorder

if TYPE_CHECKING:
    from .coordinator import Coordinator, Target

__all__ = ["Jobs", "job_options"]

logger = logging.getLogger(__name__)


def job_options(options: dict[str, Any]) -> dict[str, Any]:
    """A call's own scheduler settings (``@task(slurm={...})``, ``rx run --slurm "..."``), over the remote's."""
    own = dict(options.get("slurm") or {})
    words = [*own.pop("args", ()), *(options.get("slurm_args") or ())]
    if words:
        own["args"] = words
    return own


class _Counted:
    """An output sink that counts the bytes it passed on (where a second follow of the same run starts)."""

    def __init__(self, sink: OutputSink) -> None:
        self.sink = sink
        self.count = 0

    def __call__(self, data: bytes) -> None:
        self.count += len(data)
        self.sink(data)


class Jobs:
    """A coordinator's jobs: one watch per cluster, and the calls that follow them.

    Attributes:
        coordinator: The coordinator it belongs to (targets, archives, task records).
    """

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator
        self._lock = threading.Lock()
        self._watches: dict[tuple[Any, ...], JobWatch] = {}

    def watch(self, target: Target) -> JobWatch:
        """The one watch over ``target``'s cluster: every job this process follows there, polled together."""
        key = (target.backend_name, target.spec or target.host)
        with self._lock:
            watch = self._watches.get(key)
            if watch is None or watch.backend is not target.backend:
                if watch is not None:
                    watch.close()
                fastest, slowest = target.launcher.poll_intervals()
                watch = self._watches[key] = JobWatch(target.backend, target.launcher, fastest=fastest,
                                                      slowest=slowest)
            return watch

    def run(self, session: Session, target: Target, archive: DistributionArchive, recorder: CallRecorder,
            project: ProjectCall | None = None) -> Outcome:
        """Submit ``session`` as a job on ``target``'s cluster (in a snapshot of ``project``'s tree) and
        follow it to its result."""
        detached = self.submit(session, target, archive, recorder, project)
        recorder.submitted(detached)
        outcome = self.follow(session, target, detached, recorder, interrupt="cancel")
        if detached.get("synced"):  # the project's blobs this job's submission sent
            outcome.synced = (int(detached["synced"][0]), int(detached["synced"][1]))
        return outcome

    @staticmethod
    def submit(session: Session, target: Target, archive: DistributionArchive, recorder: CallRecorder,
               project: ProjectCall | None = None) -> dict[str, Any]:
        """Store ``session`` (and ``project``'s tree) on the cluster and submit it as one job; return where it
        is (its ``detached``)."""
        return store_and_submit([session], target.backend, archive, target.options, launcher=target.launcher,
                                job_options=job_options(dict(session.context.get("options") or {})),
                                name=session.task.name, on_phase=recorder.phase, project=project,
                                on_progress=session.local.get("on_progress"))[0]

    def follow(self, session: Session, target: Target, detached: dict[str, Any], recorder: CallRecorder, *,
               offsets: tuple[int, int] = (0, 0), interrupt: str = "cancel") -> Outcome:
        """Follow a submitted call to its result (see :func:`~remote_exec.protocol.scheduled.follow_job`).

        ``interrupt``: what Ctrl-C does to the job: ``cancel`` it (after which what it left is collected),
        or ``leave`` it running (``rx attach``, or a run started with ``keep_queued``).
        """
        on_state = self._job_listener(recorder, session.local.get("on_job"))
        stdout, stderr = _Counted(recorder.stdout), _Counted(recorder.stderr)
        recorder.phase("execute", "started")
        try:
            outcome, record = follow_job(session, target.backend, detached, target.options,
                                         launcher=target.launcher, watch=self.watch(target),
                                         on_stdout=stdout, on_stderr=stderr,
                                         land_file=recorder.land_file, offsets=offsets, on_state=on_state)
        except ConnectError as exc:  # the login node was lost, not the job: it stays the run's
            recorder.phase("execute", "failed")
            session.local["job_left"] = True
            job = detached["job"]
            raise ConnectError(target.host, f"{exc.message.removeprefix(f'{target.host}: ')}; {job['scheduler']} job "
                                            f"{job['job_id']} goes on (rx attach {session.run_id} collects it)",
                               hint=exc.hint) from exc
        except Interrupted:
            recorder.phase("execute", "failed")
            options = dict(session.context.get("options") or {})
            job = detached["job"]
            if interrupt == "leave" or options.get("keep_queued"):
                session.local["job_left"] = True
                raise Interrupted(f"interrupted; {job['scheduler']} job {job['job_id']} goes on "
                                  f"(rx attach {session.run_id} collects it)") from None
            self._cancel_and_collect(session, target, detached, recorder,
                                     (offsets[0] + stdout.count, offsets[1] + stderr.count))
            raise Interrupted(f"interrupted; {job['scheduler']} job {job['job_id']} was cancelled") from None
        recorder.phase("execute", "finished")
        recorder.job(record)
        assert outcome is not None
        return outcome

    @staticmethod
    def _job_listener(recorder: CallRecorder, callback: JobCallback | None) -> JobCallback:
        def heard(job: Job, state: JobState) -> None:
            name = job.job_id if state.index is None else f"{job.job_id}_{state.index}"
            logger.info("%s job %s: %s", job.scheduler, name, state.summary())
            recorder.job({"job_id": name, "scheduler": job.scheduler, **state.summary()})
            if callback is not None:
                callback(job, state)

        return heard

    def _cancel_and_collect(self, session: Session, target: Target, detached: dict[str, Any],
                            recorder: CallRecorder, offsets: tuple[int, int]) -> None:
        """Cancel an interrupted call's job, then bring back what it left (bounded: a few seconds)."""
        job = Job.from_record(detached["job"])
        target.launcher.cancel_jobs(target.backend, [job])
        watch, key = self.watch(target), element_key(detached)
        watch.follow(job)
        try:
            state = watch.wait(key, lambda state: state.ended, 15.0, poke=0.5)
            if state is None or not state.ended:
                return
            seal(target.backend, target.launcher, job, state, detached, target.options)
            _, record = follow_job(session, target.backend, detached, target.options, launcher=target.launcher,
                                   watch=watch, on_stdout=recorder.stdout, on_stderr=recorder.stderr,
                                   land_file=recorder.land_file, offsets=offsets)
            recorder.job(record)
        except Exception:  # the cancel went through; what it left stays on the cluster
            logger.debug("collecting the cancelled job %s failed", job.job_id, exc_info=True)
        finally:
            watch.forget(job)

    # -- arrays ----------------------------------------------------------------------------------------

    def run_array(self, sessions: Sequence[Session], *, parallel: int | None = None) -> list[Result]:
        """Run ``sessions`` (calls of one task, to one scheduler remote) as one job array; their results in
        order.

        Raises:
            ConfigError: The remote has no scheduler.
            Interrupted: Ctrl-C (the array is cancelled).
        """
        if not sessions:
            return []
        target = self.coordinator.resolve_target(sessions[0])
        if not target.launcher.schedules:
            raise ConfigError(f"{target.host} runs calls at once: a job array needs a scheduler remote",
                              hint='set scheduler = "slurm" on the remote')
        recorders = [self.coordinator.task_recorder(session, target, session.to_wire()) for session in sessions]
        try:
            project, warnings = self.coordinator.project_for(sessions[0])  # one task's calls: one project
            for warning in warnings:
                logger.warning("%s", warning)
            archive = self.coordinator.archive_for(sessions[0], project=project is not None)
            records = store_and_submit(sessions, target.backend, archive, target.options, launcher=target.launcher,
                                       job_options=job_options(dict(sessions[0].context.get("options") or {})),
                                       name=f"{sessions[0].task.name}[{len(sessions)}]", parallel=parallel,
                                       on_phase=recorders[0].phase, project=project,
                                       on_progress=sessions[0].local.get("on_progress"))
        except BaseException as exc:
            for recorder in recorders:
                recorder.failed(exc)
            raise
        for recorder, record in zip(recorders, records, strict=True):
            recorder.submitted(record)
        try:
            outcomes = collect_array(sessions, target.backend, records, target.options, launcher=target.launcher,
                                     watch=self.watch(target),
                                     sinks=[ElementSinks(r.stdout, r.stderr, r.land_file) for r in recorders])
        except KeyboardInterrupt:
            target.launcher.cancel_jobs(target.backend, [Job.from_record(records[0]["job"])])
            for recorder in recorders:
                recorder.failed(Interrupted("interrupted; the array was cancelled"))
            raise Interrupted(f"interrupted; {target.launcher.name} job {records[0]['job']['job_id']} "
                              "was cancelled") from None
        return [self._array_result(session, target, recorder, outcome, archive, project)
                for session, recorder, outcome in zip(sessions, recorders, outcomes, strict=True)]

    def _array_result(self, session: Session, target: Target, recorder: CallRecorder,
                      outcome: Outcome | BaseException, archive: DistributionArchive,
                      project: ProjectCall | None) -> Result:
        if isinstance(outcome, BaseException):
            recorder.failed(outcome)
            return Result(status="error", exit_code=3, detail=str(outcome), host=target.host)
        self.coordinator.localize(session, outcome, archive.sources, recorder, python=target.options.python,
                                  project=root_of(project))
        recorder.job(outcome.header.get("job") or {})
        recorder.finished(result=outcome.result, phases=outcome.phases,
                          value=lambda: self.coordinator.recorded_value(session, target, outcome))
        return outcome.result

    # -- detached runs ---------------------------------------------------------------------------------

    def follow_output(self, target: Target, detached: dict[str, Any], *, on_stdout: OutputSink,
                      on_stderr: OutputSink, offsets: tuple[int, int]) -> None:
        """Stream a submitted run's output until its job ends (``rx logs -f``; collecting nothing)."""
        follow_job(None, target.backend, detached, target.options, launcher=target.launcher,
                   watch=self.watch(target), on_stdout=on_stdout, on_stderr=on_stderr, offsets=offsets)

    @staticmethod
    def cancel(target: Target, detached: dict[str, Any]) -> dict[str, Any]:
        """Ask the scheduler to cancel a submitted run's job (``rx cancel``; ``rx attach`` collects it)."""
        job = Job.from_record(detached["job"])
        target.launcher.cancel_jobs(target.backend, [job])
        return {"job_id": job.job_id, "cancel": "requested"}

    def close(self) -> None:
        """Stop polling (the jobs go on: ``rx attach`` collects them)."""
        with self._lock:
            watches = list(self._watches.values())
            self._watches.clear()
        for watch in watches:
            watch.close()
