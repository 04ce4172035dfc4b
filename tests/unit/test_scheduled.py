"""Calls through a batch scheduler, with a scheduler plug-in that lives outside rx (tests/unit/scheduler_double.py:
its "cluster" is this machine) selected by ``scheduler = "queue"``: the call is stored, submitted, followed
and collected exactly like any call (value, exception, files, output); the scheduler's verdict reads into
the result when it ended the job; a job that vanished without a result is lost; a job is polled with the
others, not one by one; an array comes back per index; secrets never go to a job."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from backend_double import TARGET as BACKEND_TARGET
from backend_double import DoubleBackend
from scheduler_double import TARGET, QueueLauncher

from remote_exec import task
from remote_exec.backends import register, unregister
from remote_exec.config import Configuration, Remote
from remote_exec.coordinator import Coordinator
from remote_exec.errors import Cancelled, ConfigError, ConnectError, RemoteExecError, RunnerError
from remote_exec.launchers import register_launcher, unregister_launcher


@pytest.fixture
def queue(isolated: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Configuration]:
    """The queue scheduler registered; a remote ``cluster`` that uses it; a coordinator of the test's own."""
    register("double", BACKEND_TARGET)
    register_launcher("queue", TARGET)
    QueueLauncher.reset()
    coordinator = Coordinator()
    monkeypatch.setattr(Coordinator, "_current", coordinator)
    config = Configuration().add_remote(Remote(name="cluster", host="cluster", backend="double", scheduler="queue",
                                               python=sys.executable, workdir=str(tmp_path / "shared")))
    yield config
    coordinator.close()
    QueueLauncher.reset()
    unregister_launcher("queue")
    unregister("double")


def where() -> tuple[str | None, str | None]:
    with open("made.txt", "w") as stream:
        stream.write("made in the job")
    print("printed in the job", flush=True)
    return os.environ.get("RX_JOB_ID"), os.environ.get("RX_INSIDE_RUNNER")


def broken() -> None:
    raise LookupError("no such thing in the job")


def sleepy() -> str:
    time.sleep(60)
    return "woke"


def runs(tmp_path: Path) -> list[str]:
    return sorted(os.listdir(tmp_path / "shared" / "runs"))


def test_a_task_call_is_a_job_with_its_value_files_and_output(queue: Configuration, tmp_path: Path,
                                                              capfd: pytest.CaptureFixture[str]) -> None:
    job_id, inside = task(remote="cluster", config=queue)(where)()

    assert inside == "1" and job_id == next(iter(QueueLauncher.requests))
    assert "printed in the job" in capfd.readouterr().out
    Coordinator.current().flush()
    run = Coordinator.current().task_runs
    [entry] = next(iter(run._created.values())).tasks().values()
    assert entry["status"] == "done" and entry["job"]["job_id"] == job_id and entry["job"]["state"] == "COMPLETED"
    assert runs(tmp_path) == []  # collected: the run directory is gone from the "cluster"


def test_an_exception_comes_back_as_itself(queue: Configuration) -> None:
    with pytest.raises(LookupError, match="no such thing in the job") as caught:
        task(remote="cluster", config=queue)(broken)()
    assert "broken" in str(caught.value.__cause__)


def test_a_cancelled_job_reads_as_cancelled_whatever_its_task_did(queue: Configuration) -> None:
    call = task(remote="cluster", config=queue)(sleepy)
    cancel = threading.Timer(1.0, lambda: QueueLauncher().cancel_jobs(None, [_job(queue)]))  # type: ignore[arg-type]
    cancel.start()
    try:
        with pytest.raises(Cancelled, match="was cancelled"):
            call()
    finally:
        cancel.cancel()


def on_term(marker: str) -> str:
    def handler(*_: object) -> None:
        Path(marker).write_text("got TERM")
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, handler)
    Path(marker + ".started").write_text("")
    try:
        time.sleep(60)
    except KeyboardInterrupt:
        Path(marker).write_text("got KeyboardInterrupt")
        raise
    return "woke"


def test_a_job_its_scheduler_ends_gets_sigterm_and_no_interrupt(queue: Configuration, tmp_path: Path) -> None:
    """A scheduler ending a job (scancel, a time limit) sends SIGTERM; the task's handler runs, not a
    KeyboardInterrupt. This double signals only the job's process group, as Slurm's proctrack/pgid does, so
    the task gets SIGTERM from its supervisor after the grace (Slurm's cgroup and linuxproc tracking signal
    the task themselves: it then ends before the grace)."""
    call = task(remote="cluster", config=queue)(on_term)
    marker = tmp_path / "ended-by.txt"

    def cancel_once_started() -> None:
        until = time.monotonic() + 60
        while time.monotonic() < until and not Path(f"{marker}.started").exists():
            time.sleep(0.05)
        QueueLauncher().cancel_jobs(None, [_job(queue)])  # type: ignore[arg-type]

    cancel = threading.Thread(target=cancel_once_started, daemon=True)
    cancel.start()
    with pytest.raises(Cancelled, match="was cancelled"):
        call(str(marker))
    cancel.join(timeout=60)
    until = time.monotonic() + 20  # (the scheduler says CANCELLED at once; the task ends within its graces)
    while time.monotonic() < until and not marker.exists():
        time.sleep(0.05)
    assert marker.read_text() == "got TERM"


def _job(config: Configuration) -> Any:
    from remote_exec.launchers.jobs import Job

    deadline = time.monotonic() + 10
    while not QueueLauncher.processes and time.monotonic() < deadline:
        time.sleep(0.05)
    job_id = next(iter(QueueLauncher.processes))
    return Job(scheduler="queue", job_id=job_id, submitted=0, workdir="")


def test_a_job_that_vanished_without_a_result_is_lost_never_finished(queue: Configuration) -> None:
    call = task(remote="cluster", config=queue)(sleepy)

    def vanish() -> None:
        job_id = _job(queue).job_id
        time.sleep(0.5)
        QueueLauncher.kill(job_id)  # its node died with it, runner and task
        QueueLauncher.forgotten.add(job_id)

    killer = threading.Thread(target=vanish)
    killer.start()
    try:
        with pytest.raises(RunnerError, match="the queue forgot job") as caught:
            call()
    finally:
        killer.join()
    assert caught.value.reason == "lost"


def test_a_pending_job_is_followed_and_polled_with_the_others(queue: Configuration) -> None:
    heard: list[str] = []
    call = task(remote="cluster", config=queue, slurm={"hold": True})(where)

    def release() -> None:
        job_id = _job(queue).job_id
        time.sleep(0.6)
        heard.append(f"polls while pending: {QueueLauncher.polls}")
        QueueLauncher.release(job_id)

    releaser = threading.Thread(target=release)
    releaser.start()
    try:
        job_id, _ = call()
    finally:
        releaser.join()
    assert job_id == next(iter(QueueLauncher.requests))
    assert heard and int(heard[0].split(": ")[1]) >= 2  # it was polled while it waited


def test_an_array_comes_back_per_index_and_records_each_call(queue: Configuration, tmp_path: Path) -> None:
    def tenfold(value: int) -> int:
        if value == 2:
            raise ValueError("two is bad")
        return value * 10

    function = task(remote="cluster", config=queue)(tenfold)
    results = Coordinator.current().map_array(function, range(4), parallel=2)

    assert [result.status for result in results] == ["finished", "finished", "raised", "finished"]
    assert [result.value for result in results] == [0, 10, None, 30]
    assert isinstance(results[2].exception, ValueError)
    [request] = QueueLauncher.requests.values()
    assert request.array == 4 and request.parallel == 2
    assert runs(tmp_path) == []


def test_secrets_never_go_to_a_job(queue: Configuration, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_TOKEN", "s3cret")
    call = task(remote="cluster", config=queue, secret_env=["API_TOKEN"])(where)

    with pytest.raises(ConfigError, match="--secret-env cannot reach a queue job"):
        call()
    assert QueueLauncher.requests == {}


def test_a_direct_remote_refuses_scheduler_options_and_arrays(isolated: Any, tmp_path: Path) -> None:
    config = Configuration().add_remote(Remote(name="box", host="box", python=sys.executable,
                                               workdir=str(tmp_path / "remote")))
    coordinator = Coordinator()
    try:
        with pytest.raises(ConfigError, match="a job array needs a scheduler remote"):
            coordinator.map_array(task(remote="box", config=config)(where), [1, 2])
    finally:
        coordinator.close()


class LinkLosingBackend(DoubleBackend):
    """A local backend whose killed commands read as a lost link (as ssh's exit 255 does)."""

    name = "lossy"

    def classify_exit(self, exit_code: int | None, stderr: bytes) -> RemoteExecError | None:
        return ConnectError(self.host, "the link was lost") if exit_code == -signal.SIGKILL else None


def _children_with(word: str) -> list[int]:
    """This process's children whose command line holds ``word`` (the runners it started)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) == os.getpid() and word.encode() in command:
            found.append(int(entry.name))
    return found


def test_a_lost_login_node_leaves_the_job_running_for_rx_attach(queue: Configuration, tmp_path: Path) -> None:
    register("lossy", "test_scheduled:LinkLosingBackend")
    config = Configuration().add_remote(Remote(name="cluster", host="cluster", backend="lossy", scheduler="queue",
                                               python=sys.executable, workdir=str(tmp_path / "shared")))

    def lose_the_link() -> None:
        deadline = time.monotonic() + 20
        while not (followers := _children_with("attach")) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        for pid in followers:
            os.kill(pid, signal.SIGKILL)

    cutter = threading.Thread(target=lose_the_link)
    cutter.start()
    try:
        with pytest.raises(ConnectError, match=r"queue job \d+ goes on \(rx attach .* collects it\)"):
            task(remote="cluster", config=config)(sleepy)()
    finally:
        cutter.join()
        unregister("lossy")
    [processes] = QueueLauncher.processes.values()
    assert processes[0].poll() is None and not QueueLauncher.cancelled  # the job was left alone


class RefusingLauncher(QueueLauncher):
    """A queue whose scheduler refuses every job."""

    name = "refusing"

    def submit(self, backend: Any, request: Any) -> Any:
        raise RunnerError("sbatch on cluster refused the job: invalid partition", reason="submit")


def test_a_refused_job_is_one_error_and_leaves_nothing_on_the_cluster(queue: Configuration, tmp_path: Path) -> None:
    register_launcher("refusing", "test_scheduled:RefusingLauncher")
    config = Configuration().add_remote(Remote(name="cluster", host="cluster", backend="double",
                                               scheduler="refusing", python=sys.executable,
                                               workdir=str(tmp_path / "shared")))
    try:
        with pytest.raises(RunnerError, match="refused the job: invalid partition"):
            task(remote="cluster", config=config)(where)()
    finally:
        unregister_launcher("refusing")
    assert runs(tmp_path) == []


PROJECT_TASKS = """\
import json
import os
from pathlib import Path


def train(seed):
    with open("configs/a.json") as stream:  # relative to the project, as in a script run there
        lr = json.load(stream)["lr"]
    rows = (Path(__file__).parent / "data" / "x.csv").read_text().split()
    os.makedirs("outputs", exist_ok=True)
    with open(f"outputs/model-{seed}.txt", "w") as stream:
        stream.write(f"lr={lr} rows={len(rows)} seed={seed}")
    with open("configs/a.json", "w") as stream:  # a run that rewrites a project file touches only its snapshot
        stream.write("{}")
    if seed == 2:
        raise ValueError("seed 2 diverged")
    return lr, os.getcwd() == os.environ["RX_RUN_DIR"]
"""


@pytest.fixture
def project_tasks(isolated: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A project (pyproject.toml, configs/, data/, its tasks module), the current directory, imported."""
    import importlib

    root = tmp_path / "proj"
    (root / "configs").mkdir(parents=True)
    (root / "data").mkdir()
    (root / "pyproject.toml").write_text("[project]\nname = 'proj'\n")
    (root / "configs" / "a.json").write_text('{"lr": 0.1}')
    (root / "data" / "x.csv").write_text("1,2\n3,4\n5,6\n")
    (root / "proj_tasks.py").write_text(PROJECT_TASKS)
    monkeypatch.chdir(root)
    monkeypatch.syspath_prepend(str(root))
    sys.modules.pop("proj_tasks", None)
    module = importlib.import_module("proj_tasks")
    yield module
    sys.modules.pop("proj_tasks", None)


def _landed(isolated: Any) -> dict[str, str]:
    return {path.name: path.read_text() for path in isolated.workspace.rglob("outputs/model-*.txt")}


def test_a_job_runs_in_a_snapshot_of_its_project_and_its_outputs_land(queue: Configuration, project_tasks: Any,
                                                                      isolated: Any, tmp_path: Path) -> None:
    # Seen failing before the jobs shipped the project: FileNotFoundError: 'configs/a.json'.
    call = task(remote="cluster", config=queue)(project_tasks.train)

    assert call(1) == (0.1, True)

    Coordinator.current().flush()
    assert _landed(isolated) == {"model-1.txt": "lr=0.1 rows=3 seed=1"}
    assert (tmp_path / "proj" / "configs" / "a.json").read_text() == '{"lr": 0.1}'  # the user's tree untouched
    assert not (tmp_path / "proj" / "outputs").exists()
    assert runs(tmp_path) == []


def test_an_array_runs_each_call_in_its_own_snapshot(queue: Configuration, project_tasks: Any, isolated: Any,
                                                     tmp_path: Path) -> None:
    function = task(remote="cluster", config=queue)(project_tasks.train)

    results = Coordinator.current().map_array(function, [1, 2, 3])

    assert [result.status for result in results] == ["finished", "raised", "finished"]
    assert results[0].unwrap() == (0.1, True) and results[2].unwrap() == (0.1, True)  # each read the original
    with pytest.raises(ValueError, match="seed 2 diverged"):
        results[1].unwrap()
    traceback = results[1].traceback or ""
    assert 'File "proj_tasks.py", line 16, in train' in traceback and "/runs/" not in traceback  # the user's file
    Coordinator.current().flush()
    assert _landed(isolated) == {f"model-{seed}.txt": f"lr=0.1 rows=3 seed={seed}" for seed in (1, 2, 3)}
    assert len(QueueLauncher.requests) == 1  # one job array


def test_a_job_whose_tree_left_the_store_before_it_started_says_so(queue: Configuration, project_tasks: Any,
                                                                    tmp_path: Path) -> None:
    import shutil

    call = task(remote="cluster", config=queue, slurm={"hold": True})(project_tasks.train)

    def remove_then_release() -> None:
        job_id = _job(queue).job_id
        shutil.rmtree(tmp_path / "shared" / "trees")  # someone emptied the store while the job queued
        QueueLauncher.release(job_id)

    releaser = threading.Thread(target=remove_then_release)
    releaser.start()
    try:
        with pytest.raises(RemoteExecError, match=r"tree [0-9a-f]{12} is no longer whole .*run the call again"):
            call(1)
    finally:
        releaser.join()


def writes_a_large_file() -> int:
    with open("big.bin", "wb") as stream:
        stream.write(b"x" * 8192)
    with open("small.txt", "w") as stream:
        stream.write("small")
    return 1


def test_a_jobs_files_over_the_pull_limit_stay_on_the_cluster(queue: Configuration, tmp_path: Path) -> None:
    # Before, a job's stored options had no pull_limit: everything came back, whatever the limit.
    import dataclasses
    import json

    limited = dataclasses.replace(queue, pull_limit=1024)

    assert task(remote="cluster", config=limited)(writes_a_large_file)() == 1

    [kept] = runs(tmp_path)
    status = json.loads((tmp_path / "shared" / "runs" / kept / ".rx" / "status.json").read_text())
    assert status.get("over_limit") is True
    assert (tmp_path / "shared" / "runs" / kept / "big.bin").stat().st_size == 8192
