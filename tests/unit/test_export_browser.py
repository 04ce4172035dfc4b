"""The HTML export, opened in headless Chromium, shows the run's status, host and output as text."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from remote_exec.workspace.export import export
from remote_exec.workspace.manager import Workspace

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TIMEOUT = 90

pytestmark = pytest.mark.skipif(CHROMIUM is None,
                                reason="chromium is not installed (apt-get install -y chromium)")


class _DomText(HTMLParser):
    """Collects the visible text of a DOM, the tags present and the status badges."""

    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.tags: set[str] = set()
        self.badges: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        if tag in ("style", "script"):
            self._skip += 1
        attributes = dict(attrs)
        if tag == "span" and "badge" in (attributes.get("class") or ""):
            self.badges.append(attributes.get("data-status") or "")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("style", "script") and self._skip:
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.text.append(data)


def dump_dom(page: Path, profile: Path) -> str:
    assert CHROMIUM is not None
    argv = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
            "--dump-dom", page.as_uri()]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"chromium did not render {page} within {TIMEOUT} s")
    finally:
        if proc.poll() is None:  # the browser and its helpers are in the session we started
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    assert proc.returncode == 0, f"chromium exited with {proc.returncode}"
    return out


@pytest.mark.timeout(TIMEOUT + 30)
def test_html_export_renders_status_host_and_output(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    run = ws.new_run(target="train.py", kind="script", remote="gpu-box-7", backend="paramiko")
    run.set_status("running")
    with run.store.open_append("stdout.log") as out:
        out.write(b"epoch 3 loss=0.125 <script>document.title='pwned'</script>\n")
    run.store.write_bytes("result.json", json.dumps({
        "ok": False, "value_repr": None, "exit_code": 1,
        "exception": {"type": "KeyError", "message": "'lr'", "traceback": "Traceback ...\nKeyError: 'lr'\n"},
    }).encode())
    run.set_status("failed", exit_code=1)
    page = tmp_path / "report.html"
    page.write_text(export([run], "html"), encoding="utf-8")

    dom = _DomText()
    dom.feed(dump_dom(page, tmp_path / "profile"))
    text = "".join(dom.text)

    assert dom.badges[0] == "failed"
    assert "failed" in text
    assert "gpu-box-7" in text and "paramiko" in text
    assert "epoch 3 loss=0.125 <script>document.title='pwned'</script>" in text  # shown, as text
    assert "script" not in dom.tags  # and never run
    assert "KeyError" in text and "Traceback" in text
    assert run.id in text
