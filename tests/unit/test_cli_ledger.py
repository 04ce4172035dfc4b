"""rx runs / show / logs / export / clean, driven through the typer app as a user would."""

from __future__ import annotations

import json
import threading
import time
import typing
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

import remote_exec.cli.ledger as ledger
from remote_exec.cli import app
from remote_exec.errors import ConfigError, WorkspaceError
from remote_exec.workspace.export import EXPORT_FORMATS
from remote_exec.workspace.manager import Run, Workspace
from remote_exec.workspace.state import RUN_STATUSES


def rx(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200", **(env or {})})


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path / "ws")


def finished_run(ws: Workspace, target: str = "train.py", remote: str | None = "gpu1") -> Run:
    run = ws.new_run(target=target, kind="script", remote=remote, backend="openssh" if remote else "local")
    run.set_status("running")
    with run.store.open_append("stdout.log") as out:
        out.write(b"hello from " + target.encode() + b"\n")
    with run.store.open_append("stderr.log") as err:
        err.write(b"warning: something\n")
    run.store.write_bytes("result.json", json.dumps({"ok": True, "value_repr": "42", "exception": None,
                                                     "exit_code": 0}).encode())
    run.set_status("finished", exit_code=0)
    return run


def test_choices_match_the_library() -> None:
    assert typing.get_args(ledger.StatusName) == RUN_STATUSES
    assert typing.get_args(ledger.FormatName) == EXPORT_FORMATS


@pytest.mark.parametrize("command", ["runs", "show", "logs", "export", "clean"])
def test_every_command_has_help(command: str) -> None:
    result = rx(command, "--help")
    assert result.exit_code == 0, result.output
    assert "--workspace" in result.output


def test_runs_table_and_json(ws: Workspace) -> None:
    first = finished_run(ws)
    second = ws.new_run(target="eval.py", kind="script")
    second.set_status("running")
    second.set_status("failed", exit_code=3)
    result = rx("runs", "--workspace", str(ws.root))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["id", "target", "host", "status", "started", "duration", "exit"]
    assert first.id in lines[1] and "gpu1" in lines[1] and "finished" in lines[1]
    assert second.id in lines[2] and "local" in lines[2] and "failed" in lines[2] and lines[2].endswith("3")

    data = json.loads(rx("runs", "--json", "--workspace", str(ws.root)).output)
    assert [d["run_id"] for d in data] == [first.id, second.id]
    for key in ("run_id", "status", "target", "remote", "exit_code", "created", "started", "finished"):
        assert key in data[0]

    failed = json.loads(rx("runs", "--json", "--status", "failed", "--workspace", str(ws.root)).output)
    assert [d["run_id"] for d in failed] == [second.id]
    assert rx("runs", "--status", "exploded", "--workspace", str(ws.root)).exit_code == 2


def test_runs_uses_rx_workspace_and_says_when_empty(tmp_path: Path) -> None:
    result = rx("runs", env={"RX_WORKSPACE": str(tmp_path / "empty")})
    assert result.exit_code == 0
    assert "no runs in" in result.output and "empty" in result.output
    run = finished_run(Workspace(tmp_path / "env-ws"))
    assert run.id in rx("runs", env={"RX_WORKSPACE": str(tmp_path / "env-ws")}).output


def test_show_text_and_json(ws: Workspace) -> None:
    run = finished_run(ws)
    text = rx("show", run.id[:15], "--workspace", str(ws.root))
    assert text.exit_code == 0, text.output
    assert run.id in text.output and "finished" in text.output and "gpu1" in text.output
    assert "value: 42" in text.output
    data = json.loads(rx("show", "latest", "--json", "--workspace", str(ws.root)).output)
    assert data["run_id"] == run.id and data["status"] == "finished" and data["result"]["value_repr"] == "42"


def test_show_unknown_and_ambiguous_runs_are_workspace_errors(ws: Workspace) -> None:
    for rid in ("20240101-000000-000aaa", "20240101-000000-000bbb"):
        ws.new_run(target="t", kind="task", run_id=rid)
    unknown = rx("show", "1999", "--workspace", str(ws.root))
    assert isinstance(unknown.exception, WorkspaceError) and "unknown run" in str(unknown.exception)
    ambiguous = rx("show", "2024", "--workspace", str(ws.root))
    assert isinstance(ambiguous.exception, WorkspaceError)
    assert "20240101-000000-000aaa, 20240101-000000-000bbb" in str(ambiguous.exception)


def test_logs_prints_stdout_or_stderr_exactly(ws: Workspace) -> None:
    run = finished_run(ws)
    assert rx("logs", run.id, "--workspace", str(ws.root)).stdout_bytes == b"hello from train.py\n"
    assert rx("logs", run.id, "--stderr", "--workspace", str(ws.root)).stdout_bytes == b"warning: something\n"


@pytest.mark.timeout(60)
def test_logs_follow_prints_until_the_run_ends(ws: Workspace) -> None:
    run = ws.new_run(target="slow.py", kind="script")
    run.set_status("running")

    def task() -> None:
        with run.store.open_append("stdout.log") as out:
            for i in range(5):
                out.write(f"step {i}\n".encode())
                time.sleep(0.15)
        run.set_status("finished", exit_code=0)

    writer = threading.Thread(target=task)
    started = time.monotonic()
    writer.start()
    result = rx("logs", "-f", run.id, "--workspace", str(ws.root))
    writer.join()
    assert result.exit_code == 0, result.output
    assert result.output == "".join(f"step {i}\n" for i in range(5))
    assert time.monotonic() - started >= 0.6  # it waited for the run rather than printing what was there


def test_export_latest_by_default_and_to_a_file(ws: Workspace, tmp_path: Path) -> None:
    older = finished_run(ws, "a.py")
    newer = finished_run(ws, "b.py")
    default = rx("export", "--format", "json", "--workspace", str(ws.root))
    assert [d["run_id"] for d in json.loads(default.output)] == [newer.id]

    both = rx("export", older.id, newer.id, older.id, "--format", "json", "--workspace", str(ws.root))
    assert [d["run_id"] for d in json.loads(both.output)] == [older.id, newer.id]

    report = tmp_path / "report.xml"
    written = rx("export", older.id, newer.id, "-o", str(report), "--workspace", str(ws.root))
    assert written.exit_code == 0, written.output
    assert [s.get("id") for s in ET.parse(report).getroot().findall("testsuite")] == [older.id, newer.id]

    page = tmp_path / "report.html"
    rx("export", "latest", "-o", str(page), "--workspace", str(ws.root))
    assert "hello from b.py" in page.read_text()

    missing = rx("export", "-o", str(tmp_path / "report.bin"), "--workspace", str(ws.root))
    assert isinstance(missing.exception, ConfigError) and "--format is required" in str(missing.exception)
    empty = rx("export", "--format", "text", "--workspace", str(tmp_path / "nothing"))
    assert isinstance(empty.exception, WorkspaceError) and "no runs" in str(empty.exception)


def test_clean_keeps_newest_and_running(ws: Workspace) -> None:
    running = ws.new_run(target="live.py", kind="script")
    running.set_status("running")
    old = [finished_run(ws, f"{i}.py").id for i in range(3)]
    newest = finished_run(ws, "new.py")
    result = rx("clean", "--keep", "1", "--workspace", str(ws.root))
    assert result.exit_code == 0, result.output
    assert "removed 3 runs, 2 left" in result.output
    assert all(rid in result.output for rid in old)
    assert ws.ids() == [running.id, newest.id]
    assert rx("clean", "--keep", "-1", "--workspace", str(ws.root)).exit_code == 2


def test_a_damaged_run_does_not_hide_the_others(ws: Workspace) -> None:
    good = finished_run(ws)
    bad = finished_run(ws, "bad.py")
    (bad.dir / "state.json").write_text("{torn")
    result = rx("runs", "--workspace", str(ws.root))
    assert result.exit_code == 0
    assert good.id in result.stdout and bad.id not in result.stdout
    assert f"skipping run {bad.id}" in result.stderr and "not valid JSON" in result.stderr
    shown = rx("show", bad.id, "--workspace", str(ws.root))
    assert isinstance(shown.exception, WorkspaceError) and "not valid JSON" in str(shown.exception)


def test_runs_last_reads_from_the_newest_back(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    """``rx runs --last N`` lists the N newest runs that pass its filters (status, a sweep's runs left out)
    and reads no more states than it must: a workspace of thousands of runs answers at once."""
    runs = []
    for index in range(12):
        run = ws.new_run(target=f"t{index}.py", kind="script")
        run.set_status("running")
        run.set_status("failed" if index % 3 == 0 else "finished", exit_code=1 if index % 3 == 0 else 0)
        runs.append(run)
    runs[10].state.update(lambda state: state.update(sweep={"parent": runs[9].id}))  # one run of a sweep
    reads: list[str] = []
    info = Run.info
    monkeypatch.setattr(Run, "info", lambda self: (reads.append(self.id), info(self))[1])

    def listed(*args: str) -> list[str]:
        reads.clear()
        done = rx("runs", "--json", "--workspace", str(ws.root), *args)
        assert done.exit_code == 0, done.output
        return [entry["run_id"] for entry in json.loads(done.stdout)]

    assert listed("--last", "2") == [runs[9].id, runs[11].id] and len(reads) == 3
    assert listed("--last", "2", "--status", "failed") == [runs[6].id, runs[9].id] and len(reads) == 6
    assert listed("--last", "3", "--all") == [runs[9].id, runs[10].id, runs[11].id] and len(reads) == 3
    assert listed() == [run.id for index, run in enumerate(runs) if index != 10] and len(reads) == 12
    assert listed("--status", "failed") == [runs[index].id for index in (0, 3, 6, 9)]
