"""Helpers of the fault-injection suite: an rx "rig" per test, remote audits, and the trial recorder.

Every scenario runs rx the way a user does (``python -m remote_exec`` in a subprocess, or a small driver
script calling ``@task`` functions) against the Docker testbed, breaks something on purpose, and then
checks what a user would notice: that nothing hung, that the error was one clear line, that the workspace
recorded the right status, that nothing was lost or corrupted, and that nothing was left running or lying
around on the remote host.

Each check is recorded as a :class:`Trial` (scenario, backend, outcome, seconds, overrun past its bound and
the measured facts) by the session's :class:`Recorder`, which writes ``tests/faults/.results/results.json``
at the end of the session; ``scripts/reliability_report.py`` turns that file into ``docs/reliability.md``.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import random
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from testbed import Testbed, TestbedHost, exec_root

__all__ = [
    "HERE",
    "REMOTE_CACHE",
    "REPO",
    "RESULTS_FILE",
    "SCENARIOS",
    "SSHD_KILLER",
    "Ran",
    "Recorder",
    "RemoteAudit",
    "Rig",
    "Trial",
    "TrialFactory",
    "Watched",
    "audit_remote",
    "cli_error_lines",
    "error_summary",
    "finish",
    "has_traceback",
    "json_tail",
    "remote_baseline",
    "state_files_parse",
    "traceback_message",
    "workspace_files",
]

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DRIVER = HERE / "task_driver.py"
RESULTS_FILE = Path(os.environ.get("RX_FAULTS_RESULTS", HERE / ".results" / "results.json"))
#: The remote user's default rx cache (archives and run directories).
REMOTE_CACHE = "/home/rx/.cache/remote_exec"
#: A root command that kills every sshd process serving the user rx (not the listener); prints how many.
SSHD_KILLER = (
    "n=0; for pid in $(ps -eo pid=,args= | awk '$2 == \"sshd:\" && $3 ~ /^rx/ {print $1}'); "
    "do kill -9 $pid && n=$((n+1)); done; echo $n"
)
#: Seconds after a fault within which nothing of the task may be left on the remote.
CLEAN_WITHIN = 5.0
#: Seconds past its bound after which a call counts as hung.
HANG_MARGIN = 5.0

#: What each scenario does, for the report. The key is in the name of every test of the scenario, so
#: ``pytest tests/faults -k KEY`` selects them (a key must not match a marker name such as ``timeout``).
#: ``class`` groups scenarios into the fault classes of the report's summary table (one row each, in the
#: order the classes first appear here).
SCENARIOS: dict[str, dict[str, str]] = {
    "pause": {
        "class": "link lost",
        "title": "Host paused mid-run",
        "fault": "docker pause of the host while a @task(keepalive_interval=1, keepalive_count=2) call sleeps",
        "expect": "ConnectError (exit status 255) within interval x count + 1 s = 3 s (+2 s margin); the task "
                  "and its run directory gone within 5 s of unpause",
    },
    "sshd_killed": {
        "class": "link lost",
        "title": "sshd killed mid-transfer",
        "fault": "the session's sshd processes are SIGKILLed while a 50 MB result file streams back",
        "expect": "exit 255 with one error line; no partial file under a final name in the workspace",
    },
    "disk_full": {
        "class": "host limits",
        "title": "Remote disk full",
        "fault": "the remote cache is a 5 MB tmpfs and the task writes 10 MB",
        "expect": "the task's OSError (ENOSPC) comes back, or one clear error; nothing corrupt lands; "
                  "nothing left on the remote",
    },
    "python_missing": {
        "class": "host limits",
        "title": "python3 missing",
        "fault": "--python /nonexistent/python3, and /usr/bin/python3 moved away on the host",
        "expect": "RunnerError 'python3 not found on <host>', exit status 3",
    },
    "fake_python": {
        "class": "host limits",
        "title": "Fake python3",
        "fault": "--python names a script that exits 0 without output",
        "expect": "a clear error (exit status 3), never success",
    },
    "task_sigkill": {
        "class": "task ends badly",
        "title": "Task killed by SIGKILL",
        "fault": "the task sends itself SIGKILL",
        "expect": "result status 'signal' naming SIGKILL; rx run exits 137",
    },
    "oom": {
        "class": "host limits",
        "title": "Task out of memory",
        "fault": "host with a 128 MB memory limit; the task touches 512 MB",
        "expect": "result status 'oom' (or 'signal' SIGKILL with an out-of-memory detail); exit 137",
    },
    "coordinator_killed": {
        "class": "coordinator killed",
        "title": "Coordinator killed",
        "fault": "rx run of a 3 s script SIGKILLed after a random 0.1-2.5 s (through an rx server: the worker "
                 "running it, the client then exits 3 with one line)",
        "expect": "no remote process of the task within 5 s; the run listed as lost; rx rerun --failed "
                  "completes it",
    },
    "interrupt": {
        "class": "task ends badly",
        "title": "Ctrl-C / SIGTERM of rx run",
        "fault": "SIGINT or SIGTERM to rx run while the task runs",
        "expect": "exit 130; the remote task gone within 5 s; run status cancelled",
    },
    "task_timeout": {
        "class": "task ends badly",
        "title": "Task timeout",
        "fault": "--timeout 2 on a task that sleeps 60 s and spawned a child",
        "expect": "exit 124 within 2 + 5 s of the task's start; the task's whole process group gone",
    },
    "concurrency": {
        "class": "concurrency",
        "title": "Concurrent runs on one workspace",
        "fault": "8 rx run processes at once on one workspace (4 local, 4 remote)",
        "expect": "8 runs, all finished, every state.json parses, no lost updates",
    },
    "integrity": {
        "class": "corrupted or malicious results",
        "title": "Corrupted and malicious results",
        "fault": "a Process wrapper flips a byte in a V/F frame, truncates the stream, or forges a signed "
                 "result holding ../evil, an absolute path or a symlink",
        "expect": "IntegrityError (truncation: a clear error); nothing written outside the run dir; run failed",
    },
    "pool_pause": {
        "class": "pools of hosts",
        "title": "A pool's host paused mid-map",
        "fault": "docker pause of one of two hosts while Executor.map (keepalive 1 s x 2) runs 0.4 s calls there",
        "expect": "every result exactly once, in order; the paused host's calls finish on the other host; "
                  "nothing of rx left on it within 5 s of unpause",
    },
    "pool_worker_killed": {
        "class": "pools of hosts",
        "title": "A pool slot's worker killed mid-call",
        "fault": "SIGKILL to the slot's persistent worker on the host while it runs a call",
        "expect": "the call runs again (a fresh worker, or the other host); every result exactly once; two "
                  "attempts in the ledger; no process left, and the killed worker's run directory swept by "
                  "the next worker",
    },
    "host_key": {
        "class": "security",
        "title": "Host key changed",
        "fault": "regenerated host keys; also a known_hosts entry of another key type for the host",
        "expect": "refused with HostKeyError (exit 255) on every trial; known_hosts unchanged",
    },
    "injection": {
        "class": "security",
        "title": "Injection fuzz",
        "fault": "~200 generated hostile strings as script args, env values and @task string args",
        "expect": "every string arrives byte for byte; the canary file an injection would create never "
                  "appears",
    },
    "secret_canary": {
        "class": "security",
        "title": "Secret canary",
        "fault": "rx -vv run --secret-env RX_CANARY with a random value",
        "expect": "the task sees it; the value appears nowhere in the workspace, rx's output, the remote "
                  "process list or remote files",
    },
    "tree_interrupted": {
        "class": "coordinator killed",
        "title": "rx killed while the project is sent",
        "fault": "kill -9 of rx run once the host holds a part of a 200 MB project file, then the same run again",
        "expect": "no tree and no part of a blob under a final name on the host, nothing left running; the "
                  "rerun succeeds and its task reads the file byte for byte",
    },
    "tree_disk_full": {
        "class": "host limits",
        "title": "Remote disk full while the project is sent",
        "fault": "the remote cache is a 5 MB tmpfs and the project holds 8 MB",
        "expect": "one clear error naming the full disk (exit 3); no tree, no damaged blob and no temporary "
                  "left; a smaller project then runs",
    },
}


# --------------------------------------------------------------------------------------------------------
# running rx


@dataclass(frozen=True)
class Ran:
    """A finished (or killed) process.

    Attributes:
        argv: What ran.
        returncode: Its exit status (negative: killed by that signal).
        stdout: Its stdout, decoded as UTF-8.
        stderr: Its stderr, decoded as UTF-8.
        seconds: From start to exit.
        timed_out: It ran past its timeout and was killed (a hang).
    """

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool = False

    def result_line(self) -> dict[str, Any]:
        """The driver's ``RESULT {json}`` line, parsed (``{}`` if it printed none)."""
        for line in reversed(self.stdout.splitlines()):
            if line.startswith("RESULT "):
                parsed: dict[str, Any] = json.loads(line[len("RESULT "):])
                return parsed
        return {}


def finish(process: subprocess.Popen[bytes], argv: Sequence[str], started: float, timeout: float) -> Ran:
    """Wait for ``process`` at most ``timeout`` seconds (then kill it) and collect its output."""
    timed_out = False
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        process.kill()
        out, err = process.communicate()
    seconds = time.monotonic() - started
    return Ran(tuple(argv), process.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"),
               seconds, timed_out)


class Watched:
    """A running process whose stdout lines and stderr are read as they come, each line timestamped.

    Use it to act at a moment of the run ("task started"), then :meth:`wait` for the end.
    """

    def __init__(self, process: subprocess.Popen[bytes], argv: Sequence[str]) -> None:
        self.process = process
        self.argv = tuple(argv)
        self.started = time.monotonic()
        self.lines: list[tuple[float, str]] = []
        self._err: list[bytes] = []
        self._changed = threading.Condition()
        self._readers = [threading.Thread(target=self._read_out, daemon=True),
                         threading.Thread(target=self._read_err, daemon=True)]
        for reader in self._readers:
            reader.start()

    def _read_out(self) -> None:
        assert self.process.stdout is not None
        for raw in iter(self.process.stdout.readline, b""):
            with self._changed:
                self.lines.append((time.monotonic(), raw.decode("utf-8", "replace").rstrip("\n")))
                self._changed.notify_all()

    def _read_err(self) -> None:
        assert self.process.stderr is not None
        for raw in iter(lambda: self.process.stderr.read(65536) if self.process.stderr else b"", b""):
            self._err.append(raw)

    def wait_for(self, marker: str, timeout: float) -> float | None:
        """The monotonic time the first stdout line holding ``marker`` came; None if it did not within
        ``timeout`` seconds or the process ended first."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for at, line in self.lines:
                    if marker in line:
                        return at
                left = deadline - time.monotonic()
                if left <= 0 or (self.process.poll() is not None and not self._readers[0].is_alive()):
                    return None
                self._changed.wait(min(left, 0.1))

    def wait(self, timeout: float) -> Ran:
        """Wait at most ``timeout`` seconds for the end (then kill it: a hang) and return what it did."""
        timed_out = False
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            self.process.kill()
            self.process.wait()
        ended = time.monotonic()
        for reader in self._readers:
            reader.join(10)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()
        stdout = "".join(line + "\n" for _, line in self.lines)
        return Ran(self.argv, self.process.returncode, stdout, b"".join(self._err).decode("utf-8", "replace"),
                   ended - self.started, timed_out)


@dataclass
class Rig:
    """One test's rx environment: a project folder, a workspace, a local archive cache, one backend.

    Attributes:
        testbed: The session testbed (its ssh_config reaches every host, dedicated ones too).
        backend: ``openssh`` or ``paramiko`` (``RX_BACKEND``).
        root: The test's temporary directory.
        project: The current directory of every rx process.
        workspace: ``RX_WORKSPACE``.
        cache: ``RX_CACHE_DIR``.
        env: The environment of rx processes.
    """

    testbed: Testbed
    backend: str
    root: Path
    server: bool = False
    project: Path = field(init=False)
    workspace: Path = field(init=False)
    cache: Path = field(init=False)
    env: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.project = self.root / "project"
        self.workspace = self.root / "ws"
        self.cache = self.root / "cache"
        self.project.mkdir(parents=True, exist_ok=True)
        env = {key: value for key, value in os.environ.items() if not key.startswith("RX_")}
        env.update(
            RX_SSH_CONFIG=str(self.testbed.ssh_config),
            RX_BACKEND=self.backend,
            RX_WORKSPACE=str(self.workspace),
            RX_CACHE_DIR=str(self.cache),
            PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
            PYTHONIOENCODING="utf-8",
            PYTHONDONTWRITEBYTECODE="1",
            RX_SSH_PERSIST="0",  # each rx its own OpenSSH master, as the scenarios assume (no test shares one)
        )
        env.pop("COLUMNS", None)
        self.runtime: Path | None = None
        if self.server:
            # rx's commands through an rx server of this rig's own (remote_exec.cli.server), as a user's go once
            # one command has started it: its socket in a runtime directory of its own, ended with the rig.
            self.runtime = Path(tempfile.mkdtemp(prefix="rxf-", dir="/tmp"))
            env.update(RX_SERVER="600", XDG_RUNTIME_DIR=str(self.runtime))
        else:
            env["RX_SERVER"] = "0"
        self.env = env

    def start_server(self, timeout: float = 30.0) -> None:
        """Start the rig's rx server (a first command, ``rx --version``, leaves it) and wait until it listens."""
        from remote_exec.cli.server import servers

        assert self.runtime is not None
        done = self.rx("--version", timeout=timeout)
        assert done.returncode == 0, done.stderr
        until = time.monotonic() + timeout
        while not any(os.path.exists(socket) for _, socket in servers(str(self.runtime / "rx-ssh"))):
            assert time.monotonic() < until, f"no rx server listened within {timeout:g} s"
            time.sleep(0.02)

    def workers(self) -> list[int]:
        """The pids of the workers of the rig's rx server (its children): the processes running its commands."""
        from remote_exec.cli.server import servers
        from remote_exec.runner.contain import _children, _scan_all

        assert self.runtime is not None
        found: list[int] = []
        for parent, _ in servers(str(self.runtime / "rx-ssh")):
            children = _children(parent)
            if children is None:  # no /proc/PID/task/*/children: every process's parent
                children = [pid for pid, (ppid, _, _) in _scan_all().items() if ppid == parent]
            found += children
        return found

    def close(self) -> None:
        """End the rig's rx server (commands it is running go on) and remove its runtime directory."""
        if self.runtime is not None:
            from remote_exec.cli.server import stop_all

            stop_all(str(self.runtime / "rx-ssh"))
            shutil.rmtree(self.runtime, ignore_errors=True)

    def write(self, name: str, text: str) -> Path:
        """Write a file into the project folder and return its path."""
        path = self.project / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return path

    def rx_argv(self, *args: str) -> list[str]:
        """The command line of ``rx ARGS``."""
        return [sys.executable, "-m", "remote_exec", *args]

    def spawn(self, argv: Sequence[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start ``argv`` in the project folder with the rig's environment (plus ``env``)."""
        return subprocess.Popen(list(argv), cwd=self.project, env={**self.env, **(env or {})},
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def rx(self, *args: str, timeout: float = 60.0, env: dict[str, str] | None = None) -> Ran:
        """Run ``rx ARGS`` to its end (killed after ``timeout`` s, which then counts as a hang)."""
        argv = self.rx_argv(*args)
        started = time.monotonic()
        return finish(self.spawn(argv, env), argv, started, timeout)

    def driver(self, mode: str, *args: str, timeout: float = 60.0, env: dict[str, str] | None = None) -> Ran:
        """Run ``task_driver.py MODE ARGS`` (``@task`` calls in a process of their own)."""
        argv = [sys.executable, str(DRIVER), mode, *args]
        started = time.monotonic()
        return finish(self.spawn(argv, env), argv, started, timeout)

    def driver_argv(self, mode: str, *args: str) -> list[str]:
        """The command line of ``task_driver.py MODE ARGS``."""
        return [sys.executable, str(DRIVER), mode, *args]

    def watch(self, argv: Sequence[str], env: dict[str, str] | None = None) -> Watched:
        """Start ``argv`` and watch its output as it comes."""
        return Watched(self.spawn(argv, env), argv)

    def runs(self) -> list[dict[str, Any]]:
        """``rx runs --json``."""
        done = self.rx("runs", "--json", timeout=60)
        assert done.returncode == 0, done.stderr
        listed: list[dict[str, Any]] = json.loads(done.stdout)
        return listed

    def show(self, ref: str = "latest") -> dict[str, Any]:
        """``rx show REF --json``."""
        done = self.rx("show", ref, "--json", timeout=60)
        assert done.returncode == 0, done.stderr
        shown: dict[str, Any] = json.loads(done.stdout)
        return shown

    def run_ids(self) -> list[str]:
        """The recorded runs in the workspace, oldest first (no rx call: works whatever rx does). A run
        directory without state.json is a run rx was killed while creating: rx lists no run there either."""
        runs = self.workspace / "runs"
        if not runs.is_dir():
            return []
        return sorted(path.name for path in runs.iterdir() if (path / "state.json").is_file())


# --------------------------------------------------------------------------------------------------------
# checks


_ERROR_LINE = re.compile(r"^rx: error: ")
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b")


def has_traceback(text: str) -> bool:
    """True when ``text`` holds a Python traceback of rx's. The task's own KeyboardInterrupt traceback does not
    count: a stopped task gets SIGINT first, as from a terminal's Ctrl-C, and prints it as Python does."""
    blocks = text.split("Traceback (most recent call last)")[1:]
    for block in blocks:
        ending = next((line for line in block.splitlines() if line and not line.startswith((" ", ":"))), "")
        if ending.strip() != "KeyboardInterrupt":
            return True
    return False


def cli_error_lines(stderr: str) -> list[str]:
    """The ``rx: error: ...`` lines of rx's stderr."""
    return [line for line in stderr.splitlines() if _ERROR_LINE.match(line)]


def json_tail(stdout: str) -> Any:
    """The JSON document ``rx ... --json`` printed after the task's own output."""
    start = stdout.rfind("\n{\n") + 1 if not stdout.startswith("{") else 0
    return json.loads(stdout[start:])


def error_summary(stderr: str, limit: int = 160) -> str:
    """rx's error line without its prefix, else the task's exception line, else the end of stderr (for trial
    outcomes)."""
    errors = cli_error_lines(stderr)
    if errors:
        return errors[0][len("rx: error: "):][:limit]
    lines = stderr.strip().splitlines() or ["no output"]
    raised = [line for line in lines if _EXCEPTION_LINE.match(line)]
    return (f"{raised[-1]} (on stderr)" if raised else lines[-1])[:limit]


def traceback_message(stderr: str) -> str:
    """An assertion message for stderr that should hold one error line and no traceback."""
    return f"rx printed {'a traceback' if has_traceback(stderr) else 'no single error line'}, ending: " + (
        " / ".join(stderr.strip().splitlines()[-3:]))


def workspace_files(workspace: Path) -> list[Path]:
    """Every file under the workspace."""
    return sorted(path for path in workspace.rglob("*") if path.is_file()) if workspace.is_dir() else []


def state_files_parse(workspace: Path) -> tuple[int, list[str]]:
    """How many ``state.json`` files the workspace holds, and the ones that do not parse as JSON objects."""
    broken = []
    count = 0
    for path in sorted((workspace / "runs").glob("*/state.json")):
        count += 1
        try:
            if not isinstance(json.loads(path.read_text(encoding="utf-8")), dict):
                broken.append(str(path))
        except (OSError, ValueError) as exc:
            broken.append(f"{path}: {exc}")
    return count, broken


@dataclass(frozen=True)
class RemoteAudit:
    """What the remote holds of rx and its tasks, beyond a baseline.

    Attributes:
        processes: ``pid pgid user args`` of processes of the user ``rx`` other than sshd's.
        run_dirs: Run directories under the rx cache.
        temp_files: ``.tmp-*`` entries under the rx cache (half-installed archives).
        seconds: Seconds it took for the remote to come clean (the whole wait when it did not).
    """

    processes: tuple[str, ...]
    run_dirs: tuple[str, ...]
    temp_files: tuple[str, ...]
    seconds: float = 0.0

    @property
    def clean(self) -> bool:
        """Nothing left."""
        return not (self.processes or self.run_dirs or self.temp_files)

    def describe(self) -> str:
        """A short text for assertion messages."""
        return (f"processes={list(self.processes)} run_dirs={list(self.run_dirs)} "
                f"temp_files={list(self.temp_files)}")


_AUDIT = (
    "ps -ww -eo pid=,pgid=,user=,args=; echo '@@runs'; "
    f"ls -A1 {REMOTE_CACHE}/runs 2>/dev/null; echo '@@tmp'; "
    f"find {REMOTE_CACHE} -maxdepth 3 -name '.tmp-*' 2>/dev/null; true"
)


def _remote_state(host: TestbedHost) -> RemoteAudit:
    code, output = exec_root(host, _AUDIT, timeout=20)
    if code != 0:
        raise AssertionError(f"auditing {host.alias} failed (exit {code}): {output}")
    processes, _, rest = output.partition("@@runs\n")
    runs, _, temps = rest.partition("@@tmp\n")
    found = []
    for line in processes.splitlines():
        words = line.split(None, 3)
        if len(words) == 4 and words[2] == "rx" and not words[3].startswith("sshd:"):
            found.append(" ".join(words[:2] + words[3:]))
    return RemoteAudit(tuple(found), tuple(runs.split()), tuple(temps.split()))


def remote_baseline(host: TestbedHost) -> RemoteAudit:
    """What the remote holds before a fault (whatever earlier tests left is not this test's doing)."""
    return _remote_state(host)


def audit_remote(host: TestbedHost, baseline: RemoteAudit, within: float = CLEAN_WITHIN) -> RemoteAudit:
    """Wait up to ``within`` seconds for the remote to hold nothing beyond ``baseline``; return what is left."""
    started = time.monotonic()
    while True:
        state = _remote_state(host)
        left = RemoteAudit(
            tuple(p for p in state.processes if p.split()[0] not in {b.split()[0] for b in baseline.processes}),
            tuple(sorted(set(state.run_dirs) - set(baseline.run_dirs))),
            tuple(sorted(set(state.temp_files) - set(baseline.temp_files))),
            time.monotonic() - started,
        )
        if left.clean or time.monotonic() - started >= within:
            return left
        time.sleep(0.25)


def root_sh(host: TestbedHost, command: str, timeout: float = 30) -> str:
    """Run ``command`` as root on ``host``; fail the test unless it exits 0. Returns the output."""
    code, output = exec_root(host, command, timeout=timeout)
    assert code == 0, f"{command!r} on {host.alias} exited {code}: {output}"
    return output


def quote(text: str) -> str:
    """Shell-quote ``text`` for commands run with :func:`root_sh`."""
    return shlex.quote(text)


# --------------------------------------------------------------------------------------------------------
# recording


@dataclass
class Trial:
    """One attempt of one scenario on one backend, as the report shows it.

    Attributes:
        scenario: A key of :data:`SCENARIOS`.
        backend: ``openssh`` or ``paramiko``.
        test: The pytest node id that ran it.
        variant: What differs between trials of one test (a signal, a mutation, a delay, ...).
        bound: Seconds the faulty call was allowed (None: no time bound beyond the test's).
        seconds: Seconds the faulty call took.
        outcome: What happened, in a few words (the error class and exit status, the status, ...).
        facts: Measured numbers and flags: ``hang``, ``lost``, ``corrupted``, ``orphans``,
            ``leftover_files``, ``outside_files``, ``injections``, ``refused``, ``canary_leaks``,
            ``traceback``, plus whatever the scenario records.
        error: The first line of the assertion that failed, if any.
    """

    scenario: str
    backend: str
    test: str
    variant: str = ""
    bound: float | None = None
    seconds: float | None = None
    outcome: str = ""
    facts: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def overrun(self) -> float:
        """Seconds past the bound (0 when within it or unbounded)."""
        if self.bound is None or self.seconds is None:
            return 0.0
        return max(0.0, self.seconds - self.bound)

    def note(self, **facts: Any) -> None:
        """Add facts."""
        self.facts.update(facts)

    def timed(self, seconds: float, *, hang: bool = False) -> None:
        """Record the faulty call's duration; it hung when killed by its timeout or past bound + 5 s."""
        self.seconds = round(seconds, 3)
        overdue = self.bound is not None and seconds > self.bound + HANG_MARGIN
        self.facts["hang"] = bool(hang or overdue or self.facts.get("hang"))

    def audit(self, left: RemoteAudit) -> None:
        """Record what a remote audit found."""
        self.facts["orphans"] = self.facts.get("orphans", 0) + len(left.processes)
        self.facts["leftover_files"] = self.facts.get("leftover_files", 0) + len(left.run_dirs) + len(
            left.temp_files)
        self.facts["clean_after"] = round(left.seconds, 2)
        if not left.clean:
            self.facts["left_on_remote"] = left.describe()[:500]

    def ran(self, done: Ran, host: TestbedHost, baseline: RemoteAudit) -> list[str]:
        """Record how an ``rx`` command that was the faulty call ended (its time, exit status and first error,
        whether it printed a traceback) and audit ``host`` against ``baseline``; its error lines."""
        self.timed(done.seconds, hang=done.timed_out)
        self.outcome = f"exit {done.returncode}: {error_summary(done.stderr)}"
        self.note(traceback=has_traceback(done.stderr))
        self.audit(audit_remote(host, baseline))
        return cli_error_lines(done.stderr)

    def record(self) -> dict[str, Any]:
        """The trial as JSON."""
        data = asdict(self)
        data["overrun"] = round(self.overrun, 3)
        return data


#: The ``trial`` fixture: ``with trial("scenario", variant=..., bound=...) as t:``.
TrialFactory = Callable[..., "contextlib.AbstractContextManager[Trial]"]


class Recorder:
    """Collects the session's trials and test outcomes and writes them to :data:`RESULTS_FILE`."""

    def __init__(self) -> None:
        self.started = time.time()
        self.seed = int(os.environ.get("RX_FAULTS_SEED", "0")) or random.SystemRandom().randrange(1, 10**6)
        self.trials: list[Trial] = []
        self.tests: dict[str, dict[str, Any]] = {}

    @contextlib.contextmanager
    def trial(self, scenario: str, backend: str, test: str, *, variant: str = "",
              bound: float | None = None) -> Iterator[Trial]:
        """Record one trial, also (with the failing assertion's first line) when the test fails in it."""
        if scenario not in SCENARIOS:
            raise KeyError(f"unknown scenario {scenario!r}")
        trial = Trial(scenario=scenario, backend=backend, test=test, variant=variant, bound=bound)
        try:
            yield trial
        except BaseException as exc:
            text = str(exc).strip().splitlines()
            trial.error = f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
            raise
        finally:
            self.trials.append(trial)

    def test_outcome(self, nodeid: str, outcome: str, seconds: float, reason: str | None = None) -> None:
        """Record how a test ended (passed, failed, xfailed, xpassed, skipped, error)."""
        entry = self.tests.setdefault(nodeid, {"outcome": outcome, "seconds": 0.0})
        if outcome != "passed" or entry["outcome"] == "passed":
            entry["outcome"] = outcome
        entry["seconds"] = round(entry["seconds"] + seconds, 3)
        if reason:
            entry["reason"] = reason

    def write(self, path: Path = RESULTS_FILE, *, argv: Sequence[str] = ()) -> Path:
        """Write the results file (atomically)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        finished = time.time()
        try:
            commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True, timeout=10, check=False).stdout.strip()
            dirty = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "remote_exec"],
                                        capture_output=True, text=True, timeout=10, check=False).stdout.strip())
        except (OSError, subprocess.SubprocessError):
            commit, dirty = "", False
        data = {
            "version": 1,
            "started": datetime.datetime.fromtimestamp(self.started, datetime.timezone.utc).isoformat(
                timespec="seconds"),
            "duration": round(finished - self.started, 1),
            "commit": commit,
            "library_dirty": dirty,
            "python": platform.python_version(),
            "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs",
            "argv": list(argv),
            "seed": self.seed,
            "scenarios": SCENARIOS,
            "tests": self.tests,
            "trials": [trial.record() for trial in self.trials],
        }
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(temporary, path)
        return path
