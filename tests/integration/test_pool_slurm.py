"""A pool over a Slurm cluster (testbed/_slurm.py): ``task.map`` and ``Executor.map`` send the waiting calls
as one job array through the login node, results in order, a failing element's exception in its place."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent / "data"
if str(DATA) not in sys.path:
    sys.path.insert(0, str(DATA))
pytest.register_assert_rewrite("slurm_support")

from slurm_support import Cluster  # noqa: E402

pytest_plugins = ["slurm_support"]
pytestmark = pytest.mark.slurm


@pytest.mark.parametrize("slurm_backend", ["openssh", "paramiko"], indirect=True)
def test_a_map_over_a_cluster_is_one_job_array(cluster: Cluster) -> None:
    cluster.write("sweep.py", """\
        import os
        from remote_exec import Executor, task

        @task(remote="cluster")
        def work(index):
            if index == 3:
                raise RuntimeError(f"index {index} failed")
            return index * 10, os.environ.get("SLURM_ARRAY_TASK_ID")

        if __name__ == "__main__":
            for value in work.map(range(6), per_host=4, return_exceptions=True):
                print(repr(value))
        """)

    done = cluster.python("sweep.py")

    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["(0, '0')", "(10, '1')", "(20, '2')", "RuntimeError('index 3 failed')",
                                        "(40, '4')", "(50, '5')"]
    info = cluster.show()
    jobs = {entry["job"]["job_id"] for entry in info["tasks"].values()}
    assert len({job.split("_")[0] for job in jobs}) == 1 and len(jobs) == 6  # one array, six elements


def test_rx_map_over_a_cluster_runs_each_combination_as_a_job_in_the_project(cluster: Cluster) -> None:
    (cluster.project / "data").mkdir()
    cluster.write("data/base.txt", "7")
    cluster.write("train.py", """\
        import os, sys
        lr = sys.argv[sys.argv.index("--lr") + 1]
        base = open("data/base.txt").read()  # the project's file, in the job's snapshot
        with open(f"out-{lr}.txt", "w") as stream:
            stream.write(f"{base}:{lr}")
        print("lr", lr, "base", base, "job", bool(os.environ.get("SLURM_JOB_ID")))
        """)

    done = cluster.rx("map", "-r", "cluster", "train.py", "--lr", ":::", "0.1", "0.2")

    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.splitlines()) == ["[lr=0.1] lr 0.1 base 7 job True", "[lr=0.2] lr 0.2 base 7 job True"]
    landed = {path.name: path.read_text() for path in (cluster.workspace / "runs").glob("*/files/out-*.txt")}
    assert landed == {"out-0.1.txt": "7:0.1", "out-0.2.txt": "7:0.2"}
    assert cluster.squeue() == "" and cluster.remote_runs() == []
