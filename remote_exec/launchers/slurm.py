"""The Slurm launcher: calls become ``sbatch`` jobs submitted through the cluster's login node.

Selected by ``scheduler = "slurm"`` on a remote (its settings in ``slurm = {...}``), by
``rx run --slurm "OPTIONS"`` or by ``@task(slurm={...})``::

    [tool.rx.remotes.cluster]
    host = "login1"
    scheduler = "slurm"
    slurm = { partition = "gpu", time = "1:00:00", gres = "gpu:1", mem = "16G", account = "lab",
              extra = ["--constraint=a100"], signal = "B:USR2@120", requeue = true }

The login node is an ordinary rx host: the archive is installed and each call stored in its run directory
there (the runner's ``prepare``), on the shared filesystem the compute nodes see. :meth:`SlurmLauncher.submit`
then writes the job's script into the run directory and runs ``sbatch --parsable`` with every option as a
word of its own command line (quoted by the backend as every remote command is, so nothing the user wrote
is ever read by a shell, and sbatch parses nothing but its argv); the script execs the runner's ``batch``
mode: the job's own process is the call's supervisor. Options rx owns (where the output goes, the working
directory, the array) are refused with the reason.

Polling (:meth:`SlurmLauncher.poll`) asks ``squeue`` about every followed job of a cluster in one command
(live states and pending reasons; the pending queue of their partitions only while one waits, for its
position) and, once for each job that ended or left the queue, accounting (``sacct``: every attempt,
exit code, elapsed, MaxRSS, who cancelled) or, where accounting does not answer, ``scontrol``. Whether
accounting answers is probed once per cluster.
"""

from __future__ import annotations

import secrets
import shlex
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ..backends.base import Backend, Process
from ..errors import ConfigError, RunnerError
from .base import Launcher
from .jobs import ENDED, GONE, PENDING, Job, JobKey, JobRequest, JobState, Verdict
from .slurm_states import (
    ACCT_FIELDS,
    REQUEUEABLE,
    SQUEUE_FORMAT,
    ids_of,
    merge,
    parse_sacct,
    parse_scontrol,
    parse_squeue,
    positions,
    verdict_for,
)

__all__ = ["SlurmLauncher", "SlurmSettings", "slurm_settings"]

#: Settings of ``slurm = {...}`` and their types (``args`` are ``rx run --slurm`` words).
_KEYS: dict[str, type | tuple[type, ...]] = {
    "partition": str, "time": (str, int), "gres": str, "mem": str, "account": str, "qos": str,
    "cpus_per_task": int, "extra": list, "args": list, "signal": str, "requeue": bool,
    "poll_interval": (int, float), "poll_max": (int, float),
}
#: sbatch options rx sets itself, and why the user may not.
_OWNED = {name: why for names, why in (
    (("--output", "-o", "--error", "-e"), "rx keeps the job's log in the run directory"),
    (("--input", "-i"), "the task's stdin is /dev/null"),
    (("--wrap",), "rx writes the job's script"),
    (("--parsable",), "rx reads sbatch's answer itself"),
    (("--array", "-a"), "arrays come from a map of calls"),
    (("--chdir", "-D"), "the task runs in its own run directory"),
    (("--wait", "-W"), "rx follows the job itself"),
    (("--test-only",), "rx submits real jobs"),
    (("--open-mode",), "rx appends a requeued job's output"),
) for name in names}
DEFAULT_SIGNAL = "B:USR2@60"
_SUBMIT = """\
set -e
script=$1; shift
umask 077
cat > "$script"
chmod 700 "$script"
date +%s
exec "$@" "$script"
"""
_POLL = """\
export SLURM_TIME_FORMAT=%s
squeue -h -r -t all -j "$1" -o "$2" 2>&1; echo "@@rx squeue $?"
if [ -n "$3" ]; then squeue -h -t PD -p "$3" -o '%i|%P|%Q' 2>/dev/null; fi
echo "@@rx queue"
if [ -n "$4" ]; then id -u; sacct -n -X -j 1 -o JobID >/dev/null 2>&1; echo "acct $?"; fi
"""
_FINAL_ACCT = 'SLURM_TIME_FORMAT=%s exec sacct -n -P -D -j "$1" --format="$2"'
_FINAL_SCONTROL = 'export SLURM_TIME_FORMAT=%s; for j in $1; do scontrol -o show job "$j" 2>/dev/null; done; true'


class SlurmSettings:
    """The settings of one submission: the remote's ``slurm`` table under the call's own.

    Attributes:
        words: sbatch options in the order given (the table's, then ``extra``, then ``--slurm``'s).
        requeue: The job may be requeued (``requeue = true`` or ``--requeue``).
        signal: The warning signal (``--signal``), None when the user's own options set one.
        poll_interval: The shortest interval between polls (seconds).
        poll_max: The longest interval between polls, reached while nothing changes.
    """

    def __init__(self, words: list[str], requeue: bool, signal: str | None, poll_interval: float,
                 poll_max: float) -> None:
        self.words = words
        self.requeue = requeue
        self.signal = signal
        self.poll_interval = poll_interval
        self.poll_max = poll_max


def _checked_types(options: Mapping[str, Any]) -> None:
    for key, value in options.items():
        expected = _KEYS.get(key)
        if expected is None:
            raise ConfigError(f"slurm: unknown setting {key!r}", hint=f"known: {', '.join(sorted(_KEYS))}")
        if not isinstance(value, expected) or isinstance(value, bool) != (expected is bool):
            raise ConfigError(f"slurm: {key} = {value!r} is not a {getattr(expected, '__name__', 'number')}")
        if isinstance(value, list) and not all(isinstance(word, str) for word in value):
            raise ConfigError(f"slurm: {key} must be a list of strings (one sbatch word each)")


def _refused(word: str) -> str | None:
    """Why rx refuses the sbatch word ``word`` (None: it passes through)."""
    if "\n" in word or "\0" in word:
        return "an sbatch option cannot span lines"
    name = word.split("=", 1)[0]
    if name in _OWNED:
        return _OWNED[name]
    if len(word) > 2 and word[0] == "-" and word[1] != "-" and word[:2] in _OWNED:
        return _OWNED[word[:2]]  # -ofile
    return None


def slurm_settings(options: Mapping[str, Any]) -> SlurmSettings:
    """The checked settings of ``options`` (a ``slurm`` table, ``args`` the words of ``--slurm``).

    Raises:
        ConfigError: An unknown setting, a value of the wrong type, or an option rx owns.
    """
    _checked_types(options)
    words = [f"--{key.replace('_', '-')}={options[key]}" for key in
             ("partition", "time", "gres", "mem", "account", "qos", "cpus_per_task") if key in options]
    words += [str(word) for key in ("extra", "args") for word in options.get(key, ())]
    for word in words:
        why = _refused(word)
        if why is not None:
            raise ConfigError(f"slurm: {word!r} is rx's to set: {why}", hint="leave it out")
    requeue = bool(options.get("requeue", False))
    for word in words:
        if word in ("--requeue", "--no-requeue"):
            requeue = word == "--requeue"
    own_signal = any(word.startswith("--signal") for word in words)
    signal = None if own_signal else str(options.get("signal") or DEFAULT_SIGNAL)
    interval = float(options.get("poll_interval", 1.0))
    slowest = float(options.get("poll_max", 30.0))
    if not 0.05 <= interval <= slowest:
        raise ConfigError(f"slurm: poll_interval {interval:g} must be at least 0.05 and at most poll_max {slowest:g}")
    return SlurmSettings(words, requeue, signal, interval, slowest)


def _script(request: JobRequest, sbatch: Sequence[str], requeue: bool) -> str:
    """The job's script: the runner's command, quoted word by word; the options are on sbatch's own
    command line (copied here as a comment, for a reader)."""
    return ("#!/bin/sh\n"
            f"# rx: {' '.join(request.name.split())}\n"
            f"# submitted with: {' '.join(shlex.join(sbatch).split())} <this script>\n"
            'export RX_JOB_ID="${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}"\n'
            'export RX_ARRAY_INDEX="${SLURM_ARRAY_TASK_ID:-}"\n'
            'export RX_JOB_ATTEMPT="${SLURM_RESTART_COUNT:-0}"\n'
            f"export RX_JOB_REQUEUE={1 if requeue else 0}\n"
            f"exec {shlex.join(request.argv)}\n")


class SlurmLauncher(Launcher):
    """Submits calls to Slurm through the login node (see the module docstring)."""

    name = "slurm"
    schedules = True

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        self.settings = slurm_settings(self.options)

    def start(self, backend: Backend, argv: Sequence[str]) -> Process:
        """The runner's helpers run on the login node, over its connection."""
        return backend.start(argv)

    def check_options(self, options: Mapping[str, Any]) -> None:
        slurm_settings({**self.options, **options})

    # -- submit ----------------------------------------------------------------------------------------

    def sbatch_argv(self, request: JobRequest, settings: SlurmSettings) -> list[str]:
        """``sbatch`` and its options for ``request`` (rx's first; the user's after them win where sbatch
        lets the last of two win, e.g. ``--job-name``)."""
        private = f"{request.run_dir}/.rx"
        argv = ["sbatch", "--parsable", f"--job-name=rx:{request.name}"[:120], f"--chdir={request.run_dir}",
                "--open-mode=append", "--requeue" if settings.requeue else "--no-requeue"]
        if request.array:
            base = request.run_dir.removesuffix("-0")
            throttle = f"%{request.parallel}" if request.parallel else ""
            argv += [f"--array=0-{request.array - 1}{throttle}", f"--output={base}-%a/.rx/slurm-%A_%a.out"]
        else:
            argv.append(f"--output={private}/slurm-%j.out")
        if settings.signal:
            argv.append(f"--signal={settings.signal}")
        return argv + settings.words

    def submit(self, backend: Backend, request: JobRequest) -> Job:
        settings = slurm_settings({**self.options, **request.options})
        sbatch = self.sbatch_argv(request, settings)
        script = f"{request.run_dir}/.rx/job.sh"
        result = backend.run(["sh", "-c", _SUBMIT, "sh", script, *sbatch],
                             stdin=_script(request, sbatch, settings.requeue).encode(), timeout=60)
        lines = result.stdout.decode("utf-8", "replace").split()
        if result.failed or len(lines) < 2 or not lines[0].isdigit():
            said = result.stderr.decode("utf-8", "replace").strip().splitlines()
            raise RunnerError(f"sbatch on {backend.host} refused the job: {said[-1] if said else 'no reason given'}",
                              reason="submit", host=backend.host, hint="check the --slurm options and the partition")
        job_id = lines[1].split(";")[0]
        log = f"slurm-{job_id}_{{index}}.out" if request.array else f"slurm-{job_id}.out"
        return Job(scheduler=self.name, job_id=job_id, submitted=float(lines[0]), workdir=request.run_dir,
                   requeue=settings.requeue, array=request.array, log=log,
                   details={"sbatch": sbatch, "script": script})

    # -- poll ------------------------------------------------------------------------------------------

    def poll(self, backend: Backend, jobs: Sequence[Job], previous: Mapping[JobKey, JobState],
             memo: dict[str, Any]) -> dict[JobKey, JobState]:
        pending = sorted({state.partition for state in previous.values()
                          if state.phase == PENDING and state.partition})
        probe = "accounting" not in memo
        result = backend.run(["sh", "-c", _POLL, "sh", ids_of(jobs), SQUEUE_FORMAT, ",".join(pending),
                              "probe" if probe else ""], timeout=60)
        text = result.stdout.decode("utf-8", "replace")
        live_text, _, rest = text.partition("@@rx squeue ")
        code, _, rest = rest.partition("\n")
        if code.strip() != "0" and "Invalid job id" not in live_text:
            raise RunnerError(f"squeue on {backend.host} failed: {live_text.strip()[-200:] or result.tail()}",
                              reason="poll", host=backend.host)
        queue_text, _, probe_text = rest.partition("@@rx queue")
        if probe:
            words = probe_text.split()
            memo["uid"] = words[0] if words else None
            memo["accounting"] = "acct 0" in probe_text
        live = parse_squeue(live_text, jobs)
        places = positions(queue_text, live)
        for key, place in places.items():
            live[key] = _with(live[key], position=place)
        return self._with_final(backend, jobs, live, previous, memo)

    def _with_final(self, backend: Backend, jobs: Sequence[Job], live: dict[JobKey, JobState],
                    previous: Mapping[JobKey, JobState], memo: dict[str, Any]) -> dict[JobKey, JobState]:
        """``live`` with accounting's word on the elements that ended since the last poll or left the queue
        (asked once per element); an element nobody knows any more is gone."""
        states = dict(live)
        for key, state in previous.items():  # what accounting said of an element that stays ended
            if state.info.get("final") and (key not in live or live[key].phase == ENDED):
                states[key] = state
        unsettled = _unsettled(jobs, live, states)
        asked = [job for job in jobs if any(key[0] == job.job_id for key in unsettled)]
        final = self._final(backend, asked, memo) if asked else {}
        if final is None:  # accounting did not answer this time: ask again at the next poll
            return _annotated(states, jobs, memo.get("uid"))
        states = merge(states, final)
        for key in unsettled:
            if key not in states:
                states[key] = _missing(key, previous.get(key))
        return _annotated(states, jobs, memo.get("uid"))

    def _final(self, backend: Backend, jobs: Sequence[Job], memo: dict[str, Any]) -> dict[JobKey, JobState] | None:
        """What accounting (or, without it, the controller) says of ``jobs``; None if it did not answer."""
        if memo.get("accounting"):
            result = backend.run(["sh", "-c", _FINAL_ACCT, "sh", ids_of(jobs), ACCT_FIELDS], timeout=60)
            if result.failed:
                return None
            return parse_sacct(result.stdout.decode("utf-8", "replace"), jobs)
        result = backend.run(["sh", "-c", _FINAL_SCONTROL, "sh", ids_of(jobs).replace(",", " ")], timeout=60)
        return None if result.failed else parse_scontrol(result.stdout.decode("utf-8", "replace"), jobs)

    def poll_intervals(self) -> tuple[float, float]:
        return (self.settings.poll_interval, self.settings.poll_max)

    def verdict(self, job: Job, state: JobState) -> Verdict | None:
        return verdict_for(job, state)

    # -- cancel, describe ------------------------------------------------------------------------------

    def cancel_jobs(self, backend: Backend, jobs: Sequence[Job]) -> None:
        if not jobs:
            return
        result = backend.run(["scancel", *sorted({job.job_id for job in jobs})], timeout=60)
        if result.failed and "already completing or completed" not in result.stderr.decode("utf-8", "replace"):
            raise RunnerError(f"scancel on {backend.host} failed: {result.tail() or 'no reason given'}",
                              reason="cancel", host=backend.host)

    def describe(self, backend: Backend, workdir: str) -> dict[str, Any]:
        """Slurm's version, the partitions (availability, time limit, nodes idle/total), whether accounting
        answers, and whether a job sees the login node's home (a probe job writes a file there)."""
        result = backend.run(["sh", "-c", _DESCRIBE, "sh"], timeout=60)
        text = result.stdout.decode("utf-8", "replace")
        if result.failed or "@@rx" not in text:
            raise RunnerError(f"sinfo on {backend.host} failed: {result.tail() or 'is Slurm installed there?'}",
                              reason="describe", host=backend.host)
        facts = _described(text)
        facts["shared_home"] = self._probe_shared(backend, workdir)
        return facts

    def _probe_shared(self, backend: Backend, workdir: str) -> dict[str, Any]:
        token = secrets.token_hex(6)
        settings = slurm_settings(self.options)
        sbatch = ["sbatch", "--parsable", "--wait", f"--job-name=rx-probe-{token}", "--output=/dev/null",
                  "--time=1", *[word for word in settings.words if not word.startswith("--time")],
                  f"--wrap=hostname > .rx-probe-{token}"]
        result = backend.run(["sh", "-c", _PROBE, "sh", workdir, token, *sbatch], timeout=90)
        lines = result.stdout.decode("utf-8", "replace").split()
        if "@@seen" in lines:
            node = lines[lines.index("@@seen") + 1] if len(lines) > lines.index("@@seen") + 1 else "?"
            return {"shared": True, "node": node}
        if "@@timeout" in lines:
            return {"shared": None, "reason": "the probe job did not run within 60 s (still pending: cancelled)"}
        return {"shared": False, "reason": result.stderr.decode("utf-8", "replace").strip()[-200:]
                or "the probe job's file did not appear on the login node"}


_UNKNOWN = JobState(index=None, state="", phase=PENDING)


#: Seconds an element must stay unknown to squeue and to accounting before it counts as gone (accounting
#: may lag behind a job that just left the queue, an array's elements more).
GONE_AFTER = 20.0


def _missing(key: JobKey, previous: JobState | None) -> JobState:
    """An element neither squeue nor accounting knows: gone once that lasted :data:`GONE_AFTER` seconds;
    until then, what was known of it."""
    now = time.time()
    since = float((previous.info.get("missing_since") if previous else None) or now)
    if now - since >= GONE_AFTER:
        return JobState(index=key[1], state="", phase=GONE, info={"final": True})
    if previous is None:
        return JobState(index=key[1], state="", phase=PENDING, info={"missing_since": since, "final": False})
    return _with(previous, info={**previous.info, "missing_since": since})


def _unsettled(jobs: Sequence[Job], live: Mapping[JobKey, JobState], states: Mapping[JobKey, JobState]) -> list[JobKey]:
    """The elements that ended or left the queue, of which accounting has not had its last word yet."""
    return [key for job in jobs for key in _keys(job)
            if not states.get(key, _UNKNOWN).info.get("final") and (key not in live or live[key].phase == ENDED)]


def _keys(job: Job) -> list[JobKey]:
    """The elements of ``job``: (id, None), or (id, index) for each index of an array."""
    if not job.array:
        return [(job.job_id, None)]
    return [(job.job_id, index) for index in range(job.array)]

_DESCRIBE = """\
sinfo --version 2>&1
echo @@rx
sinfo -h -o '%P|%a|%l|%F' 2>&1
echo @@rx
sacct -n -X -j 1 -o JobID >/dev/null 2>&1; echo "acct $?"
"""
_PROBE = """\
dir=$1; token=$2; shift 2
case $dir in "~/"*) dir="$HOME/${dir#"~/"}";; "~") dir=$HOME;; esac
mkdir -p "$dir"
path="$dir/.rx-probe-$token"
if timeout 60 "$@" --chdir="$dir" >/dev/null; then
  if [ -s "$path" ]; then echo @@seen; cat "$path"; rm -f "$path"; else echo @@missing; fi
else
  scancel --name="rx-probe-$token" 2>/dev/null; echo @@timeout
fi
"""


def _described(text: str) -> dict[str, Any]:
    version, _, rest = text.partition("@@rx")
    partitions_text, _, acct = rest.partition("@@rx")
    partitions = []
    for line in partitions_text.strip().splitlines():
        fields = line.split("|")
        if len(fields) == 4:
            counts = fields[3].split("/")  # allocated/idle/other/total
            partitions.append({"name": fields[0].rstrip("*"), "default": fields[0].endswith("*"),
                               "available": fields[1], "time_limit": fields[2],
                               "idle_nodes": int(counts[1]) if len(counts) == 4 and counts[1].isdigit() else None,
                               "nodes": int(counts[3]) if len(counts) == 4 and counts[3].isdigit() else None})
    return {"scheduler": "slurm", "version": (version.split() or ["?"])[-1],
            "partitions": partitions, "accounting": "acct 0" in acct}


def _annotated(states: dict[JobKey, JobState], jobs: Sequence[Job], uid: str | None) -> dict[JobKey, JobState]:
    """Mark who cancelled (you?), and which ended elements Slurm may still requeue (they asked for it)."""
    requeue = {job.job_id for job in jobs if job.requeue}
    for key, state in states.items():
        extra: dict[str, Any] = {}
        if uid is not None and state.info.get("cancelled_by") == uid:
            extra["cancelled_by_you"] = True
        if state.phase == ENDED and key[0] in requeue and state.state in REQUEUEABLE:
            extra["may_requeue"] = True
        if extra and any(state.info.get(name) != value for name, value in extra.items()):
            states[key] = _with(state, info={**state.info, **extra})
    return states


def _with(state: JobState, **changes: Any) -> JobState:
    from dataclasses import replace

    return replace(state, **changes)


def job_summary(state: JobState) -> str:
    """One line for a status display: ``pending (Resources), position 2`` or ``running on c1``."""
    if state.phase == PENDING:
        text = f"pending ({state.reason})" if state.reason else "pending"
        return text + (f", position {state.position} in {state.partition}" if state.position else "")
    if state.phase == ENDED:
        return state.state.lower()
    if state.phase == GONE:
        return "gone from the queue"
    return f"{state.state.lower()} on {state.nodes}" if state.nodes else state.state.lower()
