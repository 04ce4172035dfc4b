"""Backends without SSH: :class:`LocalBackend` (subprocesses on this machine) and :class:`MockBackend`.

:class:`LocalBackend` is what ``rx run`` without ``--remote`` and :class:`SubprocessAdvice` use: the same
archive, session and runner as a remote run, with a local subprocess in place of ssh. Remote paths are
local paths. It doubles as the test backend for everything above the SSH layer, like
``httpx.MockTransport``: unit tests never patch :mod:`subprocess`.

:class:`MockBackend` answers commands from a handler function, for tests of code that only needs
canned command results.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import IO

from ..errors import ConfigError, TransferError
from .base import Backend, CommandResult, HostSpec, Process

__all__ = ["LocalBackend", "MockBackend", "PopenProcess"]


class PopenProcess(Process):
    """A :class:`Process` over a local :class:`subprocess.Popen` with three pipes."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen = popen
        self._killed = False
        assert popen.stdin is not None and popen.stdout is not None and popen.stderr is not None
        self._stdin_lock = threading.Lock()

    def _read(self, stream: IO[bytes] | None, size: int) -> bytes:
        # By the file object, never a bare fd number: after close, that number may belong to another file.
        # Once killed, reads end (b"") when the pipe goes idle, as a severed ssh link's do, even while a
        # process the command left (a runner's worker in a session of its own, stopped with SIGSTOP) still
        # holds the pipe open.
        if stream is None:
            return b""
        try:
            while not select.select([stream], [], [], 0.5)[0]:
                if self._killed:
                    return b""
            if stream.closed:
                return b""
            chunk = os.read(stream.fileno(), size)
        except (OSError, ValueError, TypeError, AttributeError):
            return b""
        if not chunk:  # end of file: release the pipe now rather than when the Popen is collected
            stream.close()
        return chunk

    def read_stdout(self, size: int = 65536) -> bytes:
        return self._read(self.popen.stdout, size)

    def read_stderr(self, size: int = 65536) -> bytes:
        return self._read(self.popen.stderr, size)

    def write_stdin(self, data: bytes) -> None:
        from ..errors import ConnectError

        view = memoryview(data)
        with self._stdin_lock:
            stream = self.popen.stdin
            if stream is None or stream.closed:
                raise ConnectError("local", "the command's stdin is already closed")
            while view:
                try:
                    written = os.write(stream.fileno(), view)
                except OSError as exc:
                    raise ConnectError("local", f"the command's stdin closed: {exc}") from exc
                view = view[written:]

    def close_stdin(self) -> None:
        assert self.popen.stdin is not None
        with self._stdin_lock:
            try:
                self.popen.stdin.close()
            except OSError:
                pass

    def wait(self, timeout: float | None = None) -> int | None:
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        return code

    def kill(self) -> None:
        self._killed = True
        if self.popen.poll() is None:
            try:
                self.popen.kill()
            except ProcessLookupError:
                pass
        self.popen.wait()
        for stream in (self.popen.stdin, self.popen.stdout, self.popen.stderr):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass


class LocalBackend(Backend):
    """Runs commands as local subprocesses; "remote" paths are local paths.

    Attributes:
        commands: How many commands it started (tests count them).
    """

    name = "local"

    def __init__(self, spec: HostSpec | None = None) -> None:
        super().__init__(spec or HostSpec(host="local"))
        self.commands = 0

    def start(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
              cwd: PurePosixPath | None = None) -> Process:
        if not argv:
            raise ConfigError("empty command")
        environment = dict(os.environ)
        environment.update(env or {})
        if self.connections_opened == 0:
            self.connections_opened = 1
        self.commands += 1
        try:
            popen = subprocess.Popen(
                list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env=environment, cwd=str(cwd) if cwd is not None else None, bufsize=0,
            )
        except FileNotFoundError:
            # What a shell would say: the caller maps exit 127 to "not found".
            popen = subprocess.Popen(
                ["sh", "-c", 'echo "$0: command not found" >&2; exit 127', argv[0]],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
        return PopenProcess(popen)

    def put(self, local: Path, remote: PurePosixPath) -> None:
        self._copy(local, Path(str(remote)))

    def get(self, remote: PurePosixPath, local: Path) -> None:
        self._copy(Path(str(remote)), local)

    def _copy(self, source: Path, target: Path) -> None:
        temporary = target.with_name(f".{target.name}.rx-tmp")
        try:
            shutil.copyfile(source, temporary)
            os.replace(temporary, target)
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            raise TransferError(self.host, f"copying {source} to {target} failed: {exc}") from exc

    def close(self) -> None:
        """Nothing to close."""


Handler = Callable[[Sequence[str], bytes], CommandResult]


class _CannedProcess(Process):
    def __init__(self, handler: Handler, argv: Sequence[str]) -> None:
        self._handler = handler
        self._argv = list(argv)
        self._stdin = bytearray()
        self._result: CommandResult | None = None
        self._out = 0
        self._err = 0
        self._ready = threading.Event()

    def _run(self) -> CommandResult:
        self._ready.wait()
        if self._result is None:
            self._result = self._handler(self._argv, bytes(self._stdin))
        return self._result

    def read_stdout(self, size: int = 65536) -> bytes:
        result = self._run()
        chunk = result.stdout[self._out:self._out + size]
        self._out += len(chunk)
        return chunk

    def read_stderr(self, size: int = 65536) -> bytes:
        result = self._run()
        chunk = result.stderr[self._err:self._err + size]
        self._err += len(chunk)
        return chunk

    def write_stdin(self, data: bytes) -> None:
        self._stdin += data

    def close_stdin(self) -> None:
        self._ready.set()

    def wait(self, timeout: float | None = None) -> int | None:
        if not self._ready.wait(timeout):
            return None
        return self._run().exit_code

    def kill(self) -> None:
        self._ready.set()


class MockBackend(Backend):
    """Answers every command from ``handler(argv, stdin) -> CommandResult`` (after stdin is closed).

    Attributes:
        calls: The argv of every command started.
        files: The "remote" file system for put/get.
    """

    name = "mock"

    def __init__(self, handler: Handler, spec: HostSpec | None = None) -> None:
        super().__init__(spec or HostSpec(host="mock"))
        self.handler = handler
        self.calls: list[list[str]] = []
        self.files: dict[PurePosixPath, bytes] = {}

    def start(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
              cwd: PurePosixPath | None = None) -> Process:
        self.calls.append(list(argv))
        return _CannedProcess(self.handler, argv)

    def put(self, local: Path, remote: PurePosixPath) -> None:
        self.files[remote] = local.read_bytes()

    def get(self, remote: PurePosixPath, local: Path) -> None:
        try:
            local.write_bytes(self.files[remote])
        except KeyError:
            raise TransferError(self.host, f"no such remote file: {remote}") from None

    def close(self) -> None:
        """Nothing to close."""
