"""A researcher's first day (issue 12) against the testbed, on both backends: tracebacks of their code mapped
back to their files, Python's semantics (Ctrl-C, stdin, exceptions) over the wire, hosts as ssh resolves them."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent / "data"
if str(DATA) not in sys.path:
    sys.path.insert(0, str(DATA))
pytest.register_assert_rewrite("remote_support")

from remote_support import HOST, Remote  # noqa: E402

pytest_plugins = ["remote_support"]


def write(path: Path, source: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source).lstrip(), encoding="utf-8")
    return path


def user_lines(text: str) -> list[str]:
    """The lines of a traceback a user reads, without Python's column marks (which vary between versions)."""
    return [line.rstrip() for line in text.splitlines() if line.strip() and set(line.strip()) - set("~^")]


# -- 7. tracebacks ------------------------------------------------------------------------------------------

def test_a_remote_failure_shows_the_users_frames_at_their_local_files(remote: Remote) -> None:
    write(remote.project / "mylib" / "__init__.py", "")
    write(remote.project / "mylib" / "steps.py", """
        def run(x):
            return 1 / x
    """)
    write(remote.project / "train.py", """
        from mylib import steps

        print("training")
        steps.run(0)
    """)

    done = remote.rx("run", "--remote", HOST, "train.py")

    assert done.returncode == 1, done.stderr
    assert done.stdout == "training\n"
    lines = user_lines(done.stderr)
    assert lines[:-1] == [
        "Traceback (most recent call last):",
        '  File "train.py", line 4, in <module>',
        "    steps.run(0)",
        f'  File "{os.path.join("mylib", "steps.py")}", line 2, in run',
        "    return 1 / x",
        "ZeroDivisionError: division by zero",
    ], done.stderr
    assert ".cache/remote_exec" not in done.stderr


def test_a_task_defined_in_the_script_shows_its_source_on_the_callers_side(remote: Remote) -> None:
    write(remote.project / "sweep.py", f"""
        import traceback
        from remote_exec import task

        @task(remote="{HOST}")
        def train(x):
            return 10 / x

        try:
            train(0)
        except ZeroDivisionError:
            traceback.print_exc()
    """)

    done = subprocess.run([sys.executable, "sweep.py"], cwd=remote.project, env=remote.env, capture_output=True,
                          text=True, timeout=90, check=False)

    remote_part = done.stderr.partition("The above exception was the direct cause")[0]
    assert user_lines(remote_part) == [
        "remote_exec.errors.RemoteTraceback:",
        "Traceback (most recent call last):",
        '  File "sweep.py", line 6, in train',
        "    return 10 / x",
        "ZeroDivisionError: division by zero",
    ], done.stderr


# -- 5. stdin -------------------------------------------------------------------------------------------------

def test_piped_stdin_reaches_the_remote_script_with_its_end(remote: Remote) -> None:
    write(remote.project / "cat_stdin.py", """
        import hashlib, sys
        data = sys.stdin.buffer.read()
        print(len(data), hashlib.sha256(data).hexdigest(), repr(data[:3]))
    """)
    payload = b"hi\n" + os.urandom(2 << 20)

    done = subprocess.run(remote.argv("run", "--remote", HOST, "cat_stdin.py"), cwd=remote.project, env=remote.env,
                          input=payload, capture_output=True, timeout=120, check=False)

    import hashlib

    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().split() == [str(len(payload)), hashlib.sha256(payload).hexdigest(), "b'hi\\n'"]
