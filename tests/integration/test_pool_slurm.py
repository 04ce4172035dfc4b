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
