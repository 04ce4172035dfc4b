"""What a host sends never drives the user's terminal: rx's own lines (the run's summary, one-line errors,
``rx show``, the text export, log lines) show control characters as escapes. The task's live output is
its own and stays raw."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from remote_exec.errors import RemoteError, RemoteTraceback, printable

#: An OSC window-title change, a screen clear, NUL, a C1 CSI and a right-to-left override.
HOSTILE = "\x1b]0;pwned\x07\x1b[2J\x00\x9b31m\u202eboom"
RAW = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")

RAISES = f"raise RuntimeError({HOSTILE!r})\n"


def rx(isolated: Any, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "remote_exec", *args], cwd=isolated.root, env=isolated.env(),
                          capture_output=True, text=True, timeout=90, check=False)


def test_printable_escapes_control_characters_and_keeps_text() -> None:
    assert printable("plain text, tabs\tand é") == "plain text, tabs\tand é"
    assert printable("a\x1b[31mb\x00c") == "a\\x1b[31mb\\x00c"
    assert printable("one\ntwo\rthree") == "one\\ntwo\\rthree"
    assert printable("one\ntwo", lines=True) == "one\ntwo"
    assert printable("\x9b\u202e\udcff") == "\\x9b\\u202e\ufffd"


def test_remote_error_and_traceback_print_escaped_but_keep_the_raw_text() -> None:
    error = RemoteError("mod.Bad", HOSTILE, "Traceback\n  " + HOSTILE + "\n")
    assert not RAW.search(str(error)) and "mod.Bad: \\x1b]0;pwned" in str(error)
    assert error.remote_message == HOSTILE  # the object keeps what the host said
    cause = RemoteTraceback("line 1\n" + HOSTILE)
    assert not RAW.search(str(cause)) and str(cause).startswith("\nline 1\n") and cause.tb.endswith("boom")


def test_a_hostile_exception_message_reaches_no_terminal_raw(isolated: Any) -> None:
    (isolated.root / "job.py").write_text(RAISES)
    ran = rx(isolated, "run", "job.py")
    assert ran.returncode == 1
    summary = [line for line in ran.stderr.splitlines() if line.startswith("rx: run ")]
    assert len(summary) == 1 and not RAW.search(summary[0]), summary

    shown = rx(isolated, "show", "latest")
    assert shown.returncode == 0, shown.stderr
    assert "RuntimeError: \\x1b]0;pwned\\x07\\x1b[2J\\x00" in shown.stdout
    assert not RAW.search(shown.stdout), shown.stdout

    exported = rx(isolated, "export", "latest", "--format", "text")
    assert exported.returncode == 0, exported.stderr
    assert "\\x1b]0;pwned" in exported.stdout and not RAW.search(exported.stdout), exported.stdout


def test_a_script_traceback_with_a_hostile_message_reaches_the_terminal_escaped(isolated: Any) -> None:
    (isolated.root / "job.py").write_text(f"print('before')\n{RAISES}")
    ran = rx(isolated, "run", "job.py")
    assert ran.returncode == 1
    assert ran.stdout == "before\n"  # the task's own output stays raw; the traceback rx shows is escaped
    assert "RuntimeError: \\x1b]0;pwned\\x07\\x1b[2J\\x00\\x9b31m\\u202eboom" in ran.stderr, ran.stderr
    assert 'File "job.py", line 2, in <module>' in ran.stderr
    assert not RAW.search(ran.stderr), repr(ran.stderr)


def test_a_one_line_error_quoting_the_host_is_escaped(isolated: Any) -> None:
    fake = isolated.root / "fakepython"
    fake.write_text("#!/bin/sh\nprintf '\\033]0;pwned\\007\\033[2Jrunner died\\n' >&2\nexit 1\n")
    fake.chmod(0o755)
    (isolated.root / "job.py").write_text("print('never')\n")
    ran = rx(isolated, "run", "--python", str(fake), "job.py")
    assert ran.returncode == 3, ran.stderr
    errors = [line for line in ran.stderr.splitlines() if line.startswith("rx: error:")]
    assert len(errors) == 1 and "runner died" in errors[0], ran.stderr
    assert not RAW.search(ran.stderr), repr(ran.stderr)


def test_log_lines_are_escaped(isolated: Any, capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    from remote_exec.cli import main

    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    with pytest.raises(SystemExit):
        main(["runs"])  # sets up rx's logging
    logging.getLogger("remote_exec.test").warning("%s: no sign of life", HOSTILE)
    err = capsys.readouterr().err
    assert "no sign of life" in err and not RAW.search(err), repr(err)


def test_rx_logs_prints_the_task_output_raw(isolated: Any, tmp_path: Path) -> None:
    (isolated.root / "job.py").write_text(f"print({HOSTILE!r})\n")
    assert rx(isolated, "run", "job.py").returncode == 0
    logged = rx(isolated, "logs", "latest")
    assert logged.stdout == HOSTILE + "\n"  # the task's own output, documented as raw
