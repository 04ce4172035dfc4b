"""The runner and its protocol, end to end through dispatch and the LocalBackend (a real subprocess)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from remote_exec.backends.base import Process
from remote_exec.backends.local import LocalBackend
from remote_exec.task import Task


def test_output_streams_live(dispatcher: Any) -> None:
    """The first line arrives while the task still sleeps, not when it ends."""
    call = dispatcher.run("""
        import sys, time
        print("first", flush=True)
        time.sleep(0.8)
        print("to stderr", file=sys.stderr, flush=True)
        print("second", time.monotonic())  # CLOCK_MONOTONIC is one clock for every process
    """)
    assert call.result.ok
    first_arrival, first_chunk = call.stdout[0]
    assert first_chunk == b"first\n"
    lines = call.text().splitlines()
    assert lines[0] == "first" and lines[1].startswith("second ")
    assert call.stderr == b"to stderr\n"
    second_printed = float(lines[1].split()[1])
    assert first_arrival < second_printed, "the first line came only when the task was about to end"


@pytest.mark.parametrize(("source", "exit_code"), [
    ("import sys\nsys.exit(3)\n", 3),
    ("import sys\nsys.exit(0)\n", 0),
    ("import sys\nsys.exit('fatal: giving up')\n", 1),
    ("import os\nos._exit(5)\n", 5),
    ("print('fine')\n", 0),
])
def test_exit_codes_of_scripts(dispatcher: Any, source: str, exit_code: int) -> None:
    call = dispatcher.run(source)
    assert call.result.status == "finished"
    assert call.result.exit_code == exit_code
    assert call.outcome.header["exit_code"] == exit_code


def test_uncaught_exception_in_a_script_is_exit_1_with_its_traceback(dispatcher: Any) -> None:
    call = dispatcher.run("""
        def deep():
            raise KeyError("missing-key")
        deep()
    """)
    assert (call.result.status, call.result.exit_code) == ("finished", 1)
    assert call.result.exception_type == "builtins.KeyError"
    text = call.result.traceback or ""
    assert "Traceback (most recent call last)" in text and "in deep" in text
    assert text.rstrip().endswith("KeyError: 'missing-key'")
    # The coordinator prints it (its frames mapped to the local files), not the runner.
    assert "Traceback" not in call.stderr.decode()
    chain = call.outcome.header["exception"]["chain"]
    assert [frame[2] for frame in chain[-1]["frames"]][-2:] == ["<module>", "deep"]


def test_killed_by_a_signal_is_named(dispatcher: Any) -> None:
    call = dispatcher.run("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    assert call.result.status == "signal"
    assert "SIGKILL" in (call.result.detail or "")
    assert call.outcome.header["signal"] == "SIGKILL"
    assert call.result.exit_code == 128 + signal.SIGKILL
    assert not call.result.ok


def test_function_that_exits_without_a_result_is_an_error(dispatcher: Any) -> None:
    call = dispatcher.run(Task.from_function(lambda: os._exit(0)))
    assert call.result.status == "error" and not call.result.ok
    assert "without a result" in (call.result.detail or "")


def test_timeout_stops_the_whole_process_group(dispatcher: Any) -> None:
    call = dispatcher.run("""
        import os, subprocess, time
        child = subprocess.Popen(["sleep", "60"])
        print(os.getpid(), child.pid, flush=True)
        time.sleep(60)
    """, timeout=1.0)
    assert call.result.status == "timeout"
    assert call.result.detail == "timed out after 1 s"
    assert call.ended - call.started < 10
    task_pid, child_pid = (int(word) for word in call.text().split())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not (dispatcher.gone(task_pid) and dispatcher.gone(child_pid)):
        time.sleep(0.05)
    assert dispatcher.gone(task_pid), "the task outlived its timeout"
    assert dispatcher.gone(child_pid), "a process the task started outlived the timeout"


def test_files_written_by_the_task_land(dispatcher: Any) -> None:
    call = dispatcher.run("""
        import os
        os.makedirs("out/deep", exist_ok=True)
        open("result.txt", "w").write("hello")
        open("out/deep/table.csv", "w").write("a,b\\n1,2\\n")
        open("big.bin", "wb").write(os.urandom(3 * (1 << 20)))
    """)
    assert call.result.ok
    landed = sorted(str(p.relative_to(call.landed)) for p in call.outcome.files)
    assert landed == ["big.bin", "out/deep/table.csv", "result.txt"]
    assert (call.landed / "result.txt").read_text() == "hello"
    assert (call.landed / "out/deep/table.csv").read_text() == "a,b\n1,2\n"
    assert (call.landed / "big.bin").stat().st_size == 3 * (1 << 20)
    assert sorted(entry["path"] for entry in call.outcome.header["files"]) == landed


def test_pull_globs_choose_the_files(dispatcher: Any) -> None:
    source = """
        open("keep.txt", "w").write("k")
        open("skip.log", "w").write("s")
        open("also.txt", "w").write("a")
    """
    call = dispatcher.run(source, pull=("*.txt",))
    assert sorted(p.name for p in call.outcome.files) == ["also.txt", "keep.txt"]
    assert not (call.landed / "skip.log").exists()


def test_no_pull_brings_back_nothing(dispatcher: Any) -> None:
    call = dispatcher.run("open('result.txt', 'w').write('x')\n", no_pull=True)
    assert call.result.ok and call.outcome.files == [] and call.outcome.header["files"] == []
    assert not call.landed.exists()


def test_the_task_runs_in_a_private_directory_that_is_removed(dispatcher: Any) -> None:
    call = dispatcher.run("""
        import os, stat
        print(os.getcwd())
        print(oct(stat.S_IMODE(os.stat(".").st_mode)))
    """)
    cwd, mode = call.text().split()
    assert Path(cwd).parent == dispatcher.workdir / "runs"
    assert mode == "0o700"
    assert not Path(cwd).exists()


def test_keep_keeps_the_remote_run_directory(dispatcher: Any) -> None:
    call = dispatcher.run("import os\nprint(os.getcwd())\nopen('kept.txt', 'w').write('k')\n", keep=True)
    cwd = Path(call.text().strip())
    assert (cwd / "kept.txt").read_text() == "k"


def test_script_arguments_and_environment(dispatcher: Any) -> None:
    call = dispatcher.run("import os, sys\nprint(sys.argv[1:], os.environ['RX_UNIT'])\n",
                          ("--rounds", 2), env={"RX_UNIT": "set"})
    assert call.text() == "['--rounds', '2'] set\n"


class _RecordingBackend(LocalBackend):
    def __init__(self) -> None:
        super().__init__()
        self.argvs: list[list[str]] = []

    def start(self, argv: Sequence[str], **kwargs: Any) -> Process:
        self.argvs.append(list(argv))
        return super().start(argv, **kwargs)


def test_secrets_reach_the_task_but_never_a_command_line(dispatcher: Any) -> None:
    backend = _RecordingBackend()
    call = dispatcher.run("import os\nprint(os.environ['RX_TOKEN'])\n", backend=backend,
                          secret_env={"RX_TOKEN": "s3cr3t-value"})
    assert call.text() == "s3cr3t-value\n"
    assert backend.argvs and not any("s3cr3t-value" in word for argv in backend.argvs for word in argv)


def test_large_values_cross_in_many_frames(dispatcher: Any) -> None:
    call = dispatcher.run(Task.from_function(lambda n: bytes(range(256)) * n), (12_000,))  # ~3 MiB
    assert call.result.ok
    assert call.result.value == bytes(range(256)) * 12_000


def test_the_archive_is_uploaded_once(dispatcher: Any) -> None:
    backend = LocalBackend()
    first = dispatcher.run("print(1)\n", backend=backend)
    second = dispatcher.run("print(2)\n", backend=backend)
    assert first.outcome.uploaded and not second.outcome.uploaded
    assert set(first.outcome.phases) == {"connect", "upload", "execute", "collect"}
    assert "upload" not in second.outcome.phases
    installed = dispatcher.workdir / "archives" / dispatcher.archive.sha256
    assert (installed / "remote_exec" / "runner" / "__init__.py").is_file()


def test_a_function_raising_arrives_with_type_and_traceback(dispatcher: Any) -> None:
    def broken(x: int) -> int:
        raise ArithmeticError(f"cannot handle {x}")

    call = dispatcher.run(Task.from_function(broken), (7,))
    assert call.result.status == "raised"
    assert isinstance(call.result.exception, ArithmeticError)
    assert str(call.result.exception) == "cannot handle 7"
    assert "in broken" in (call.result.traceback or "")


def test_unserializable_return_value_is_reported(dispatcher: Any) -> None:
    call = dispatcher.run(Task.from_function(lambda: __import__("threading").Lock()))
    assert call.result.status == "raised"
    assert "cannot be serialized" in (call.result.exception_message or "")



def test_built_in_data_crosses_as_marshal_and_anything_else_as_pickle(dispatcher: Any) -> None:
    """A call of built-in data needs no pickle module on the runner; other values still arrive whole."""
    import datetime

    from remote_exec.task import Task

    def echo(value: Any) -> Any:
        import sys

        return value, "_pickle" in sys.modules

    plain = {"a": [1, 2.5, "x", b"y", None, True, (3, frozenset({4}))], "k": {5: complex(1, 2)}}
    call = dispatcher.run(Task.from_function(echo), (plain,))
    assert call.result.value == (plain, False)  # the closure travels as a pickle, read without the C module
    assert call.outcome.header["value"]["encoding"] == "marshal"
    moment = datetime.datetime(2026, 11, 22, 12, 0)
    call = dispatcher.run(Task.from_function(echo), (moment,))
    assert call.result.value[0] == moment and call.outcome.header["value"]["encoding"] == "serializer"
    call = dispatcher.run(Task.from_function(echo), (bytearray(b"ab"),))
    assert type(call.result.value[0]) is bytearray  # marshal would give bytes: it goes as a pickle
    call = dispatcher.run(Task.from_function(echo), (plain,), restricted=True)
    assert call.result.value == (plain, False) and call.outcome.header["value"]["encoding"] == "serializer"


@pytest.mark.parametrize(("count", "name_length"), [(20_000, 8), (4_000, 240)])
def test_a_result_of_many_files_comes_back_whole(dispatcher: Any, count: int, name_length: int) -> None:
    """The file list travels in frames of its own: 20,000 files, or 4,000 with long names, are well over
    the 1 MiB a single header frame may hold."""
    call = dispatcher.run(f"""
        import os
        os.makedirs("many", exist_ok=True)
        for index in range({count}):
            with open(os.path.join("many", str(index).rjust({name_length}, "n")), "w") as stream:
                stream.write(str(index))
    """)
    assert call.result.ok, call.stderr
    assert len(call.outcome.files) == count == call.outcome.header["file_count"]
    assert (call.landed / "many" / "7".rjust(name_length, "n")).read_text() == "7"


def test_unreadable_files_are_skipped_and_named(dispatcher: Any) -> None:
    """What the runner cannot read (a file or folder the task made unreadable) is listed as skipped; the
    rest of the result, and the script's exit code, still come back."""
    if os.geteuid() == 0:
        pytest.skip("root reads every file: the fault suite checks this on the testbed as a normal user")
    call = dispatcher.run("""
        import os, sys
        open("fine.txt", "w").write("ok")
        open("secret.txt", "w").write("no")
        os.chmod("secret.txt", 0)
        os.makedirs("closed/inner")
        open("closed/inner/x.txt", "w").write("x")
        os.chmod("closed", 0)
        sys.exit(3)
    """)
    assert call.result.exit_code == 3
    assert [p.name for p in call.outcome.files] == ["fine.txt"]
    assert sorted(entry["path"] for entry in call.outcome.header["skipped"]) == ["closed/", "secret.txt"]


def _interrupt_once(started: Path) -> None:
    """Send this process SIGINT (a Ctrl-C of the caller) once ``started`` exists."""
    import threading

    def interrupt() -> None:
        deadline = time.monotonic() + 30
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()


def test_ctrl_c_interrupts_the_task_as_a_terminal_would_and_what_it_wrote_comes_back(dispatcher: Any) -> None:
    """Ctrl-C reaches the task as SIGINT first: its ``except KeyboardInterrupt`` and ``finally`` run, and the
    checkpoint they write is brought back before Interrupted is raised."""
    from remote_exec.errors import Interrupted

    started = dispatcher.root / "started"
    source = f"""
        import time
        open({str(started)!r}, "w").close()
        try:
            time.sleep(60)
        except KeyboardInterrupt:
            open("checkpoint.txt", "w").write("saved on Ctrl-C")
            raise
        finally:
            open("finally.txt", "w").write("ran")
    """

    _interrupt_once(started)
    began = time.monotonic()
    with pytest.raises(Interrupted, match="2 file"):
        dispatcher.run(source)
    assert time.monotonic() - began < 15
    assert (dispatcher.root / "landed" / "checkpoint.txt").read_text() == "saved on Ctrl-C"
    assert (dispatcher.root / "landed" / "finally.txt").read_text() == "ran"


def test_ctrl_c_of_a_keep_warm_call_runs_its_finally(dispatcher: Any) -> None:
    """A persistent worker's call gets Ctrl-C as a KeyboardInterrupt in its own thread: its ``finally``
    runs before the worker ends (a fresh one takes the next call)."""
    from remote_exec.errors import Interrupted
    from remote_exec.task import Task

    started = dispatcher.root / "started"
    saved = dispatcher.root / "saved"

    def checkpointed(started: str, saved: str) -> str:
        import time

        open(started, "w").close()
        try:
            time.sleep(60)
        finally:
            with open(saved, "w") as stream:
                stream.write("finally ran")
        return "slept"

    checkpointed.__module__ = "__main__"

    _interrupt_once(started)
    began = time.monotonic()
    with pytest.raises(Interrupted):
        dispatcher.run(Task.from_function(checkpointed), (str(started), str(saved)), keep_warm=True)
    assert time.monotonic() - began < 15
    assert saved.read_text() == "finally ran"
