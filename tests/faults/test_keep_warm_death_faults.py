"""A persistent worker (``keep_warm``) ended by a signal is reported like a per-call run's task.

The out-of-memory killer or a ``kill -9`` of the worker used to read "the connection was lost while the
task ran" (the worker is the ssh session's command: its death looked like the link's); now the worker's
guardian says how it ended: "killed by the kernel's out-of-memory killer (SIGKILL)", "killed by SIGKILL",
exit 137, and the next call gets a fresh worker.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from faultkit import SCENARIOS, Rig, TrialFactory, audit_remote, has_traceback, remote_baseline, root_sh

from testbed import TestbedHost

SCENARIOS.update({
    "warm_worker_killed": {
        "class": "keep_warm workers",
        "title": "keep_warm worker killed",
        "fault": "a @task(keep_warm=True) call touches 512 MB on a 128 MB host (the OOM killer ends the worker), "
                 "or the worker gets kill -9 from root while a call sleeps",
        "expect": "RunnerError reason oom ('out-of-memory') or signal ('killed by SIGKILL'), never 'connection "
                  "lost'; the call recorded failed, exit 137; the next call works in a fresh worker; nothing "
                  "left on the remote",
    },
})

DRIVER = """\
import json, os, sys, time
from remote_exec import task
from remote_exec.coordinator import Coordinator

@task(remote=sys.argv[1], keep_warm=True)
def hog():
    block = bytearray(512 << 20)
    for index in range(0, len(block), 4096):
        block[index] = 1
    return "survived"

@task(remote=sys.argv[1], keep_warm=True)
def sleeper():
    print("task started", os.getpid(), flush=True)
    time.sleep(30)
    return "slept"

@task(remote=sys.argv[1], keep_warm=True)
def where():
    return os.getpid()

first = where()
try:
    value = (hog if sys.argv[2] == "oom" else sleeper)()
    result = {"ok": True, "value": value}
except Exception as exc:
    result = {"ok": False, "type": type(exc).__name__, "message": str(exc), "reason": getattr(exc, "reason", None)}
result["first"] = first
result["next"] = where()
Coordinator.current().flush()
from remote_exec.workspace import Workspace
(run,) = Workspace.resolve().runs()
entries = sorted(run.tasks().values(), key=lambda entry: entry["started"])
result["entry"] = {key: entries[1].get(key) for key in ("status", "result_status", "exit_code", "error")}
print("RESULT " + json.dumps(result), flush=True)
"""


@pytest.fixture(scope="module")
def tight_host(module_host: Callable[..., TestbedHost]) -> TestbedHost:
    """A host with 128 MB of memory."""
    return module_host("warm", mem_limit="128m")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["oom", "kill9"])
def test_warm_worker_killed_is_reported_like_a_task(rig: Rig, tight_host: TestbedHost, trial: TrialFactory,
                                                    how: str) -> None:
    driver = rig.write("warm.py", DRIVER)
    baseline = remote_baseline(tight_host)

    with trial("warm_worker_killed", variant="OOM killer" if how == "oom" else "kill -9 of the worker",
               bound=30.0) as t:
        watched = rig.watch([rig.driver_argv("x")[0], str(driver), tight_host.alias, how])
        if how == "kill9":
            started = watched.wait_for("task started", timeout=45)
            assert started is not None, "the call never started"
            pid = next(line.split()[2] for _, line in watched.lines if line.startswith("task started"))
            root_sh(tight_host, f"kill -9 {int(pid)}")
        done = watched.wait(timeout=60)
        t.timed(done.seconds, hang=done.timed_out)
        result = done.result_line()
        t.outcome = f"{result.get('type')} ({result.get('reason')}): {result.get('message')}"
        entry = result.get("entry") or {}
        t.note(traceback=has_traceback(done.stderr), entry=json.dumps(entry))
        left = audit_remote(tight_host, baseline)
        t.audit(left)

        assert not done.timed_out and result, done.stdout + done.stderr
        assert result["type"] == "RunnerError", result
        assert "connection" not in result["message"], result
        if how == "oom":
            assert result["reason"] == "oom" and "out-of-memory" in result["message"], result
        else:
            assert result["reason"] == "signal" and "killed by SIGKILL" in result["message"], result
        assert (entry.get("status"), entry.get("exit_code")) == ("failed", 137), entry
        assert isinstance(result["next"], int) and result["next"] != result["first"], result
        assert left.clean, left.describe()
