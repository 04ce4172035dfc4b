"""A run's stdout.log keeps at most its cap: the tail, after a note of how much of the head was dropped;
the terminal gets every byte."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from remote_exec.config import Configuration, parse_size
from remote_exec.errors import ConfigError
from remote_exec.workspace.output import CappedLog, log_origin


def test_a_capped_log_keeps_the_tail_and_counts_what_it_dropped(tmp_path: Path) -> None:
    path = tmp_path / "stdout.log"
    log = CappedLog(open(path, "ab", buffering=0), path, 1000)  # noqa: SIM115
    data = b"".join(f"{index:05d}\n".encode() for index in range(1000))  # 6000 bytes
    for start in range(0, len(data), 70):
        log.write(data[start:start + 70])
        assert path.stat().st_size <= 2000 + 200
    assert log.offset == len(data)
    log.close()
    text = path.read_bytes()
    note, _, tail = text.partition(b"\n")
    assert tail == data[-1000:]
    assert note == b"[rx: the first 5000 bytes of this output were dropped (log_cap); the last 1000 follow]"
    assert log_origin(path) == (5000, len(note) + 1)
    again = CappedLog(open(path, "ab", buffering=0), path, 1000)  # noqa: SIM115 - an attach resumes it
    assert again.offset == len(data)
    again.write(b"more\n")
    again.close()
    assert log_origin(path)[0] == 5005 and path.read_bytes().endswith(b"more\n")  # trimmed to its cap


def test_no_cap_keeps_everything(tmp_path: Path) -> None:
    path = tmp_path / "stdout.log"
    log = CappedLog(open(path, "ab", buffering=0), path, 0)  # noqa: SIM115
    log.write(b"x" * 100_000)
    log.close()
    assert path.read_bytes() == b"x" * 100_000


def test_log_cap_is_read_from_tool_rx(tmp_path: Path) -> None:
    assert Configuration().log_cap == 100 << 20
    (tmp_path / "pyproject.toml").write_text('[tool.rx]\nlog_cap = "4 MiB"\n')
    assert Configuration.from_pyproject(tmp_path / "pyproject.toml").log_cap == 4 << 20
    assert parse_size("1.5k", "x") == 1536
    (tmp_path / "pyproject.toml").write_text('[tool.rx]\nlog_cap = "lots"\n')
    with pytest.raises(ConfigError, match="log_cap 'lots'"):
        Configuration.from_pyproject(tmp_path / "pyproject.toml")


def test_rx_run_prints_everything_and_logs_the_tail(isolated: Any) -> None:
    (isolated.root / "pyproject.toml").write_text('[tool.rx]\nlog_cap = "1MiB"\n')
    (isolated.root / "chatty.py").write_text("import sys\nfor i in range(3 * 1024):\n"
                                             "    sys.stdout.write(f'{i:05d}' + 'z' * 1018 + '\\n')\n")
    ran = subprocess.run([sys.executable, "-m", "remote_exec", "run", "chatty.py"], cwd=isolated.root,
                         env=isolated.env(), capture_output=True, timeout=90, check=False)
    assert ran.returncode == 0, ran.stderr
    assert len(ran.stdout) == 3 << 20
    (run_dir,) = (isolated.workspace / "runs").iterdir()
    log = (run_dir / "stdout.log").read_bytes()
    assert log.endswith(ran.stdout[-(1 << 20):]) and log.startswith(b"[rx: the first 2097152 bytes")
