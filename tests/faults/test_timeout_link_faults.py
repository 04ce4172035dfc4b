"""Timeouts under link faults: ``--timeout N`` ends the run within N + a few seconds whatever the link does.

A host frozen (docker pause) shortly after the task started cannot stop its task at the limit nor report
it; the coordinator then gives the link up a few seconds past the limit (exit 124, saying the host did
not confirm the stop) instead of waiting for the dead-link detection (16 s by default). Once the host
runs again, its runner stops the task itself. One dedicated host of this module is paused.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from faultkit import (
    SCENARIOS,
    Rig,
    TrialFactory,
    audit_remote,
    cli_error_lines,
    error_summary,
    has_traceback,
    remote_baseline,
    traceback_message,
)

from remote_exec.protocol.call import STOP_MARGIN
from testbed import TestbedHost, pause, unpause

SCENARIOS.update({
    "paused_timeout": {
        "class": "timeouts under link faults",
        "title": "Host paused under --timeout",
        "fault": "rx run --timeout 6 of a script that sleeps 60 s; docker pause of the host 2 s, or 5.5 s, into "
                 "the run (default keepalive 5 s x 3: the dead-link detection would take 16 s)",
        "expect": "exit 124 within 6 s + the stop margin (4 s), or past it once the link has been silent for a "
                  "heartbeat (5 s) + 1 s, plus 2 s; one error line saying the host did not confirm the stop; "
                  "the run failed with exit 124; the task gone within 5 s of unpause",
    },
})

TIMEOUT = 6.0
#: The runner heartbeats every 5 s: a link silent for longer than that (+1 s) past the deadline is given up.
HEARTBEAT_SILENCE = 6.0


def bound(pause_after: float) -> float:
    """When rx must have returned, from the task's start: the deadline, or the silence past it, + the
    watchdog's tick (1 s) + 1 s."""
    return max(TIMEOUT + STOP_MARGIN, pause_after + HEARTBEAT_SILENCE) + 2.0

NAP = "import time\nprint('task started', flush=True)\ntime.sleep(60)\nprint('task finished', flush=True)\n"


@pytest.fixture(scope="module")
def paused_host(module_host: Callable[..., TestbedHost]) -> TestbedHost:
    """A host of this module's own, for pausing."""
    return module_host("timeout")


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("pause_after", [2.0, 5.5])
def test_paused_timeout_exits_124_within_the_bound(rig: Rig, paused_host: TestbedHost, trial: TrialFactory,
                                                   pause_after: float) -> None:
    rig.write("nap.py", NAP)
    baseline = remote_baseline(paused_host)
    limit = bound(pause_after)

    with trial("paused_timeout", variant=f"--timeout {TIMEOUT:g}, paused {pause_after:g} s in", bound=limit) as t:
        watched = rig.watch(rig.rx_argv("run", "--remote", paused_host.alias, "--timeout", f"{TIMEOUT:g}", "nap.py"))
        started_at = watched.wait_for("task started", timeout=45)
        assert started_at is not None, "the task never started"
        time.sleep(max(0.0, started_at + pause_after - time.monotonic()))
        pause(paused_host)
        try:
            done = watched.wait(timeout=40)
        finally:
            unpause(paused_host)
        since_start = watched.started + done.seconds - started_at
        t.timed(since_start, hang=done.timed_out)
        t.outcome = f"exit {done.returncode}: {error_summary(done.stderr)}"
        left = audit_remote(paused_host, baseline)
        t.audit(left)
        shown = rig.show()
        t.note(traceback=has_traceback(done.stderr), run_status=shown["status"])

        assert not done.timed_out
        assert done.returncode == 124, done.stderr
        assert since_start <= limit, since_start
        errors = cli_error_lines(done.stderr)
        assert len(errors) == 1 and "did not confirm the stop" in errors[0], done.stderr
        assert not has_traceback(done.stderr), traceback_message(done.stderr)
        assert (shown["status"], shown["exit_code"]) == ("failed", 124), shown
        assert "task finished" not in done.stdout
        assert left.clean, left.describe()
