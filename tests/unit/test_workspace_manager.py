"""Workspace and Run: ids, lookup, lost runs, retention, merging done tasks, the state.json contract."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import remote_exec
from remote_exec.errors import ConfigError, WorkspaceError
from remote_exec.workspace.manager import Run, Workspace, coordinator_alive, new_run_id
from remote_exec.workspace.state import parse_time

REPO = Path(remote_exec.__file__).resolve().parent.parent

CONTRACT_FIELDS = {"version", "run_id", "status", "target", "kind", "argv", "remote", "backend", "exit_code",
                   "error", "created", "started", "finished", "duration", "coordinator", "actions", "tasks",
                   "parent"}


def make_run(ws: Workspace, status: str = "finished") -> Run:
    """A run of this process, taken through pending -> running -> ``status``."""
    run = ws.new_run(target="job.py", kind="script")
    if status != "pending":
        run.set_status("running")
    if status not in ("pending", "running"):
        run.set_status(status, exit_code=0 if status == "finished" else 1)
    return run


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_run_ids_have_the_documented_form_and_sort_in_creation_order() -> None:
    ids = [new_run_id() for _ in range(2000)]  # many share a second, and a millisecond
    assert all(re.fullmatch(r"\d{8}-\d{6}-\d{3}[0-9a-f]{3}", i) for i in ids)
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def test_runs_list_oldest_to_newest(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    made = [make_run(ws).id for _ in range(20)]
    assert [r.id for r in ws.runs()] == made
    assert ws.latest() == Run(ws, made[-1])


def test_new_run_writes_the_state_contract(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    run = ws.new_run(target="train.py", kind="script", argv=["--epochs", "3"], remote="gpu1",
                     backend="openssh", parent="20240101-000000-000abc")
    info = run.info()
    assert set(info) >= CONTRACT_FIELDS
    assert info["version"] == 1 and info["run_id"] == run.id and info["status"] == "pending"
    assert info["argv"] == ["--epochs", "3"] and info["remote"] == "gpu1" and info["backend"] == "openssh"
    assert info["parent"] == "20240101-000000-000abc"
    assert parse_time(info["created"]) is not None and info["started"] is None and info["finished"] is None
    assert info["coordinator"]["pid"] == os.getpid()
    assert run.dir == tmp_path / "ws" / "runs" / run.id
    assert run.stdout_log == run.dir / "stdout.log" and run.stderr_log == run.dir / "stderr.log"
    assert run.files_dir == run.dir / "files" and run.session_path == run.dir / "session.zip"
    assert run.result_json == run.dir / "result.json" and run.result_pkl == run.dir / "result.pkl"


def test_a_run_is_listed_only_once_its_session_is_saved(tmp_path: Path) -> None:
    """rx run's session goes into the run before its state: a coordinator killed the moment after the run
    appears leaves a run that rx rerun can run again (the fault suite once found one without it)."""
    ws = Workspace(tmp_path / "ws")
    seen: list[tuple[str, list[str]]] = []

    def saved(run_id: str) -> bytes:
        seen.append((run_id, ws.ids()))
        return b"the session of " + run_id.encode()

    run = ws.new_run(target="train.py", kind="script", session=saved)
    assert seen == [(run.id, [])]  # not listed while its session was made
    assert (run.dir / "session.zip").read_bytes() == b"the session of " + run.id.encode()
    assert ws.ids() == [run.id]


def test_set_status_stamps_the_clocks(tmp_path: Path) -> None:
    run = Workspace(tmp_path).new_run(target="t", kind="task")
    run.set_status("running")
    started = run.info()["started"]
    run.set_status("running")
    assert run.info()["started"] == started  # stamped once
    run.set_status("failed", exit_code=2, error="boom")
    info = run.info()
    assert info["status"] == "failed" and info["exit_code"] == 2 and info["error"] == "boom"
    assert parse_time(info["finished"]) >= parse_time(info["started"])  # type: ignore[operator]
    assert isinstance(info["duration"], float) and info["duration"] >= 0
    with pytest.raises(ConfigError, match="unknown run status"):
        run.set_status("exploded")


def test_explicit_run_id(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    assert ws.new_run(target="t", kind="task", run_id="my-run").id == "my-run"
    with pytest.raises(WorkspaceError, match="already exists"):
        ws.new_run(target="t", kind="task", run_id="my-run")
    for bad in ("../x", ".hidden", "a/b", ""):
        with pytest.raises(WorkspaceError, match="invalid run id"):
            ws.new_run(target="t", kind="task", run_id=bad)
    with pytest.raises(ConfigError, match="unknown run kind"):
        ws.new_run(target="t", kind="notebook")


def test_resolve_option_then_env_then_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RX_WORKSPACE", raising=False)
    assert Workspace.resolve().root == tmp_path / ".rx"
    monkeypatch.setenv("RX_WORKSPACE", str(tmp_path / "env-ws"))
    assert Workspace.resolve().root == tmp_path / "env-ws"
    assert Workspace.resolve(tmp_path / "opt").root == tmp_path / "opt"
    assert Workspace.resolve("rel").root == tmp_path / "rel"


def test_lookup_by_id_prefix_and_latest(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    for rid in ("20240101-120000-000aaa", "20240101-120000-000abb", "20240102-090000-000ccc"):
        ws.new_run(target="t", kind="task", run_id=rid)
    assert ws.run("20240101-120000-000aaa").id == "20240101-120000-000aaa"
    assert ws.run("20240102").id == "20240102-090000-000ccc"
    assert ws.run("20240101-120000-000ab").id == "20240101-120000-000abb"
    assert ws.run("latest").id == "20240102-090000-000ccc"
    with pytest.raises(WorkspaceError) as ambiguous:
        ws.run("20240101")
    assert "ambiguous" in str(ambiguous.value)
    assert "20240101-120000-000aaa, 20240101-120000-000abb" in str(ambiguous.value)
    with pytest.raises(WorkspaceError, match="unknown run '2023'"):
        ws.run("2023")
    with pytest.raises(WorkspaceError, match="no runs"):
        Workspace(tmp_path / "empty").run("latest")


def test_latest_with_action_and_current(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    first = make_run(ws)
    with first.action("upload"):
        pass
    second = make_run(ws)
    with pytest.raises(OSError), second.action("upload"):
        raise OSError("disk full")
    assert ws.latest(action="upload") == first
    assert ws.latest(action="never") is None
    assert ws.latest() == second
    assert ws.current() is None
    running = make_run(ws, "running")
    make_run(ws, "finished")
    assert ws.current() == running


def test_run_of_a_dead_coordinator_is_lost_and_recorded(tmp_path: Path) -> None:
    script = textwrap.dedent("""
        import sys
        from remote_exec.workspace import Workspace
        run = Workspace(sys.argv[1]).new_run(target="job.py", kind="script")
        run.set_status("running")
        run.task_started("k", name="f", host=None)
        print(run.id)
    """)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60, check=True)
    run = Workspace(tmp_path).run(out.stdout.strip())
    info = run.info()
    assert info["status"] == "lost"
    assert "ended without recording" in info["error"]
    assert info["tasks"]["k"]["status"] == "cancelled"
    # Persisted, not only derived:
    assert json.loads((run.dir / "state.json").read_text())["status"] == "lost"
    assert [r.id for r in Workspace(tmp_path).runs("lost")] == [run.id]


def test_pid_reuse_and_other_hosts(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    run = make_run(ws, "running")
    record = run.info()["coordinator"]
    assert coordinator_alive(record) is True
    # Same pid, other start time: the pid was reused, the coordinator is gone.
    run.update(coordinator={**record, "start_ticks": record["start_ticks"] + 1})
    assert run.status() == "lost"
    other = make_run(ws, "running")
    other.update(coordinator={**record, "pid": dead_pid(), "hostname": "some-other-host"})
    assert coordinator_alive(other.info()["coordinator"]) is None
    assert other.status() == "running"  # cannot be judged from here
    finished = make_run(ws, "finished")
    finished.update(coordinator={**record, "pid": dead_pid()})
    assert finished.status() == "finished"  # only active runs get lost


def test_clean_keeps_the_newest_and_never_a_running_run(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    old_running = make_run(ws, "running")
    old_pending = make_run(ws, "pending")
    lost = make_run(ws, "running")
    lost.update(coordinator={**lost.info()["coordinator"], "pid": dead_pid()})
    done = [make_run(ws, s).id for s in ("finished", "failed", "cancelled", "finished", "finished")]
    removed = ws.clean(keep=2)
    assert removed == [lost.id, *done[:3]]
    assert ws.ids() == [old_running.id, old_pending.id, *done[3:]]
    assert not [p for p in (tmp_path / "runs").iterdir() if p.name.startswith(".trash")]
    assert ws.clean(keep=0) == done[3:]
    assert ws.ids() == [old_running.id, old_pending.id]
    with pytest.raises(ConfigError):
        ws.clean(keep=-1)
    assert Workspace(tmp_path / "nothing").clean(keep=0) == []


def test_merge_done_copies_done_tasks_and_their_results(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    previous = make_run(ws, "failed")
    previous.task_started("a", name="f", host="h1")
    previous.task_finished("a", ok=True)
    previous.set_task("a", "done", execution_id="exec-a")
    previous.task_started("b", name="f", host="h2")
    previous.task_finished("b", ok=False, error="ValueError: bad")
    previous.task_started("a.b", name="g", host="h1")
    previous.task_finished("a.b", ok=True)
    previous.set_task("c", "skipped")
    previous.store.write_bytes("results/a.json", b'{"ok": true}')
    previous.store.write_bytes("results/a.pkl", b"pickled-a")
    previous.store.write_bytes("results/a.b.pkl", b"pickled-ab")
    previous.store.write_bytes("results/b.json", b'{"ok": false}')

    rerun = ws.new_run(target="job.py", kind="rerun", parent=previous.id)
    merged = rerun.merge_done(previous)

    assert merged == ["a", "a.b"]
    tasks = rerun.tasks()
    assert set(tasks) == {"a", "a.b"}
    assert tasks["a"]["status"] == "done" and tasks["a"]["execution_id"] == "exec-a"
    assert tasks["a"]["merged_from"] == previous.id
    assert sorted(p.name for p in rerun.results_dir.iterdir()) == ["a.b.pkl", "a.json", "a.pkl"]
    assert (rerun.results_dir / "a.pkl").read_bytes() == b"pickled-a"
    assert (rerun.results_dir / "a.b.pkl").read_bytes() == b"pickled-ab"
    assert rerun.merge_done(previous) == []  # already done here


def test_per_call_records_are_written_in_batches_and_read_back_by_name(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    previous = make_run(ws, "failed")
    previous.write_calls([("sessions/a.session", b"session-a"), ("results/a.pkl", b"value-a")])
    previous.write_calls([("sessions/b.session", b"session-b")])
    previous.store.write_bytes("sessions/c.zip", b"an older rx's session")  # written on its own
    assert len(list((previous.dir / "calls").glob("*.zip"))) == 2
    assert previous.call_record("sessions/a.session") == b"session-a"
    assert previous.call_record("results/a.pkl") == b"value-a"
    assert previous.call_record("sessions/b.session") == b"session-b"
    assert previous.call_record("sessions/c.zip") == b"an older rx's session"
    assert previous.call_record("results/b.pkl") is None
    # A rerun takes the done calls' values with it, out of the batch.
    previous.task_started("a", name="f", host="h1")
    previous.set_task("a", "done")
    rerun = ws.new_run(target="job.py", kind="rerun", parent=previous.id)
    assert rerun.merge_done(previous) == ["a"]
    assert (rerun.results_dir / "a.pkl").read_bytes() == b"value-a"


def test_result_logs_and_files(tmp_path: Path) -> None:
    run = make_run(Workspace(tmp_path))
    assert run.result() is None and run.read_log() == b"" and run.files() == []
    run.store.write_bytes("result.json", json.dumps({"ok": True, "value_repr": "42", "exception": None,
                                                     "exit_code": 0}).encode())
    with run.store.open_append("stdout.log") as log:
        log.write(b"0123456789")
    run.store.write_bytes("files/out/model.bin", b"x" * 1000)
    run.store.write_bytes("files/a.txt", b"abc")
    assert run.result() == {"ok": True, "value_repr": "42", "exception": None, "exit_code": 0}
    assert run.read_log(tail=4) == b"6789"
    assert run.files() == [("a.txt", 3), ("out/model.bin", 1000)]


def test_a_directory_without_state_is_not_a_run(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    run = make_run(ws)
    (tmp_path / "runs" / "20990101-000000-000fff").mkdir()
    assert ws.ids() == [run.id]
    with pytest.raises(WorkspaceError, match="unknown run"):
        ws.run("2099")


@pytest.mark.skipif(not Path("/proc/sys/kernel/random/boot_id").is_file(), reason="no boot id on this system")
def test_a_coordinator_of_an_earlier_boot_is_gone(tmp_path: Path) -> None:
    record = make_run(Workspace(tmp_path), "running").info()["coordinator"]
    assert coordinator_alive(record) is True
    assert coordinator_alive({**record, "boot_id": "an-earlier-boot"}) is False
    assert coordinator_alive({**record, "boot_id": None}) is True  # no boot id recorded: the pid decides
    assert coordinator_alive({**record, "pid": "1"}) is None  # not a record rx wrote


def test_merge_done_copies_results_recorded_in_batches(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    previous = make_run(ws, "failed")
    for key in ("a", "b"):
        previous.task_started(key, name="f", host=None)
        previous.task_finished(key, ok=True)
    previous.write_calls([("sessions/a.session", b"session-a"), ("results/a.pkl", b"value-a")])
    rerun = ws.new_run(target="job.py", kind="rerun", parent=previous.id)
    assert rerun.merge_done(previous) == ["a", "b"]  # b's value was never recorded: its entry still is
    assert sorted(p.name for p in rerun.results_dir.iterdir()) == ["a.pkl"]
    assert (rerun.results_dir / "a.pkl").read_bytes() == b"value-a"


def test_a_new_workspace_in_a_git_project_stays_out_of_git_status(tmp_path: Path) -> None:
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "train.py").write_text("print(1)\n")
    subprocess.run(["git", "-C", str(tmp_path), "add", "train.py"], check=True)

    Workspace(tmp_path / ".rx").new_run(target="train.py", kind="script")

    status = subprocess.run(["git", "-C", str(tmp_path), "status", "--porcelain", "--untracked-files=all"],
                            capture_output=True, text=True, check=True).stdout
    assert status.splitlines() == ["A  train.py"]


def test_a_workspace_named_by_the_user_gets_no_gitignore(tmp_path: Path) -> None:
    Workspace(tmp_path / "my-runs").new_run(target="train.py", kind="script")

    assert sorted(path.name for path in (tmp_path / "my-runs").iterdir()) == ["runs"]
