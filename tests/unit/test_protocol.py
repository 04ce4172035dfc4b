"""The coordinator's side of the protocol: what dispatch refuses (damaged results, unsafe names) and how it
reports runners that fail to start or end without a result."""

from __future__ import annotations

import os
import stat
import sys
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from remote_exec.backends.base import Process
from remote_exec.backends.local import LocalBackend
from remote_exec.errors import IntegrityError, RunnerError
from remote_exec.protocol import wire
from remote_exec.protocol.collect import safe_member_path
from remote_exec.task import Task

# -- names of pulled files ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a.txt", "out/deep/table.csv", "with space.txt", ".hidden", "a..b"])
def test_safe_member_path_accepts_names_inside_the_run_directory(name: str) -> None:
    assert safe_member_path(name) == PurePosixPath(name)


@pytest.mark.parametrize("name", ["", "/etc/passwd", "../escape", "a/../../b", "out/..", "~/x", "..",
                                  "dir\\..\\evil"])
def test_safe_member_path_refuses_names_outside(name: str) -> None:
    with pytest.raises(IntegrityError, match="outside its run directory"):
        safe_member_path(name)


# -- a damaged result --------------------------------------------------------------------------------------


class _TamperingProcess(Process):
    """Passes the runner's stdout through, changing the first frame of one kind on the way."""

    def __init__(self, inner: Process, kind: bytes, change: Any) -> None:
        self.inner = inner
        self.kind = kind
        self.change = change
        self.framing = False
        self.pending = b""
        self.reader = wire.FrameReader()
        self.tampered = False

    def read_stdout(self, size: int = 65536) -> bytes:
        while True:
            data = self.inner.read_stdout(size)
            if not data:
                return b""
            out = bytearray()
            if not self.framing:  # the bootstrap's handshake lines come first
                self.pending += data
                while not self.framing and b"\n" in self.pending:
                    line, _, self.pending = self.pending.partition(b"\n")
                    out += line + b"\n"
                    self.framing = line.startswith(b"RXBOOT2 ") and line.endswith((b" HAVE", b" OK"))
                if not self.framing:
                    if out:
                        return bytes(out)
                    continue
                data, self.pending = self.pending, b""
            for kind, payload in self.reader.feed(data):
                if kind == self.kind and not self.tampered:
                    payload = self.change(payload)
                    self.tampered = True
                out += wire.encode(kind, payload)
            if out:
                return bytes(out)

    def read_stderr(self, size: int = 65536) -> bytes:
        return self.inner.read_stderr(size)

    def write_stdin(self, data: bytes) -> None:
        self.inner.write_stdin(data)

    def close_stdin(self) -> None:
        self.inner.close_stdin()

    def wait(self, timeout: float | None = None) -> int | None:
        return self.inner.wait(timeout)

    def kill(self) -> None:
        self.inner.kill()


class _TamperingBackend(LocalBackend):
    def __init__(self, kind: bytes, change: Any) -> None:
        super().__init__()
        self.kind = kind
        self.change = change
        self.processes: list[_TamperingProcess] = []

    def start(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
              cwd: PurePosixPath | None = None) -> Process:
        process = _TamperingProcess(super().start(argv, env=env, cwd=cwd), self.kind, self.change)
        self.processes.append(process)
        return process


def _flip_first_byte(payload: bytes) -> bytes:
    return bytes([payload[0] ^ 0x01]) + payload[1:]


def test_untampered_pass_through_is_accepted(dispatcher: Any) -> None:
    """The tampering wrapper itself changes nothing when it finds nothing to change."""
    backend = _TamperingBackend(b"-", _flip_first_byte)
    call = dispatcher.run(Task.from_function(lambda: b"payload"), backend=backend)
    assert call.result.value == b"payload" and not backend.processes[0].tampered


@pytest.mark.parametrize(("kind", "change", "source"), [
    (b"V", _flip_first_byte, None),
    (b"R", lambda p: p.replace(b'"exit_code":0', b'"exit_code":7'), None),
    (b"F", _flip_first_byte, "open('out.txt', 'w').write('data')\n"),
])
def test_a_tampered_result_is_refused(dispatcher: Any, kind: bytes, change: Any, source: str | None) -> None:
    backend = _TamperingBackend(kind, change)
    task = dispatcher.script(source) if source else Task.from_function(lambda: {"answer": 42})
    with pytest.raises(IntegrityError, match="HMAC"):
        dispatcher.run(task, backend=backend)
    assert backend.processes[0].tampered
    assert not (dispatcher.root / "landed" / "out.txt").exists()


def test_a_garbled_result_header_is_an_integrity_error(dispatcher: Any) -> None:
    backend = _TamperingBackend(b"R", _flip_first_byte)
    with pytest.raises(IntegrityError):
        dispatcher.run(Task.from_function(lambda: 1), backend=backend)


# -- runners that do not start, or end without a result ----------------------------------------------------


def _fake_python(folder: Path, body: str) -> str:
    path = folder / "fake-python"
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_a_missing_interpreter_is_not_found(dispatcher: Any) -> None:
    missing = str(dispatcher.root / "no" / "such" / "python3")
    with pytest.raises(RunnerError, match="not found") as error:
        dispatcher.run("print(1)\n", python=missing)
    assert error.value.reason == "interpreter-missing"
    assert missing in str(error.value)
    assert "--python" in str(error.value)


def test_a_python_that_exits_0_without_output_is_an_error(dispatcher: Any) -> None:
    silent = dispatcher.root / "silent-python"
    silent.write_text("#!/bin/sh\nexit 0\n")
    silent.chmod(0o755)
    with pytest.raises(RunnerError) as error:
        dispatcher.run("print(1)\n", python=str(silent))
    message = str(error.value)
    assert "could not start" in message and str(silent) in message and "exit 0" in message


def test_a_runner_that_exits_0_after_the_handshake_is_an_error(dispatcher: Any) -> None:
    python = _fake_python(dispatcher.root, """
        import sys
        sys.stdout.write("RXBOOT2 %s HAVE\\n" % sys.argv[3])
        sys.stdout.flush()
        sys.stdin.buffer.read(1)
    """)
    with pytest.raises(RunnerError, match="exited 0 without a result") as error:
        dispatcher.run("print(1)\n", python=python)
    assert error.value.reason == "no-result"


def test_a_runner_that_fails_says_why(dispatcher: Any) -> None:
    python = _fake_python(dispatcher.root, """
        import sys
        sys.stdout.write("RXBOOT2 %s HAVE\\n" % sys.argv[3])
        sys.stdout.flush()
        sys.stderr.write("rx runner: MemoryError: out of memory\\n")
        sys.exit(70)
    """)
    with pytest.raises(RunnerError, match=r"failed \(exit 70\): rx runner: MemoryError: out of memory"):
        dispatcher.run("print(1)\n", python=python)


def test_a_too_old_python_is_named(dispatcher: Any) -> None:
    python = _fake_python(dispatcher.root, """
        import sys
        sys.stdout.write("RXBOOT2 %s OLDPY 3.6.15\\n" % sys.argv[3])
        sys.exit(3)
    """)
    with pytest.raises(RunnerError, match=r"is Python 3\.6\.15; the runner needs 3\.8 or newer") as error:
        dispatcher.run("print(1)\n", python=python)
    assert error.value.reason == "python-too-old"


_EVIL_RUNNER = """
    import hashlib, hmac, io, json, sys, tarfile
    sys.path.insert(0, {repo!r})
    from remote_exec.protocol import wire

    sys.stdout.buffer.write(b"RXBOOT2 %s HAVE\\n" % sys.argv[3].encode())
    sys.stdout.buffer.flush()
    options = None
    while True:
        kind, payload = wire.read_frame(sys.stdin.buffer)
        if kind == b"G":
            options = wire.load_options(payload)
        elif kind == b"s":
            break
    mac = hmac.new(bytes.fromhex(options["key"]), digestmod=hashlib.sha256)

    def send(kind, payload, signed=True):
        if signed:
            mac.update(kind + len(payload).to_bytes(8, "big") + payload)
        sys.stdout.buffer.write(wire.encode(kind, payload))

    data = b"owned"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        info = tarfile.TarInfo({member!r})
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    files = [{{"path": {listed!r}, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}}]
    send(b"R", json.dumps({{"status": "finished", "exit_code": 0, "files": files, "value": None,
                           "exc_pickle": None, "exception": None}}).encode())
    send(b"F", buffer.getvalue())
    send(b"Z", json.dumps({{"hmac": mac.hexdigest()}}).encode(), signed=False)
    sys.stdout.buffer.flush()
    sys.stdin.buffer.read()
"""


@pytest.mark.parametrize(("listed", "member"), [
    ("../escaped.txt", "../escaped.txt"),
    ("fine.txt", "../escaped.txt"),
    ("/tmp/absolute-rx-unit.txt", "/tmp/absolute-rx-unit.txt"),
])
def test_a_result_naming_files_outside_the_run_directory_is_refused(dispatcher: Any, listed: str,
                                                                     member: str) -> None:
    """Even correctly signed: a runner (or remote) must not place files outside the run's folder."""
    repo = str(Path(__file__).resolve().parents[2])
    python = _fake_python(dispatcher.root, _EVIL_RUNNER.format(repo=repo, listed=listed, member=member))
    with pytest.raises(IntegrityError, match="outside its run directory"):
        dispatcher.run("print(1)\n", python=python)
    assert not (dispatcher.root / "escaped.txt").exists()
    assert not Path("/tmp/absolute-rx-unit.txt").exists()
    landed = dispatcher.root / "landed"
    assert not landed.exists() or not any(landed.rglob("*"))


def test_the_fake_runner_is_accepted_with_a_safe_name(dispatcher: Any) -> None:
    """The same hand-made result with a safe name lands: the refusals above are about the names."""
    repo = str(Path(__file__).resolve().parents[2])
    python = _fake_python(dispatcher.root, _EVIL_RUNNER.format(repo=repo, listed="ok.txt", member="ok.txt"))
    call = dispatcher.run("print(1)\n", python=python)
    assert call.result.ok
    assert (dispatcher.root / "landed" / "ok.txt").read_bytes() == b"owned"
    assert os.path.commonpath([call.outcome.files[0], dispatcher.root / "landed"]) == str(
        dispatcher.root / "landed")
