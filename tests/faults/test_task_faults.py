"""Faults of the task and of the coordinator, on the session testbed's first host: the task kills itself,
runs past its timeout, gets interrupted, loses its coordinator, or shares a workspace with 7 other runs."""

from __future__ import annotations

import os
import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from faultkit import (
    Ran,
    Rig,
    TrialFactory,
    audit_remote,
    cli_error_lines,
    error_summary,
    finish,
    has_traceback,
    json_tail,
    remote_baseline,
    state_files_parse,
    traceback_message,
)

from testbed import TestbedHost

HOST = "rx-testbed-1"

SELF_KILL = """\
import os
print("about to die", flush=True)
os.kill(os.getpid(), 9)
print("still alive")
"""

# Sleeps long and leaves a child in its process group; prints when both run.
SLEEPER = """\
import subprocess, sys, time
child = subprocess.Popen(["sleep", "61.{token}"])
print("task started", child.pid, flush=True)
time.sleep(float(sys.argv[1]) if len(sys.argv) > 1 else 60)
print("task finished", flush=True)
"""

SHORT = """\
import sys, time
print("task started", flush=True)
time.sleep(3)
with open("done.txt", "w") as stream:
    stream.write("done " + " ".join(sys.argv[1:]))
print("task finished", flush=True)
"""


@pytest.mark.timeout(60)
def test_task_sigkill_reports_signal_and_exits_137(rig: Rig, testbed_host: TestbedHost,
                                                   trial: TrialFactory) -> None:
    rig.write("self_kill.py", SELF_KILL)
    baseline = remote_baseline(testbed_host)

    with trial("task_sigkill", bound=30.0) as t:
        done = rig.rx("run", "--remote", HOST, "self_kill.py", timeout=35)
        t.timed(done.seconds, hang=done.timed_out)
        shown = rig.show()
        result = shown.get("result") or {}
        t.outcome = f"exit {done.returncode}, result status {result.get('status')}: {result.get('detail')}"
        t.note(traceback=has_traceback(done.stderr), run_status=shown["status"])
        t.audit(audit_remote(testbed_host, baseline))

        assert not done.timed_out
        assert done.returncode == 137, done.stderr
        assert done.stdout.splitlines() == ["about to die"]
        assert not has_traceback(done.stderr), traceback_message(done.stderr)
        assert "SIGKILL" in done.stderr
        assert (shown["status"], shown["exit_code"]) == ("failed", 137)
        assert result.get("status") == "signal"
        assert "SIGKILL" in str(result.get("detail")) and "SIGKILL" in str(shown.get("error"))
        assert t.facts["orphans"] == 0 and t.facts["leftover_files"] == 0, t.facts


@pytest.mark.timeout(60)
def test_task_timeout_exits_124_and_kills_the_process_group(rig: Rig, testbed_host: TestbedHost,
                                                       trial: TrialFactory) -> None:
    token = str(random.randrange(10**6))
    rig.write("sleeper.py", SLEEPER.format(token=token))
    baseline = remote_baseline(testbed_host)

    with trial("task_timeout", bound=2.0 + 5.0) as t:
        watched = rig.watch(rig.rx_argv("run", "--remote", HOST, "--timeout", "2", "sleeper.py", "60"))
        started_at = watched.wait_for("task started", timeout=30)
        done = watched.wait(timeout=30)
        since_start = watched.started + done.seconds - (started_at or watched.started)
        t.timed(since_start, hang=done.timed_out)
        shown = rig.show()
        t.outcome = f"exit {done.returncode}, run {shown['status']}: {shown.get('error')}"
        t.note(traceback=has_traceback(done.stderr), total_seconds=round(done.seconds, 2))
        left = audit_remote(testbed_host, baseline)
        t.audit(left)

        assert started_at is not None, done.stderr
        assert not done.timed_out
        assert done.returncode == 124, done.stderr
        assert since_start <= 2.0 + 5.0, since_start
        assert "task finished" not in done.stdout
        assert not has_traceback(done.stderr), traceback_message(done.stderr)
        assert (shown["status"], shown["exit_code"]) == ("failed", 124)
        assert (shown.get("result") or {}).get("status") == "timeout"
        assert not any(f"sleep 61.{token}" in line for line in left.processes), left.describe()
        assert left.clean, left.describe()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_interrupt_exits_130_and_cancels_the_remote_task(rig: Rig, testbed_host: TestbedHost,
                                                         trial: TrialFactory, signame: str) -> None:
    token = str(random.randrange(10**6))
    rig.write("sleeper.py", SLEEPER.format(token=token))
    baseline = remote_baseline(testbed_host)

    with trial("interrupt", variant=signame, bound=5.0) as t:
        watched = rig.watch(rig.rx_argv("run", "--remote", HOST, "sleeper.py", "60"))
        started_at = watched.wait_for("task started", timeout=30)
        assert started_at is not None, "the task never started"
        signalled = time.monotonic()
        watched.process.send_signal(getattr(signal, signame))
        done = watched.wait(timeout=20)
        t.timed(time.monotonic() - signalled, hang=done.timed_out)
        left = audit_remote(testbed_host, baseline)
        t.audit(left)
        runs = rig.runs()
        status = runs[-1]["status"] if runs else None
        t.outcome = f"exit {done.returncode}, run {status}"
        t.note(traceback=has_traceback(done.stderr), run_status=status)

        assert not done.timed_out
        assert left.clean, left.describe()
        assert not has_traceback(done.stderr), traceback_message(done.stderr)
        assert len(cli_error_lines(done.stderr)) == 1, done.stderr
        assert status == "cancelled"
        assert done.returncode == 130, done.stderr


def _coordinator_trial(rig: Rig, delay: float, index: int) -> tuple[Ran, list[str], bool]:
    """Start rx run of SHORT, SIGKILL its coordinator after ``delay`` s: the rx process, or through an rx
    server the worker running its command (a client killed is not a coordinator killed: its worker stops
    the run, see tests/unit/test_cli_server.py); return it, the runs it created and whether a worker was
    killed."""
    before = set(rig.run_ids())
    argv = rig.rx_argv("run", "--remote", HOST, "short.py", f"trial{index}")
    spawned = time.monotonic()
    process = rig.spawn(argv)
    time.sleep(delay)
    workers = rig.workers() if rig.server else []
    for pid in workers or [process.pid]:
        os.kill(pid, signal.SIGKILL)
    done = finish(process, argv, spawned, timeout=10)
    new = sorted(set(rig.run_ids()) - before)
    return done, new, bool(workers)


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_coordinator_killed_leaves_nothing_running_and_a_lost_run_to_rerun(
        rig: Rig, testbed_host: TestbedHost, trial: TrialFactory, fault_seed: int) -> None:
    rig.write("short.py", SHORT)
    seed = fault_seed
    chooser = random.Random(seed)
    killed: list[tuple[str, float]] = []
    for index in range(6):
        delay = round(chooser.uniform(0.1, 2.5), 2)
        baseline = remote_baseline(testbed_host)
        with trial("coordinator_killed", variant=f"kill after {delay:.2f} s (seed {seed})",
                   bound=5.0) as t:
            done, new, worker = _coordinator_trial(rig, delay, index)
            left = audit_remote(testbed_host, baseline)
            t.audit(left)
            t.timed(left.seconds, hang=done.timed_out)
            t.note(runs_created=len(new), delay=delay, worker_killed=worker)
            t.outcome = "killed before the run was recorded" if not new else "run recorded, coordinator killed"
            if worker:  # the client says so in one line, and exits 3
                t.outcome += f"; exit {done.returncode}: {error_summary(done.stderr)}"
                assert done.returncode == 3, done.stderr
                assert cli_error_lines(done.stderr)[-1:] == [
                    "rx: error: the rx server's worker ended without a status; RX_SERVER=0 runs rx without a "
                    "server"], done.stderr
            else:
                assert done.returncode == -signal.SIGKILL
            assert left.clean, left.describe()
            assert len(new) <= 1, new
            killed += [(run_id, delay) for run_id in new]

    listed = {run["run_id"]: run for run in rig.runs()}
    with trial("coordinator_killed", variant="rx runs --json, then rx rerun --failed of every lost run",
               bound=60.0) as t:
        statuses = {run_id: listed[run_id]["status"] for run_id, _ in killed}
        t.note(statuses=statuses)
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=len(killed) or 1) as pool:
            reruns = list(pool.map(lambda item: rig.rx("rerun", item[0], "--failed", "--json", timeout=60),
                                   killed))
        t.timed(time.monotonic() - started, hang=any(r.timed_out for r in reruns))
        finished = [json_tail(r.stdout) if r.returncode == 0 else {} for r in reruns]
        t.outcome = (f"{sum(s == 'lost' for s in statuses.values())}/{len(statuses)} lost, "
                     f"{sum(f.get('status') == 'finished' for f in finished)}/{len(finished)} reruns finished")
        t.note(lost=sum(s not in ("lost", "finished") for s in statuses.values()),
               traceback=any(has_traceback(r.stderr) for r in reruns))

        assert killed, f"seed {seed}: no trial got as far as recording its run"
        assert all(status == "lost" for status in statuses.values()), statuses
        for (run_id, _), again, info in zip(killed, reruns, finished, strict=True):
            assert again.returncode == 0, again.stderr
            assert info["status"] == "finished" and info["parent"] == run_id, info
            assert (rig.workspace / "runs" / info["run_id"] / "files" / "done.txt").read_text().startswith("done")
        _, broken = state_files_parse(rig.workspace)
        assert not broken, broken


@pytest.mark.timeout(120)
def test_concurrency_eight_runs_on_one_workspace(rig: Rig, testbed_host: TestbedHost,
                                                 trial: TrialFactory) -> None:
    rig.write("tagged.py", "import sys\nprint('tag', sys.argv[1])\n"
                           "open('tag.txt', 'w').write(sys.argv[1])\n")
    baseline = remote_baseline(testbed_host)
    tags = [f"{'remote' if index % 2 else 'local'}-{index}" for index in range(8)]

    with trial("concurrency", variant="4 local + 4 remote", bound=60.0) as t:
        started = time.monotonic()
        processes = []
        for tag in tags:
            where = ["--remote", HOST] if tag.startswith("remote") else []
            argv = rig.rx_argv("run", *where, "tagged.py", tag)
            processes.append((argv, rig.spawn(argv)))
        done = [finish(process, argv, started, timeout=90) for argv, process in processes]
        t.timed(time.monotonic() - started, hang=any(d.timed_out for d in done))
        runs = rig.runs()
        count, broken = state_files_parse(rig.workspace)
        by_tag = {}
        for run in runs:
            if run.get("argv"):
                by_tag[run["argv"][0]] = run
        landed = {}
        for tag, run in by_tag.items():
            path = rig.workspace / "runs" / run["run_id"] / "files" / "tag.txt"
            landed[tag] = path.read_text() if path.is_file() else None
        lost = len(tags) - sum(1 for tag in tags if landed.get(tag) == tag)
        t.note(lost=lost, corrupted=len(broken), runs=len(runs), state_files=count)
        t.outcome = (f"{len(runs)} runs, {sum(r['status'] == 'finished' for r in runs)} finished, "
                     f"{len(broken)} unreadable state.json")
        t.audit(audit_remote(testbed_host, baseline))

        assert all(d.returncode == 0 for d in done), [d.stderr for d in done if d.returncode]
        assert [d.stdout.strip() for d in done] == [f"tag {tag}" for tag in tags]
        assert len(runs) == 8 and count == 8 and not broken, (runs, broken)
        assert {run["status"] for run in runs} == {"finished"}
        assert sorted(by_tag) == sorted(tags)
        for tag, run in by_tag.items():
            assert run["remote"] == (HOST if tag.startswith("remote") else None), run
            log = (rig.workspace / "runs" / run["run_id"] / "stdout.log").read_text()
            assert log == f"tag {tag}\n"
        assert lost == 0, landed
        assert t.facts["orphans"] == 0 and t.facts["leftover_files"] == 0, t.facts
