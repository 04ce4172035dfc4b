"""How Slurm ends jobs, read honestly, against the Docker cluster: a time limit is a timeout (exit 124) and
the warning signal reaches the task first; a node failure requeues the job in the same rx run (files
written before kept, SLURM_RESTART_COUNT seen) or fails it, said so; a preemption by the urgent
partition fails the run, said so. Time limits have a granularity of a minute in Slurm, and a dead node is
noticed after 10-25 s: these tests run their jobs side by side and are marked slow."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent / "data"
if str(DATA) not in sys.path:
    sys.path.insert(0, str(DATA))
pytest.register_assert_rewrite("slurm_support")

from slurm_support import Cluster  # noqa: E402

pytest_plugins = ["slurm_support"]
pytestmark = pytest.mark.slurm

# Checkpoints when warned (USR2), then goes on until the time limit stops it.
WARNED = """\
import signal, sys, time
def warned(*_):
    print("got USR2", flush=True)
    with open("checkpoint.txt", "w") as stream:
        stream.write("saved")
signal.signal(signal.SIGUSR2, warned)
print("working", flush=True)
while True:
    time.sleep(0.2)
"""

# Counts attempts: writes a file per attempt, runs long enough for the node to be killed under it.
ATTEMPTS = """\
import os, socket, sys, time
attempt = os.environ.get("SLURM_RESTART_COUNT", "0")
print("attempt", attempt, "on", socket.gethostname(), flush=True)
with open(f"attempt-{attempt}.txt", "w") as stream:
    stream.write(socket.gethostname())
if attempt == "0":
    time.sleep(300)
print("done after", sorted(name for name in os.listdir(".") if name.startswith("attempt")), flush=True)
"""

SLEEPER = """\
import time
print("sleeping", flush=True)
time.sleep(300)
"""


@pytest.mark.slow
def test_a_time_limit_is_a_timeout_and_the_warning_signal_reaches_the_task_first(cluster: Cluster) -> None:
    cluster.write("warned.py", WARNED)

    done = cluster.rx("run", "--remote", "cluster", "--slurm", "--time=1 --signal=B:USR2@45", "warned.py",
                      timeout=180)

    assert done.returncode == 124, done.stderr
    assert done.stdout.splitlines()[:2] == ["working", "got USR2"]
    info = cluster.show()
    assert info["status"] == "failed" and info["exit_code"] == 124
    assert "at its time limit (TIMEOUT" in info["error"]
    assert info["job"]["state"] == "TIMEOUT"
    assert "--signal=B:USR2@45" in info["job"]["submit_argv"]
    assert cluster.files_of(info["run_id"]) == {"checkpoint.txt": "saved"}


@pytest.mark.slow
def test_a_node_failure_requeues_the_job_in_the_same_run_or_fails_it(cluster: Cluster) -> None:
    cluster.write("attempts.py", ATTEMPTS)
    requeued = cluster.start("run", "--remote", "cluster", "--slurm", "--nodelist=c1 --requeue", "attempts.py")
    failed = cluster.start("run", "--remote", "cluster", "--slurm", "--nodelist=c1", "attempts.py")
    cluster.wait_for("both jobs to run on c1", lambda: cluster.squeue().count("RUNNING") == 2)
    time.sleep(1)

    cluster.slurm.kill("c1")
    try:
        cluster.wait_for("Slurm to see c1 fail", lambda: "RUNNING" not in cluster.squeue(), timeout=90)
    finally:
        cluster.slurm.start("c1")
    requeued_out, requeued_err = requeued.communicate(timeout=180)
    _, failed_err = failed.communicate(timeout=60)

    assert requeued.returncode == 0, requeued_err
    assert requeued_out.splitlines() == ["attempt 0 on c1", "attempt 1 on c1", "done after ['attempt-0.txt', "
                                                                              "'attempt-1.txt']"]
    assert "started again" in requeued_err
    assert failed.returncode == 3, failed_err
    assert "(NODE_FAIL); not requeued" in failed_err
    runs = {info["exit_code"]: info for info in (cluster.show(run) for run in _run_ids(cluster))}
    assert runs[0]["status"] == "finished" and "NODE_FAIL" in runs[0]["job"]["states"]
    assert runs[0]["job"]["restarts"] == 1
    assert sorted(cluster.files_of(runs[0]["run_id"])) == ["attempt-0.txt", "attempt-1.txt"]
    assert runs[3]["status"] == "failed" and runs[3]["job"]["state"] == "NODE_FAIL"
    cluster.slurm.wait_idle()


def test_a_preemption_by_the_urgent_partition_fails_the_run_and_says_so(cluster: Cluster) -> None:
    cluster.write("sleeper.py", SLEEPER)
    victim = cluster.start("run", "--remote", "cluster", "--slurm", "--nodelist=c2 --exclusive", "sleeper.py")
    cluster.wait_for("the job to run on c2", lambda: "RUNNING" in cluster.squeue())

    cluster.login("sbatch -p urgent --nodelist=c2 --exclusive --output=/dev/null --wrap 'sleep 1'")
    out, err = victim.communicate(timeout=120)

    assert victim.returncode == 3, err
    assert out.splitlines() == ["sleeping"]
    assert "preempted by a higher-priority job (PREEMPTED); not requeued" in err
    info = cluster.show()
    assert info["status"] == "failed" and info["job"]["state"] == "PREEMPTED"


def _run_ids(cluster: Cluster) -> list[str]:
    import json

    return [info["run_id"] for info in json.loads(cluster.rx("runs", "--json").stdout)]
