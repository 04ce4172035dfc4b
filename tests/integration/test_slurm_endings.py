"""How Slurm ends jobs, read honestly, against the Docker cluster: a time limit is a timeout (exit 124) and
the warning signal reaches the task first; a node failure requeues the job in the same rx run (files
written before kept, SLURM_RESTART_COUNT seen) or fails it, said so; a preemption by the urgent
partition fails the run, said so. Time limits have a granularity of a minute in Slurm, and a dead node is
noticed after 10-25 s: the test of both runs its three jobs side by side, and is marked slow."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

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
print("done after", sorted(name for name in os.listdir(".") if name.startswith("attempt-")), flush=True)
"""

SLEEPER = """\
import time
print("sleeping", flush=True)
time.sleep(300)
"""


@pytest.mark.slow
def test_a_time_limit_and_a_node_failure_side_by_side(cluster: Cluster) -> None:
    """Three jobs at once (a time limit costs a minute, a dead node half of one): on c2 one that runs into
    its time limit; on c1 two that lose their node, one asking to be requeued."""
    cluster.write("warned.py", WARNED)
    cluster.write("attempts.py", ATTEMPTS)
    limited = cluster.start("run", "--remote", "cluster", "--slurm", "--nodelist=c2 --time=1 --signal=B:USR2@45",
                            "warned.py")
    requeued = cluster.start("run", "--remote", "cluster", "--slurm", "--nodelist=c1 --requeue", "attempts.py")
    failed = cluster.start("run", "--remote", "cluster", "--slurm", "--nodelist=c1", "attempts.py")
    cluster.wait_for("the three jobs to run", lambda: cluster.squeue().count("RUNNING") == 3)
    time.sleep(1)

    cluster.slurm.kill("c1")
    try:
        cluster.wait_for("Slurm to see c1 fail", lambda: cluster.squeue().count("RUNNING") == 1, timeout=90)
    finally:
        cluster.slurm.start("c1")
    outputs = {name: process.communicate(timeout=180) for name, process in
               (("limited", limited), ("requeued", requeued), ("failed", failed))}
    runs = {info["target"] + str(info["exit_code"]): info for info in (cluster.show(run) for run in _run_ids(cluster))}

    _assert_timed_out(cluster, limited.returncode, *outputs["limited"], runs["warned.py124"])
    _assert_requeued(cluster, requeued.returncode, *outputs["requeued"], runs["attempts.py0"])
    assert failed.returncode == 3, outputs["failed"][1]
    assert "(NODE_FAIL); not requeued" in outputs["failed"][1]
    assert runs["attempts.py3"]["status"] == "failed" and runs["attempts.py3"]["job"]["state"] == "NODE_FAIL"
    cluster.slurm.wait_idle()


def _assert_timed_out(cluster: Cluster, code: int, out: str, err: str, info: dict[str, Any]) -> None:
    """A time limit is a timeout (exit 124), and the warning signal reached the task before it."""
    assert code == 124, err
    assert out.splitlines()[:2] == ["working", "got USR2"]
    assert info["status"] == "failed" and "at its time limit (TIMEOUT" in info["error"]
    assert info["job"]["state"] == "TIMEOUT" and "--signal=B:USR2@45" in info["job"]["submit_argv"]
    assert cluster.files_of(info["run_id"]) == {"checkpoint.txt": "saved"}


def _assert_requeued(cluster: Cluster, code: int, out: str, err: str, info: dict[str, Any]) -> None:
    """The requeued job ran again in the same rx run: its first attempt's file kept, the attempts counted."""
    assert code == 0, err
    assert out.splitlines() == ["attempt 0 on c1", "attempt 1 on c1",
                                "done after ['attempt-0.txt', 'attempt-1.txt']"]
    assert "started again" in err
    assert info["status"] == "finished" and "NODE_FAIL" in info["job"]["states"] and info["job"]["restarts"] == 1
    assert sorted(cluster.files_of(info["run_id"])) == ["attempt-0.txt", "attempt-1.txt"]


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
