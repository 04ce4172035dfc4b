"""Faults of runs that outlive one call: detached runs (``rx run --detach``, ``rx logs -f``, ``rx attach``,
``rx cancel``) and persistent workers (``@task(keep_warm=True)``).

A detached run must survive rx and its connection, be followed and collected later, be stoppable, and be
collectable again after an attach that lost its link. A persistent worker must serve many calls in one
process over one connection, be replaced after a timeout, die with its coordinator, and go away when idle.
Every scenario ends with a remote audit: nothing of the run may be left running or lying around.

The scenarios are registered in :data:`faultkit.SCENARIOS` here, so the report describes them.
"""

from __future__ import annotations

import json
import re
import secrets
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from faultkit import (
    CLEAN_WITHIN,
    SCENARIOS,
    SSHD_KILLER,
    Rig,
    TrialFactory,
    audit_remote,
    cli_error_lines,
    error_summary,
    finish,
    has_traceback,
    remote_baseline,
    root_sh,
    traceback_message,
)

from remote_exec.backends.base import HostSpec
from testbed import TestbedHost, pause, unpause

HOST = "rx-testbed-1"

SCENARIOS.update({
    "detached_outlives": {
        "class": "detached runs",
        "title": "Detached run outlives rx and its connection",
        "fault": "rx run --detach of a 4 s script: rx exits, then any sshd session of the rx user on the host "
                 "is killed; also an rx attach SIGKILLed mid-run",
        "expect": "rx returns within 10 s; rx runs lists the run as running (never lost) while the task runs; "
                  "a later rx attach collects exit code, output and files; nothing left on the remote",
    },
    "detached_follow": {
        "class": "detached runs",
        "title": "rx logs -f of a detached run",
        "fault": "rx logs -f on a detached script that prints a timestamped line every second for 6 s",
        "expect": "each line arrives within 1.5 s of being printed (or of logs -f starting); logs -f ends with "
                  "the run; the run stays uncollected until rx attach, which collects each line once",
    },
    "detached_cancel": {
        "class": "detached runs",
        "title": "rx cancel of a detached run",
        "fault": "rx cancel of a detached script that sleeps 60 s with a child in its process group",
        "expect": "exit 130; the task's process group and run directory gone within 5 s; run cancelled",
    },
    "attach_frozen_host": {
        "class": "link lost",
        "title": "Host paused under rx attach",
        "fault": "docker pause of the host while rx attach streams a detached run (default keepalive 5 s x 3)",
        "expect": "exit 255 with one error line within dead_after (16 s) + 1 s watchdog tick + 2 s kill grace; "
                  "the run stays running; after unpause a new rx attach collects it, each line once",
    },
    "keep_warm_reuse": {
        "class": "keep_warm workers",
        "title": "keep_warm: one worker, one connection",
        "fault": "20 @task(keep_warm=True) calls from one process",
        "expect": "every call runs in the same remote process, the only worker in the remote process list; "
                  "one TCP connection to the host throughout; the worker gone within 5 s of the coordinator",
    },
    "keep_warm_timeout": {
        "class": "keep_warm workers",
        "title": "keep_warm: a call times out",
        "fault": "a keep_warm call with timeout=1 whose task sleeps 10 s, then another call",
        "expect": "CommandTimeout within 1 + 5 s; the old worker gone from the host; the next call works in "
                  "a fresh worker",
    },
    "keep_warm_orphans": {
        "class": "keep_warm workers",
        "title": "keep_warm: coordinator SIGKILLed",
        "fault": "SIGKILL of a process whose keep_warm call runs a task with a child process",
        "expect": "no worker, task or child process and no run directory on the remote within 5 s",
    },
    "keep_warm_idle": {
        "class": "keep_warm workers",
        "title": "keep_warm: idle worker",
        "fault": "dispatch() with CallOptions(keep_warm=True, worker_idle=2), then no call for a while",
        "expect": "the worker exits within worker_idle + 1 s; the next call starts a fresh worker",
    },
})

TICKER = """\
import sys, time
for index in range(int(sys.argv[1])):
    print("tick", index, repr(time.time()), flush=True)
    time.sleep(1)
with open("out.txt", "w") as stream:
    stream.write("done {token}")
print("bye", flush=True)
sys.exit(int(sys.argv[2]))
"""

# Sleeps long and leaves a child in its process group; prints when both run.
SLEEPER = """\
import subprocess, sys, time
child = subprocess.Popen(["sleep", "61.{token}"])
print("task started", child.pid, flush=True)
time.sleep(60)
print("task finished", flush=True)
"""


#: keep_warm calls in a process of their own (the archive ships this file: standard library and rx only).
WARM_DRIVER = '''\
"""python warm_driver.py MODE HOST [ARGS]: keep_warm calls; the last line is RESULT {json}."""
import json
import os
import sys
import time

from remote_exec import task
from remote_exec.errors import RemoteExecError


def connections(port):
    """Established TCP connections of this machine to 127.0.0.1:port."""
    count = 0
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as stream:
                lines = stream.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "01" and int(fields[2].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def main(mode, host, *args):
    @task(remote=host, keep_warm=True)
    def where(index):
        import os

        return index, os.getpid()

    @task(remote=host, keep_warm=True, timeout=1)
    def slow():
        import time

        print("slow started", flush=True)
        time.sleep(10)
        return "woke up"

    @task(remote=host, keep_warm=True)
    def nap(token):
        import subprocess
        import time

        child = subprocess.Popen(["sleep", "61." + token])
        print("task started", child.pid, flush=True)
        time.sleep(30)
        return "woke up"

    if mode == "reuse":
        port, count = int(args[0]), int(args[1])
        before = connections(port)
        calls = []
        started = time.monotonic()
        for index in range(count):
            returned, pid = where(index)
            calls.append([returned, pid, connections(port)])
        seconds = time.monotonic() - started
        print("CALLS " + json.dumps({"before": before, "calls": calls, "seconds": seconds}), flush=True)
        deadline = time.monotonic() + 60
        while not os.path.exists("release") and time.monotonic() < deadline:
            time.sleep(0.05)
        return {"calls": len(calls)}
    if mode == "timeout":
        _, first = where(0)
        print("FIRST " + str(first), flush=True)
        started = time.monotonic()
        try:
            value = slow()
        except RemoteExecError as exc:
            error = {"type": type(exc).__name__, "message": str(exc), "exit_code": exc.exit_code}
        else:
            error = {"type": None, "value": value}
        seconds = time.monotonic() - started
        _, second = where(1)
        return {"first": first, "second": second, "error": error, "seconds": seconds}
    if mode == "kill":
        where(0)
        return nap(args[0])
    raise SystemExit("unknown mode " + mode)


if __name__ == "__main__":
    started = time.monotonic()
    try:
        result = {"ok": True, "value": main(*sys.argv[1:])}
    except BaseException as exc:
        result = {"ok": False, "type": type(exc).__name__, "message": str(exc)}
    result["seconds"] = time.monotonic() - started
    print("RESULT " + json.dumps(result), flush=True)
'''

_WORKER = re.compile(r" worker [\d.]+$")


@pytest.fixture(scope="module")
def frozen_host(module_host: Callable[..., TestbedHost]) -> TestbedHost:
    """A host of this module's own, for pausing."""
    return module_host("frozen")


def _detach(rig: Rig, host: str, *args: str) -> tuple[str, float]:
    """``rx run --detach --remote HOST ARGS``: the run id, and the seconds rx took."""
    done = rig.rx("run", "--detach", "--remote", host, *args, timeout=30)
    assert not done.timed_out and done.returncode == 0, done.stderr
    run_id = done.stdout.strip()
    assert re.fullmatch(r"[\w-]+", run_id), done.stdout
    assert f"rx attach {run_id}" in done.stderr, done.stderr
    return run_id, done.seconds


def _status(rig: Rig, run_id: str) -> str:
    listed = {run["run_id"]: run for run in rig.runs()}
    return str(listed[run_id]["status"])


def _task_processes(host: TestbedHost, baseline: Any) -> list[str]:
    """The rx user's processes on ``host`` that were not there at ``baseline``."""
    known = {line.split()[0] for line in baseline.processes}
    return [line for line in remote_baseline(host).processes if line.split()[0] not in known]


def _wait_remote(host: TestbedHost, needle: str, timeout: float) -> bool:
    """Wait until a process of the rx user whose command line holds ``needle`` runs on ``host``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(needle in line for line in remote_baseline(host).processes):
            return True
        time.sleep(0.2)
    return False


def _ticks(text: str) -> list[int]:
    return [int(line.split()[1]) for line in text.splitlines() if line.startswith("tick ")]


def _files(rig: Rig, run_id: str) -> dict[str, str]:
    root = rig.workspace / "runs" / run_id / "files"
    return {str(path.relative_to(root)): path.read_text() for path in root.rglob("*") if path.is_file()}


# --- detached runs --------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_detached_outlives_rx_and_its_connection(rig: Rig, testbed_host: TestbedHost, trial: TrialFactory) -> None:
    token = secrets.token_hex(4)
    rig.write("ticker.py", TICKER.format(token=token))
    baseline = remote_baseline(testbed_host)

    with trial("detached_outlives", variant="4 s script; rx exits, any sshd session of the rx user is killed",
               bound=10.0) as t:
        run_id, seconds = _detach(rig, HOST, "ticker.py", "4", "3")
        detached_at = time.monotonic()
        t.timed(seconds)
        killed = int(root_sh(testbed_host, SSHD_KILLER).strip() or 0)
        statuses = []
        alive = []
        for at in (1.0, 2.5):
            time.sleep(max(0.0, detached_at + at - time.monotonic()))
            alive.append(len(_task_processes(testbed_host, baseline)))
            statuses.append(_status(rig, run_id))
        t.note(sshd_sessions_killed=killed, statuses_while_running=statuses, task_processes=alive,
               lost=sum(status != "running" for status in statuses))
        time.sleep(max(0.0, detached_at + 6.0 - time.monotonic()))  # the task has ended on the host
        attached = rig.rx("attach", run_id, timeout=60)
        shown = rig.show(run_id)
        files = _files(rig, run_id)
        t.outcome = (f"rx returned in {seconds:.2f} s; while running: {', '.join(statuses)}; attach exit "
                     f"{attached.returncode}, run {shown['status']}")
        t.note(corrupted=int(files.get("out.txt") != f"done {token}"), traceback=has_traceback(attached.stderr))
        left = audit_remote(testbed_host, baseline)
        t.audit(left)

        assert seconds <= 10.0, seconds
        assert all(count >= 1 for count in alive), f"the task was not running on the host: {alive}"
        assert statuses == ["running", "running"], statuses
        assert not attached.timed_out
        assert attached.returncode == 3, attached.stderr
        assert _ticks(attached.stdout) == [0, 1, 2, 3] and "bye" in attached.stdout, attached.stdout
        assert (shown["status"], shown["exit_code"]) == ("failed", 3), shown
        assert files == {"out.txt": f"done {token}"}, files
        assert left.clean, left.describe()


@pytest.mark.timeout(120)
def test_detached_outlives_a_killed_attach(rig: Rig, testbed_host: TestbedHost, trial: TrialFactory) -> None:
    token = secrets.token_hex(4)
    rig.write("ticker.py", TICKER.format(token=token))
    baseline = remote_baseline(testbed_host)

    with trial("detached_outlives", variant="rx attach SIGKILLed mid-run, then rx attach again",
               bound=60.0) as t:
        run_id, _ = _detach(rig, HOST, "ticker.py", "4", "0")
        watched = rig.watch(rig.rx_argv("attach", run_id))
        assert watched.wait_for("tick 1", timeout=30) is not None, "rx attach streamed nothing"
        watched.process.send_signal(signal.SIGKILL)
        watched.wait(timeout=10)
        status_after_kill = _status(rig, run_id)
        time.sleep(4)  # the task ends on the host meanwhile
        started = time.monotonic()
        attached = rig.rx("attach", run_id, timeout=60)
        t.timed(time.monotonic() - started, hang=attached.timed_out)
        shown = rig.show(run_id)
        files = _files(rig, run_id)
        left = audit_remote(testbed_host, baseline)
        t.audit(left)
        t.note(lost=int(shown["status"] != "finished"), status_after_kill=status_after_kill)
        t.outcome = (f"after the kill: {status_after_kill}; attach exit {attached.returncode}: "
                     f"{error_summary(attached.stderr) if attached.stderr.strip() else 'no message'}")

        assert status_after_kill == "running", status_after_kill
        assert attached.returncode == 0, attached.stderr
        assert (shown["status"], shown["exit_code"]) == ("finished", 0), shown
        assert files == {"out.txt": f"done {token}"}, files
        assert left.clean, left.describe()


@pytest.mark.timeout(120)
def test_detached_follow_streams_live_then_attach_collects(rig: Rig, testbed_host: TestbedHost,
                                                          trial: TrialFactory) -> None:
    token = secrets.token_hex(4)
    rig.write("ticker.py", TICKER.format(token=token))
    baseline = remote_baseline(testbed_host)
    wall_offset = time.time() - time.monotonic()  # the containers share this machine's clock

    with trial("detached_follow", variant="6 lines, 1 s apart", bound=6.0 + 5.0) as t:
        run_id, _ = _detach(rig, HOST, "ticker.py", "6", "0")
        watched = rig.watch(rig.rx_argv("logs", "-f", run_id))
        done = watched.wait(timeout=40)
        t.timed(done.seconds, hang=done.timed_out)
        following = watched.started + wall_offset
        ticks = [(at + wall_offset, line.split()) for at, line in watched.lines if line.startswith("tick ")]
        # A line printed before rx logs -f started can only arrive after it started.
        latencies = [round(arrived - max(float(words[2]), following), 3) for arrived, words in ticks]
        live = sum(float(words[2]) > following for _, words in ticks)
        status_after_follow = _status(rig, run_id)
        attached = rig.rx("attach", run_id, timeout=60)
        log = (rig.workspace / "runs" / run_id / "stdout.log").read_text()
        shown = rig.show(run_id)
        t.note(latencies=latencies, printed_while_following=live, status_after_follow=status_after_follow,
               traceback=has_traceback(done.stderr + attached.stderr),
               lost=int(_ticks(log) != list(range(6))))
        t.outcome = (f"{len(ticks)} lines ({live} printed while following), worst latency "
                     f"{max(latencies, default=0):.2f} s; then attach exit {attached.returncode}, "
                     f"run {shown['status']}")
        left = audit_remote(testbed_host, baseline)
        t.audit(left)

        assert not done.timed_out and done.returncode == 0, done.stderr
        assert [int(words[1]) for _, words in ticks] == list(range(6)), done.stdout
        assert max(latencies) <= 1.5, latencies
        assert live >= 2, f"only {live} line(s) printed while rx logs -f ran: nothing shows they came live"
        assert f"rx attach {run_id}" in done.stderr, done.stderr
        assert status_after_follow == "running", "following a run must not collect it"
        assert attached.returncode == 0, attached.stderr
        assert _ticks(log) == list(range(6)) and log.rstrip().endswith("bye"), log
        assert (shown["status"], shown["exit_code"]) == ("finished", 0), shown
        assert _files(rig, run_id) == {"out.txt": f"done {token}"}
        assert left.clean, left.describe()


@pytest.mark.timeout(120)
def test_detached_cancel_stops_the_process_group(rig: Rig, testbed_host: TestbedHost, trial: TrialFactory) -> None:
    token = str(secrets.randbelow(10**6))
    rig.write("sleeper.py", SLEEPER.format(token=token))
    baseline = remote_baseline(testbed_host)

    with trial("detached_cancel", variant="task sleeping 60 s with a child", bound=5.0) as t:
        run_id, _ = _detach(rig, HOST, "sleeper.py")
        assert _wait_remote(testbed_host, f"sleep 61.{token}", timeout=20), "the task never started"
        started = time.monotonic()
        cancelled = rig.rx("cancel", run_id, timeout=30)
        left = audit_remote(testbed_host, baseline)
        t.timed(time.monotonic() - started, hang=cancelled.timed_out)  # until the remote came clean
        t.note(cancel_seconds=round(cancelled.seconds, 2), traceback=has_traceback(cancelled.stderr))
        t.audit(left)
        shown = rig.show(run_id)
        log = (rig.workspace / "runs" / run_id / "stdout.log").read_text()
        again = rig.rx("attach", run_id, timeout=30)
        t.outcome = f"exit {cancelled.returncode}, run {shown['status']} (exit {shown['exit_code']})"

        assert not cancelled.timed_out
        assert cancelled.returncode == 130, cancelled.stderr
        assert not has_traceback(cancelled.stderr), traceback_message(cancelled.stderr)
        assert not any(f"sleep 61.{token}" in line for line in left.processes), left.describe()
        assert left.clean, left.describe()
        assert t.seconds is not None and t.seconds <= 5.0, t.seconds
        assert (shown["status"], shown["exit_code"]) == ("cancelled", 130), shown
        assert "task started" in log and "task finished" not in log, log
        assert again.returncode == 130 and "nothing to attach" in again.stderr, again.stderr


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_attach_frozen_host_fails_within_bound_and_reattach_collects(rig: Rig, frozen_host: TestbedHost,
                                                                     trial: TrialFactory) -> None:
    token = secrets.token_hex(4)
    rig.write("ticker.py", TICKER.format(token=token))
    baseline = remote_baseline(frozen_host)
    dead_after = HostSpec(frozen_host.alias).dead_after
    bound = dead_after + 1.0 + 2.0  # one watchdog tick, then the backend's kill grace

    with trial("attach_frozen_host", variant=f"default keepalive, dead_after {dead_after:g} s", bound=bound) as t:
        run_id, _ = _detach(rig, frozen_host.alias, "ticker.py", "6", "0")
        watched = rig.watch(rig.rx_argv("attach", run_id))
        assert watched.wait_for("tick 1", timeout=30) is not None, "rx attach streamed nothing"
        pause(frozen_host)
        paused_at = time.monotonic()
        try:
            done = watched.wait(timeout=bound + 15)
        finally:
            unpause(frozen_host)
        seconds = watched.started + done.seconds - paused_at
        t.timed(seconds, hang=done.timed_out)
        errors = cli_error_lines(done.stderr)
        t.note(traceback=has_traceback(done.stderr), hint=errors[0][-80:] if errors else None)
        status_after = _status(rig, run_id)
        attached = rig.rx("attach", run_id, timeout=60)
        log = (rig.workspace / "runs" / run_id / "stdout.log").read_text()
        shown = rig.show(run_id)
        t.note(status_after_failed_attach=status_after, lost=int(_ticks(log) != list(range(6))))
        t.outcome = (f"exit {done.returncode}: {error_summary(done.stderr)}; reattach exit {attached.returncode}, "
                     f"run {shown['status']}")
        left = audit_remote(frozen_host, baseline)
        t.audit(left)

        assert not done.timed_out, "rx attach hung on the paused host"
        assert done.returncode == 255, done.stderr
        assert len(errors) == 1 and not has_traceback(done.stderr), traceback_message(done.stderr)
        assert seconds <= bound + 2.0, seconds
        assert status_after == "running", status_after
        assert attached.returncode == 0, attached.stderr
        assert _ticks(log) == list(range(6)), f"stdout.log after two attaches: {log!r}"
        assert (shown["status"], shown["exit_code"]) == ("finished", 0), shown
        assert _files(rig, run_id) == {"out.txt": f"done {token}"}
        assert left.clean, left.describe()


# --- persistent workers (keep_warm) ------------------------------------------------------------------


@pytest.fixture
def warm_driver(rig: Rig) -> Path:
    """The keep_warm driver in the rig's project folder."""
    return rig.write("warm_driver.py", WARM_DRIVER)


def _warm_argv(driver: Path, *args: str) -> list[str]:
    """The command line of ``warm_driver.py ARGS``."""
    return [sys.executable, str(driver), *args]


def _workers(host: TestbedHost) -> list[str]:
    """``pid pgid args`` of the persistent workers running on ``host`` (not their guardians: the parents with
    the same command line that report a worker killed by a signal)."""
    listing = root_sh(host, "ps -ww -eo pid=,ppid=,pgid=,user=,args=")
    rows = [row for row in (line.split(None, 4) for line in listing.splitlines())
            if len(row) == 5 and row[3] == "rx" and _WORKER.search(row[4])]
    pids = {row[0] for row in rows}
    return [f"{row[0]} {row[2]} {row[4]}" for row in rows if row[1] in pids]


def _gone_within(host: TestbedHost, pids: set[str], timeout: float) -> float | None:
    """Seconds until none of ``pids`` runs on ``host`` (None: still there after ``timeout``)."""
    started = time.monotonic()
    while True:
        running = {line.split()[0] for line in remote_baseline(host).processes}
        if not running & pids:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            return None
        time.sleep(0.2)


@pytest.mark.timeout(120)
def test_keep_warm_reuse_one_worker_one_connection(rig: Rig, testbed_host: TestbedHost, warm_driver: Path,
                                                   trial: TrialFactory) -> None:
    baseline = remote_baseline(testbed_host)

    with trial("keep_warm_reuse", variant="20 calls", bound=30.0) as t:
        watched = rig.watch(_warm_argv(warm_driver, "reuse", HOST, str(testbed_host.port), "20"))
        reported = watched.wait_for("CALLS ", timeout=60)
        assert reported is not None, "the driver reported no calls"
        calls = json.loads(next(line for _, line in watched.lines if line.startswith("CALLS "))[len("CALLS "):])
        workers = _workers(testbed_host)
        (rig.project / "release").touch()
        done = watched.wait(timeout=30)
        released_at = watched.started + done.seconds
        left = audit_remote(testbed_host, baseline)
        t.audit(left)
        t.timed(calls["seconds"], hang=done.timed_out)
        pids = sorted({pid for _, pid, _ in calls["calls"]})
        connections = sorted({count for _, _, count in calls["calls"]})
        t.note(worker_pids=pids, connections_before=calls["before"], connections=connections,
               workers_listed=len(workers),
               lost=sum(index != returned for index, (returned, _, _) in enumerate(calls["calls"])),
               gone_after_exit=round(time.monotonic() - released_at, 2))
        t.outcome = (f"{len(calls['calls'])} calls in {calls['seconds']:.2f} s; {len(pids)} worker pid(s), "
                     f"{len(workers)} worker(s) listed; connections {connections}")

        assert done.result_line().get("ok") is True, done.stdout + done.stderr
        assert [returned for returned, _, _ in calls["calls"]] == list(range(20))
        assert len(pids) == 1, pids
        assert len(workers) == 1 and workers[0].split()[0] == str(pids[0]), workers
        # Whatever else is connected to the host (an ssh master of an rx killed earlier lingers for its
        # ControlPersist time), the calls add one connection and keep it.
        assert connections == [calls["before"] + 1], calls
        assert left.clean, left.describe()


@pytest.mark.timeout(120)
def test_keep_warm_timeout_raises_and_the_next_call_gets_a_fresh_worker(
        rig: Rig, testbed_host: TestbedHost, warm_driver: Path, trial: TrialFactory) -> None:
    baseline = remote_baseline(testbed_host)

    with trial("keep_warm_timeout", variant="timeout=1, task sleeps 10 s", bound=1.0 + 5.0) as t:
        argv = _warm_argv(warm_driver, "timeout", HOST)
        done = finish(rig.spawn(argv), argv, time.monotonic(), timeout=60)
        result = done.result_line()
        value = result.get("value") or {}
        error = value.get("error") or {}
        t.timed(float(value.get("seconds") or done.seconds), hang=done.timed_out)
        old = str(value.get("first"))
        gone = _gone_within(testbed_host, {old}, 5.0)
        left = audit_remote(testbed_host, baseline)
        t.audit(left)
        t.note(old_worker_gone_after=gone, first=value.get("first"), second=value.get("second"))
        t.outcome = (f"{error.get('type')} (exit status {error.get('exit_code')}) after "
                     f"{float(value.get('seconds') or 0):.2f} s; next call in worker {value.get('second')} "
                     f"(was {value.get('first')})")

        assert result.get("ok") is True, done.stdout + done.stderr
        assert error.get("type") == "CommandTimeout" and error.get("exit_code") == 124, error
        assert value["seconds"] <= 1.0 + 5.0, value
        assert value["second"] != value["first"], "the next call ran in the worker that timed out"
        assert gone is not None, f"the worker that timed out (pid {old}) still runs"
        assert left.clean, left.describe()


def _kill_coordinator(rig: Rig, host: TestbedHost, driver: Path, token: str) -> tuple[float, Any]:
    """Start a keep_warm call that runs ``sleep 61.TOKEN``, SIGKILL its process; return the time of the kill
    and the remote processes then running."""
    watched = rig.watch(_warm_argv(driver, "kill", host.alias, token))
    assert watched.wait_for("task started", timeout=60) is not None, "the task never started"
    running = remote_baseline(host)
    watched.process.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    done = watched.wait(timeout=10)
    assert done.returncode == -signal.SIGKILL
    return killed_at, running


@pytest.mark.timeout(120)
def test_keep_warm_orphans_none_after_coordinator_sigkill(rig: Rig, testbed_host: TestbedHost, warm_driver: Path,
                                                          trial: TrialFactory) -> None:
    token = str(secrets.randbelow(10**6))
    baseline = remote_baseline(testbed_host)

    with trial("keep_warm_orphans", variant="processes: worker (task thread) and the task's child",
               bound=CLEAN_WITHIN) as t:
        killed_at, running = _kill_coordinator(rig, testbed_host, warm_driver, token)
        left = _task_processes(testbed_host, baseline)
        while left and time.monotonic() - killed_at < CLEAN_WITHIN:
            time.sleep(0.2)
            left = _task_processes(testbed_host, baseline)
        t.timed(time.monotonic() - killed_at)
        t.note(orphans=len(left))
        if left:
            t.note(left_on_remote=f"processes={left}"[:500])
        t.outcome = (f"{len(left)} process(es) left" if left else "no process left") + (
            f" {t.seconds:.2f} s after the kill")

        assert any(f"sleep 61.{token}" in line for line in running.processes), "the child never ran"
        assert any(_WORKER.search(line) for line in running.processes), "no worker ran"
        assert not left, left


@pytest.mark.timeout(120)
def test_keep_warm_orphans_no_run_dir_after_coordinator_sigkill(rig: Rig, testbed_host: TestbedHost,
                                                                warm_driver: Path, trial: TrialFactory) -> None:
    token = str(secrets.randbelow(10**6))
    baseline = remote_baseline(testbed_host)

    with trial("keep_warm_orphans", variant="run directory of the call in flight", bound=5.0) as t:
        _, running = _kill_coordinator(rig, testbed_host, warm_driver, token)
        left = audit_remote(testbed_host, baseline)
        t.timed(left.seconds)
        t.note(leftover_files=len(left.run_dirs) + len(left.temp_files), clean_after=round(left.seconds, 2))
        if left.run_dirs:
            t.note(left_on_remote=f"run_dirs={list(left.run_dirs)}")
        t.outcome = f"{len(left.run_dirs)} run dir(s) left after {left.seconds:.2f} s"

        assert any(_WORKER.search(line) for line in running.processes), "no worker ran"
        assert not left.run_dirs and not left.temp_files, left.describe()


class _WorkerCalls:
    """keep_warm calls through :func:`remote_exec.protocol.call.dispatch` in this process (``worker_idle`` is
    not an @task option): a script that prints the pid it runs in."""

    def __init__(self, rig: Rig, idle: float, coordinator: Any) -> None:
        from remote_exec.protocol.options import CallOptions
        from remote_exec.task import Task

        script = rig.write("pid.py", "import os\nprint('pid', os.getpid(), flush=True)\n")
        self.task = Task.from_script(script)
        self.coordinator = coordinator
        self.archive = coordinator.packer.archive_for(self.task)
        self.backend = coordinator.backend(HostSpec(HOST, ssh_config=rig.testbed.ssh_config), rig.backend)
        self.options = CallOptions(keep_warm=True, worker_idle=idle)

    def call(self) -> int:
        """One call; the pid it ran in."""
        from remote_exec.launchers import create_launcher
        from remote_exec.protocol.call import dispatch
        from remote_exec.session import Session
        from remote_exec.task import Execution

        out = bytearray()
        session = Session(task=self.task, execution=Execution.create(self.task, ()), run_id="idle")
        outcome = dispatch(session, self.backend, self.archive, self.options, launcher=create_launcher("direct"),
                           workers=self.coordinator.workers, on_stdout=out.extend, on_stderr=lambda data: None)
        assert outcome.result.status == "finished", outcome.result
        words = out.decode().split()
        assert words[:1] == ["pid"], out
        return int(words[1])


@pytest.fixture
def worker_calls(rig: Rig) -> Iterator[Callable[[float], _WorkerCalls]]:
    """``worker_calls(idle)``: keep_warm calls from this process; workers and connections closed after."""
    from remote_exec.coordinator import Coordinator

    coordinator = Coordinator()
    yield lambda idle: _WorkerCalls(rig, idle, coordinator)
    coordinator.close()


IDLE = 2.0


@pytest.mark.timeout(120)
def test_keep_warm_idle_worker_exits(rig: Rig, testbed_host: TestbedHost, trial: TrialFactory,
                                     worker_calls: Callable[[float], _WorkerCalls]) -> None:
    baseline = remote_baseline(testbed_host)

    with trial("keep_warm_idle", variant=f"worker_idle={IDLE:g}: the worker exits", bound=IDLE + 1.0) as t:
        calls = worker_calls(IDLE)
        pid = calls.call()
        called_at = time.monotonic()
        listed = [line.split()[0] for line in _workers(testbed_host)]
        gone = _gone_within(testbed_host, {str(pid)}, IDLE + 15)
        seconds = (called_at + gone if gone is not None else time.monotonic()) - called_at
        # Measured from the end of the call: the first poll above may come a little after it.
        t.timed(seconds, hang=gone is None)
        left = audit_remote(testbed_host, baseline)
        t.audit(left)
        t.outcome = f"worker {pid} " + (f"exited {seconds:.2f} s after its call" if gone is not None else "stayed")

        assert listed == [str(pid)], listed
        assert gone is not None and seconds <= IDLE + 1.0 + 2.0, seconds
        assert left.clean, left.describe()


@pytest.mark.timeout(120)
def test_keep_warm_idle_then_the_next_call_gets_a_fresh_worker(rig: Rig, testbed_host: TestbedHost,
                                                               trial: TrialFactory,
                                                               worker_calls: Callable[[float], _WorkerCalls]) -> None:
    baseline = remote_baseline(testbed_host)

    with trial("keep_warm_idle", variant=f"worker_idle={IDLE:g}: a call after the worker exited",
               bound=10.0) as t:
        calls = worker_calls(IDLE)
        first = calls.call()
        assert _gone_within(testbed_host, {str(first)}, IDLE + 15) is not None, "the idle worker stayed"
        started = time.monotonic()
        second: int | None = None
        try:
            second = calls.call()
        except Exception as exc:
            t.outcome = f"{type(exc).__name__}: {exc}"[:200]
            raise
        finally:
            t.timed(time.monotonic() - started)
            t.note(lost=int(second is None))
        t.outcome = f"next call in a fresh worker {second} (was {first})"
        calls.coordinator.workers.close()
        left = audit_remote(testbed_host, baseline)
        t.audit(left)

        assert second != first
        assert left.clean, left.describe()
