"""The progress bar of a large first upload: shown on a terminal, silent when nothing is sent or output is
not a terminal."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

DRIVE = """
import time
from remote_exec.cli.sync import SyncBar
from remote_exec.protocol.options import SyncProgress
bar = SyncBar()
total = int(__import__("sys").argv[1])
for step in range(5):
    bar(SyncProgress(step * 20, 100, step * total // 4, total))
    time.sleep(0.05)
bar(SyncProgress(100, 100, total, total, done=True))
"""


def _drive(total: int, *, terminal: bool) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "120", "TERM": "xterm"}
    if not terminal:
        done = subprocess.run([sys.executable, "-c", DRIVE, str(total)], capture_output=True, env=env, timeout=60,
                              check=False)
        return (done.stdout + done.stderr).decode()
    leader, follower = os.openpty()
    process = subprocess.Popen([sys.executable, "-c", DRIVE, str(total)], stdout=follower, stderr=follower, env=env)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    process.wait(60)
    os.close(leader)
    return b"".join(chunks).decode("utf-8", "replace")


def test_a_large_upload_shows_files_bytes_and_rate_on_a_terminal() -> None:
    shown = _drive(300 << 20, terminal=True)
    assert "sending the project" in shown
    assert "100/100 files" in shown and "300.0/300.0 MiB" in shown
    assert "/s" in shown  # the rate


def test_nothing_shows_for_a_small_upload_or_without_a_terminal() -> None:
    assert _drive(1 << 20, terminal=True) == ""
    assert _drive(300 << 20, terminal=False) == ""
