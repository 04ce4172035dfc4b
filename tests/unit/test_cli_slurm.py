"""``rx run --slurm``: its options are checked before anything connects, each mistake one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest


def rx(isolated: Any, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "remote_exec", *args], cwd=isolated.root, env=isolated.env(**env),
                          capture_output=True, text=True, timeout=90, check=False)


def one_error(done: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("rx: error: "), done.stderr
    return lines[0]


@pytest.fixture
def script(isolated: Any) -> Path:
    path = isolated.root / "train.py"
    path.write_text("print('trained')\n")
    return path


@pytest.mark.parametrize(("args", "message"), [
    (["--slurm", "--gres=gpu:1", "train.py"], "--slurm needs --remote: the cluster's login node"),
    (["--remote", "nohost.invalid", "--slurm", "--time=1 --output=log", "train.py"],
     "slurm: '--output=log' is rx's to set: rx keeps the job's log in the run directory (leave it out)"),
    (["--remote", "nohost.invalid", "--slurm", "--comment='unclosed", "train.py"], "No closing quotation"),
])
def test_a_bad_slurm_option_is_one_line_before_anything_connects(isolated: Any, script: Path, args: list[str],
                                                                 message: str) -> None:
    done = rx(isolated, "run", *args)

    assert done.returncode == 3
    assert message in one_error(done)


def test_secrets_are_refused_for_a_slurm_remote_before_anything_connects(isolated: Any, script: Path) -> None:
    (isolated.root / "pyproject.toml").write_text(
        '[tool.rx.remotes.cluster]\nhost = "nohost.invalid"\nslurm = { partition = "gpu" }\n')

    done = rx(isolated, "run", "--remote", "cluster", "--secret-env", "TOKEN", "train.py", TOKEN="s3cret")

    assert done.returncode == 3
    assert "--secret-env cannot reach a slurm job" in one_error(done)
    assert "s3cret" not in done.stderr
