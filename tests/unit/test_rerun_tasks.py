"""rx rerun of a run recorded by @task calls: --failed runs only the calls that did not finish."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from remote_exec.cli.rerun_tasks import rerun_tasks
from remote_exec.errors import WorkspaceError
from remote_exec.workspace.manager import Workspace

PROGRAM = """
import os, sys
from remote_exec import task

@task
def square(x):
    with open(os.environ["CALLS_LOG"], "a") as log:
        log.write(f"square {x}\\n")
    if x == 3 and not os.path.exists(os.environ["FIXED_FLAG"]):
        raise ValueError("three is broken today")
    return x * x

if __name__ == "__main__":
    results = []
    for x in (1, 2, 3):
        try:
            results.append(square(x))
        except ValueError as exc:
            results.append(repr(exc))
    print(results)
"""


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[2])
    environment = dict(os.environ)
    environment.update(RX_WORKSPACE=str(tmp_path / "ws"), RX_CACHE_DIR=str(tmp_path / "cache"),
                       CALLS_LOG=str(tmp_path / "calls.log"), FIXED_FLAG=str(tmp_path / "fixed"),
                       PYTHONPATH=os.pathsep.join(filter(None, [root, environment.get("PYTHONPATH")])))
    (tmp_path / "program.py").write_text(PROGRAM)
    return environment


def rx(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "remote_exec", *args], cwd=tmp_path, env=env, text=True,
                          capture_output=True, timeout=120)


def test_rerun_failed_runs_only_the_calls_that_did_not_finish(tmp_path: Path, env: dict[str, str]) -> None:
    first = subprocess.run([sys.executable, "program.py"], cwd=tmp_path, env=env, text=True, capture_output=True,
                           timeout=120)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("[1, 4, ") and "three is broken today" in first.stdout
    runs = json.loads(rx(tmp_path, env, "runs", "--json").stdout)
    # The program caught the failure and exited 0: so is the run recorded; the failed call is counted apart.
    assert len(runs) == 1 and runs[0]["status"] == "finished" and runs[0]["kind"] == "task"
    assert runs[0]["exit_code"] == 0 and runs[0]["error"] == "1 of 3 calls failed"
    tasks = runs[0]["tasks"]
    assert sorted(entry["status"] for entry in tasks.values()) == ["done", "done", "failed"]

    (tmp_path / "calls.log").write_text("")
    (tmp_path / "fixed").write_text("")
    rerun = rx(tmp_path, env, "rerun", runs[0]["run_id"], "--failed")
    assert rerun.returncode == 0, rerun.stderr
    assert "1 task(s) done, 0 failed, 2 merged" in rerun.stderr
    assert (tmp_path / "calls.log").read_text() == "square 3\n"  # only the call that failed ran again
    info = json.loads(rx(tmp_path, env, "show", "latest", "--json").stdout)
    assert info["status"] == "finished" and info["parent"] == runs[0]["run_id"]
    assert sorted(entry["status"] for entry in info["tasks"].values()) == ["done", "done", "done"]
    merged = [entry for entry in info["tasks"].values() if entry.get("merged_from")]
    assert len(merged) == 2


def test_rerun_of_a_finished_task_run_reruns_every_call(tmp_path: Path, env: dict[str, str]) -> None:
    (tmp_path / "fixed").write_text("")
    assert subprocess.run([sys.executable, "program.py"], cwd=tmp_path, env=env, capture_output=True,
                          timeout=120).returncode == 0
    (tmp_path / "calls.log").write_text("")
    rerun = rx(tmp_path, env, "rerun", "latest")
    assert rerun.returncode == 0, rerun.stderr
    assert sorted((tmp_path / "calls.log").read_text().splitlines()) == ["square 1", "square 2", "square 3"]


def test_a_call_without_a_saved_session_is_skipped_and_fails_the_rerun(isolated: Any,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    ws = Workspace(isolated.workspace)
    previous = ws.new_run(target="pipeline", kind="task", remote="gpu1", backend="openssh")
    previous.set_task("k1", "failed", name="train", error="RuntimeError: boom")
    previous.set_status("failed", exit_code=1)

    assert rerun_tasks(ws, previous, failed=True, remote=None, as_json=True) == 1
    info = json.loads(capsys.readouterr().out)
    assert info["status"] == "failed" and info["exit_code"] == 1 and info["parent"] == previous.id
    assert info["error"] == "1 task(s) did not finish" and info["remote"] == "gpu1"
    entry = info["tasks"]["k1"]
    assert (entry["status"], entry["name"], entry["error"]) == ("skipped", "train", "no saved session to rerun")


def test_a_run_without_tasks_is_a_workspace_error(isolated: Any, capsys: pytest.CaptureFixture[str]) -> None:
    ws = Workspace(isolated.workspace)
    previous = ws.new_run(target="pipeline", kind="task")
    previous.set_status("finished", exit_code=0)
    with pytest.raises(WorkspaceError, match="recorded no tasks"):
        rerun_tasks(ws, previous, failed=False, remote=None, as_json=False)
    assert "0 task(s) done, 0 failed, 0 merged from" in capsys.readouterr().err
    assert ws.run("latest").info()["status"] == "finished"
