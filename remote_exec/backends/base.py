"""The backend interface: how rx talks to one host.

A backend is small, like an httpx transport: :meth:`Backend.start` opens one remote command as a
:class:`Process` (stdin, stdout, stderr as byte streams, an exit status), :meth:`Backend.put` and
:meth:`Backend.get` copy a file, :meth:`Backend.close` ends the connection. Everything else (the run loop
with live output callbacks and timeouts, environment handling, quoting) is written once here, so the
OpenSSH, paramiko and local backends only fill in those hooks.

Backends open their connection lazily on first use, keep it for every later call, and translate the
errors of their dependency into :mod:`remote_exec.errors` at the boundary.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shlex
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import ClassVar, Literal

from ..errors import CommandTimeout, ConfigError, ConnectError, RemoteExecError

__all__ = [
    "Backend",
    "CommandResult",
    "HostKeyPolicy",
    "HostSpec",
    "OutputCallback",
    "Process",
    "build_command",
]

logger = logging.getLogger(__name__)

HostKeyPolicy = Literal["accept-new", "strict", "off"]
OutputCallback = Callable[[bytes], None]

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HOST_SPEC = re.compile(r"^(?:(?P<user>[^@\s]+)@)?(?P<host>\[[^\]]+\]|[^:@\s]+)(?::(?P<port>\d+))?$")


@dataclass(frozen=True)
class HostSpec:
    """How to reach one host.

    Attributes:
        host: An ssh_config alias or a host name / address, as the user named it.
        user: Overrides ``User`` from ssh_config.
        port: Overrides ``Port`` from ssh_config.
        identity_file: Overrides ``IdentityFile`` from ssh_config.
        ssh_config: The ssh_config file to read; None means ``~/.ssh/config`` when it exists.
        known_hosts: Overrides ``UserKnownHostsFile`` from ssh_config (default ``~/.ssh/known_hosts``).
        host_key_policy: ``accept-new`` records unknown keys and refuses changed ones (the default);
            ``strict`` refuses unknown keys too; ``off`` checks nothing (the caller warns the user).
        connect_timeout: Seconds to wait for TCP connect plus the SSH handshake.
        keepalive_interval: Seconds between keepalive probes on an idle link.
        keepalive_count: Unanswered probes after which the link counts as dead.
    """

    host: str
    user: str | None = None
    port: int | None = None
    identity_file: Path | None = None
    ssh_config: Path | None = None
    known_hosts: Path | None = None
    host_key_policy: HostKeyPolicy = "accept-new"
    connect_timeout: float = 10.0
    keepalive_interval: float = 5.0
    keepalive_count: int = 3

    @classmethod
    def parse(cls, spec: str, **options: object) -> HostSpec:
        """Parse ``[user@]host[:port]`` (a bare ssh_config alias is a host).

        Raises:
            ConfigError: The spec is empty or malformed.
        """
        match = _HOST_SPEC.match(spec.strip())
        if not spec.strip() or match is None:
            raise ConfigError(f"not a host: {spec!r}", hint="use an ssh_config alias or [user@]host[:port]")
        host = match["host"].strip("[]")
        port = int(match["port"]) if match["port"] else None
        if port is not None and not 0 < port < 65536:
            raise ConfigError(f"not a port: {port} in {spec!r}")
        return dataclasses.replace(cls(host=host, user=match["user"], port=port), **options)  # type: ignore[arg-type]

    @property
    def label(self) -> str:
        """The host as the user would write it: ``[user@]host[:port]``."""
        text = f"{self.user}@{self.host}" if self.user else self.host
        return f"{text}:{self.port}" if self.port else text

    @property
    def dead_after(self) -> float:
        """Seconds of silence after which a link counts as dead."""
        return self.keepalive_interval * self.keepalive_count + 1.0


@dataclass(frozen=True)
class CommandResult:
    """The outcome of one remote command. A non-zero exit is data, not an exception.

    Attributes:
        argv: The command as given.
        exit_code: Its exit status (-1 when the backend received none).
        stdout: Everything it wrote to stdout (empty when a callback consumed the stream).
        stderr: Everything it wrote to stderr (empty when a callback consumed the stream).
        duration: Seconds from start to exit.
        host: Where it ran.
    """

    argv: tuple[str, ...]
    exit_code: int
    stdout: bytes = b""
    stderr: bytes = b""
    duration: float = 0.0
    host: str = ""

    @property
    def ok(self) -> bool:
        """True when the command exited with status 0."""
        return self.exit_code == 0

    @property
    def failed(self) -> bool:
        """True when the command exited with a non-zero status."""
        return not self.ok

    def tail(self, stream: Literal["stdout", "stderr"] = "stderr", count: int = 10) -> str:
        """The last ``count`` lines of a stream, decoded, for error messages."""
        data: bytes = getattr(self, stream)
        return "\n".join(data.decode("utf-8", "replace").splitlines()[-count:])


def build_command(argv: Sequence[str], env: Mapping[str, str] | None = None,
                  cwd: PurePosixPath | None = None) -> str:
    """Build the remote shell command line for ``argv``: every word quoted, nothing interpolated.

    Args:
        argv: Program and arguments.
        env: Environment variables to set for the command (through ``env``; not for secrets, which
            must travel over stdin: command lines show in the remote process list).
        cwd: Directory to change to first.

    Raises:
        ConfigError: An environment variable name is not a valid name.
    """
    if not argv:
        raise ConfigError("empty command")
    words: list[str] = []
    if env:
        for name in env:
            if not _ENV_NAME.match(name):
                raise ConfigError(f"not an environment variable name: {name!r}")
        words += ["env", *(f"{name}={value}" for name, value in env.items())]
    command = shlex.join([*words, *argv])
    if cwd is not None:
        command = f"cd {shlex.quote(str(cwd))} && {command}"
    return command


class Process(ABC):
    """One running command on a host. The backend fills these hooks in; the loop lives in the base."""

    @abstractmethod
    def read_stdout(self, size: int = 65536) -> bytes:
        """Block until some stdout is available; return up to ``size`` bytes, or b"" at end of stream."""

    @abstractmethod
    def read_stderr(self, size: int = 65536) -> bytes:
        """Block until some stderr is available; return up to ``size`` bytes, or b"" at end of stream."""

    @abstractmethod
    def write_stdin(self, data: bytes) -> None:
        """Write all of ``data`` to the command's stdin.

        Raises:
            ConnectError: The link or the command's stdin is gone.
        """

    @abstractmethod
    def close_stdin(self) -> None:
        """Signal end of input to the command."""

    def grow_buffers(self) -> None:  # noqa: B027 - optional: most processes have nothing to grow
        """Prepare for a large transfer (e.g. larger local pipe buffers). Does nothing by default."""

    @abstractmethod
    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the command to end; return its exit status, or None if it still runs at ``timeout``.

        An exit status of -1 means the backend got none (the link died).
        """

    @abstractmethod
    def kill(self) -> None:
        """Stop the command (close its channel / end the local ssh process). Safe to call twice."""


class Backend(ABC):
    """A connection to one host, opened lazily and reused for every command.

    Subclasses set :attr:`name` and implement :meth:`start`, :meth:`put`, :meth:`get` and :meth:`close`.

    Attributes:
        spec: How to reach the host.
        connections_opened: SSH connections this backend has established so far (tests use it to show
            that calls reuse one connection).
    """

    name: ClassVar[str] = ""

    def __init__(self, spec: HostSpec) -> None:
        self.spec = spec
        self.connections_opened = 0

    @property
    def host(self) -> str:
        """The host as the user named it."""
        return self.spec.label

    @abstractmethod
    def start(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
              cwd: PurePosixPath | None = None) -> Process:
        """Start ``argv`` on the host (opening the connection if needed) and return its process.

        Raises:
            ConnectError, AuthError, HostKeyError: The connection could not be made.
        """

    @abstractmethod
    def put(self, local: Path, remote: PurePosixPath) -> None:
        """Copy a local file to ``remote`` (its directory must exist).

        Raises:
            TransferError: The copy failed.
        """

    @abstractmethod
    def get(self, remote: PurePosixPath, local: Path) -> None:
        """Copy the remote file ``remote`` to ``local``.

        Raises:
            TransferError: The copy failed or the remote file does not exist.
        """

    def classify_exit(self, exit_code: int | None, stderr: bytes) -> RemoteExecError | None:
        """The error to raise when a remote command ended this way because of the link rather than the
        command (None: the exit status is the command's own)."""
        if exit_code in (255, -1):
            lines = stderr.decode("utf-8", "replace").strip().splitlines() or ["no reason given"]
            return ConnectError(self.host, f"the connection closed: {lines[-1]}")
        return None

    @abstractmethod
    def close(self) -> None:
        """Close the connection. Safe to call twice; a later command reconnects."""

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        cwd: PurePosixPath | None = None,
        stdin: bytes | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> CommandResult:
        """Run ``argv`` to completion and return its result.

        Output is passed to ``on_stdout`` / ``on_stderr`` as it arrives; a stream without a callback is
        collected into the result instead.

        Raises:
            CommandTimeout: The command ran past ``timeout`` seconds; it has been killed.
            ConnectError, AuthError, HostKeyError: The connection failed.
        """
        started = time.monotonic()
        process = self.start(argv, env=env, cwd=cwd)
        out: list[bytes] = []
        err: list[bytes] = []

        def pump(read: Callable[[int], bytes], sink: OutputCallback | None, store: list[bytes]) -> None:
            while chunk := read(65536):
                if sink is None:
                    store.append(chunk)
                else:
                    sink(chunk)

        def feed() -> None:
            try:
                if stdin:
                    process.write_stdin(stdin)
            except Exception:  # the command may exit without reading its input
                logger.debug("stdin of %s on %s closed early", argv[0], self.host, exc_info=True)
            finally:
                process.close_stdin()

        threads = [
            threading.Thread(target=pump, args=(process.read_stderr, on_stderr, err), daemon=True),
            threading.Thread(target=feed, daemon=True),
        ]
        for thread in threads:
            thread.start()
        timer: threading.Timer | None = None
        expired = threading.Event()
        if timeout is not None:
            def expire() -> None:
                expired.set()
                process.kill()
            timer = threading.Timer(timeout, expire)
            timer.daemon = True
            timer.start()
        try:
            pump(process.read_stdout, on_stdout, out)
            threads[0].join()
            code = process.wait()
        finally:
            if timer is not None:
                timer.cancel()
        if expired.is_set():
            raise CommandTimeout(self.host, f"{shlex.join(argv)[:80]} ran past its timeout of {timeout:g} s")
        return CommandResult(
            argv=tuple(argv),
            exit_code=-1 if code is None else code,
            stdout=b"".join(out),
            stderr=b"".join(err),
            duration=time.monotonic() - started,
            host=self.host,
        )

    def __enter__(self) -> Backend:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
