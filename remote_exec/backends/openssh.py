"""The OpenSSH backend: the system ``ssh`` client, one multiplexed connection per host.

How it works:

* **Resolution.** ``ssh -G`` prints the options OpenSSH itself would use for the host (aliases, HostName,
  User, Port, IdentityFile, ProxyJump, UserKnownHostsFile from ``ssh_config``), with the overrides of the
  :class:`~remote_exec.backends.base.HostSpec` applied (``-l``, ``-p``, ``-i``,
  ``-o UserKnownHostsFile=``). The result is cached per backend as a
  :class:`~remote_exec.backends.ssh.ResolvedHost` (the record the paramiko backend builds too); connecting
  still goes through ``ssh`` with the same arguments, so what works on the command line works here.
* **One master per host, shared.** The first call starts ``ssh -M -N -o ControlPersist=<idle>`` with its control
  socket in the user's private directory under a digest of the connection's settings, where the next ``rx``
  finds it and uses it (:mod:`~remote_exec.backends.controlpath`: alive-checked, a ``flock`` between two that
  connect at once, ``RX_SSH_PERSIST`` idle seconds). With ``RX_SSH_PERSIST=0`` or no safe directory, the master
  is this process's own, in a ``mkdtemp`` directory (mode 0700, a short path because unix socket paths are
  limited to ~104 bytes). The master backgrounds itself once authenticated; its stderr goes to an anonymous
  temporary file, never to a pipe of ours (a backgrounded master that inherits a pipe keeps it open and a reader
  waiting for end of file hangs). Every later command, ``put`` and ``get`` is a client of that master
  (``ControlMaster=no``), about 10 ms instead of ~200 ms for a fresh connection. A process's own master is ended
  by ``close()`` and interpreter exit (``ssh -O exit``); a shared one, and one whose coordinator was killed with
  SIGKILL, by its idle ``ControlPersist``. A master that died (link lost, idle timeout) is noticed before the
  next call, which opens a new one. Clients carry a ``ProxyCommand`` that only prints a marker and fails, so a
  client never quietly opens a connection of its own when the master is gone.
* **Processes.** A command runs as ``ssh ... -- host '<command>'`` with stdin, stdout and stderr pipes,
  read with ``os.read``. The remote shell first writes its own pid (a session leader: sshd calls
  ``setsid``) as one marker line on stderr, which :class:`SshProcess` strips. Without a pty sshd does not
  signal a command whose channel closes, so :meth:`SshProcess.kill` signals the remote process group
  through the master (TERM, then KILL after :attr:`OpenSSHBackend.kill_grace` seconds) before ending
  the local ssh process.
* **Exit status.** A command's exit status is its own. 255 means ssh failed *or* the remote command was
  killed by a signal (ssh has no other way to report that); a command whose master dies under it also
  exits 255. The runner never exits 255 itself, so callers can tell.
* **Transfers.** ``put`` pipes the local file into ``cat`` through the master (the master reads the file
  descriptor directly), writes a temporary name beside the target, checks the byte count and renames;
  ``get`` streams ``cat`` into a local temporary file, checks the byte count, fsyncs and renames. Nothing
  appears under the final name incomplete.
* **Errors.** ssh reports a failed connection as exit status 255 and a message on stderr;
  :func:`map_ssh_error` turns that message into :class:`~remote_exec.errors.HostKeyError`,
  :class:`~remote_exec.errors.AuthError`, :class:`~remote_exec.errors.ConnectError` or, for a broken
  ssh_config, :class:`~remote_exec.errors.ConfigError`.

* **Concurrency.** Commands from many threads share the master; the host's ``MaxSessions`` (10 unless
  sshd_config says otherwise) bounds how many run at once, and a command beyond it exits 255 with
  "session request failed". A forked child that exits leaves its parent's master alone.

POSIX only: ControlMaster needs unix sockets.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import re
import secrets
import select
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, ClassVar

from ..errors import (
    AuthError,
    BackendError,
    ConfigError,
    ConnectError,
    HostKeyError,
    RemoteExecError,
    TransferError,
)
from .base import (
    Backend,
    Feed,
    HostSpec,
    Process,
    announced_size,
    build_command,
    get_argv,
    put_argv,
    transfer_reason,
)
from .controlpath import label_master, master_lock, persist_seconds, private_dir, socket_answers, socket_name
from .ssh import ResolvedHost, default_config_path, locked_identity, locked_identity_hint

__all__ = [
    "OpenSSHBackend",
    "SshProcess",
    "client_argv",
    "config_args",
    "map_ssh_error",
    "master_argv",
    "preferred_ciphers",
    "remote_command",
    "ssh_options",
]

logger = logging.getLogger(__name__)

SSH = "ssh"
"""The OpenSSH client, looked up on PATH."""

NO_MASTER_MARKER = "rx-openssh: no control master"
"""What a client prints (through its ProxyCommand) when it finds no master to multiplex over."""

_PID_MARKER = "__rx_pid__="
_PID_LINE = re.compile(rb"(?:^|\n)__rx_pid__=(\d+)\n")
_MASTER_PID = re.compile(r"Master running \(pid=(\d+)\)")
_HEADER_LIMIT = 65536
#: Seconds a command's pid line may take once the connection is up before start() returns without it.
_COMMAND_START = 1.0
_POLL_INTERVAL = 0.25

# Signal a remote process group: TERM, then KILL if it is still there after the grace period.
_KILL_SCRIPT = """\
kill -TERM -"$1" 2>/dev/null || exit 0
i=0
while [ "$i" -lt "$2" ]; do
  kill -0 -"$1" 2>/dev/null || exit 0
  sleep 0.1 2>/dev/null || sleep 1
  i=$((i + 1))
done
kill -KILL -"$1" 2>/dev/null
exit 0
"""


# --- resolution -------------------------------------------------------------------------------------------


# --- argv -------------------------------------------------------------------------------------------------


def _config_word(value: str) -> str:
    """Quote a path for an ``-o Keyword=value`` argument: ssh splits on spaces and expands ``%``.

    Raises:
        ConfigError: The value contains a double quote, which ssh_config cannot express.
    """
    if '"' in value:
        raise ConfigError(f"ssh cannot use a path containing a double quote: {value!r}")
    value = value.replace("%", "%%")
    return f'"{value}"' if any(char.isspace() for char in value) else value


def _seconds(value: float) -> int:
    """Whole seconds for an ssh option that takes an integer, at least 1."""
    return max(1, math.ceil(value))


def config_args(spec: HostSpec) -> list[str]:
    """``-F FILE``: the ssh_config rx reads for ``spec``, so that ssh reads that one too.

    With no file named (``--ssh-config``, RX_SSH_CONFIG, ``[tool.rx] ssh_config``), rx means
    ``~/.ssh/config`` under ``$HOME``, as the paramiko backend reads it; ssh itself reads the one under
    the home of the user database, which is another file when ``$HOME`` was changed: then rx names its
    file (``/dev/null`` when there is none). Otherwise ssh is left to read its own (and
    ``/etc/ssh/ssh_config``, which any ``-F`` would leave out).
    """
    if spec.ssh_config is not None:
        return ["-F", str(spec.ssh_config)]
    try:
        import pwd

        home = Path(pwd.getpwuid(os.getuid()).pw_dir)
    except (ImportError, KeyError):
        return []
    if home.resolve() == Path.home().resolve():
        return []
    meant = default_config_path()
    return ["-F", str(meant) if meant.is_file() else os.devnull]


def ssh_options(spec: HostSpec, *, identity: bool = True) -> list[str]:
    """The options every ssh invocation for ``spec`` carries (before the ``--`` and the host).

    Args:
        spec: The host.
        identity: Pass the identity file (``-i``). Clients of a master leave it out: they never
            authenticate, and ssh would warn on their stderr if the file were missing.

    Raises:
        ConfigError: A path cannot be expressed as an ssh option.
    """
    args: list[str] = config_args(spec)
    if spec.user:
        args += ["-l", spec.user]
    if spec.port:
        args += ["-p", str(spec.port)]
    if identity and spec.identity_file is not None:
        # ssh adds -i in front of ssh_config's IdentityFile entries; IdentitiesOnly keeps agent keys out.
        args += ["-i", str(spec.identity_file).replace("%", "%%"), "-o", "IdentitiesOnly=yes"]
    if spec.host_key_policy == "off":
        args += [
            "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null",
            "-o", "GlobalKnownHostsFile=/dev/null",
        ]
    else:
        if spec.known_hosts is not None:
            args += ["-o", f"UserKnownHostsFile={_config_word(str(spec.known_hosts))}"]
        strict = "yes" if spec.host_key_policy == "strict" else "accept-new"
        args += ["-o", f"StrictHostKeyChecking={strict}"]
    args += [
        "-o", "BatchMode=yes",
        "-o", f"ConnectTimeout={_seconds(spec.connect_timeout)}",
        "-o", f"ServerAliveInterval={_seconds(spec.keepalive_interval)}",
        "-o", f"ServerAliveCountMax={max(1, spec.keepalive_count)}",
    ]
    return args


_DEFAULT_CIPHERS = (
    "chacha20-poly1305@openssh.com",
    "aes128-ctr",
    "aes192-ctr",
    "aes256-ctr",
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
)
_GCM_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")


def _cpu_has_aes() -> bool:
    """True when this machine encrypts AES in hardware (x86 ``aes`` flag, arm64 ``aes`` feature, macOS)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            return any(
                line.startswith(("flags", "Features")) and " aes" in f" {line.split(':', 1)[-1]}"
                for line in handle
            )
    except OSError:
        return os.uname().sysname == "Darwin"


def preferred_ciphers(resolved: ResolvedHost, *, hardware_aes: bool) -> str | None:
    """A cipher list with AES-GCM first, when ssh_config keeps OpenSSH's default list and the CPU has AES.

    With AES in hardware, AES-GCM moves bulk data (put, get, large stdin) 30-50 % faster than
    chacha20-poly1305, OpenSSH's first choice. A list the user configured is left alone (None).
    """
    ciphers = resolved.options.get("ciphers", ("",))[0].split(",")
    if not hardware_aes or tuple(ciphers) != _DEFAULT_CIPHERS:
        return None
    return ",".join([*_GCM_CIPHERS, *(name for name in ciphers if name not in _GCM_CIPHERS)])


def master_argv(spec: HostSpec, control_path: Path, *, persist: int, ciphers: str | None = None,
                command: str | None = None) -> list[str]:
    """The command that starts the master for ``spec`` and backgrounds it once authenticated.

    Args:
        spec: The host.
        control_path: Where the master listens.
        persist: Seconds the master stays up without clients (``ControlPersist``).
        ciphers: A ``Ciphers`` list to use instead of ssh_config's (see :func:`preferred_ciphers`).
        command: A remote command (built with :func:`remote_command`) to run over the new connection:
            ssh backgrounds the master once authenticated and runs the command as its first client, so
            a first call costs one connection, not a connection and then a session.
    """
    session = ["-N"] if command is None else ["-T", "-x", "-e", "none", "-o", "RemoteCommand=none"]
    return [
        SSH, *ssh_options(spec),
        *(["-o", f"Ciphers={ciphers}"] if ciphers else []),
        "-M", *session, "-S", str(control_path),
        "-o", f"ControlPersist={persist}",
        "-o", "ClearAllForwardings=yes",  # forwards from ssh_config are not ours to open
        "-o", "LogLevel=INFO",            # errors for map_ssh_error, and the "Permanently added" line
        "-o", "PermitLocalCommand=no",
        "--", spec.host, *([] if command is None else [command]),
    ]


def client_argv(spec: HostSpec, control_path: Path, command: str) -> list[str]:
    """The command that runs the remote shell command ``command`` over the master at ``control_path``.

    ``command`` must be built with :func:`~remote_exec.backends.base.build_command`.
    """
    return [
        SSH, *ssh_options(spec, identity=False),
        "-S", str(control_path),
        "-o", "ControlMaster=no",
        # Reached only when the master is gone: print a marker and fail instead of connecting afresh.
        "-o", f"ProxyCommand=sh -c 'echo {NO_MASTER_MARKER} >&2; exit 1'",
        "-o", "LogLevel=ERROR",           # stderr is the command's own
        "-o", "RemoteCommand=none",
        "-o", "PermitLocalCommand=no",
        "-T", "-x", "-e", "none",
        "--", spec.host, command,
    ]


def remote_command(argv: Sequence[str], env: Mapping[str, str] | None = None,
                   cwd: PurePosixPath | None = None) -> str:
    """The shell command line a client sends: the remote shell's pid line on stderr, then ``argv``.

    sshd runs the command in a new session, so that pid is also the command's process group, which
    :meth:`SshProcess.kill` signals. Every word of ``argv`` is quoted by
    :func:`~remote_exec.backends.base.build_command`.

    Raises:
        ConfigError: An empty command or a bad environment variable name.
    """
    return f"echo {_PID_MARKER}$$ >&2; {build_command(argv, env, cwd)}"


def _control_argv(spec: HostSpec, control_path: Path, operation: str) -> list[str]:
    """``ssh -O <operation>`` for the master at ``control_path``."""
    config = config_args(spec)
    return [SSH, *config, "-S", str(control_path), "-O", operation, "--", spec.host]


# --- errors -----------------------------------------------------------------------------------------------

_CONFIG_PATTERNS = (
    "Bad configuration option",
    "bad configuration options",
    "Can't open user config file",
    "Unsupported option",
    "no argument after keyword",
    "Bad port",
    "Bad number",
    "Invalid multiplex command",
    "missing argument",
)
_AUTH_PATTERNS = (
    "Permission denied",
    "Too many authentication failures",
    "No more authentication methods",
    "Authentication failed",
)
_CONNECT_PATTERNS = (
    "Connection refused",
    "Connection timed out",
    "timed out during banner exchange",
    "Could not resolve hostname",
    "No route to host",
    "Network is unreachable",
    "Connection closed by",
    "Connection reset",
    "kex_exchange_identification",
    "Operation timed out",
    "Broken pipe",
    "not responding",
    "Name or service not known",
    "Temporary failure in name resolution",
    "Unable to negotiate",
    NO_MASTER_MARKER,
)
_NOISE = ("Warning: Permanently added", "Pseudo-terminal will not be allocated")


def _lines(text: str) -> list[str]:
    lines = (line.strip() for line in text.replace("\r", "").splitlines())
    return [line for line in lines if line and not line.startswith(_NOISE)]


def _first(lines: Sequence[str], patterns: Sequence[str]) -> str | None:
    for line in lines:
        if any(pattern in line for pattern in patterns):
            return line
    return None


def _reason(line: str) -> str:
    """ssh's own words, without its ``ssh:`` prefix and final period."""
    return line.removeprefix("ssh: ").rstrip(".")


def map_ssh_error(host: str, stderr: str, *, known_hosts: str | None = None) -> RemoteExecError:
    """Turn what ssh said when it failed (exit status 255) into one of our errors, one clear line.

    Args:
        host: The host as the user named it.
        stderr: ssh's stderr.
        known_hosts: The known_hosts file in use, named in host key errors when ssh does not say.

    Returns:
        :class:`HostKeyError`, :class:`AuthError`, :class:`ConfigError` (ssh_config or options are
        broken) or :class:`ConnectError` (everything else, with ssh's reason).
    """
    lines = _lines(stderr)
    return (_host_key_error(host, "\n".join(lines), known_hosts or "known_hosts")
            or _config_error(host, lines)
            or _link_error(host, lines))


def _host_key_error(host: str, text: str, known_hosts: str) -> HostKeyError | None:
    """A changed key, an unknown key under strict checking, or a failed verification; else None."""
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in text or re.search(r"Host key for \S+ has changed", text):
        offending = re.search(r"Offending \S+ key in (.+):(\d+)$", text, re.MULTILINE)
        where = f"{offending[1]} line {offending[2]}" if offending else known_hosts
        remove = re.search(r'(ssh-keygen -f ".+" -R ".+")$', text, re.MULTILINE)
        hint = (
            f"if the host was reinstalled or its keys regenerated, remove the old key with `{remove[1]}`"
            if remove else "if the host's keys were regenerated, remove its old key from known_hosts"
        )
        message = (f"the host key has changed since it was recorded in {where}; "
                   "refusing to connect (possible man-in-the-middle attack)")
        return HostKeyError(host, message, hint=f"{hint} and connect again")
    unknown = re.search(r"No (\S+) host key is known for (\S+) and you have requested strict checking", text)
    if unknown:
        return HostKeyError(
            host,
            f"no {unknown[1]} host key for {unknown[2]} is recorded in {known_hosts} "
            "and host key checks are strict",
            hint="connect once with the accept-new policy, or add the key with ssh-keyscan",
        )
    if "Host key verification failed" in text:
        return HostKeyError(host, f"host key verification failed (known_hosts: {known_hosts})",
                            hint="check the host's key and the known_hosts file")
    return None


def _config_error(host: str, lines: Sequence[str]) -> ConfigError | None:
    """ssh refusing its configuration or options (it says "terminating"); else None."""
    config = _first([line for line in lines if "terminating" not in line], _CONFIG_PATTERNS)
    if config is not None or any("terminating" in line for line in lines):
        return ConfigError(f"ssh configuration error for {host}: {_reason(config or lines[0])}")
    return None


def _link_error(host: str, lines: Sequence[str]) -> AuthError | ConnectError:
    """An authentication failure, or the connection's failure in ssh's words."""
    auth = _first(lines, _AUTH_PATTERNS)
    if auth is not None:
        return AuthError(host, f"authentication failed: {_reason(auth)}",
                         hint="check User and IdentityFile, and the host's authorized_keys")
    connect = _first(lines, _CONNECT_PATTERNS)
    if connect == NO_MASTER_MARKER:
        return ConnectError(host, "the connection was lost (its control master is gone)")
    if connect is not None:
        return ConnectError(host, _reason(connect))
    if lines:
        return ConnectError(host, _reason(lines[-1]))
    return ConnectError(host, "ssh failed with exit status 255 and no message")


# --- the master -------------------------------------------------------------------------------------------


def _control_root() -> str:
    """A directory for control sockets with a short path: /tmp when writable, else the temp dir."""
    return "/tmp" if os.access("/tmp", os.W_OK | os.X_OK) else tempfile.gettempdir()


def _users_master(resolved: ResolvedHost) -> Path | None:
    """The socket of a master the user's ssh_config asks for (``ControlMaster`` other than ``no`` and a
    ``ControlPath``, tokens expanded by ``ssh -G``) when one answers there; else None."""
    wanted = resolved.options.get("controlmaster", ("no",))[0].lower()
    path = resolved.options.get("controlpath", ("none",))[0]
    if wanted in ("no", "false") or path.lower() == "none" or "%" in path or not os.path.isabs(path):
        return None
    return Path(path) if socket_answers(Path(path), timeout=0.5) else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop_master(exit_argv: list[str], control_dir: Path, control_path: Path, owner: int) -> None:
    """End a master (``ssh -O exit``) and remove its control directory.

    A module-level function so the finalizer holds no reference to the backend. A master that does not
    answer is left to its idle ``ControlPersist`` rather than signalled by a pid that may be reused. A
    forked child (``owner`` is the pid that opened the master) leaves its parent's master alone.
    """
    if os.getpid() != owner:
        return
    try:
        if control_path.exists():
            done = subprocess.run(exit_argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=10,
                                  check=False)
            if done.returncode != 0:
                logger.debug("ssh -O exit: %s", done.stderr.decode(errors="replace").strip())
    except (OSError, subprocess.SubprocessError):
        logger.debug("could not stop the ssh master at %s", control_path, exc_info=True)
    finally:
        shutil.rmtree(control_dir, ignore_errors=True)


@dataclass
class _Master:
    """A running control master: its directory, its socket and its pid.

    ``pid`` is 0 while ``pid_known`` (set when a background ``ssh -O check`` has answered) is not set.
    A ``shared`` master (see :mod:`~remote_exec.backends.controlpath`) lives in the user's private
    directory under a name of its settings, serves every rx of the user and is never stopped by one: its
    ``ControlPersist`` ends it once idle. Its liveness is its socket's. A ``foreign`` master is the user's
    own (their ssh_config's ``ControlPath``): used, never replaced or stopped.
    """

    control_dir: Path
    pid: int
    finalizer: weakref.finalize[[list[str], Path, Path, int], _Master] | None = None
    pid_known: threading.Event | None = None
    name: str = "s"
    shared: bool = False
    foreign: bool = False

    @property
    def control_path(self) -> Path:
        return self.control_dir / self.name

    def alive(self) -> bool:
        if self.shared:
            return socket_answers(self.control_path)
        if self.pid_known is not None:
            self.pid_known.wait(15)
        if not self.control_path.exists():
            return False
        return _pid_alive(self.pid) if self.pid else True

    def stop(self) -> None:
        if self.finalizer is not None:
            self.finalizer()

    def discard(self) -> None:
        """Remove what a master that did not come up left: its private directory, or a stale shared socket."""
        if not self.shared:
            shutil.rmtree(self.control_dir, ignore_errors=True)
        elif not socket_answers(self.control_path, timeout=0.5):
            with contextlib.suppress(OSError):
                self.control_path.unlink()


# --- processes --------------------------------------------------------------------------------------------


class SshProcess(Process):
    """One command running through the local ``ssh`` client.

    Attributes:
        remote_pid: The pid of the remote shell (the leader of the command's process group), once known.
        lost_master: True when the client found no master to multiplex over (the command never ran).
    """

    def __init__(self, backend: OpenSSHBackend, popen: subprocess.Popen[bytes], label: str) -> None:
        self._backend = backend
        self._popen = popen
        self._label = label
        self._stderr_pending = b""
        self._kill_lock = threading.Lock()
        self._killed = False
        self._abandoned = False
        self.remote_pid: int | None = None
        self.lost_master = False
        self.preamble = b""  # what came on stderr before the pid line (ssh's own messages, for a master)
        self._pid_later = False  # the pid line did not come in time: read_stderr still looks for it

    @property
    def pid(self) -> int:
        """The pid of the local ssh process."""
        return self._popen.pid

    def _read_header(self, timeout: float, ready: Callable[[], bool] | None = None) -> None:
        """Read stderr up to the remote shell's pid line; keep everything else for :meth:`read_stderr`.

        Once ``ready()`` holds (the connection is up), the pid line gets :data:`_COMMAND_START` more seconds:
        a slow login, or a login shell that replaced itself (``exec zsh`` in ``~/.bashrc``) and never runs
        the command line, must not hold the caller; :meth:`read_stderr` takes a pid line that comes later.
        """
        stream = self._popen.stderr
        assert stream is not None
        fd = stream.fileno()
        buffer = b""
        deadline = time.monotonic() + timeout
        while True:
            if self._take_pid_line(buffer):
                return
            now = time.monotonic()
            if ready is not None and ready():
                deadline, ready = min(deadline, now + _COMMAND_START), None
            remaining = deadline - now
            if len(buffer) > _HEADER_LIMIT or remaining <= 0:
                break
            if not self._wait_readable(fd, remaining if ready is None else min(remaining, 0.05)):
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buffer += chunk
        self._stderr_pending = buffer
        self.lost_master = NO_MASTER_MARKER.encode() in buffer
        self._pid_later = not self.lost_master
        logger.debug("%s on %s: no pid line from the remote shell yet", self._label, self._backend.host)

    def _take_pid_line(self, buffer: bytes) -> bool:
        """Take the pid line out of ``buffer`` (the rest goes to :meth:`read_stderr`); False if it has none."""
        match = _PID_LINE.search(buffer)
        if match is None:
            return False
        self.remote_pid = int(match[1])
        self._pid_later = False
        # keep a newline that ended earlier output; drop the marker line itself
        start = match.start() + (1 if buffer[match.start():match.start() + 1] == b"\n" else 0)
        self.preamble = buffer[:start]
        self._stderr_pending = buffer[:start] + buffer[match.end():]
        return True

    def _wait_readable(self, fd: int, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for ``fd`` to be readable (data or end of file)."""
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(max(0, int(timeout * 1000))))

    def _read(self, stream: IO[bytes] | None, size: int) -> bytes:
        """Read from a pipe of ssh. After :meth:`kill`, a pipe that stays silent counts as ended.

        The master holds the far end of our pipes (the client hands them over), and when a client dies
        it stops writing stdout but keeps stderr open until the remote command ends; a killed command
        must not leave a reader waiting for that.
        """
        if stream is None or stream.closed:
            return b""
        fd = stream.fileno()
        while not self._wait_readable(fd, _POLL_INTERVAL):
            if self._abandoned:
                stream.close()
                return b""
        chunk = os.read(fd, size)
        if not chunk:
            stream.close()
        return chunk

    def read_stdout(self, size: int = 65536) -> bytes:
        """Block until some stdout is available; return up to ``size`` bytes, or b"" at end of stream."""
        return self._read(self._popen.stdout, size)

    def read_stderr(self, size: int = 65536) -> bytes:
        """Block until some stderr is available; return up to ``size`` bytes, or b"" at end of stream."""
        if not self._stderr_pending:
            chunk = self._read(self._popen.stderr, size)
            if not (self._pid_later and chunk):
                return chunk
            self._stderr_pending = chunk
        if self._pid_later:  # a late pid line: take it out when it comes
            self._take_pid_line(self._stderr_pending)
        chunk, self._stderr_pending = self._stderr_pending[:size], self._stderr_pending[size:]
        return chunk

    def write_stdin(self, data: bytes) -> None:
        """Write all of ``data`` to the command's stdin.

        Raises:
            ConnectError: The command's stdin is closed (it exited, or the link is gone).
        """
        stream = self._popen.stdin
        if stream is None or stream.closed:
            raise ConnectError(self._backend.host, f"stdin of {self._label} is already closed")
        view = memoryview(data)
        try:
            while view:
                written = os.write(stream.fileno(), view)
                view = view[written:]
        except OSError as exc:
            message = f"{self._label} stopped reading its input: {exc.strerror}"
            raise ConnectError(self._backend.host, message) from exc

    def grow_buffers(self) -> None:
        """1 MiB pipes to and from ssh: a large transfer then moves in fewer, larger reads and writes."""
        from ..protocol.wire import grow_pipe

        for stream in (self._popen.stdin, self._popen.stdout):
            if stream is not None and not stream.closed:
                grow_pipe(stream.fileno())

    def close_stdin(self) -> None:
        """Signal end of input to the command."""
        stream = self._popen.stdin
        if stream is not None and not stream.closed:
            with contextlib.suppress(OSError):
                stream.close()

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for ssh to end; return its exit status (-1 when it was killed here), None at ``timeout``."""
        try:
            code = self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self.close_stdin()  # nobody reads it any more
        return -1 if code < 0 else code

    def kill(self) -> None:
        """Stop the command: signal its remote process group through the master, then end local ssh."""
        with self._kill_lock:
            if self._killed:
                return
            self._killed = True
        if self._popen.poll() is None and self.remote_pid is not None:
            self._backend._signal_remote_group(self.remote_pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._popen.wait(self._backend.kill_grace)
        self._end_local()

    def abandon(self) -> None:
        """End the local ssh at once (the master closes the session's channel; nothing waits on the host)."""
        with self._kill_lock:
            if self._killed:
                return
            self._killed = True
        self._end_local()

    def _end_local(self) -> None:
        if self._popen.poll() is None:
            self._popen.terminate()
            try:
                self._popen.wait(1.0)
            except subprocess.TimeoutExpired:
                self._popen.kill()
                self._popen.wait()
        self._abandoned = True

    def _discard(self) -> str:
        """Reap a process that never ran, close its pipes and return what it said on stderr."""
        self.close_stdin()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._popen.wait(5.0)
        if self._popen.poll() is None:
            self._popen.kill()
            self._popen.wait()
        said = self._stderr_pending
        stream = self._popen.stderr
        if stream is not None and not stream.closed and self._wait_readable(stream.fileno(), 1.0):
            said += os.read(stream.fileno(), 65536)
        for stream in (self._popen.stdout, self._popen.stderr):
            if stream is not None:
                stream.close()
        return said.decode(errors="replace")


class _SessionRetry:
    """What to do when a client got no session from the master (it printed :data:`NO_MASTER_MARKER`).

    A dead master is replaced at once. A live one refused the session, most likely because the host's
    ``MaxSessions`` is reached: wait for a session to free up, backing off, for at most the connect
    timeout, then give up with :class:`ConnectError`. A live master is never stopped here: that would
    cut every command running over it.
    """

    def __init__(self, backend: OpenSSHBackend, what: str) -> None:
        self._backend = backend
        self._what = what
        self._deadline = time.monotonic() + backend.spec.connect_timeout
        self._delay = 0.05
        self._reconnects = 0

    def no_session(self, master: _Master, stderr: str) -> None:
        """Prepare the next attempt (reconnect or back off), or raise when there is none to make.

        Raises:
            ConnectError: The master kept refusing sessions, or kept dying, until the deadline.
        """
        host = self._backend.host
        if not master.alive():
            self._backend._forget(master)
            self._reconnects += 1
            logger.info("the connection to %s was gone when %s started; reconnecting", host, self._what)
            if self._reconnects > 2:
                raise ConnectError(host, f"the connection kept dropping while {self._what} started")
            return
        if time.monotonic() + self._delay > self._deadline:
            refusal = _first(_lines(stderr), ("session request failed", "refused"))
            raise ConnectError(
                host, f"the host refused another session on the shared connection for {self._what}"
                      + (f" ({_reason(refusal)})" if refusal else ""),
                hint="too many commands at once for sshd's MaxSessions; run fewer concurrently",
            )
        logger.debug("%s refused a session for %s; retrying in %.2f s", host, self._what, self._delay)
        time.sleep(self._delay)
        self._delay = min(self._delay * 2, 0.5)


# --- the backend ------------------------------------------------------------------------------------------


class OpenSSHBackend(Backend):
    """A host reached through the system OpenSSH client, over one ControlMaster connection.

    Attributes:
        control_persist: Seconds an idle master stays up (so a coordinator killed with SIGKILL does not
            leave it behind for long).
        kill_grace: Seconds between TERM and KILL when a command is stopped.
    """

    name: ClassVar[str] = "openssh"
    control_persist: ClassVar[int] = 300
    kill_grace: ClassVar[float] = 2.0

    def __init__(self, spec: HostSpec) -> None:
        super().__init__(spec)
        #: Seconds a shared master stays up once idle (``RX_SSH_PERSIST``); 0: a master of this process.
        self.shared_persist = persist_seconds()
        self.connections_reused = 0
        self._lock = threading.RLock()
        self._resolved: ResolvedHost | None = None
        self._master: _Master | None = None
        #: (memo key, files) under which to note this backend's shared master for the next ``rx run`` of
        #: the same line (see :mod:`~remote_exec.prestart`); None: not noted.
        self.prestart_memo: tuple[str, tuple[str, ...]] | None = None

    # --- resolution and the master ------------------------------------------------------------------------

    def resolve(self) -> ResolvedHost:
        """Resolve the host as OpenSSH would (``ssh -G``), once per backend.

        Raises:
            ConfigError: ``ssh`` is not installed, the identity file is missing, or ssh_config is broken.
        """
        with self._lock:
            if self._resolved is not None:
                return self._resolved
            spec = self.spec
            if spec.ssh_config is not None and not spec.ssh_config.is_file():
                raise ConfigError(f"ssh_config file {spec.ssh_config} does not exist")
            if spec.identity_file is not None and not spec.identity_file.expanduser().is_file():
                raise ConfigError(f"identity file {spec.identity_file} does not exist")
            resolved = ResolvedHost.from_ssh_g(spec.host, self._ssh_g(), config_file=spec.ssh_config)
            if spec.known_hosts is not None and spec.host_key_policy != "off":
                # ssh -G separates files with spaces; the override is one path, spaces and all
                resolved = dataclasses.replace(resolved, known_hosts_files=(spec.known_hosts,))
            self._resolved = resolved
            logger.debug("%s resolves to %s", self.host, self._resolved.destination)
            return self._resolved

    def _ssh_g(self) -> str:
        """What ``ssh -G`` says of the host: kept from an earlier process when nothing it came from changed
        (see :mod:`.sshg`), else asked now."""
        from . import sshg

        spec = self.spec
        argv = [SSH, "-G", "-T", *ssh_options(spec), "--", spec.host]
        binary = shutil.which(SSH) or SSH
        text = sshg.recall(argv, binary)
        if text is not None:
            return text
        with self._map_os_errors("resolve"):
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=30, check=False)
        if done.returncode != 0:
            error = map_ssh_error(self.host, done.stderr.decode(errors="replace"))
            if isinstance(error, ConfigError):
                raise error
            raise ConfigError(f"`ssh -G {spec.host}` failed: {error.message}")
        text = done.stdout.decode(errors="replace")
        sshg.remember(argv, binary, text)
        return text

    @contextlib.contextmanager
    def _map_os_errors(self, what: str) -> Iterator[None]:
        """Translate a missing ``ssh`` binary and other local failures to run it."""
        try:
            yield
        except FileNotFoundError as exc:
            if shutil.which(SSH) is None:
                raise ConfigError("the OpenSSH client `ssh` is not installed or not on PATH",
                                  hint="install openssh-client, or use the paramiko backend") from exc
            raise ConnectError(self.host, f"cannot {what}: {exc}") from exc
        except subprocess.TimeoutExpired as exc:
            raise ConnectError(self.host, f"ssh did not {what} within {exc.timeout:g} s") from exc
        except OSError as exc:
            raise ConnectError(self.host, f"cannot run ssh to {what}: {exc.strerror or exc}") from exc

    def _connect_deadline(self) -> float:
        """Seconds to allow for a master to come up: connect, handshake, authentication, maybe hops."""
        return 2 * self.spec.connect_timeout + self.spec.dead_after + 5.0

    def connect(self) -> None:
        self._ensure_master()

    def _ensure_master(self) -> _Master:
        """Return a live master, opening one (again) when there is none: the one ``rx run`` started from
        its memo when that is the very one (:func:`~remote_exec.prestart.take`), else the shared
        one that answers, else a new one."""
        with self._lock:
            master = self._live_master()
            if master is None:
                master, resolved, argv = self._prepare_master()
                early = self._prestarted(master, argv)
                if early is not None:
                    logger.debug("%s: taking the ssh that rx started from its memo of this command line",
                                 self.host)
                    master = self._master = self._open_master(master, resolved, argv, early=early)
                else:
                    with self._claim(master) as adopted:
                        self._master = master if adopted else self._open_master(master, resolved, argv)
                        master = self._master
                self._remember(master, resolved, argv)
            return master

    def _prestarted(self, master: _Master, argv: list[str]) -> Any:
        """The master ``rx run`` started from its memo, when it is the one this backend opens (a
        :class:`~remote_exec.prestart.Prestarted`), else None (one started for anything else is
        stopped). Nothing to look for unless the memo's module was loaded (by ``rx run``)."""
        prestart = sys.modules.get("remote_exec.prestart")
        if prestart is None:
            return None
        wanted = str(master.control_path) if master.shared and not master.foreign else ""
        return prestart.take(wanted, argv)

    def _remember(self, master: _Master, resolved: ResolvedHost, argv: list[str]) -> None:
        """Note the shared master that ``argv`` opens (or found) for the next ``rx run`` of this line (see
        :attr:`prestart_memo`), with the files its settings came from."""
        memo, self.prestart_memo = self.prestart_memo, None
        if memo is None or not master.shared or master.foreign:
            return
        from .. import prestart

        key, files = memo
        ssh_files = (str(resolved.config_file or default_config_path()), "/etc/ssh/ssh_config")
        prestart.remember(key, (*files, *ssh_files), str(master.control_path), argv)

    def _live_master(self) -> _Master | None:
        """The live master, or None (a dead one is stopped and forgotten). The caller holds the lock."""
        master = self._master
        if master is not None:
            if master.alive():
                return master
            logger.info("the connection to %s was lost; reconnecting", self.host)
            master.stop()
            self._master = None
        return None

    def _prepare_master(self, command: str | None = None) -> tuple[_Master, ResolvedHost, list[str]]:
        """A new master's private directory and the ssh command that opens it (see :func:`master_argv`)."""
        resolved = self.resolve()
        if self.spec.host_key_policy == "off":  # the coordinator warned once already
            logger.info("host key checking is off for %s: its identity is not verified", self.host)
        ciphers = preferred_ciphers(resolved, hardware_aes=_cpu_has_aes())
        master = self._place(resolved, ciphers)
        persist = self.shared_persist if master.shared else self.control_persist
        argv = master_argv(self.spec, master.control_path, persist=persist, ciphers=ciphers, command=command)
        shown = shlex.join(argv if command is None else argv[:-1]) + ("" if command is None else
                                                                      f" <the command, {len(command)} bytes>")
        logger.debug("connecting to %s: %s", self.host, shown)
        return master, resolved, argv

    def _place(self, resolved: ResolvedHost, ciphers: str | None) -> _Master:
        """Where a master for this host listens: the shared socket of its settings in the user's private
        directory, else (``RX_SSH_PERSIST=0``, or no safe directory) a private directory of this process."""
        own = _users_master(resolved)
        if own is not None:
            logger.debug("%s: using the master of your ssh_config at %s", self.host, own)
            return _Master(control_dir=own.parent, pid=0, name=own.name, shared=True, foreign=True)
        shared_dir = private_dir() if self.shared_persist > 0 else None
        if shared_dir is None:
            return _Master(control_dir=Path(tempfile.mkdtemp(prefix="rx-ssh-", dir=_control_root())), pid=0)
        settings = [SSH, *ssh_options(self.spec), f"ciphers={ciphers}", "--", self.spec.host,
                    *(f"{key}={' '.join(values)}" for key, values in sorted(resolved.options.items()))]
        return _Master(control_dir=shared_dir, pid=0, name=socket_name(settings), shared=True)

    @contextlib.contextmanager
    def _claim(self, master: _Master) -> Iterator[bool]:
        """Hold a shared master's place while it is opened; yields True when one already listens there
        (another rx opened it: use it), False when this process is to open it (a stale socket removed)."""
        if not master.shared or master.foreign:
            yield master.foreign
            return
        with master_lock(master.control_path, self._connect_deadline()):
            if socket_answers(master.control_path):
                logger.debug("using the shared ssh master of %s at %s", self.host, master.control_path)
                self.connections_reused += 1
                yield True
                return
            with contextlib.suppress(FileNotFoundError):
                master.control_path.unlink()  # its master ended: idle timeout, lost link
            label_master(master.control_path, self.host, self.resolve().destination)
            yield False

    def _keep_master(self, master: _Master, said: str) -> None:
        """Take a master that came up: a master of this process is stopped when the backend goes (a shared
        one is left to its ``ControlPersist``); log what ssh said of the host."""
        if not master.shared:
            master.finalizer = weakref.finalize(
                master, _stop_master, _control_argv(self.spec, master.control_path, "exit"),
                master.control_dir, master.control_path, os.getpid(),
            )
        self.connections_opened += 1
        for line in _lines(said):
            if line.startswith("Warning: Permanently added"):
                logger.info("%s: %s", self.host, line)

    def _open_master(self, master: _Master, resolved: ResolvedHost, argv: list[str], *,
                     early: Any = None) -> _Master:
        """Start ``argv`` (or take ``early``, the same command started by ``rx run`` from its memo) and wait
        until its master is up and backgrounded."""
        started = time.monotonic()
        try:
            if early is not None:
                label_master(master.control_path, self.host, resolved.destination)
                code, said = self._master_up(early, early.log, resolved)
                listens = Path(early.listens)
            else:
                # An anonymous file: the master keeps it as stderr after it backgrounds itself, and a
                # coordinator killed with SIGKILL leaves nothing behind but the empty control directory.
                with tempfile.TemporaryFile() as log:
                    with self._map_os_errors("connect"):
                        popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                                 stderr=log, start_new_session=True)
                    code, said = self._master_up(popen, log, resolved)
                listens = master.control_path
            if code != 0 or not listens.exists():
                if code == 0:
                    raise ConnectError(self.host, f"the ssh master left no socket: {said.strip()}")
                raise self._mapped(said)
            if early is not None:
                early.adopt()  # its socket takes the shared name, under the lock held since it started
            if not master.shared:
                master.pid = self._master_pid(master.control_path)
        except BaseException:
            if early is not None:
                early.discard()
            master.discard()
            raise
        self._keep_master(master, said)
        logger.debug("connected to %s (%s) in %.3f s, master pid %d", self.host, resolved.destination,
                     time.monotonic() - started, master.pid)
        return master

    def _master_up(self, process: Any, log: IO[bytes], resolved: ResolvedHost) -> tuple[int, str]:
        """The exit status of a master's ``ssh`` (0: up and backgrounded) and what it said."""
        deadline = self._connect_deadline()
        try:
            code = process.wait(deadline)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
            raise ConnectError(self.host, f"no SSH session with {resolved.destination} within "
                                          f"{deadline:g} s") from None
        log.seek(0)
        return code, log.read().decode(errors="replace")

    def _start_with_new_master(self, command: str, label: str, fed: Feed | None = None) -> SshProcess | None:
        """With no live master: one ssh connects, becomes the master and runs ``command`` as its first
        client. Returns None when a master is already up (the caller runs the command as a client), or when
        ``rx run`` started one from its memo (this waits for it, see :meth:`_ensure_master`)."""
        with self._lock:
            if self._live_master() is not None:
                return None
            prestart = sys.modules.get("remote_exec.prestart")
            if prestart is not None and prestart.pending():
                self._ensure_master()
                return None
            master, _, argv = self._prepare_master(command)
            with self._claim(master) as adopted:
                if adopted:
                    self._master = master
                    return None
                process = self._first_client(master, argv, label, fed)
            if process.remote_pid is not None:  # what came before the pid line is ssh's, not the command's
                process._stderr_pending = process._stderr_pending[len(process.preamble):]
            self._keep_master(master, process.preamble.decode(errors="replace"))
            if not master.shared:
                master.pid_known = threading.Event()
                threading.Thread(target=self._learn_pid, args=(master,), name="rx-ssh-pid", daemon=True).start()
            self._master = master
            return process

    def _first_client(self, master: _Master, argv: list[str], label: str, fed: Feed | None = None) -> SshProcess:
        """Start the ssh that connects, becomes the master and runs the first command (``fed`` written to
        its stdin at once: ssh passes it on once the session is open); return once the master listens or
        the command announced itself."""
        try:
            with self._map_os_errors("connect"):
                popen = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, bufsize=0, start_new_session=True)
            process = SshProcess(self, popen, label)
            if fed is not None:
                fed.begin(process.write_stdin)
            process._read_header(self._connect_deadline(), ready=master.control_path.exists)
            if process.remote_pid is None and not master.control_path.exists():
                said = process._discard()
                raise self._mapped(said)
        except BaseException:
            master.discard()
            raise
        return process

    def _learn_pid(self, master: _Master) -> None:
        """Ask the new master for its pid (off the first call's path)."""
        try:
            master.pid = self._master_pid(master.control_path)
        except Exception:
            logger.debug("no pid from the ssh master of %s", self.host, exc_info=True)
        finally:
            assert master.pid_known is not None
            master.pid_known.set()

    def _master_pid(self, control_path: Path) -> int:
        with self._map_os_errors("check its connection"):
            done = subprocess.run(_control_argv(self.spec, control_path, "check"), stdin=subprocess.DEVNULL,
                                  capture_output=True, timeout=10, check=False)
        match = _MASTER_PID.search(done.stderr.decode(errors="replace"))
        if done.returncode != 0 or match is None:
            raise ConnectError(self.host, f"the ssh master is not answering: "
                                          f"{done.stderr.decode(errors='replace').strip()}")
        return int(match[1])

    def _mapped(self, said: str) -> RemoteExecError:
        """:func:`map_ssh_error` of what ssh said; a refused login whose key needs a passphrase no agent
        holds says so (ssh in batch mode skips such a key without a word)."""
        error = map_ssh_error(self.host, said, known_hosts=self._known_hosts_file())
        if isinstance(error, AuthError) and self._resolved is not None:
            locked = locked_identity(self._resolved.identity_files)
            if locked is not None:
                error.hint = locked_identity_hint(locked)
        proxy = self._resolved.proxy_command if self._resolved is not None else None
        if isinstance(error, ConnectError) and proxy and error.hint is None:
            # (ssh sends a ProxyCommand's stderr to /dev/null when the connection is to persist)
            config = self._resolved.config_file if self._resolved is not None else None
            named = f"-F {shlex.quote(str(config))} " if config and config != default_config_path() else ""
            error.hint = (f"the connection goes through its ProxyCommand ({proxy}), whose messages ssh hides from "
                          f"a shared connection: `ssh {named}{shlex.quote(self.host)} true` shows them")
        return error

    def _known_hosts_file(self) -> str | None:
        if self.spec.known_hosts is not None:
            return str(self.spec.known_hosts)
        known = self._resolved.known_hosts_file if self._resolved is not None else None
        return str(known) if known is not None else None

    def classify_exit(self, exit_code: int | None, stderr: bytes) -> RemoteExecError | None:
        """Exit status 255 is ssh's own failure (or a command killed by a signal, which ssh reports the same
        way): the error :func:`map_ssh_error` reads from stderr. A negative status means the local ssh was
        killed before the command ended: the link to it is gone. Anything else is the command's own.
        """
        if exit_code is None or (exit_code >= 0 and exit_code != 255):
            return None
        if exit_code < 0:
            return ConnectError(self.host, "the connection was lost (the ssh client ended before the command)")
        error = map_ssh_error(self.host, stderr.decode(errors="replace"), known_hosts=self._known_hosts_file())
        if isinstance(error, BackendError):
            return error
        # Words of a broken ssh_config in the output of a command that ran: the link failed, not the config.
        return ConnectError(self.host, error.message)

    def _forget(self, master: _Master) -> None:
        with self._lock:
            if self._master is master:
                self._master = None
        master.stop()

    # --- commands -----------------------------------------------------------------------------------------

    def _spawn(self, master: _Master, command: str, *, stdin: int | IO[bytes],
               stdout: int | IO[bytes]) -> subprocess.Popen[bytes]:
        with self._map_os_errors("run a command"):
            return subprocess.Popen(
                client_argv(self.spec, master.control_path, command),
                stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, bufsize=0, start_new_session=True,
            )

    def start(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
              cwd: PurePosixPath | None = None) -> SshProcess:
        """Start ``argv`` on the host (connecting first if needed) and return its process.

        Returns once the remote shell runs (it announces its pid), so a connection failure is raised here.

        Raises:
            ConfigError: Bad environment variable name, broken ssh_config, no ``ssh``.
            ConnectError, AuthError, HostKeyError: The connection could not be made.
        """
        self.raise_failed_ahead()
        command = remote_command(argv, env, cwd)
        label = argv[0] if argv else "command"
        retry = _SessionRetry(self, label)
        fed = self._take_feed()  # (written as soon as ssh runs: see Backend.feeding)
        while True:
            first = self._start_with_new_master(command, label, fed)
            if first is not None:
                return first
            master = self._ensure_master()
            popen = self._spawn(master, command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            process = SshProcess(self, popen, label)
            if fed is not None:
                fed.begin(process.write_stdin)  # (again, to this one, when a lost master made it start over)
            process._read_header(self.spec.connect_timeout + self.spec.dead_after, ready=lambda: True)
            if not process.lost_master:
                return process
            retry.no_session(master, process._discard())

    def _signal_remote_group(self, pid: int) -> None:
        """TERM (then KILL) the remote process group ``pid`` through the master; bounded in time."""
        master = self._master
        if master is None or not master.alive():
            return
        steps = max(1, math.ceil(self.kill_grace / 0.1))
        command = build_command(["sh", "-c", _KILL_SCRIPT, "sh", str(pid), str(steps)])
        try:
            done = subprocess.run(
                client_argv(self.spec, master.control_path, command), stdin=subprocess.DEVNULL,
                capture_output=True, timeout=self.kill_grace + self.spec.dead_after + 5, check=False,
                start_new_session=True,
            )
            logger.debug("signalled process group %d on %s: exit %d", pid, self.host, done.returncode)
        except (OSError, subprocess.SubprocessError):
            logger.warning("could not signal process group %d on %s", pid, self.host, exc_info=True)

    # --- transfers ----------------------------------------------------------------------------------------

    def _transfer(self, command: str, *, stdin: int | IO[bytes], stdout: int | IO[bytes],
                  what: str) -> tuple[int, str]:
        """Run a transfer command over the master; return its exit status and stderr."""
        retry = _SessionRetry(self, what)
        while True:
            master = self._ensure_master()
            popen = self._spawn(master, command, stdin=stdin, stdout=stdout)
            _, err = popen.communicate()
            stderr = err.decode(errors="replace")
            if popen.returncode == 255 and NO_MASTER_MARKER in stderr:
                retry.no_session(master, stderr)  # the command never ran
                if not isinstance(stdin, int):
                    stdin.seek(0)  # nothing should have read it; start from the beginning regardless
                continue
            if popen.returncode == 255 and not master.alive():
                raise TransferError(self.host, f"{what}: the connection was lost")
            return popen.returncode, stderr

    def put(self, local: Path, remote: PurePosixPath) -> None:
        """Copy ``local`` to ``remote`` through the master; ``remote`` appears whole or not at all.

        Raises:
            TransferError: The local file cannot be read, or the copy failed (reason from the host).
        """
        what = f"put {local} -> {remote}"
        started = time.monotonic()
        tmp = f"{remote}.rx-{secrets.token_hex(4)}.tmp"
        try:
            handle = open(local, "rb")  # noqa: SIM115 - closed below, after the transfer
            size = os.fstat(handle.fileno()).st_size
        except OSError as exc:
            raise TransferError(self.host, f"{what}: cannot read {local}: {exc.strerror or exc}") from exc
        command = build_command(put_argv(tmp, remote, size))
        with handle:
            code, stderr = self._transfer(command, stdin=handle, stdout=subprocess.DEVNULL, what=what)
        if code != 0:
            raise TransferError(self.host, f"{what}: {self._transfer_reason(stderr, code)}")
        elapsed = time.monotonic() - started
        logger.debug("%s: %d bytes in %.3f s", what, size, elapsed)

    def get(self, remote: PurePosixPath, local: Path) -> None:
        """Copy ``remote`` to ``local`` through the master; ``local`` appears whole or not at all.

        Raises:
            TransferError: The remote file is missing or unreadable, the local directory is not writable,
                or the copy failed.
        """
        what = f"get {remote} -> {local}"
        started = time.monotonic()
        command = build_command(get_argv(remote))
        try:
            fd, tmp_name = tempfile.mkstemp(dir=local.parent, prefix=f".{local.name}.", suffix=".rx-tmp")
        except OSError as exc:
            raise TransferError(self.host, f"{what}: cannot write in {local.parent}: {exc.strerror or exc}") \
                from exc
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                code, stderr = self._transfer(command, stdin=subprocess.DEVNULL, stdout=out, what=what)
                if code != 0:
                    raise TransferError(self.host, f"{what}: {self._transfer_reason(stderr, code)}")
                size = os.fstat(out.fileno()).st_size
                announced = announced_size(stderr)
                if announced is not None and announced != size:
                    raise TransferError(self.host, f"{what}: received {size} of {announced} bytes")
                os.fsync(out.fileno())
            os.replace(tmp, local)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        logger.debug("%s: %d bytes in %.3f s", what, size, time.monotonic() - started)

    def _transfer_reason(self, stderr: str, code: int) -> str:
        reason = transfer_reason("\n".join(_lines(stderr)), code)
        if code == 255 and reason != transfer_reason("", code):  # ssh said why: in our words
            return map_ssh_error(self.host, stderr).message.removeprefix(f"{self.host}: ")
        return reason

    # --- closing ------------------------------------------------------------------------------------------

    def close(self) -> None:
        """End a master of this process (``ssh -O exit``) and remove its control directory; a shared master
        is left to the next rx (its ``ControlPersist`` ends it once idle). A later call reconnects."""
        with self._lock:
            master, self._master = self._master, None
        if master is not None:
            master.stop()
            logger.debug("closed the connection to %s", self.host)

    def __repr__(self) -> str:
        state = "connected" if self._master is not None else "idle"
        return f"<OpenSSHBackend {self.host!r} {state}>"
