"""The modules that travel to the remote import and serve a call with only the standard library.

A subprocess installs a meta-path finder that refuses every module outside the standard library (typer,
rich, paramiko, fabric, docker, cloudpickle, ...), imports the remote-side modules from the repository and
serves one call through ``remote_exec.runner.main`` fed frames on stdin.
"""

from __future__ import annotations

import operator
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from remote_exec.packing import REMOTE_MODULES
from remote_exec.session import Session
from remote_exec.task import Execution, Task

REPO_ROOT = Path(__file__).resolve().parents[2]

BLOCKING_RUNNER = """
    import sys

    class StdlibOnly:
        '''Refuse every module that is neither standard library nor remote_exec.'''

        def find_spec(self, name, path=None, target=None):
            top = name.partition(".")[0]
            if top == "remote_exec" or top in sys.stdlib_module_names or top in sys.builtin_module_names:
                return None
            raise ImportError(f"blocked on the remote side: {name}")

    sys.meta_path.insert(0, StdlibOnly())
    for name in ("typer", "rich", "paramiko", "fabric", "docker", "cloudpickle", "platformdirs", "filelock"):
        try:
            __import__(name)
        except ImportError:
            pass
        else:
            raise SystemExit(f"the blocker let {name} through")

    import remote_exec
    import remote_exec.errors
    import remote_exec.runner
    import remote_exec.serialization
    import remote_exec.session
    import remote_exec.task
    import remote_exec.protocol.wire

    assert callable(remote_exec.task)
    loaded = sorted({name.partition(".")[0] for name in sys.modules} - set(sys.stdlib_module_names)
                    - set(sys.builtin_module_names) - {"__main__"})
    sys.stderr.write("non-stdlib modules loaded: " + ",".join(loaded) + "\\n")
    sys.stderr.flush()
    sys.exit(remote_exec.runner.main([sys.argv[1], "serve"]))
"""


@pytest.fixture
def blocking_runner(tmp_path: Path) -> list[str]:
    script = tmp_path / "blocking_runner.py"
    script.write_text(textwrap.dedent(BLOCKING_RUNNER))
    # -S: no site, so the .pth hooks of site-packages (certifi, setuptools' hack) are not loaded either.
    return [sys.executable, "-S", str(script), str(tmp_path / "remote-cache")]


def _env() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO_ROOT)}


def test_remote_modules_are_the_ones_tested_here() -> None:
    runner = {f"runner/{path.stem}" for path in (REPO_ROOT / "remote_exec" / "runner").glob("*.py")}
    assert {"runner/__init__", "runner/supervise", "runner/child", "runner/result"} <= runner
    assert set(REMOTE_MODULES) == {"__init__", "api", "errors", "lazy", "protocol/__init__", "protocol/wire",
                                   "serialization", "session", "task"} | runner


def test_the_code_bundle_takes_the_remote_modules() -> None:
    """The host's code bundle (remote_exec.runner.bundle) serves what the archive ships compiled."""
    from remote_exec.runner.bundle import REMOTE_SIDE

    runner = {name for name in REMOTE_MODULES if name.startswith("runner/")}
    assert {f"remote_exec/{name}.py" for name in set(REMOTE_MODULES) - runner} | {"remote_exec/runner/"} \
        == set(REMOTE_SIDE)


def test_every_remote_module_imports_with_the_standard_library_only(tmp_path: Path) -> None:
    """Each mode's rooms (the worker's, detached runs') too, not only what a served call loads."""
    blocker = textwrap.dedent(BLOCKING_RUNNER).partition("import remote_exec\n")[0]
    names = [f"remote_exec.{name.removesuffix('/__init__').replace('/', '.')}" if name != "__init__" else "remote_exec"
             for name in REMOTE_MODULES]
    script = tmp_path / "import_all.py"
    script.write_text(blocker + "".join(f"import {name}\n" for name in names) + "print('imported')\n")
    done = subprocess.run([sys.executable, "-S", str(script)], capture_output=True, text=True, env=_env(),
                          timeout=60, check=False)
    assert done.returncode == 0 and done.stdout == "imported\n", done.stderr


def test_a_function_call_is_served_with_the_standard_library_only(blocking_runner: list[str], frames: Any,
                                                                   tmp_path: Path) -> None:
    t = Task.from_function(operator.mul)
    session = Session(task=t, execution=Execution.create(t, (6, 7)), run_id="stdlib")
    served = frames.serve(blocking_runner, session.dumps(), cwd=tmp_path, env=_env())
    assert served.returncode == 0, served.stderr.decode()
    assert b"non-stdlib modules loaded: remote_exec\n" in served.stderr
    header = served.header()
    assert header["status"] == "finished" and header["exit_code"] == 0
    assert pickle.loads(served.payload(b"V")) == 42
    assert served.kinds()[-1] == b"Z"


def test_a_script_is_served_with_the_standard_library_only(blocking_runner: list[str], frames: Any,
                                                           tmp_path: Path) -> None:
    script = tmp_path / "hello.py"
    script.write_text("import json, sys\nprint(json.dumps(sys.argv[1:]))\nsys.exit(4)\n")
    t = Task.from_script(script)
    session = Session(task=t, execution=Execution.create(t, ("a", "b")), run_id="stdlib")
    served = frames.serve(blocking_runner, session.dumps(), cwd=tmp_path, env=_env(), kind="script")
    assert served.returncode == 0, served.stderr.decode()
    assert served.payload(b"O") == b'["a", "b"]\n'
    assert served.header()["exit_code"] == 4


def test_a_closure_runs_with_the_standard_library_only(blocking_runner: list[str], frames: Any,
                                                      tmp_path: Path) -> None:
    """A function written by value (a closure here) is rebuilt without cloudpickle on the host."""
    offset = 41
    t = Task.from_function(lambda: offset + 1)
    session = Session(task=t, execution=Execution.create(t), run_id="stdlib")
    served = frames.serve(blocking_runner, session.dumps(), cwd=tmp_path, env=_env())
    assert served.returncode == 0, served.stderr.decode()
    assert served.header()["status"] == "finished", served.header()
    assert pickle.loads(served.payload(b"V")) == 42


def test_a_class_by_value_without_cloudpickle_fails_as_the_task_not_the_runner(blocking_runner: list[str],
                                                                              frames: Any, tmp_path: Path) -> None:
    """A class written by value needs the archive's cloudpickle; without it the call still ends with a
    reported error."""
    class Local:
        pass

    t = Task.from_function(lambda: Local)
    session = Session(task=t, execution=Execution.create(t), run_id="stdlib")
    served = frames.serve(blocking_runner, session.dumps(), cwd=tmp_path, env=_env())
    assert served.returncode == 0, served.stderr.decode()
    header = served.header()
    assert header["status"] == "raised"
    assert "blocked on the remote side: cloudpickle" in header["exception"]["message"]
