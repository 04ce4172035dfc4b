"""Exporters: the JSON, JUnit XML, HTML and text reports carry what a reader needs, safely escaped."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from remote_exec.errors import ConfigError
from remote_exec.workspace.export import LOG_TAIL, export
from remote_exec.workspace.manager import Run, Workspace

TRACEBACK = ('Traceback (most recent call last):\n  File "train.py", line 3, in <module>\n'
             "ValueError: bad <input>\n")


def failed_run(ws: Workspace) -> Run:
    """A remote run that failed with an exception, with hostile characters in its output."""
    run = ws.new_run(target="train.py", kind="script", argv=["--epochs", "3"], remote="gpu1",
                     backend="openssh")
    run.set_status("running")
    with run.action("pack"):
        pass
    with run.store.open_append("stdout.log") as out:
        out.write(b"epoch 1 <script>alert('x')</script> & done\n\x1b[31mred\x1b[0m \x00 nul\n")
    with run.store.open_append("stderr.log") as err:
        err.write(TRACEBACK.encode())
    run.store.write_bytes("files/model.bin", b"m" * 2048)
    run.store.write_bytes("result.json", json.dumps({
        "ok": False, "value_repr": None, "exit_code": 1,
        "exception": {"type": "ValueError", "message": "bad <input>", "traceback": TRACEBACK}}).encode())
    run.set_status("failed", exit_code=1, error="ValueError: bad <input>")
    return run


def task_run(ws: Workspace) -> Run:
    """A local run of three tasks: one done, one failed, one skipped."""
    run = ws.new_run(target="pipeline", kind="task", backend="local")
    run.set_status("running")
    run.task_started("k1", name="prepare", host="gpu1")
    run.task_finished("k1", ok=True)
    run.task_started("k2", name="train", host="gpu2")
    run.task_finished("k2", ok=False, error="RuntimeError: CUDA out of memory")
    run.set_task("k2", "failed", traceback="Traceback ...\nRuntimeError: CUDA out of memory\n")
    run.set_task("k3", "skipped")
    with run.store.open_append("stdout.log") as out:
        out.write(b"pipeline output\n")
    run.set_status("failed", exit_code=1)
    return run


def test_json_export_has_the_contract_fields_result_and_files(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    run = failed_run(ws)
    items = json.loads(export([run], "json"))
    assert len(items) == 1
    item = items[0]
    for key in ("run_id", "status", "target", "remote", "exit_code", "created", "started", "finished"):
        assert key in item
    assert item["run_id"] == run.id and item["status"] == "failed" and item["remote"] == "gpu1"
    assert item["result"]["exception"]["type"] == "ValueError"
    assert item["files"] == [{"path": "model.bin", "size": 2048}]
    assert item["actions"][0]["name"] == "pack"


def test_junit_one_suite_per_run_one_case_per_task(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    single, tasks = failed_run(ws), task_run(ws)
    finished = ws.new_run(target="ok.py", kind="script")
    finished.set_status("running")
    finished.set_status("finished", exit_code=0)
    root = ET.fromstring(export([single, tasks, finished], "junit"))  # parses: valid XML

    assert root.tag == "testsuites"
    assert (root.get("tests"), root.get("failures"), root.get("skipped")) == ("5", "2", "1")
    suites = root.findall("testsuite")
    assert [s.get("id") for s in suites] == [single.id, tasks.id, finished.id]

    # A run without tasks is one test case, failing with the exception and its traceback.
    (case,) = suites[0].findall("testcase")
    failure = case.find("failure")
    assert failure is not None and failure.get("message") == "ValueError: bad <input>"
    assert "line 3, in <module>" in (failure.text or "")
    assert suites[0].get("hostname") == "gpu1"
    out = suites[0].findtext("system-out") or ""
    assert "<script>alert('x')</script>" in out and "\x1b" not in out and "\x00" not in out
    assert "ValueError: bad <input>" in (suites[0].findtext("system-err") or "")
    props = {p.get("name"): p.get("value") for p in suites[0].iter("property")}
    assert props["status"] == "failed" and props["exit_code"] == "1"

    cases = {c.get("name"): c for c in suites[1].findall("testcase")}
    assert set(cases) == {"prepare", "train", "k3"}
    assert cases["k3"].find("skipped") is not None
    assert cases["prepare"].find("failure") is None and cases["prepare"].find("skipped") is None
    train_failure = cases["train"].find("failure")
    assert train_failure is not None and train_failure.get("message") == "RuntimeError: CUDA out of memory"
    assert "Traceback" in (train_failure.text or "")
    assert [suites[1].get(k) for k in ("tests", "failures", "skipped")] == ["3", "1", "1"]

    (ok_case,) = suites[2].findall("testcase")
    assert list(ok_case) == []  # passed


def test_junit_lost_run_is_an_error(tmp_path: Path) -> None:
    run = Workspace(tmp_path).new_run(target="job.py", kind="script")
    run.set_status("lost", error="coordinator gone")
    suite = ET.fromstring(export([run], "junit")).find("testsuite")
    assert suite is not None and suite.get("errors") == "1"
    error = suite.find("testcase/error")
    assert error is not None and error.get("message") == "coordinator gone"


def test_html_shows_status_host_output_and_escapes(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    page = export([failed_run(ws), task_run(ws)], "html")
    assert page.startswith("<!DOCTYPE html>")
    assert 'data-status="failed"' in page and ">failed</span>" in page
    assert "gpu1" in page and "openssh" in page
    assert "epoch 1 &lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; done" in page
    assert "<script>" not in page  # nothing executable, nothing external
    assert "http://" not in page and "https://" not in page and "<link" not in page
    assert "ValueError" in page and "line 3, in &lt;module&gt;" in page
    assert "model.bin" in page and "2.0 KiB" in page
    assert "CUDA out of memory" in page and "prepare" in page and "status-skipped" in page


def test_html_and_junit_keep_only_the_tail_of_long_logs(tmp_path: Path) -> None:
    run = Workspace(tmp_path).new_run(target="chatty.py", kind="script")
    with run.store.open_append("stdout.log") as out:
        out.write(b"HEAD-MARKER\n" + b"x" * (LOG_TAIL + 1000) + b"\nTAIL-MARKER\n")
    page = export([run], "html")
    assert "TAIL-MARKER" in page and "HEAD-MARKER" not in page
    assert "last 200.0 KiB of" in page
    out = ET.fromstring(export([run], "junit")).findtext("testsuite/system-out") or ""
    assert "TAIL-MARKER" in out and "HEAD-MARKER" not in out


def test_text_summary(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    run = failed_run(ws)
    text = export([run, task_run(ws)], "text")
    assert f"run {run.id}  failed  (exit 1)" in text
    assert "host      gpu1 via openssh" in text
    assert "exception ValueError: bad <input>" in text
    assert "failed    k2 (train) on gpu2" in text
    assert "epoch 1" in text and "\x1b" not in text
    assert "files     1 (2.0 KiB)" in text


def test_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown export format"):
        export([], "yaml")
