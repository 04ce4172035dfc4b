"""What users and tools read, byte for byte: the four exports, ``rx runs`` and ``rx show``.

The workspace below is built with fixed ids, clocks and coordinator records, so every report of it is
the same on every machine (the paths of its directory are written as ``<tmp>``, the HTML export's own
clock as ``<now>``). Each report is compared with its file under ``golden/``; a difference fails with a
unified diff. When a change of output is intended, rewrite the files with ``RX_UPDATE_GOLDEN=1`` and
review the diff of ``tests/unit/golden/`` like any other change.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import remote_exec.cli.ledger  # noqa: F401 - registers runs and show on the app
import remote_exec.workspace.export as export_module
from remote_exec.cli import app
from remote_exec.workspace.export import export
from remote_exec.workspace.manager import Run, Workspace

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("RX_UPDATE_GOLDEN") == "1"
#: A small log tail, so the "last ... of ..." notes show without megabytes of golden files.
SMALL_TAIL = 1024

TRACEBACK = ('Traceback (most recent call last):\n  File "train.py", line 3, in <module>\n'
             '    raise ValueError("bad <input>")\nValueError: bad <input>\n')
#: A coordinator on a host that is not this one: its runs are never checked for liveness.
COORDINATOR = {"pid": 4242, "hostname": "golden-host", "started": "2024-05-01T11:59:00.000+00:00",
               "start_ticks": 100, "boot_id": "b00t"}


def record(ws: Workspace, run_id: str, *, result: dict[str, Any] | None = None, stdout: bytes = b"",
           stderr: bytes = b"", files: dict[str, bytes] | None = None, **fields: Any) -> Run:
    """A run whose state.json holds exactly ``fields`` over fixed defaults."""
    run = ws.new_run(target=str(fields.get("target")), kind=str(fields.get("kind", "script")), run_id=run_id)
    state = {"version": 1, "run_id": run_id, "status": "finished", "target": None, "kind": "script",
             "argv": None, "remote": None, "backend": None, "exit_code": None, "error": None,
             "created": "2024-05-01T12:00:00.000+00:00", "started": None, "finished": None, "duration": None,
             "coordinator": COORDINATOR, "actions": [], "tasks": {}, "parent": None, **fields}
    run.state.write(state)
    if result is not None:
        run.store.write_bytes("result.json", json.dumps(result).encode())
    for name, data in (("stdout.log", stdout), ("stderr.log", stderr)):
        if data:
            with run.store.open_append(name) as log:
                log.write(data)
    for path, content in (files or {}).items():
        run.store.write_bytes(f"files/{path}", content)
    return run


def task(name: str | None, status: str, *, host: str | None = None, duration: float | None = None,
         error: str | None = None, **extra: Any) -> dict[str, Any]:
    entry = {"name": name, "host": host, "status": status, "started": "2024-05-01T12:00:01.000+00:00",
             "finished": None if duration is None else "2024-05-01T12:00:02.500+00:00",
             "duration": duration, "error": error, "execution_id": "e" * 16, **extra}
    return entry if name is not None else {k: v for k, v in entry.items() if k != "name"}


def build(ws: Workspace, project: Path) -> list[Run]:
    """Runs that between them take every branch of the reports."""
    chatty = b"".join(f"\x1b[32mepoch {i:02d}\x1b[0m loss=0.{i:03d} <ok> & \x00\n".encode() for i in range(60))
    return [
        record(ws, "20240501-120000-000a01", target="train.py", argv=["--epochs", "3", "--name", "a b"],
               remote="gpu1", backend="openssh", status="failed", exit_code=1, error="ValueError: bad <input>",
               started="2024-05-01T12:00:00.250+00:00", finished="2024-05-01T12:00:04.750+00:00",
               duration=4.5, parent="20240430-090000-000fff",
               actions=[{"name": "pack", "host": None, "status": "finished",
                         "started": "2024-05-01T12:00:00.300+00:00",
                         "finished": "2024-05-01T12:00:00.420+00:00", "error": None},
                        {"name": "execute", "host": "gpu1", "status": "failed",
                         "started": "2024-05-01T12:00:00.500+00:00",
                         "finished": "2024-05-01T12:00:04.700+00:00", "error": "RemoteError: bad <input>"}],
               result={"ok": False, "value_repr": None, "exit_code": 1,
                       "exception": {"type": "ValueError", "message": "bad <input>", "traceback": TRACEBACK}},
               stdout=chatty, stderr=TRACEBACK.encode(),
               files={"model.bin": b"m" * 2048, "logs/sub/run.txt": b"0123456789", "big.dat": b"x" * 3_500_000}),
        record(ws, "20240501-120000-000a02", target="pipeline", kind="task", backend="local", status="failed",
               exit_code=1, error="2 task(s) did not finish", started="2024-05-01T12:00:00.500+00:00",
               finished="2024-05-01T13:01:40.500+00:00", duration=3700.0,
               tasks={"k1": task("prepare", "done", host="gpu1", duration=1.5),
                      "k2": task("train", "failed", host="gpu2", duration=75.0,
                                 error="RuntimeError: CUDA out of memory",
                                 traceback="Traceback ...\nRuntimeError: CUDA out of memory\n"),
                      "k3": task("k3", "skipped"),
                      "k4": task(None, "failed"),
                      "k5": task("evaluate", "cancelled", host="gpu1"),
                      "k6": task("merged", "done", duration=0.25, merged_from="20240430-090000-000fff")},
               stdout=b"pipeline output\n"),
        record(ws, "20240501-120000-000a03", target="mypkg.main", kind="module", backend="local",
               status="finished", exit_code=0, started="2024-05-01T12:00:01.000+00:00",
               finished="2024-05-01T12:01:16.000+00:00", duration=75.0,
               result={"ok": True, "value_repr": "{'answer': 42}", "exception": None, "exit_code": 0}),
        record(ws, "20240501-120000-000a04", target="job.py", remote="gpu2", backend="paramiko", status="lost",
               error="the coordinator (pid 4242 on golden-host) ended without recording how the run ended"),
        record(ws, "20240501-120000-000a05", target="wait.py", status="cancelled",
               started="2024-05-01T12:00:02.000+00:00", finished="2024-05-01T12:00:03.000+00:00", duration=1.0,
               stderr=b"interrupted\n"),
        record(ws, "20240501-120000-000a06", target="exit2.py", remote="user@host:2222", backend="openssh",
               status="failed", result={"ok": False, "value_repr": None, "exit_code": 2, "exception": None}),
        record(ws, "20240501-120000-000a07", target="sweep", kind="task", status="failed", exit_code=1,
               tasks={"only": task("only", "done", duration=0.5)},
               result={"ok": False, "value_repr": None, "exit_code": 1,
                       "exception": {"type": None, "message": "the sweep broke after its tasks"}}),
        record(ws, "20240501-120000-000a08", target=str(project / "scripts" / "deep" / "long_name_report.py"),
               remote="a-rather-long-host-name.cluster.example.org", backend="openssh", status="running",
               started="2024-05-01T12:00:05.000+00:00", duration=3.25),
        record(ws, "20240501-120000-000a09", target="unicode.py", status="finished", exit_code=0,
               started="2024-05-01T12:00:06.000+00:00", finished="2024-05-01T12:00:06.010+00:00",
               duration=0.01, result={"ok": True, "value_repr": "'h\u00e9llo \u2713'", "exception": None,
                                      "exit_code": 0},
               stdout="d\u00e9j\u00e0 vu \u2713\n".encode()),
    ]


@pytest.fixture
def utc() -> Iterator[None]:
    """The local zone is UTC while the test runs (``rx show`` prints local times)."""
    saved = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    yield
    if saved is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = saved
    time.tzset()


@pytest.fixture
def root() -> Iterator[Path]:
    """A directory whose path has the same length on every machine (``rx show`` pads to the longest
    value, the run directory among them)."""
    path = Path(tempfile.mkdtemp(prefix="rx-golden-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def runs(root: Path, monkeypatch: pytest.MonkeyPatch, utc: None) -> list[Run]:
    monkeypatch.setattr(export_module, "LOG_TAIL", SMALL_TAIL)
    monkeypatch.chdir(root)
    return build(Workspace(root / "ws"), root)


def normalized(text: str, root: Path) -> str:
    text = text.replace(str(root), "<tmp>")
    return re.sub(r"exported \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", "exported <now>", text)


def check(name: str, text: str, root: Path) -> None:
    text = normalized(text, root)
    path = GOLDEN / name
    if UPDATE:
        GOLDEN.mkdir(exist_ok=True)
        path.write_bytes(text.encode("utf-8"))
        return
    expected = path.read_bytes().decode("utf-8")
    if text != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True),
                                            f"golden/{name}", "now"))
        pytest.fail(f"{name} changed (RX_UPDATE_GOLDEN=1 rewrites it):\n{diff}")


def rx(*args: str, columns: int = 200) -> str:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": str(columns), "LINES": "50"})
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.parametrize(("fmt", "suffix"), [("text", "txt"), ("json", "json"), ("html", "html"),
                                             ("junit", "xml")])
def test_export_formats(runs: list[Run], fmt: str, suffix: str, root: Path) -> None:
    check(f"export.{suffix}", export(runs, fmt), root)
    check(f"export-empty.{suffix}", export([], fmt), root)
    check(f"export-single.{suffix}", export(runs[:1], fmt), root)


#: Each golden file of the command line and the arguments that print it (``--workspace`` is added).
CLI: dict[str, list[str]] = {
    "runs.txt": ["runs"],
    "runs-narrow.txt": ["runs"],
    "runs-failed.txt": ["runs", "--status", "failed"],
    "runs.json": ["runs", "--json"],
    "runs-none.txt": ["runs", "--status", "pending"],
    **{f"show-{n}.txt": ["show", f"20240501-120000-000a0{n}"] for n in range(1, 10)},
    "show-1.json": ["show", "20240501-120000-000a01", "--json"],
}


@pytest.mark.parametrize("name", sorted(CLI))
def test_cli_reports(runs: list[Run], name: str, root: Path) -> None:
    columns = 72 if "narrow" in name else 200
    check(f"cli-{name}", rx(*CLI[name], "--workspace", str(root / "ws"), columns=columns), root)
