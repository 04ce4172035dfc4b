"""The backend interface: how rx talks to one host.

A backend is small, like an httpx transport: :meth:`Backend.start` opens one remote command as a
:class:`Process` (stdin, stdout, stderr as byte streams, an exit status) and :meth:`Backend.close` ends the
connection; those two are all a backend must write. Everything else is written once here: the run loop
with live output callbacks and timeouts, environment handling and quoting (:meth:`Backend.run`), file
copies as ``cat`` over :meth:`~Backend.start` (:meth:`Backend.put`, :meth:`Backend.get`; a backend with a
faster way, SFTP or the ssh client's own pipes, overrides them), and the question whether a command's exit
status is its own or the link's (:meth:`Backend.classify_exit`, which each backend answers for itself).

Backends open their connection lazily on first use, keep it for every later call, and translate the
errors of their dependency into :mod:`remote_exec.errors` at the boundary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import re
import secrets
import shlex
import sys
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import BinaryIO, ClassVar, Literal

from ..errors import CommandTimeout, ConfigError, RemoteExecError, TransferError

__all__ = [
    "GET_SCRIPT",
    "PUT_SCRIPT",
    "Backend",
    "CommandResult",
    "Feed",
    "HostKeyPolicy",
    "HostSpec",
    "OutputCallback",
    "Process",
    "announced_size",
    "build_command",
    "get_argv",
    "put_argv",
    "transfer_reason",
]

logger = logging.getLogger(__name__)

HostKeyPolicy = Literal["accept-new", "strict", "off"]
OutputCallback = Callable[[bytes], None]

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HOST_SPEC = re.compile(r"^(?:(?P<user>[^@\s]+)@)?(?P<host>\[[^\]]+\]|[^:@\s]+)(?::(?P<port>\d+))?$")


@dataclass(frozen=True)
class HostSpec:
    """How to reach one host.

    The configuration, the CLI and the coordinator build it; every backend receives it. ``host``, ``user``,
    ``port``, ``connect_timeout`` and the keepalive pair concern any link (the coordinator also derives its
    heartbeat and :attr:`dead_after` from the keepalives). The fields marked *SSH* are read only by the SSH
    backends (``openssh``, ``paramiko``); other backends ignore them.

    Attributes:
        host: An ssh_config alias or a host name / address, as the user named it.
        user: Overrides ``User`` from ssh_config.
        port: Overrides ``Port`` from ssh_config.
        identity_file: *SSH.* Overrides ``IdentityFile`` from ssh_config.
        ssh_config: *SSH.* The ssh_config file to read; None means ``~/.ssh/config`` when it exists.
        known_hosts: *SSH.* Overrides ``UserKnownHostsFile`` from ssh_config (default ``~/.ssh/known_hosts``).
        host_key_policy: *SSH.* ``accept-new`` records unknown keys and refuses changed ones (the default);
            ``strict`` refuses unknown keys too; ``off`` checks nothing (the caller warns the user).
        connect_timeout: Seconds to wait for TCP connect plus the SSH handshake.
        keepalive_interval: Seconds between keepalive probes on an idle link (SSH backends send them as
            ServerAliveInterval / keepalive@openssh.com requests).
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
        """Parse ``[user@]host[:port]`` or ``ssh://[user@]host[:port]`` (a bare ssh_config alias is a host).

        Raises:
            ConfigError: The spec is empty or malformed.
        """
        text = spec.strip()
        if text.lower().startswith("ssh://"):
            text = text[len("ssh://"):].rstrip("/")
        match = _HOST_SPEC.match(text)
        if not text or match is None:
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


# --- file copies over a command channel ----------------------------------------------------------------------

PUT_SCRIPT = """\
if ! cat > "$1"; then rm -f -- "$1"; exit 1; fi
n=$(wc -c < "$1") || { rm -f -- "$1"; exit 1; }
if [ "$((n))" -ne "$3" ]; then
  rm -f -- "$1"; echo "received $((n)) of $3 bytes" >&2; exit 1
fi
mv -f -- "$1" "$2" || { rm -f -- "$1"; exit 1; }
"""
"""Copy stdin to a temporary name beside the target, check the byte count, rename: ``$1`` the temporary
name, ``$2`` the target, ``$3`` the expected size. A broken link gives ``cat`` an early end of file, so the
count matters."""

GET_SCRIPT = """\
[ -e "$1" ] || { echo "$1: no such file" >&2; exit 2; }
[ -d "$1" ] && { echo "$1: is a directory" >&2; exit 2; }
n=$(wc -c < "$1") || exit 2
echo "__rx_size__=$((n))" >&2
exec cat < "$1"
"""
"""Announce the size of the file ``$1`` on stderr (a ``__rx_size__=N`` line), then stream it to stdout."""

_SIZE_LINE = re.compile(r"^__rx_size__=(\d+)$", re.MULTILINE)


def put_argv(temporary: str, remote: PurePosixPath, size: int) -> list[str]:
    """The command that receives a file of ``size`` bytes on stdin into ``remote`` (see :data:`PUT_SCRIPT`)."""
    return ["sh", "-c", PUT_SCRIPT, "sh", temporary, str(remote), str(size)]


def get_argv(remote: PurePosixPath) -> list[str]:
    """The command that sends ``remote`` on stdout, its size on stderr first (see :data:`GET_SCRIPT`)."""
    return ["sh", "-c", GET_SCRIPT, "sh", str(remote)]


def announced_size(stderr: str) -> int | None:
    """The size :data:`GET_SCRIPT` announced on stderr, if it did."""
    match = _SIZE_LINE.search(stderr)
    return int(match[1]) if match is not None else None


def transfer_reason(stderr: str, code: int) -> str:
    """Why a copy command failed: the last line it wrote on stderr (not the size line), or its exit status."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip() and not _SIZE_LINE.match(line.strip())]
    return lines[-1] if lines else f"the remote command failed with exit status {code}"


# --- the run loop -----------------------------------------------------------------------------------------


def _pump(read: Callable[[int], bytes], sink: Callable[[bytes], object]) -> None:
    """Hand everything ``read`` returns to ``sink`` until end of stream."""
    while chunk := read(65536):
        sink(chunk)


def _communicate(process: Process, feed: Callable[[Process], None] | None, on_stdout: Callable[[bytes], object],
                 on_stderr: Callable[[bytes], object], label: str) -> int | None:
    """Feed stdin and drain stdout and stderr of ``process`` at once (none may wait for another); return
    its exit status.

    ``feed`` writes the input (a failure to write is logged: the command may exit without reading it);
    stdin is closed after it in every case.
    """

    def write() -> None:
        try:
            if feed is not None:
                feed(process)
        except Exception:
            logger.debug("stdin of %s closed early", label, exc_info=True)
        finally:
            process.close_stdin()

    errors = threading.Thread(target=_pump, args=(process.read_stderr, on_stderr), daemon=True)
    errors.start()
    threading.Thread(target=write, daemon=True).start()
    _pump(process.read_stdout, on_stdout)
    errors.join()
    return process.wait()


@contextlib.contextmanager
def _deadline(process: Process, timeout: float | None) -> Iterator[threading.Event]:
    """Kill ``process`` if the block runs past ``timeout`` seconds; the event says whether that happened."""
    expired = threading.Event()
    if timeout is None:
        yield expired
        return

    def expire() -> None:
        expired.set()
        process.kill()

    timer = threading.Timer(timeout, expire)
    timer.daemon = True
    timer.start()
    try:
        yield expired
    finally:
        timer.cancel()


def _send_file(source: BinaryIO) -> Callable[[Process], None]:
    def feed(process: Process) -> None:
        while chunk := source.read(1 << 20):
            process.write_stdin(chunk)

    return feed


def _ignore(data: bytes) -> None:
    """An output callback that drops what it is given."""


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

    def abandon(self) -> None:
        """Stop waiting for a command whose host does not answer: close the local end now, without asking
        the host anything (a signal sent through a frozen link would only wait). The command learns it
        from its closed channel when the host runs again. Safe to call twice, and before or after
        :meth:`kill`. By default the same as :meth:`kill`."""
        self.kill()


#: The interpreter's thread switch interval while a connection is made in the background (see
#: :func:`prompt_thread_switches`): 0.5 ms instead of Python's 5 ms.
AHEAD_SWITCH_INTERVAL = 0.0005

_switches_lock = threading.Lock()
_switches_users = 0
_switches_saved: tuple[float, float] | None = None  # (the interval before, the one set)


@contextlib.contextmanager
def prompt_thread_switches() -> Iterator[None]:
    """Let a thread that waits on the network take the GIL back promptly while the caller computes.

    A connection made ahead (:meth:`Backend.connect_in_background`) is a chain of short steps, each woken by
    a packet or a child process, while the main thread imports rx and serializes the task: pure Python
    that gives the GIL up only when another thread has waited for it a whole switch interval (5 ms). Each
    step of the connection then waits up to that long: measured on the testbed, a paramiko handshake and
    authentication took 180-226 ms beside a busy main thread instead of 35-40 ms, and 55 ms with 0.5 ms.
    So the interval is lowered while such threads run and restored when the last one ends (unless
    something else changed it meanwhile; an interval set lower than ours is left as it is).
    """
    global _switches_users, _switches_saved
    with _switches_lock:
        if _switches_users == 0:
            before = sys.getswitchinterval()
            if before > AHEAD_SWITCH_INTERVAL:
                sys.setswitchinterval(AHEAD_SWITCH_INTERVAL)
                _switches_saved = (before, sys.getswitchinterval())
        _switches_users += 1
    try:
        yield
    finally:
        with _switches_lock:
            _switches_users -= 1
            if _switches_users == 0 and _switches_saved is not None:
                before, ours = _switches_saved
                _switches_saved = None
                if sys.getswitchinterval() == ours:
                    sys.setswitchinterval(before)


class Feed:
    """What a caller of :meth:`Backend.start` wants on the command's stdin first (see
    :meth:`Backend.feeding`): made (``feed()``: it may wait for the caller's last preparations) and written
    on a thread of its own once the backend spawned the command, so that a large one never holds the
    backend's start.

    Attributes:
        started: The backend took it: it is being made and written.
        error: What making it raised (the caller raises it).
        failed: Writing it failed (the command ended, or the link): the caller starts the usual way.
    """

    def __init__(self, feed: Callable[[], bytes]) -> None:
        self.feed = feed
        self.started = False
        self.error: BaseException | None = None
        self.failed = False
        self._thread: threading.Thread | None = None

    def begin(self, write: Callable[[bytes], None]) -> None:
        """Make it and ``write`` it, on a thread of its own (called by the backend, the command spawned; a
        second call, for a command started again, waits for the first's writing and writes anew)."""
        if self._thread is not None:
            self._thread.join()
            self.error, self.failed = None, False
        self.started = True
        self._thread = threading.Thread(target=self._run, args=(write,), name="rx-feed", daemon=True)
        self._thread.start()

    def _run(self, write: Callable[[bytes], None]) -> None:
        try:
            data = self.feed()
        except BaseException as exc:  # raised by the caller, in its thread
            self.error = exc
            return
        try:
            write(data)
        except Exception:
            self.failed = True

    def wait(self) -> None:
        """Wait until it is written (or failed).

        Raises:
            What making it raised.
        """
        if self._thread is not None:
            self._thread.join()
        if self.error is not None:
            raise self.error


class Backend(ABC):
    """A connection to one host, opened lazily and reused for every command.

    Subclasses set :attr:`name` and implement :meth:`start` and :meth:`close`; they may override
    :meth:`put` and :meth:`get` (the defaults copy with ``cat`` over :meth:`start`) and should override
    :meth:`classify_exit` when their link can fail under a running command.

    Attributes:
        spec: How to reach the host.
        connections_opened: SSH connections this backend has established so far (tests use it to show
            that calls reuse one connection).
    """

    name: ClassVar[str] = ""
    _failed_ahead: BaseException | None = None  # what connect_ahead met, for the next start
    _ahead: threading.Thread | None = None  # connect_in_background's thread
    _ahead_guard: ClassVar[threading.Lock] = threading.Lock()  # one such thread per backend
    _serials: ClassVar[Iterator[int]] = itertools.count(1)

    def __init__(self, spec: HostSpec) -> None:
        self.spec = spec
        self.connections_opened = 0
        #: A number of this backend, never given to another in this process: what rx keys per-connection
        #: facts by (an ``id()`` is given again to a later object once this one is gone).
        self.serial = next(Backend._serials)

    def connect(self) -> None:  # noqa: B027 - optional: a backend without a connection of its own has none
        """Open the connection to the host now (if it is not open), so that the next :meth:`start` finds it.

        Raises:
            ConnectError, AuthError, HostKeyError: The connection could not be made.
        """

    def connect_ahead(self) -> None:
        """:meth:`connect` while the caller does something else (``rx run`` scans its project meanwhile, in
        another thread); its failure is kept for the next :meth:`start`, which raises it rather than try
        again (one attempt, one wait, as without connecting ahead). A second call after a failed one does
        nothing: the next start raises that failure."""
        if self._failed_ahead is not None:
            return
        try:
            self.connect()
        except Exception as exc:
            self._failed_ahead = exc

    def connect_in_background(self) -> None:
        """:meth:`connect_ahead` on a thread of its own; the next :meth:`start` waits for it (and raises
        what it failed with). Once per backend: later calls do nothing while the first is under way."""
        with Backend._ahead_guard:
            if self._ahead is not None:
                return
            self._ahead = threading.Thread(target=self._connect_ahead_promptly, name=f"rx-connect-{self.host}",
                                           daemon=True)
        self._ahead.start()

    def _connect_ahead_promptly(self) -> None:
        with prompt_thread_switches():
            self.connect_ahead()

    def raise_failed_ahead(self) -> None:
        """Raise (once) what :meth:`connect_ahead` failed with, once a connection under way in the
        background is done; called as :meth:`start` begins."""
        ahead = self._ahead
        if ahead is not None and ahead is not threading.current_thread():
            ahead.join()
        failure, self._failed_ahead = self._failed_ahead, None
        if failure is not None:
            raise failure

    @property
    def host(self) -> str:
        """The host as the user named it."""
        return self.spec.label

    @contextlib.contextmanager
    def feeding(self, feed: Callable[[], bytes]) -> Iterator[Feed]:
        """Have this thread's next :meth:`start` write what ``feed`` makes to the command's stdin as soon as
        the command is spawned, before the backend waits for the host to run it: a round trip sooner than
        a write after :meth:`start` returned. A backend that can (:meth:`_take_feed`) marks the
        :class:`Feed` started; one that cannot leaves it to the caller."""
        local = self.__dict__.setdefault("_feeds", threading.local())
        fed = Feed(feed)
        local.feed = fed
        try:
            yield fed
        finally:
            local.feed = None

    def _take_feed(self) -> Feed | None:
        """The :class:`Feed` for the command this thread starts now, if any (taken: one command only)."""
        local = self.__dict__.get("_feeds")
        if local is None:
            return None
        fed: Feed | None = getattr(local, "feed", None)
        local.feed = None
        return fed

    @abstractmethod
    def start(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
              cwd: PurePosixPath | None = None) -> Process:
        """Start ``argv`` on the host (opening the connection if needed) and return its process.

        Raises:
            ConnectError, AuthError, HostKeyError: The connection could not be made.
        """

    @abstractmethod
    def close(self) -> None:
        """Close the connection. Safe to call twice; a later command reconnects."""

    def classify_exit(self, exit_code: int | None, stderr: bytes) -> RemoteExecError | None:
        """The error to raise when a command ended this way because of the link rather than the command.

        Called for a command whose exit the caller did not expect (the runner, for instance, never exits 255
        itself). The default says the status is always the command's own, right for a backend without a
        link that can fail (``local``).

        Args:
            exit_code: What :meth:`Process.wait` returned (None: the command has not ended; nothing to say).
            stderr: What the command wrote on stderr, or its last part.

        Returns:
            A :class:`~remote_exec.errors.ConnectError`, :class:`~remote_exec.errors.AuthError` or
            :class:`~remote_exec.errors.HostKeyError` describing the link's failure, or None when the exit
            status is the command's own.
        """
        return None

    def put(self, local: Path, remote: PurePosixPath) -> None:
        """Copy a local file to ``remote`` (its directory must exist); ``remote`` appears whole or not at all.

        The default streams the file into ``cat`` over :meth:`start` (see :data:`PUT_SCRIPT`): written under
        a temporary name beside the target, its byte count checked, then renamed.

        Raises:
            TransferError: The local file cannot be read, or the copy failed (the host's reason).
            ConnectError, AuthError, HostKeyError: No connection could be made for the copy.
        """
        what = f"put {local} -> {remote}"
        try:
            source = open(local, "rb")  # noqa: SIM115 - closed below, after the transfer
            size = os.fstat(source.fileno()).st_size
        except OSError as exc:
            raise TransferError(self.host, f"{what}: cannot read {local}: {exc.strerror or exc}") from exc
        errors: list[bytes] = []
        with source:
            process = self.start(put_argv(f"{remote}.rx-{secrets.token_hex(4)}.tmp", remote, size))
            code = _communicate(process, _send_file(source), _ignore, errors.append, what)
        self._check_transfer(what, code, b"".join(errors))

    def get(self, remote: PurePosixPath, local: Path) -> None:
        """Copy the remote file ``remote`` to ``local``; ``local`` appears whole or not at all.

        The default streams ``cat`` over :meth:`start` into a temporary file beside ``local`` (see
        :data:`GET_SCRIPT`), checks the byte count, fsyncs and renames it.

        Raises:
            TransferError: The remote file is missing or unreadable, the local directory is not writable,
                or the copy failed.
            ConnectError, AuthError, HostKeyError: No connection could be made for the copy.
        """
        what = f"get {remote} -> {local}"
        try:
            fd, name = tempfile.mkstemp(dir=local.parent, prefix=f".{local.name}.", suffix=".rx-tmp")
        except OSError as exc:
            raise TransferError(self.host, f"{what}: cannot write in {local.parent}: {exc.strerror or exc}") \
                from exc
        temporary = Path(name)
        try:
            with os.fdopen(fd, "wb") as target:
                errors: list[bytes] = []
                code = _communicate(self.start(get_argv(remote)), None, target.write, errors.append, what)
                stderr = self._check_transfer(what, code, b"".join(errors))
                target.flush()
                size, announced = os.fstat(target.fileno()).st_size, announced_size(stderr)
                if announced is not None and announced != size:
                    raise TransferError(self.host, f"{what}: received {size} of {announced} bytes")
                os.fsync(target.fileno())
            os.replace(temporary, local)
        except BaseException:
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise

    def _check_transfer(self, what: str, code: int | None, stderr: bytes) -> str:
        """The copy's stderr, decoded, if it succeeded; else the TransferError that says why it failed."""
        text = stderr.decode(errors="replace")
        if code == 0:
            return text
        link = self.classify_exit(code, stderr)
        if link is not None:
            raise TransferError(self.host, f"{what}: {link.message.removeprefix(f'{self.host}: ')}") from link
        raise TransferError(self.host, f"{what}: {transfer_reason(text, -1 if code is None else code)}")

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

        def feed(target: Process) -> None:
            if stdin:
                target.write_stdin(stdin)

        with _deadline(process, timeout) as expired:
            code = _communicate(process, feed, on_stdout or out.append, on_stderr or err.append,
                                f"{argv[0]} on {self.host}")
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
