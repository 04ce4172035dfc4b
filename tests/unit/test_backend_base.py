"""The Backend base class without a network: the run loop, the default put/get over ``start()`` (against a
backend that runs every command through ``sh -c`` as sshd does, so quoting is exercised), and the default
answer of ``classify_exit`` (the SSH backends' answers are tested with them)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath

import pytest

from remote_exec.backends.base import Backend, CommandResult, HostSpec, Process, build_command, transfer_reason
from remote_exec.backends.local import LocalBackend, MockBackend, PopenProcess
from remote_exec.errors import CommandTimeout, ConnectError, RemoteExecError, TransferError


class GroupProcess(PopenProcess):
    """Kills the whole process group of the shell, as the SSH backends signal the remote one."""

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        super().kill()


class ShellBackend(Backend):
    """Runs each command as a remote host would: one quoted command line for ``sh -c``. Only start/close."""

    name = "shell"

    def __init__(self) -> None:
        super().__init__(HostSpec("shellhost"))
        self.commands: list[str] = []

    def start(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
              cwd: PurePosixPath | None = None) -> Process:
        command = build_command(argv, env, cwd)
        self.commands.append(command)
        return GroupProcess(subprocess.Popen(["sh", "-c", command], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE, bufsize=0, start_new_session=True))

    def close(self) -> None:
        """Nothing to close."""


TRICKY = "it's a \"file\" with $HOME `id` ; and ünïcode"


@pytest.fixture
def shell() -> ShellBackend:
    return ShellBackend()


def test_a_backend_needs_only_start_and_close() -> None:
    class Incomplete(Backend):
        def close(self) -> None:
            pass

    with pytest.raises(TypeError, match="start"):
        Incomplete(HostSpec("h"))  # type: ignore[abstract]
    assert isinstance(ShellBackend(), Backend)


# --- run --------------------------------------------------------------------------------------------------


def test_run_collects_output_feeds_stdin_and_keeps_the_exit_status(shell: ShellBackend) -> None:
    script = "import sys; data = sys.stdin.buffer.read(); sys.stdout.buffer.write(data[::-1]); " \
             "sys.stderr.write('e' * 3); sys.exit(5)"
    result = shell.run([sys.executable, "-c", script], stdin=b"x" * 200_000 + b"abc")
    assert result == CommandResult(argv=(sys.executable, "-c", script), exit_code=5,
                                   stdout=b"cba" + b"x" * 200_000, stderr=b"eee", duration=result.duration,
                                   host="shellhost")
    assert (result.ok, result.failed, result.tail()) == (False, True, "eee")


def test_run_streams_to_callbacks_as_output_arrives(shell: ShellBackend) -> None:
    seen: list[tuple[str, bytes, float]] = []
    script = "import sys, time\nfor i in range(3):\n    print(i, flush=True); time.sleep(0.2)\n" \
             "sys.stderr.write('done')"
    result = shell.run([sys.executable, "-c", script], on_stdout=lambda b: seen.append(("out", b, time.monotonic())),
                       on_stderr=lambda b: seen.append(("err", b, time.monotonic())))
    assert (result.stdout, result.stderr) == (b"", b"")  # the callbacks had it all
    assert b"".join(chunk for kind, chunk, _ in seen if kind == "out") == b"0\n1\n2\n"
    assert b"".join(chunk for kind, chunk, _ in seen if kind == "err") == b"done"
    times = [at for kind, _, at in seen if kind == "out"]
    assert times[-1] - times[0] > 0.3  # live, not at the end


def test_run_kills_a_command_past_its_timeout(shell: ShellBackend) -> None:
    started = time.monotonic()
    with pytest.raises(CommandTimeout, match=r"ran past its timeout of 0\.3 s"):
        shell.run(["sleep", "30"], timeout=0.3)
    assert time.monotonic() - started < 10


def test_run_of_a_command_that_ignores_its_input(shell: ShellBackend) -> None:
    result = shell.run(["true"], stdin=b"y" * 1_000_000)
    assert result.exit_code == 0


# --- the default put / get ------------------------------------------------------------------------------------


def test_default_put_and_get_copy_bytes_exactly_under_any_name(shell: ShellBackend, tmp_path: Path) -> None:
    data = os.urandom(3 * 2**20 + 17)  # more than any pipe holds
    source = tmp_path / "source"
    source.write_bytes(data)
    remote = PurePosixPath(tmp_path / f"remote {TRICKY}")
    shell.put(source, remote)
    assert Path(str(remote)).read_bytes() == data
    local = tmp_path / f"back {TRICKY}"
    shell.get(remote, local)
    assert local.read_bytes() == data
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        ["source", f"remote {TRICKY}", f"back {TRICKY}"])  # no temporary left behind
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    shell.put(empty, PurePosixPath(tmp_path / "empty.remote"))
    shell.get(PurePosixPath(tmp_path / "empty.remote"), tmp_path / "empty.back")
    assert (tmp_path / "empty.back").read_bytes() == b""


def test_default_get_of_a_missing_file_or_a_directory_says_so(shell: ShellBackend, tmp_path: Path) -> None:
    with pytest.raises(TransferError, match=r"shellhost: get .*missing -> .*: .*missing: no such file"):
        shell.get(PurePosixPath(tmp_path / "missing"), tmp_path / "local")
    with pytest.raises(TransferError, match="is a directory"):
        shell.get(PurePosixPath(tmp_path), tmp_path / "local")
    assert list(tmp_path.iterdir()) == []  # no temporary left behind
    with pytest.raises(TransferError, match="cannot write in"):
        shell.get(PurePosixPath(tmp_path), tmp_path / "no-dir" / "local")


def test_default_put_failures_name_the_reason_and_leave_nothing(shell: ShellBackend, tmp_path: Path) -> None:
    with pytest.raises(TransferError, match="cannot read"):
        shell.put(tmp_path / "absent", PurePosixPath(tmp_path / "x"))
    source = tmp_path / "source"
    source.write_bytes(b"data" * 100_000)
    with pytest.raises(TransferError, match=r"put .* -> .*no-dir/x: .*(No such file|nonexistent|cannot create)"):
        shell.put(source, PurePosixPath(tmp_path / "no-dir" / "x"))
    assert [path.name for path in tmp_path.iterdir()] == ["source"]


class LinkDroppingBackend(MockBackend):
    """Every command "loses its link": exit 255 with ssh's words, which classify_exit calls a lost link."""

    put = Backend.put
    get = Backend.get

    def classify_exit(self, exit_code: int | None, stderr: bytes) -> RemoteExecError | None:
        if exit_code == 255:
            return ConnectError(self.host, stderr.decode().strip())
        return None


def test_a_copy_whose_link_fails_says_so_with_the_link_error_as_cause(tmp_path: Path) -> None:
    backend = LinkDroppingBackend(lambda argv, stdin: CommandResult(tuple(argv), 255, stderr=b"Broken pipe\n"))
    source = tmp_path / "source"
    source.write_bytes(b"data")
    with pytest.raises(TransferError, match=r"^mock: put .* -> /r: Broken pipe$") as caught:
        backend.put(source, PurePosixPath("/r"))
    assert isinstance(caught.value.__cause__, ConnectError)
    with pytest.raises(TransferError, match="Broken pipe"):
        backend.get(PurePosixPath("/r"), tmp_path / "local")
    assert [path.name for path in tmp_path.iterdir()] == ["source"]


def test_transfer_reason_skips_the_size_line() -> None:
    assert transfer_reason("__rx_size__=12\ncat: read error\n", 1) == "cat: read error"
    assert transfer_reason("__rx_size__=12\n", 2) == "the remote command failed with exit status 2"


# --- classify_exit --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [None, -1, -9, 0, 1, 124, 255])
def test_backends_without_a_link_own_every_exit_status(code: int | None) -> None:
    assert LocalBackend().classify_exit(code, b"Connection reset by peer") is None
    assert ShellBackend().classify_exit(code, b"") is None


class RefusingBackend(Backend):
    """Every connection attempt is refused (counted), as a host whose sshd is down."""

    name = "refusing"

    def __init__(self) -> None:
        super().__init__(HostSpec("downhost"))
        self.attempts = 0

    def connect(self) -> None:
        self.attempts += 1
        raise ConnectError("downhost", "connection refused")

    def start(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
              cwd: PurePosixPath | None = None) -> Process:
        self.raise_failed_ahead()
        self.connect()
        raise AssertionError("not reached")

    def close(self) -> None:
        pass


def test_a_failed_connection_made_ahead_is_the_next_commands_error_without_a_second_attempt() -> None:
    backend = RefusingBackend()
    backend.connect_ahead()  # as rx run does while it scans the project: nothing raised there
    with pytest.raises(ConnectError, match="connection refused"):
        backend.start(["true"])
    assert backend.attempts == 1  # one wait for the user, not two
    with pytest.raises(ConnectError):
        backend.start(["true"])  # a later command tries again
    assert backend.attempts == 2


class WatchedBackend(RefusingBackend):
    """Connects (in the background) by noting the interpreter's switch interval, then waiting for a go."""

    def __init__(self) -> None:
        super().__init__()
        import threading

        self.go = threading.Event()
        self.seen: list[float] = []

    def connect(self) -> None:
        self.seen.append(sys.getswitchinterval())
        self.go.wait(10)


def test_threads_switch_promptly_while_connections_are_made_in_the_background_and_as_before_after() -> None:
    """A connection made ahead waits for packets while the main thread computes: the GIL must come back to
    it within a fraction of Python's 5 ms switch interval, and only while such connections are made."""
    from remote_exec.backends import base

    before = sys.getswitchinterval()
    first, second = WatchedBackend(), WatchedBackend()
    first.connect_in_background()
    second.connect_in_background()
    deadline = time.monotonic() + 10
    while not (first.seen and second.seen) and time.monotonic() < deadline:
        time.sleep(0.001)
    assert first.seen == second.seen == [base.AHEAD_SWITCH_INTERVAL]
    first.go.set()
    first.raise_failed_ahead()
    assert sys.getswitchinterval() == base.AHEAD_SWITCH_INTERVAL  # the other one still connects
    second.go.set()
    second.raise_failed_ahead()
    assert sys.getswitchinterval() == before

    mine = WatchedBackend()
    mine.connect_in_background()
    while not mine.seen and time.monotonic() < deadline:
        time.sleep(0.001)
    sys.setswitchinterval(0.002)  # the program's own choice, made meanwhile, is left as it is
    try:
        mine.go.set()
        mine.raise_failed_ahead()
        assert sys.getswitchinterval() == 0.002
    finally:
        sys.setswitchinterval(before)
