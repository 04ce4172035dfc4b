"""Slurm through its login node, against a real Slurm in Docker (testbed/_slurm.py): scripts and ``@task``
calls become jobs with their output live, their value, exception and files back; the pending reason is
shown; ``rx cancel`` and Ctrl-C cancel the job; a detached run is followed and collected from other
processes; a coordinator killed while its job runs loses nothing; an array's failed index is rerun;
``rx check`` describes the cluster."""

from __future__ import annotations

import json
import signal
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

SCRIPT = """\
import os, socket, sys, time
print("start", os.environ.get("SLURM_JOB_ID"), socket.gethostname(), os.getcwd() == os.environ["RX_RUN_DIR"],
      flush=True)
time.sleep(1)
print("to stderr", file=sys.stderr, flush=True)
os.makedirs("sub", exist_ok=True)
with open("sub/result.txt", "w") as stream:
    stream.write("written on " + socket.gethostname())
print("end", flush=True)
sys.exit(int(sys.argv[1]))
"""

TICKER = """\
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: (print("got TERM", flush=True), sys.exit(143)))
for index in range(int(sys.argv[1])):
    print("tick", index, flush=True)
    time.sleep(0.5)
with open("ticked.txt", "w") as stream:
    stream.write("all ticks")
"""


@pytest.mark.parametrize("slurm_backend", ["openssh", "paramiko"], indirect=True)
def test_a_script_runs_as_a_job_with_live_output_files_and_its_exit_code(cluster: Cluster) -> None:
    cluster.write("job.py", SCRIPT)

    done = cluster.rx("run", "--remote", "cluster", "job.py", "3")

    assert done.returncode == 3, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("start ") and lines[0].endswith(" True") and lines[-1] == "end"
    job_id, node = lines[0].split()[1:3]
    assert node in ("c1", "c2")
    assert "to stderr" in done.stderr
    assert f"rx: slurm job {job_id} running on {node}" in done.stderr
    info = cluster.show()
    assert info["status"] == "failed" and info.get("exit_code") == 3, info
    job = info["job"]
    assert job["job_id"] == job_id and job["state"] == "FAILED" and job["exit_code"] == "3:0"
    assert job["nodes"] == node and job["partition"] == "debug" and "RUNNING" in job["seen"]
    assert job["elapsed"] and job["states"] == ["FAILED"]
    assert "--time=5" in job["submit_argv"]
    assert cluster.files_of(info["run_id"]) == {"sub/result.txt": f"written on {node}"}
    assert cluster.remote_runs() == []  # collected: nothing stays on the cluster
    assert f"slurm job {job_id}: FAILED on {node} (debug), elapsed" in cluster.rx("show", "latest").stdout


TRAIN = """\
import json, os, sys
from pathlib import Path
config = json.load(open(sys.argv[1]))
rows = (Path(__file__).parent / "data" / "x.csv").read_text().split()
print("lr", config["lr"], "rows", len(rows), "extra", os.path.exists("data/extra.txt"), flush=True)
os.makedirs("outputs", exist_ok=True)
Path("outputs/model.pt").write_text(f"lr={config['lr']} rows={len(rows)}")
Path(sys.argv[1]).write_text("{}")  # rewriting a project file touches only this job's snapshot
"""


@pytest.mark.parametrize("slurm_backend", ["openssh", "paramiko"], indirect=True)
def test_a_job_runs_in_a_snapshot_of_the_project_and_its_outputs_land(cluster: Cluster) -> None:
    # Before jobs shipped the project: FileNotFoundError: 'configs/a.json' (only the script travelled).
    (cluster.project / "configs").mkdir()
    (cluster.project / "data").mkdir()
    cluster.write("configs/a.json", '{"lr": 0.1}')
    cluster.write("data/x.csv", "1,2\n3,4\n5,6\n")
    cluster.write("data/extra.txt", "deleted before the second run")
    cluster.write("data/unique.txt", str(cluster.project))  # a blob the cluster's store cannot have yet
    cluster.write("train.py", TRAIN)

    first = cluster.rx("run", "--remote", "cluster", "train.py", "configs/a.json")
    runs = [cluster.latest_id()]
    (cluster.project / "data" / "extra.txt").unlink()
    second = cluster.rx("run", "--remote", "cluster", "train.py", "configs/a.json")
    runs.append(cluster.latest_id())

    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == ["lr 0.1 rows 3 extra True"]
    assert second.returncode == 0, second.stderr
    assert second.stdout.splitlines() == ["lr 0.1 rows 3 extra False"]  # a deleted file never reappears
    for run in runs:
        assert cluster.files_of(run) == {"outputs/model.pt": "lr=0.1 rows=3", "configs/a.json": "{}"}
    sent = [json.loads((cluster.workspace / "runs" / run / "result.json").read_text())["synced"] for run in runs]
    assert sent[0] is not None and sent[0]["files"] >= 1 and sent[1] is None  # the second job's tree: no blob
    assert (cluster.project / "configs" / "a.json").read_text() == '{"lr": 0.1}'  # the user's tree untouched
    assert not (cluster.project / "outputs").exists()
    assert cluster.remote_runs() == []


def test_a_task_returns_its_value_raises_its_exception_and_brings_its_files(cluster: Cluster) -> None:
    cluster.write("tasks.py", """\
        import os, socket
        from remote_exec import task

        @task(remote="cluster")
        def square(x):
            with open("square.txt", "w") as stream:
                stream.write(str(x * x))
            return x * x, os.environ["SLURM_JOB_ID"], socket.gethostname()

        @task(remote="cluster", slurm={"partition": "urgent"})
        def fails():
            raise KeyError("not on the cluster")

        if __name__ == "__main__":
            value, job, node = square(7)
            print("value", value, job, node)
            try:
                fails()
            except KeyError as exc:
                print("raised", type(exc).__name__, exc, "remote traceback:", "fails" in str(exc.__cause__))
        """)

    done = cluster.python("tasks.py")

    assert done.returncode == 0, done.stderr
    value_line, raised_line = done.stdout.strip().splitlines()
    assert value_line.startswith("value 49 ") and value_line.split()[3] in ("c1", "c2")
    assert raised_line == "raised KeyError 'not on the cluster' remote traceback: True"
    info = cluster.show()
    tasks = sorted(info["tasks"].values(), key=lambda entry: entry["name"])
    assert [entry["status"] for entry in tasks] == ["failed", "done"]
    assert tasks[0]["job"]["partition"] == "urgent" and tasks[1]["job"]["partition"] == "debug"
    assert tasks[1]["job"]["job_id"] == value_line.split()[2]
    files = cluster.files_of(info["run_id"])
    assert [content for name, content in files.items() if name.endswith("square.txt")] == ["49"]


def test_the_pending_reason_and_position_are_shown_while_the_job_waits(cluster: Cluster) -> None:
    cluster.login("sbatch --exclusive -N2 --output=/dev/null --wrap 'sleep 6'")
    cluster.write("job.py", SCRIPT)

    done = cluster.rx("run", "--remote", "cluster", "job.py", "0")

    assert done.returncode == 0, done.stderr
    assert "pending (Resources), position 1 in debug" in done.stderr, done.stderr
    job = cluster.show()["job"]
    assert job["seen"][0] == "PENDING" and job["state"] == "COMPLETED"


def test_rx_cancel_cancels_the_job_and_collects_what_it_left(cluster: Cluster) -> None:
    cluster.write("ticker.py", TICKER)
    started = cluster.rx("run", "--remote", "cluster", "--detach", "ticker.py", "60")
    assert started.returncode == 0, started.stderr
    run = started.stdout.strip()
    job_id = cluster.show(run)["job"]["job_id"]
    assert f"submitted as slurm job {job_id}" in started.stderr
    cluster.wait_for("the job to run", lambda: "RUNNING" in cluster.squeue())

    cancelled = cluster.rx("cancel", run)

    assert cancelled.returncode == 130, cancelled.stderr
    info = cluster.show(run)
    assert info["status"] == "cancelled" and info["exit_code"] == 130
    assert f"Slurm job {job_id} was cancelled by uid 1000 (you)" in info["error"]
    assert "got TERM" in (cluster.workspace / "runs" / run / "stdout.log").read_text()
    assert cluster.squeue() == "" and cluster.sacct_state(job_id) == "CANCELLED by 1000"
    assert cluster.remote_runs() == []


def test_ctrl_c_cancels_the_job_unless_asked_to_keep_it_queued(cluster: Cluster) -> None:
    cluster.write("ticker.py", TICKER)
    attached = cluster.start("run", "--remote", "cluster", "ticker.py", "60")
    kept = cluster.start("run", "--remote", "cluster", "--keep-queued", "ticker.py", "16")
    cluster.wait_for("both jobs to run", lambda: cluster.squeue().count("RUNNING") == 2)
    time.sleep(1)

    for process in (attached, kept):
        cluster.interrupt(process)
    out, err = attached.communicate(timeout=60)
    _, kept_err = kept.communicate(timeout=60)

    assert attached.returncode == 130, err
    assert "was cancelled" in err and "tick 0" in out
    assert kept.returncode == 130, kept_err
    assert "goes on (rx attach" in kept_err
    runs = {info["argv"][0]: info for info in json.loads(cluster.rx("runs", "--json").stdout)}
    assert sorted(info["status"] for info in runs.values()) == ["cancelled", "running"]
    left = next(info for info in runs.values() if info["status"] == "running")
    assert left["run_id"] in kept_err
    assert cluster.squeue().count("RUNNING") == 1  # the kept job goes on, the other is gone
    collected = cluster.rx("attach", left["run_id"])
    assert collected.returncode == 0, collected.stderr
    assert "tick 15" in collected.stdout
    assert cluster.files_of(left["run_id"]) == {"ticked.txt": "all ticks"}


def test_a_detached_run_is_followed_and_collected_from_other_processes(cluster: Cluster) -> None:
    cluster.write("ticker.py", TICKER)
    started = cluster.rx("run", "--remote", "cluster", "--detach", "ticker.py", "8")
    run = started.stdout.strip()

    follower = cluster.start("logs", "-f", run)
    collector = cluster.start("attach", run)
    followed, _ = follower.communicate(timeout=120)
    collected, collect_err = collector.communicate(timeout=120)

    ticks = [f"tick {index}" for index in range(8)]
    assert follower.returncode == 0 and followed.splitlines() == ticks
    assert collector.returncode == 0, collect_err
    assert collected.splitlines() == ticks
    info = cluster.show(run)
    assert info["status"] == "finished" and info["job"]["state"] == "COMPLETED"
    assert cluster.files_of(run) == {"ticked.txt": "all ticks"}


def test_a_killed_coordinator_loses_nothing(cluster: Cluster) -> None:
    cluster.write("ticker.py", TICKER)
    coordinator = cluster.start("run", "--remote", "cluster", "ticker.py", "10")
    cluster.wait_for("the job to run", lambda: "RUNNING" in cluster.squeue())
    time.sleep(1)

    coordinator.send_signal(signal.SIGKILL)
    coordinator.communicate(timeout=30)
    run = cluster.latest_id()
    assert cluster.show(run)["status"] == "running"  # the job's, not lost with the coordinator
    cluster.wait_for("the job to end", lambda: "RUNNING" not in cluster.squeue(), timeout=60)
    collected = cluster.rx("attach", run)

    assert collected.returncode == 0, collected.stderr
    log = (cluster.workspace / "runs" / run / "stdout.log").read_text()
    assert log.splitlines() == [f"tick {index}" for index in range(10)]  # each line once
    assert cluster.show(run)["status"] == "finished"
    assert cluster.files_of(run) == {"ticked.txt": "all ticks"}


def test_an_array_with_a_failing_index_and_its_failed_rerun(cluster: Cluster) -> None:
    cluster.login("touch ~/fail-3")
    cluster.write("sweep.py", """\
        import os
        from remote_exec import task
        from remote_exec.coordinator import Coordinator

        @task(remote="cluster")
        def work(index):
            if index == 3 and os.path.exists(os.path.expanduser("~/fail-3")):
                raise RuntimeError(f"index {index} failed")
            with open("out.txt", "w") as stream:
                stream.write(str(index))
            return index * 10, os.environ.get("SLURM_ARRAY_TASK_ID")

        if __name__ == "__main__":
            for result in Coordinator.current().map_array(work, range(6), parallel=4):
                print(result.status, result.value, result.exception_message)
        """)

    done = cluster.python("sweep.py")
    cluster.login("rm -f ~/fail-3")

    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "finished (0, '0') None", "finished (10, '1') None", "finished (20, '2') None",
        "raised None index 3 failed", "finished (40, '4') None", "finished (50, '5') None"]
    info = cluster.show()
    jobs = {entry["job"]["job_id"] for entry in info["tasks"].values()}
    assert len({job.split("_")[0] for job in jobs}) == 1 and len(jobs) == 6  # one array, six elements
    # The script itself exited 0: the run is that (issue 12 item 14); the failed call is counted apart.
    assert info["status"] == "finished" and info["error"] == "1 of 6 calls failed"
    rerun = cluster.rx("rerun", info["run_id"], "--failed")
    assert rerun.returncode == 0, rerun.stderr
    assert "1 task(s) done, 0 failed, 5 merged" in rerun.stderr
    assert cluster.show()["status"] == "finished"


def test_rx_check_describes_the_cluster(cluster: Cluster) -> None:
    done = cluster.rx("check", "cluster", "--json")

    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)["scheduler"]
    assert report["version"].startswith("22.05")
    assert {partition["name"] for partition in report["partitions"]} == {"debug", "urgent"}
    assert all(partition["nodes"] == 2 for partition in report["partitions"])
    assert report["accounting"] is True
    assert report["shared_home"]["shared"] is True and report["shared_home"]["node"] in ("c1", "c2")
    text = cluster.rx("check", "cluster")
    assert "slurm 22.05" in text.stdout and "shared home yes" in text.stdout
