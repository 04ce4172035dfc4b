"""Slow consumers: a local reader that does not keep up never kills a healthy run.

``rx run big.py | (sleep 20; wc -c)``, ``| less`` or a terminal paused with Ctrl-S used to stop rx's
reading loop on the local write; the watchdog, seeing no bytes from the link, then gave up a healthy run
("the link went silent"). Liveness is judged on the link: the output waits locally (bounded memory, then a
spill file) until the reader takes it, and every byte arrives.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from faultkit import SCENARIOS, Rig, TrialFactory, audit_remote, error_summary, has_traceback, remote_baseline

from testbed import TestbedHost

HOST = "rx-testbed-1"

SCENARIOS.update({
    "slow_consumer": {
        "class": "slow consumers",
        "title": "A slow local reader",
        "fault": "the task prints 48 MB at once; rx's stdout is a pipe nobody reads for a while: 8 s for a "
                 "@task(keepalive 1 s x 2) call (the link counts as dead after 3 s of silence), 20 s for rx run "
                 "(default keepalive: 16 s)",
        "expect": "the run finishes (exit 0, the value comes back) once the reader reads; every byte arrives, "
                  "in order; the run recorded finished; nothing left on the remote",
    },
})

LINE = "x" * 99 + "\n"
LINES = 48 * 10486  # about 48 MB: more than the link holds (paramiko: a 32 MiB window)

BIG = f"import sys\nfor index in range({LINES}):\n    sys.stdout.write({LINE!r})\nprint('done', flush=True)\n"

DRIVER = f"""\
import json, sys, time
from remote_exec import task

@task(remote={HOST!r}, keepalive_interval=1, keepalive_count=2)
def chatty(lines):
    import sys
    for _ in range(lines):
        sys.stdout.write({LINE!r})
    sys.stdout.flush()
    return lines

started = time.monotonic()
try:
    result = {{"ok": True, "value": chatty({LINES})}}
except BaseException as exc:
    result = {{"ok": False, "type": type(exc).__name__, "message": str(exc)}}
result["seconds"] = time.monotonic() - started
sys.stderr.write("RESULT " + json.dumps(result) + "\\n")
"""


def _read_late(rig: Rig, argv: list[str], delay: float, timeout: float) -> tuple[int, bytes, str, float]:
    """Start ``argv`` with its stdout a pipe nobody reads for ``delay`` s, then read it all; return (exit
    status, stdout, stderr, seconds). The process is killed after ``timeout`` s (a hang: exit -9)."""
    started = time.monotonic()
    process = subprocess.Popen(argv, cwd=rig.project, env=rig.env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(delay)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
    return process.returncode, out, err.decode("utf-8", "replace"), time.monotonic() - started


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_slow_consumer_of_a_task_call(rig: Rig, testbed_host: TestbedHost, trial: TrialFactory) -> None:
    driver = rig.write("chatty.py", DRIVER)
    baseline = remote_baseline(testbed_host)

    with trial("slow_consumer", variant="@task, keepalive 1 s x 2, reader 8 s late", bound=8.0 + 15.0) as t:
        code, out, err, seconds = _read_late(rig, [sys.executable, str(driver)], delay=8.0, timeout=60)
        t.timed(seconds, hang=code == -9)
        result = next((json.loads(line[7:]) for line in err.splitlines() if line.startswith("RESULT ")), {})
        t.outcome = (f"value {result.get('value')}" if result.get("ok")
                     else f"{result.get('type')}: {result.get('message')}")
        t.note(lost=int(out != LINE.encode() * LINES), traceback=has_traceback(err), bytes=len(out))
        left = audit_remote(testbed_host, baseline)
        t.audit(left)

        assert code == 0, err
        assert result.get("ok") and result.get("value") == LINES, result
        assert out == LINE.encode() * LINES, f"{len(out)} bytes"
        assert left.clean, left.describe()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_slow_consumer_of_rx_run(rig: Rig, testbed_host: TestbedHost, trial: TrialFactory) -> None:
    rig.write("big.py", BIG)
    baseline = remote_baseline(testbed_host)

    with trial("slow_consumer", variant="rx run big.py | (sleep 20; wc -c)", bound=20.0 + 15.0) as t:
        code, out, err, seconds = _read_late(rig, rig.rx_argv("run", "--remote", HOST, "big.py"), delay=20.0,
                                             timeout=60)
        t.timed(seconds, hang=code == -9)
        t.outcome = f"exit {code}: {error_summary(err)}; {len(out)} bytes read"
        t.note(lost=int(out != LINE.encode() * LINES + b"done\n"), traceback=has_traceback(err))
        shown = rig.show()
        left = audit_remote(testbed_host, baseline)
        t.audit(left)

        assert code == 0, err
        assert out == LINE.encode() * LINES + b"done\n", f"{len(out)} bytes"
        assert (shown["status"], shown["exit_code"]) == ("finished", 0), shown
        assert left.clean, left.describe()
