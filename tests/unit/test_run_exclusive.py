"""One ``rx attach`` of a run at a time: :meth:`Run.exclusive` and who holds it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from remote_exec.errors import RunBusy, WorkspaceError
from remote_exec.workspace.manager import Workspace


def test_a_second_holder_is_told_who_holds_the_run(tmp_path: Path) -> None:
    run = Workspace(tmp_path / "ws").new_run(target="job.py", kind="script")
    with run.exclusive("attach"):
        with pytest.raises(RunBusy) as busy, run.exclusive("attach"):
            pass
        assert isinstance(busy.value, WorkspaceError) and busy.value.exit_code == 3
        assert f"run {run.id} is already being attached by pid {os.getpid()}" in str(busy.value)
        assert busy.value.holder["pid"] == os.getpid()
    with run.exclusive("attach"):  # released: free again
        pass


def test_a_holder_that_died_holds_nothing(tmp_path: Path) -> None:
    run = Workspace(tmp_path / "ws").new_run(target="job.py", kind="script")
    code = textwrap.dedent(f"""
        import os
        from remote_exec.workspace.manager import Workspace
        run = Workspace({str(tmp_path / "ws")!r}).run({run.id!r})
        with run.exclusive("attach"):
            os._exit(0)  # dies holding it
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60,
                   env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    with run.exclusive("attach"):
        pass
