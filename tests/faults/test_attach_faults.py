"""``rx attach`` of a detached run, as users misuse it: two at once, and stopped with Ctrl-C or SIGTERM.

One attach of a run at a time (the second is told who holds it; ``stdout.log`` never gets a line twice),
and stopping an attach only detaches: the run goes on on its host, says so, and ``rx cancel`` stops it.
"""

from __future__ import annotations

import re
import secrets
import signal
import time

import pytest
from faultkit import (
    SCENARIOS,
    RemoteAudit,
    Rig,
    TrialFactory,
    audit_remote,
    cli_error_lines,
    error_summary,
    has_traceback,
    remote_baseline,
    traceback_message,
)

from testbed import TestbedHost

HOST = "rx-testbed-1"

SCENARIOS.update({
    "attach_twice": {
        "class": "concurrent attaches",
        "title": "Two rx attach of one run at once",
        "fault": "a second rx attach of a detached run (20 lines over 4 s) while the first one streams it",
        "expect": "the second exits 3 at once with one error line naming the first (its pid); the first "
                  "collects the run: exit 0, stdout.log holds each line once; nothing left on the remote",
    },
    "attach_detach": {
        "class": "concurrent attaches",
        "title": "Ctrl-C or SIGTERM of rx attach",
        "fault": "SIGINT or SIGTERM to rx attach while the detached task sleeps",
        "expect": "exit 130 within 5 s with 'detached; still running: rx attach RUN' (never 'stopped'); the task "
                  "still runs on the host; the run stays running; rx cancel then stops it (exit 130)",
    },
})

LINES = """\
import sys, time
for index in range(20):
    print("line", index, flush=True)
    time.sleep(0.2)
print("bye {token}", flush=True)
"""

SLEEPER = """\
import time
print("task started {token}", flush=True)
time.sleep(60)
print("task finished", flush=True)
"""


def _detach(rig: Rig, *args: str) -> str:
    done = rig.rx("run", "--detach", "--remote", HOST, *args, timeout=30)
    assert not done.timed_out and done.returncode == 0, done.stderr
    run_id = done.stdout.strip()
    assert re.fullmatch(r"[\w-]+", run_id), done.stdout
    return run_id


def _new_processes(host: TestbedHost, baseline: RemoteAudit) -> list[str]:
    """The rx user's processes on ``host`` that were not there at ``baseline`` (a detached run's supervisor
    and task)."""
    known = {line.split()[0] for line in baseline.processes}
    return [line for line in remote_baseline(host).processes if line.split()[0] not in known]


@pytest.mark.timeout(120)
def test_attach_twice_one_holds_the_other_is_told(rig: Rig, testbed_host: TestbedHost, trial: TrialFactory) -> None:
    token = secrets.token_hex(4)
    rig.write("lines.py", LINES.format(token=token))
    baseline = remote_baseline(testbed_host)

    with trial("attach_twice", variant="second attach while the first streams", bound=10.0) as t:
        run_id = _detach(rig, "lines.py")
        first = rig.watch(rig.rx_argv("attach", run_id))
        assert first.wait_for("line 1", timeout=30) is not None, "the first attach streamed nothing"
        second = rig.rx("attach", run_id, timeout=30)
        t.timed(second.seconds, hang=second.timed_out)
        done = first.wait(timeout=60)
        log = (rig.workspace / "runs" / run_id / "stdout.log").read_text()
        shown = rig.show(run_id)
        counts = [log.count(f"line {index}\n") for index in range(20)]
        t.outcome = (f"second: exit {second.returncode}: {error_summary(second.stderr)}; first: exit "
                     f"{done.returncode}; lines logged {min(counts)}-{max(counts)} times")
        t.note(traceback=has_traceback(second.stderr) or has_traceback(done.stderr),
               corrupted=int(counts != [1] * 20))
        left = audit_remote(testbed_host, baseline)
        t.audit(left)

        assert second.returncode == 3, second.stdout + second.stderr
        errors = cli_error_lines(second.stderr)
        assert len(errors) == 1 and "already being attached by pid" in errors[0], second.stderr
        assert str(first.process.pid) in errors[0], errors
        assert not has_traceback(second.stderr), traceback_message(second.stderr)
        assert done.returncode == 0, done.stderr
        assert counts == [1] * 20, log
        assert f"bye {token}" in log and log.count("bye") == 1, log
        assert (shown["status"], shown["exit_code"]) == ("finished", 0), shown
        assert left.clean, left.describe()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_attach_detach_on_ctrl_c_leaves_the_run_running(rig: Rig, testbed_host: TestbedHost, trial: TrialFactory,
                                                        signame: str) -> None:
    token = secrets.token_hex(4)
    rig.write("sleeper.py", SLEEPER.format(token=token))
    baseline = remote_baseline(testbed_host)

    with trial("attach_detach", variant=signame, bound=5.0) as t:
        run_id = _detach(rig, "sleeper.py")
        watched = rig.watch(rig.rx_argv("attach", run_id))
        assert watched.wait_for(f"task started {token}", timeout=30) is not None, "attach streamed nothing"
        signalled = time.monotonic()
        watched.process.send_signal(getattr(signal, signame))
        done = watched.wait(timeout=30)
        t.timed(time.monotonic() - signalled, hang=done.timed_out)
        time.sleep(1.0)
        still_running = len(_new_processes(testbed_host, baseline)) >= 2  # its supervisor and its task
        status = rig.show(run_id)["status"]
        t.outcome = f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ''}"
        t.note(task_survived=still_running, run_status=status, traceback=has_traceback(done.stderr))
        cancelled = rig.rx("cancel", run_id, timeout=60)
        left = audit_remote(testbed_host, baseline)
        t.audit(left)

        assert done.returncode == 130, done.stderr
        assert f"detached; still running: rx attach {run_id}" in done.stderr, done.stderr
        assert "stopped" not in done.stderr, done.stderr
        assert not has_traceback(done.stderr), traceback_message(done.stderr)
        assert still_running, "the detached task did not survive the attach's interruption"
        assert status == "running", status
        assert cancelled.returncode == 130, cancelled.stderr
        assert rig.show(run_id)["status"] == "cancelled"
        assert left.clean, left.describe()
