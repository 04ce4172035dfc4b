"""Calls through a batch scheduler: stored on the login node, submitted as one job (or one array), followed
from their files, sealed when the scheduler ends them, collected exactly like a detached run.

    store     the project's tree stored on the login node first (``sync``: only the blobs it lacks travel),
              then the runner's ``prepare``: each call's session and options in its own run directory on
              the shared filesystem (the archive installed there as for any call); the job's runner makes
              the run directory the snapshot of the tree when it starts
    submit    the launcher turns the runner's ``batch RUN_DIR`` into a job (Launcher.submit)
    follow    ``attach RUN_DIR collect`` on the login node streams the job's output from the run's files
              and sends its result when the runner in the allocation says it is done; meanwhile the
              cluster's :class:`~.jobs.JobWatch` polls the scheduler for all followed jobs at once
    seal      when the scheduler says a job is over and its runner did not end the run (it was stopped:
              a cancel, a time limit, a preemption, a node failure; or it never started), the runner's
              ``seal`` ends it with the launcher's verdict, and ``attach`` sends what is there
    settle    when the scheduler ended the job, its verdict says how the call ended (timeout,
              cancelled, oom, preempted, node_fail, lost); a job that completed or failed keeps the
              task's own outcome (value, exception, exit code)

Nothing here waits on a time limit of its own: a job may wait in the queue for days, and a coordinator
that goes away leaves a run that ``rx attach`` follows and collects later.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from ..backends.base import Backend
from ..errors import ConfigError, RunnerError
from ..launchers.base import Launcher
from ..launchers.jobs import Job, JobKey, JobRequest, JobState, Verdict
from ..packing import DistributionArchive
from ..session import Result, Session
from . import wire
from .bootstrap import find_handshake, new_token, runner_argv, start_runner
from .call import send_session
from .channel import reap
from .detached import attach_detached, follow_detached
from .jobs import JobWatch
from .maintain import sync_tree
from .options import CallOptions, FileLander, Outcome, OutputSink, PhaseCallback, ProgressCallback, ProjectCall

__all__ = ["FINAL_WAIT", "ElementSinks", "JobCallback", "collect_array", "element_key", "follow_job", "job_record",
           "seal", "settle", "store_and_submit", "verdict_of"]

logger = logging.getLogger(__name__)

#: Told of each new state of the job a call waits for (the CLI's status line).
JobCallback = Callable[[Job, JobState], None]
#: Seconds to wait, once the result is in, for the scheduler to say how the job ended (its accounting).
FINAL_WAIT = 5.0
#: Seconds an ended job's state must stay ended before its run is sealed.
SETTLE = 0.5
#: The same for a job that asked to be requeued and ended in a state it may be requeued from.
SETTLE_REQUEUE = 30.0


def _ignore_phase(name: str, state: str) -> None:
    """No phase callback given."""


def store_and_submit(sessions: Sequence[Session], backend: Backend, archive: DistributionArchive,
                     options: CallOptions, *, launcher: Launcher, job_options: Mapping[str, Any],
                     name: str, parallel: int | None = None, on_phase: PhaseCallback | None = None,
                     project: ProjectCall | None = None,
                     on_progress: ProgressCallback | None = None) -> list[dict[str, Any]]:
    """Store ``sessions`` on the host and submit them as one job (an array for more than one). With
    ``project``, its tree is stored on the host first (the blobs it lacks sent), and each call runs in a
    snapshot of it, made by the job's runner when it starts.

    Returns:
        One record per call (in order): what :func:`follow_job` needs (host, run directory, archive,
        interpreter, workdir, the job and the call's index in it); the first also has ``synced`` (blobs,
        bytes) when the project's tree lacked blobs there.

    Raises:
        ConfigError: Secrets were asked for (they never go to the shared filesystem), or an option the
            launcher refuses.
        SyncError: A file of the project changed or vanished while it was sent.
        RunnerError: The host could not store the project or the calls, or the scheduler refused the job.
    """
    if options.secret_env:
        raise ConfigError(f"--secret-env cannot reach a {launcher.name} job: it runs later, on another node, "
                          "from files on the shared filesystem, and rx keeps secrets off the disk",
                          hint="read the secret in the task from a file only you can read (chmod 600) on the "
                               "cluster, or run on a direct remote")
    launcher.check_options(job_options)
    phase = on_phase or _ignore_phase
    token = secrets.token_hex(4)
    base = f"{sessions[0].run_id or 'run'}-{token}"
    names = [base] if len(sessions) == 1 else [f"{base}-{index}" for index in range(len(sessions))]
    synced = _sync(backend, archive, options, launcher, project, on_progress, phase)
    run_dirs = _store(sessions, names, backend, archive, options, launcher, phase, project)
    pattern = run_dirs[0] if len(sessions) == 1 else run_dirs[0].removesuffix("-0") + "-{index}"
    phase("submit", "started")
    try:
        job = launcher.submit(backend, JobRequest(
            argv=tuple(runner_argv(options, archive.sha256, "batch", pattern)), run_dir=run_dirs[0], name=name,
            array=len(sessions) if len(sessions) > 1 else 0, parallel=parallel, options=job_options))
    except BaseException:
        phase("submit", "failed")
        try:  # nothing will run in them
            backend.run(["rm", "-rf", "--", *run_dirs], timeout=60)
        except Exception:
            logger.debug("removing the run directories of a refused job failed", exc_info=True)
        raise
    phase("submit", "finished")
    return [{"host": backend.host, "run_dir": run_dir, "archive": archive.sha256, "archive_path": str(archive.path),
             "python": options.python, "workdir": options.workdir, "job": job.to_record(),
             "index": index if len(sessions) > 1 else None, **({"synced": synced} if synced and not index else {})}
            for index, run_dir in enumerate(run_dirs)]


def _sync(backend: Backend, archive: DistributionArchive, options: CallOptions, launcher: Launcher,
          project: ProjectCall | None, on_progress: ProgressCallback | None, phase: PhaseCallback) -> list[int] | None:
    """Store ``project``'s tree on the host (the blobs it lacks sent); [blobs, bytes] sent, or None."""
    if project is None:
        return None
    report = sync_tree(backend, archive, options, project, launcher=launcher, on_progress=on_progress, on_phase=phase)
    return [report["blobs"], report["bytes"]] if report.get("blobs") else None


def _store(sessions: Sequence[Session], names: Sequence[str], backend: Backend, archive: DistributionArchive,
           options: CallOptions, launcher: Launcher, phase: PhaseCallback,
           project: ProjectCall | None = None) -> list[str]:
    """The runner's ``prepare``: each call stored in the run directory ``names[i]`` (to run in a snapshot
    of ``project``'s tree, stored there already); their paths."""
    channel = start_runner(launcher, backend, archive, options, "prepare", phase)
    run_dirs: list[str] = []

    def prepared(kind: bytes, payload: bytes) -> bool:
        if kind == b"P":
            run_dirs.append(json.loads(payload)["run_dir"])
        return len(run_dirs) == len(sessions)

    try:
        with channel.write_lock:
            for session, run_name in zip(sessions, names, strict=True):
                call = {"run_id": session.run_id or "run", "run_name": run_name, "timeout": options.timeout,
                        "env": dict(options.env), "secret_env": {}, "kind": session.task.kind,
                        "pull": list(options.pull), "no_pull": options.no_pull, "key": "00",
                        "pull_limit": options.pull_limit, **(project.go_options() if project is not None else {})}
                channel.process.write_stdin(wire.encode(b"G", wire.dump_options(call)))
                send_session(channel.process, session.to_wire())
            channel.process.write_stdin(wire.encode(b"Q"))
            channel.process.close_stdin()
        if not channel.pump(prepared, size=65536):
            raise RunnerError(f"storing the calls on {backend.host} failed: "
                              f"{channel.stderr_tail() or 'no reason given'}", host=backend.host)
    finally:
        reap(channel.process, channel.stderr_reader)
    return run_dirs


# -- sealing ---------------------------------------------------------------------------------------------


def verdict_of(launcher: Launcher, job: Job, state: JobState) -> Verdict:
    """The launcher's verdict on an ended element, or (for a job that completed or failed without leaving a
    result: its runner never started, or died with it) an error that says so."""
    verdict = launcher.verdict(job, state)
    if verdict is not None:
        return verdict
    name = job.job_id if state.index is None else f"{job.job_id}_{state.index}"
    code = state.info.get("exit_code")
    return Verdict("error", 3, f"{launcher.name} job {name} ended {state.state or 'without a trace'}"
                               + (f" (exit {code})" if code else "") + " and its runner left no result")


def seal(backend: Backend, launcher: Launcher, job: Job, state: JobState, detached: Mapping[str, Any],
         options: CallOptions) -> dict[str, Any]:
    """End the run of an ended element (its outcome the verdict, if the job left none); return its status."""
    verdict = dict(verdict_of(launcher, job, state).to_record(), log=job.element_log(state.index))
    token = new_token()
    argv = runner_argv(options, str(detached["archive"]), "seal", str(detached["run_dir"]), json.dumps(verdict),
                       token=token)
    result = backend.run(argv, timeout=60)
    answer = find_handshake(result.stdout, token)
    lines = answer.rest.decode("utf-8", "replace").strip().splitlines() if answer is not None else []
    if result.failed or answer is None or answer.word != "HAVE" or not lines:
        raise RunnerError(f"ending the run of job {job.job_id} on {backend.host} failed: "
                          f"{result.tail() or 'no reason given'}", host=backend.host)
    status: dict[str, Any] = json.loads(lines[-1])
    return status


class _Sealer:
    """Seals one followed element's run once the scheduler has said, for long enough, that it ended."""

    def __init__(self, backend: Backend, launcher: Launcher, job: Job, detached: Mapping[str, Any],
                 options: CallOptions) -> None:
        self.backend = backend
        self.launcher = launcher
        self.job = job
        self.detached = detached
        self.options = options
        self.lock = threading.Lock()
        self.timer: threading.Timer | None = None
        self.latest: JobState | None = None
        self.stopped = False

    def update(self, state: JobState) -> None:
        """A new state: (re)arm the timer when it ended, disarm it when it came back (requeued)."""
        with self.lock:
            self.latest = state
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            if state.ended and not self.stopped:
                settle_for = SETTLE_REQUEUE if state.info.get("may_requeue") else SETTLE
                self.timer = threading.Timer(settle_for, self._fire, args=(state,))
                self.timer.daemon = True
                self.timer.start()

    def _fire(self, state: JobState) -> None:
        with self.lock:
            if self.stopped or self.latest is not state:
                return
        try:
            seal(self.backend, self.launcher, self.job, state, self.detached, self.options)
        except Exception:  # the attach goes on; rx attach can seal again later
            logger.warning("could not end the run of job %s on %s", self.job.job_id, self.backend.host, exc_info=True)

    def stop(self) -> None:
        with self.lock:
            self.stopped = True
            if self.timer is not None:
                self.timer.cancel()


# -- following ---------------------------------------------------------------------------------------------


def element_key(detached: Mapping[str, Any]) -> JobKey:
    """The (job id, index) a detached record follows."""
    index = detached.get("index")
    return (str(detached["job"]["job_id"]), None if index is None else int(index))


def follow_job(session: Session | None, backend: Backend, detached: Mapping[str, Any], options: CallOptions, *,
               launcher: Launcher, watch: JobWatch, on_stdout: OutputSink, on_stderr: OutputSink,
               land_file: FileLander | None = None, offsets: tuple[int, int] = (0, 0),
               on_state: JobCallback | None = None) -> tuple[Outcome | None, dict[str, Any]]:
    """Follow a submitted call's output until its run ends, then (with ``session``) collect its result.

    Returns:
        The outcome (None without ``session``: output only, as ``rx logs -f``) with the scheduler's
        verdict settled in, and the job's record (states seen, partition, nodes, elapsed, MaxRSS, ...).

    Raises:
        Interrupted: Ctrl-C (the job goes on: the caller decides whether to cancel it).
        ConnectError: The login node was lost while following.
    """
    job = Job.from_record(detached["job"])
    key = element_key(detached)
    sealer = _Sealer(backend, launcher, job, detached, options)

    def listen(changed: JobKey, state: JobState) -> None:
        if changed == key:
            sealer.update(state)
            if on_state is not None:
                on_state(job, state)

    def heard(event: dict[str, Any]) -> None:
        if event.get("event") == "ended":  # the run waits for the scheduler's word: ask it now
            watch.hurry()

    watch.follow(job, listen)
    try:
        quiet = replace(options, timeout=None)  # the runner in the allocation keeps the call's own timeout
        try:
            if session is None:
                follow_detached(backend, detached, quiet, launcher=launcher, on_stdout=on_stdout,
                                on_stderr=on_stderr, offsets=offsets, on_event=heard)
                outcome = None
            else:
                outcome = attach_detached(session, backend, detached, quiet, launcher=launcher, on_stdout=on_stdout,
                                          on_stderr=on_stderr, land_file=land_file, offsets=offsets, on_event=heard)
        finally:
            sealer.stop()
        final = watch.wait(key, _settled, FINAL_WAIT, poke=0.25)
        record = job_record(job, key, final, watch.seen(key))
    finally:
        watch.forget(job, listen)
    if outcome is not None:
        outcome.header["job"] = record
        if final is not None and final.ended:
            settle(outcome.result, launcher.verdict(job, final))
    return outcome, record


def _settled(state: JobState) -> bool:
    """The scheduler has its last word on the element (ended, and its accounting read)."""
    return state.ended and bool(state.info.get("final", True))


def settle(result: Result, verdict: Verdict | None) -> None:
    """Read the scheduler's verdict into ``result``: when the scheduler ended the job (a time limit, a
    cancel, a preemption, a node failure, out of memory, gone), that is how the call ended, whatever the
    stopped task did with its signal; a job that completed or failed (no verdict) keeps the task's own
    outcome."""
    if verdict is None:
        return
    if result.status in ("finished", "raised") and result.exception_type:
        verdict = replace(verdict, detail=f"{verdict.detail}; the task raised {result.exception_type}: "
                                          f"{result.exception_message}")
    result.status, result.exit_code, result.detail = verdict.status, verdict.exit_code, verdict.detail
    result.value = None
    result.exception = None


def job_record(job: Job, key: JobKey, state: JobState | None, seen: Sequence[str]) -> dict[str, Any]:
    """What the run's record keeps of its job: id, scheduler, states seen, partition, nodes, reason,
    elapsed, MaxRSS, exit code, who cancelled it, requeues, the submission's command line."""
    record: dict[str, Any] = {"scheduler": job.scheduler, "job_id": job.job_id if key[1] is None
                              else f"{job.job_id}_{key[1]}", "seen": list(seen), "requeue": job.requeue,
                              "submitted": job.submitted}
    if key[1] is not None:
        record.update(array_job_id=job.job_id, index=key[1])
    if state is not None:
        record.update(state.summary())
    if job.details.get("sbatch"):
        record["submit_argv"] = list(job.details["sbatch"])
    return record


# -- arrays ------------------------------------------------------------------------------------------------


class ElementSinks:
    """Where one array element's output and files go (its call's recorder)."""

    def __init__(self, on_stdout: OutputSink, on_stderr: OutputSink, land_file: FileLander | None) -> None:
        self.on_stdout = on_stdout
        self.on_stderr = on_stderr
        self.land_file = land_file


def collect_array(sessions: Sequence[Session], backend: Backend, records: Sequence[Mapping[str, Any]],
                  options: CallOptions, *, launcher: Launcher, watch: JobWatch, sinks: Sequence[ElementSinks],
                  workers: int = 8) -> list[Outcome | BaseException]:
    """Collect each element of a submitted array as the scheduler says it ended (no element holds a
    channel while it waits: the watch's one poll covers them all); return each call's outcome, or the
    error that kept it from coming back, in order.

    Raises:
        Interrupted: Ctrl-C (the array goes on; the caller decides whether to cancel it).
    """
    import queue
    from concurrent.futures import ThreadPoolExecutor

    job = Job.from_record(records[0]["job"])
    ended: queue.Queue[tuple[JobKey, JobState]] = queue.Queue()

    def listen(key: JobKey, state: JobState) -> None:
        if state.ended:
            ended.put((key, state))

    results: dict[int, Outcome | BaseException] = {}
    watch.follow(job, listen)
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rx-array") as pool:
            pending: dict[int, Any] = {}
            while len(results) < len(sessions):
                for index in [index for index, future in pending.items() if future.done()]:
                    outcome = _outcome_of(pending.pop(index))
                    if outcome is not None:  # None: requeued; it is collected when it ends again
                        results[index] = outcome
                try:
                    key, state = ended.get(timeout=0.2)
                except queue.Empty:
                    continue
                index = key[1] if key[1] is not None else 0
                if index in results or index in pending or not 0 <= index < len(sessions):
                    continue
                pending[index] = pool.submit(_collect_element, sessions[index], backend, records[index], options,
                                             launcher, watch, job, key, state, sinks[index])
    finally:
        watch.forget(job, listen)
    return [results[index] for index in range(len(sessions))]


def _outcome_of(future: Any) -> Outcome | BaseException | None:
    try:
        outcome: Outcome | None = future.result()
    except BaseException as exc:
        return exc
    return outcome


def _collect_element(session: Session, backend: Backend, detached: Mapping[str, Any], options: CallOptions,
                     launcher: Launcher, watch: JobWatch, job: Job, key: JobKey, state: JobState,
                     sinks: ElementSinks) -> Outcome | None:
    """Seal one ended element (after it stayed ended long enough to rule out a requeue) and collect it;
    None if it was requeued instead."""
    if state.info.get("may_requeue"):
        later = watch.wait(key, lambda now: (now.state, now.phase) != (state.state, state.phase), SETTLE_REQUEUE)
        if later is not None and (later.state, later.phase) != (state.state, state.phase):
            if not later.ended:
                return None
            state = later
    seal(backend, launcher, job, state, detached, options)
    outcome = attach_detached(session, backend, detached, replace(options, timeout=None), launcher=launcher,
                              on_stdout=sinks.on_stdout, on_stderr=sinks.on_stderr, land_file=sinks.land_file)
    outcome.header["job"] = job_record(job, key, state, watch.seen(key))
    settle(outcome.result, launcher.verdict(job, state))
    return outcome
