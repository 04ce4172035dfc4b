"""The paramiko backend: one SSH connection per host in this process, no ``ssh`` binary needed.

:class:`ParamikoBackend` opens one :class:`paramiko.Transport` on first use and runs every later command
and file copy over it, as OpenSSH's ControlMaster does for the ``openssh`` backend. The socket is our own
(``TCP_NODELAY`` on: without it each small command pays a Nagle/delayed-ACK stall), ``ProxyJump`` hops are
``direct-tcpip`` channels of the jump host's own transport, a ``ProxyCommand`` runs as ssh runs it (by the
user's shell; :class:`CommandSocket`), and a watchdog closes a link whose server stops
answering keepalive probes, so reads end instead of hanging on a dead peer.

Host keys are checked against known_hosts right after the key exchange and before any authentication,
with OpenSSH's ``accept-new`` semantics by default: an unknown host's key is recorded, a key that differs
from every recorded key of the host (whatever its type) is refused. Unlike Fabric's default, no key is
ever accepted silently.

Errors of paramiko and of the socket layer are translated into :mod:`remote_exec.errors` in one place,
:func:`map_paramiko_errors`. This module is imported only when the paramiko backend is chosen (see
:mod:`remote_exec.backends`), so ``rx --help`` never loads paramiko.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import errno
import hashlib
import hmac
import logging
import os
import re
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, ClassVar, Literal

from .ssh import import_paramiko

import_paramiko()  # without invoke, which it would load for nothing (see there); the imports below find it

import paramiko  # noqa: E402
from paramiko.common import cMSG_CHANNEL_REQUEST  # noqa: E402
from paramiko.message import Message  # noqa: E402

from ..errors import AuthError, ConfigError, ConnectError, HostKeyError, RemoteExecError, TransferError  # noqa: E402
from .base import Backend, HostKeyPolicy, HostSpec, Process, build_command  # noqa: E402
from .ssh import ResolvedHost, locked_identity_hint, parse_jump, resolve  # noqa: E402

__all__ = [
    "HostKeyStatus",
    "KnownHostEntry",
    "KnownHosts",
    "ParamikoBackend",
    "ParamikoProcess",
    "check_host_key",
    "classify_host_key",
    "fingerprint",
    "map_paramiko_errors",
]

logger = logging.getLogger(__name__)

HostKeyStatus = Literal["known", "unknown", "changed", "revoked"]

#: Receive window of every channel we open. paramiko's default (2 MiB) caps a download at one window per
#: round trip; a larger one lets the server stream SFTP reads and command output without stalling.
WINDOW_SIZE = 32 * 2**20
#: Largest packet we accept from the server (its data packets are at most this big).
MAX_PACKET_SIZE = 2**15
#: Bytes read or written per SFTP request. OpenSSH's sftp-server accepts up to 255 KiB; paramiko's own
#: default (32 KiB) makes Python's per-request overhead the bottleneck of large copies.
SFTP_REQUEST_SIZE = 2**17
#: Read requests kept in flight while downloading.
SFTP_READ_AHEAD = 64
#: Deepest ProxyJump chain followed before assuming a loop.
MAX_JUMP_DEPTH = 8

# known_hosts key type -> host key algorithms that produce it, in our order of preference.
_ALGORITHMS_FOR_KEY_TYPE: dict[str, tuple[str, ...]] = {
    "ssh-rsa": ("rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"),
}


# --------------------------------------------------------------------------------------------------------
# errors


@contextlib.contextmanager
def map_paramiko_errors(host: str, address: str, action: str = "connect to",
                        timeout: float | None = None) -> Iterator[None]:
    """Translate paramiko and socket errors raised inside the block into :mod:`remote_exec.errors`.

    Args:
        host: The host as the user named it (every message starts with it).
        address: ``hostname:port`` actually contacted, named in the message.
        action: What was being done, for messages: "connect to", "run a command on", ...
        timeout: The timeout that applied, named in timeout messages.

    Raises:
        HostKeyError: paramiko refused the host key.
        AuthError: Authentication failed.
        ConnectError: Anything else that went wrong on the link.
    """
    within = f" within {timeout:g} s" if timeout is not None else ""
    try:
        yield
    except RemoteExecError:
        raise
    except paramiko.SSHException as exc:
        raise _ssh_exception_error(exc, host, address, action, within) from exc
    except (EOFError, OSError) as exc:
        raise _socket_error(exc, host, address, action, within) from exc


def _ssh_exception_error(exc: paramiko.SSHException, host: str, address: str, action: str,
                         within: str) -> RemoteExecError:
    """Our error for one of paramiko's (see :func:`map_paramiko_errors`)."""
    if isinstance(exc, paramiko.BadHostKeyException):
        return HostKeyError(host, f"host key of {address} does not match the recorded one "
                                  f"(offered {fingerprint(exc.key)})")
    if isinstance(exc, paramiko.BadAuthenticationType):
        allowed = ", ".join(exc.allowed_types) or "none"
        return AuthError(host, f"{address} does not accept public keys (it allows: {allowed})")
    if isinstance(exc, paramiko.AuthenticationException):
        return AuthError(host, f"authentication to {address} failed: {exc}")
    if isinstance(exc, paramiko.ChannelException):
        return ConnectError(host, f"{address} refused to open a channel: {exc.text} (code {exc.code})")
    text = str(exc)
    if "banner" in text.lower():
        return ConnectError(host, f"{address} did not answer as an SSH server{within}: {text}")
    return ConnectError(host, f"SSH error while trying to {action} {address}: {text}")


def _socket_error(exc: EOFError | OSError, host: str, address: str, action: str, within: str) -> ConnectError:
    """Our error for a failure of the socket under the SSH connection (see :func:`map_paramiko_errors`)."""
    if isinstance(exc, EOFError):
        return ConnectError(host, f"{address} closed the connection while we tried to {action} it")
    if isinstance(exc, socket.gaierror):
        name = address.rsplit(":", 1)[0].strip("[]")
        return ConnectError(host, f"unknown host {name!r}: {exc.strerror or exc}",
                            hint="check the host name or the HostName in ssh_config")
    if isinstance(exc, TimeoutError):  # socket.timeout is an alias
        return ConnectError(host, f"connection to {address} timed out{within}")
    if isinstance(exc, ConnectionRefusedError):
        return ConnectError(host, f"connection to {address} refused")
    if isinstance(exc, ConnectionResetError):
        return ConnectError(host, f"connection to {address} reset by peer")
    return ConnectError(host, f"cannot {action} {address}: {exc.strerror or exc}")


# --------------------------------------------------------------------------------------------------------
# host keys


def fingerprint(key: paramiko.PKey) -> str:
    """The key as OpenSSH shows it: ``ssh-ed25519 SHA256:...``."""
    digest = base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")
    return f"{key.get_name()} SHA256:{digest}"


@dataclass(frozen=True)
class KnownHostEntry:
    """One key line of a known_hosts file.

    Attributes:
        path: The file it is in.
        lineno: Its line number there (1-based).
        patterns: Host patterns of the line (plain, wildcard, negated ``!pattern`` or hashed ``|1|...``).
        key: The public key.
        marker: ``@revoked`` or ``@cert-authority`` when the line has one, else None.
    """

    path: Path
    lineno: int
    patterns: tuple[str, ...]
    key: paramiko.PKey
    marker: str | None = None

    def matches(self, name: str) -> bool:
        """True if ``name`` (``host`` or ``[host]:port``) is one of this line's hosts."""
        name = name.lower()
        matched = False
        for pattern in self.patterns:
            negated = pattern.startswith("!")
            if negated:
                pattern = pattern[1:]
            if _pattern_matches(pattern, name):
                if negated:
                    return False
                matched = True
        return matched


def _pattern_matches(pattern: str, name: str) -> bool:
    if pattern.startswith("|1|"):
        try:
            _, _, salt, digest = pattern.split("|")
            expected = base64.b64decode(digest)
            actual = hmac.new(base64.b64decode(salt), name.encode(), hashlib.sha1).digest()
        except (ValueError, TypeError):
            return False
        return hmac.compare_digest(expected, actual)
    if "*" not in pattern and "?" not in pattern:
        return pattern.lower() == name
    regex = re.escape(pattern.lower()).replace(r"\*", ".*").replace(r"\?", ".")
    return re.fullmatch(regex, name) is not None


class KnownHosts:
    """The keys recorded in a list of known_hosts files, as OpenSSH reads them.

    Hashed names, ``[host]:port`` names, wildcard and negated patterns and the ``@revoked`` marker are
    understood; lines paramiko cannot parse (unknown key types, ``@cert-authority``) are skipped.

    Attributes:
        files: The files, in order; new keys are recorded in the first one.
        entries: Every key line read.
    """

    def __init__(self, files: Sequence[Path], entries: Sequence[KnownHostEntry] = ()) -> None:
        self.files = tuple(files)
        self.entries = list(entries)

    @classmethod
    def load(cls, files: Sequence[Path]) -> KnownHosts:
        """Read ``files``; missing files count as empty."""
        entries: list[KnownHostEntry] = []
        for path in files:
            try:
                text = path.read_text(encoding="utf-8", errors="replace")
            except FileNotFoundError:
                continue
            except OSError as exc:
                logger.warning("cannot read known_hosts file %s: %s", path, exc.strerror or exc)
                continue
            for lineno, line in enumerate(text.splitlines(), 1):
                entry = _parse_known_hosts_line(path, lineno, line)
                if entry is not None:
                    entries.append(entry)
        return cls(files, entries)

    def lookup(self, name: str) -> list[KnownHostEntry]:
        """The recorded (not revoked, not CA) keys for ``name``."""
        return [entry for entry in self.entries if entry.marker is None and entry.matches(name)]

    def revoked(self, key: paramiko.PKey) -> KnownHostEntry | None:
        """The ``@revoked`` line for ``key``, if any."""
        for entry in self.entries:
            if entry.marker == "@revoked" and entry.key.asbytes() == key.asbytes():
                return entry
        return None

    def record(self, name: str, key: paramiko.PKey) -> Path:
        """Append ``name``'s key to the first file in OpenSSH's format, creating it (0600) if needed.

        Raises:
            OSError: The file cannot be written.
        """
        path = self.files[0]
        line = f"{name} {key.get_name()} {key.get_base64()}\n"
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            if path.is_file() and os.fstat(fd).st_size > 0:
                with open(path, "rb") as existing:
                    existing.seek(-1, os.SEEK_END)
                    if existing.read(1) != b"\n":
                        line = "\n" + line
            os.write(fd, line.encode())
        finally:
            os.close(fd)
        self.entries.append(KnownHostEntry(path, 0, (name,), key))
        return path


def _parse_known_hosts_line(path: Path, lineno: int, line: str) -> KnownHostEntry | None:
    fields = line.split()
    if not fields or fields[0].startswith("#"):
        return None
    marker = None
    if fields[0].startswith("@"):
        marker, fields = fields[0], fields[1:]
    if len(fields) < 3:
        return None
    patterns, key_type, blob = fields[:3]
    try:
        key = paramiko.PKey.from_type_string(key_type, base64.b64decode(blob))
    except Exception as exc:  # unknown type, bad base64, bad key: OpenSSH skips such lines too
        logger.debug("%s:%d: skipping known_hosts line: %s", path, lineno, exc)
        return None
    return KnownHostEntry(path, lineno, tuple(patterns.split(",")), key, marker)


def classify_host_key(recorded: Iterable[paramiko.PKey], offered: paramiko.PKey) -> HostKeyStatus:
    """Decide what ``offered`` is, given the keys recorded for its host.

    ``known`` if one recorded key is exactly it; ``unknown`` if nothing is recorded; ``changed`` if keys are
    recorded and none is it, whatever their types. (OpenSSH asks the server for a recorded type first, and
    so do we, see :func:`host_key_algorithms`; a server that then offers another type has lost or replaced
    its recorded key, which is refused as a changed key.)
    """
    keys = list(recorded)
    if not keys:
        return "unknown"
    if any(key.asbytes() == offered.asbytes() for key in keys):
        return "known"
    return "changed"


def host_key_algorithms(available: Sequence[str], recorded: Iterable[paramiko.PKey]) -> list[str]:
    """``available`` host key algorithms reordered so that the recorded key types come first, as OpenSSH
    orders HostKeyAlgorithms for a known host: a server with several keys then shows the one we know."""
    first: list[str] = []
    for key in recorded:
        for algorithm in _ALGORITHMS_FOR_KEY_TYPE.get(key.get_name(), (key.get_name(),)):
            if algorithm in available and algorithm not in first:
                first.append(algorithm)
    return first + [algorithm for algorithm in available if algorithm not in first]


def check_host_key(host: str, name: str, key: paramiko.PKey, known: KnownHosts,
                   policy: HostKeyPolicy) -> HostKeyStatus:
    """Check ``key`` offered by the host recorded as ``name`` against ``known``, applying ``policy``.

    With ``accept-new`` an unknown key is recorded in the first known_hosts file (a failure to write it is
    logged, as OpenSSH does, and the connection proceeds).

    Returns:
        What the key was: ``known``, ``unknown`` (accepted and recorded, or unchecked with ``off``), or
        ``changed`` (only with ``off``).

    Raises:
        HostKeyError: The key is revoked, differs from the recorded ones, or is unknown under ``strict``.
    """
    if policy == "off":
        # the coordinator warned once already (host key checking is off): the key, for -v
        logger.info("%s: host key checking is off; accepting %s unverified", host, fingerprint(key))
        recorded = [entry.key for entry in known.lookup(name)]
        return classify_host_key(recorded, key)
    revoked = known.revoked(key)
    if revoked is not None:
        raise HostKeyError(host, f"host key of {name} ({fingerprint(key)}) is marked @revoked in "
                                 f"{revoked.path}:{revoked.lineno}")
    entries = known.lookup(name)
    status = classify_host_key([entry.key for entry in entries], key)
    if status == "changed":
        raise _changed_key_error(host, name, key, entries)
    if status == "unknown" and policy == "strict":
        files = ", ".join(str(path) for path in known.files) or "no known_hosts file"
        raise HostKeyError(host, f"host key of {name} ({fingerprint(key)}) is not in {files} and "
                                 "host key checking is strict",
                           hint="add it with ssh-keyscan, or connect once with accept-new")
    if status == "unknown":
        _record_new_key(host, name, key, known)
    return status


def _changed_key_error(host: str, name: str, key: paramiko.PKey, entries: Sequence[KnownHostEntry]) -> HostKeyError:
    """The refusal of ``key``, which differs from every key recorded for ``name`` (in ``entries``)."""
    where = ", ".join(sorted({f"{entry.path}:{entry.lineno}" for entry in entries}))
    types = sorted({entry.key.get_name() for entry in entries})
    detail = ("differs from the one recorded" if key.get_name() in types
              else f"is not of a recorded type ({', '.join(types)})")
    return HostKeyError(
        host,
        f"HOST KEY CHANGED for {name}: the server offered {fingerprint(key)}, which {detail} in {where}",
        hint=f"if the host was reinstalled, remove the old key: ssh-keygen -R '{name}' -f {entries[0].path}",
    )


def _record_new_key(host: str, name: str, key: paramiko.PKey, known: KnownHosts) -> None:
    """Record an accepted new key in the first known_hosts file; a failure is logged, as OpenSSH does."""
    if not known.files:
        logger.warning("%s: no known_hosts file configured; accepting %s without recording it",
                       host, fingerprint(key))
        return
    try:
        path = known.record(name, key)
    except OSError as exc:
        logger.warning("%s: could not record host key %s in %s: %s", host, fingerprint(key),
                       known.files[0], exc.strerror or exc)
    else:
        logger.info("%s: recorded new host key %s for %s in %s", host, fingerprint(key), name, path)


# --------------------------------------------------------------------------------------------------------
# authentication


@dataclass
class _Candidate:
    label: str
    key: paramiko.PKey


@dataclass
class _Keys:
    """The keys to offer, in order, and the identity files left out (named when every key is refused).

    Attributes:
        candidates: Agent keys first, then identity files, each key once.
        notes: ``path (why)`` for each identity file that could not be used.
        encrypted: Identity files left out because they need a passphrase.
    """

    candidates: list[_Candidate] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    encrypted: list[Path] = field(default_factory=list)

    def skip(self, path: Path, why: str) -> None:
        self.notes.append(f"{path} ({why})")
        if why == "encrypted":
            self.encrypted.append(path)


def _public_blob(path: Path) -> bytes | None:
    """The public key blob of ``path`` from ``path.pub``, or None."""
    try:
        fields = Path(f"{path}.pub").read_text(encoding="ascii", errors="replace").split()
        return base64.b64decode(fields[1]) if len(fields) >= 2 else None
    except (OSError, ValueError):
        return None


def _agent_keys() -> tuple[paramiko.Agent | None, list[paramiko.AgentKey]]:
    if not os.environ.get("SSH_AUTH_SOCK"):
        return None, []
    try:
        agent = paramiko.Agent()
        return agent, list(agent.get_keys())
    except (paramiko.SSHException, OSError) as exc:
        logger.debug("ssh-agent unusable: %s", exc)
        return None, []


def _gather_keys(agent_keys: Sequence[paramiko.AgentKey], resolved: ResolvedHost) -> _Keys:
    """The keys to offer, in OpenSSH's order: agent keys (only those of the identity files with
    ``IdentitiesOnly``), then the identity files the agent does not hold."""
    keys = _Keys()
    file_blobs = {path: _public_blob(path) for path in resolved.identity_files}
    for agent_key in agent_keys:
        if agent_key.asbytes() in file_blobs.values() or not resolved.identities_only:
            comment = getattr(agent_key, "comment", "") or ""
            label = f"agent key {fingerprint(agent_key)}" + (f" ({comment})" if comment else "")
            keys.candidates.append(_Candidate(label, agent_key))
    offered = {candidate.key.asbytes() for candidate in keys.candidates}
    for path in resolved.identity_files:
        if file_blobs[path] is not None and file_blobs[path] in offered:
            continue
        key = _load_identity(path, keys)
        if key is not None and key.asbytes() not in offered:
            offered.add(key.asbytes())
            keys.candidates.append(_Candidate(str(path), key))
    return keys


def _load_identity(path: Path, keys: _Keys) -> paramiko.PKey | None:
    """The private key in ``path``, or None (and a note in ``keys`` saying why not)."""
    try:
        return paramiko.PKey.from_path(path)
    except FileNotFoundError:
        keys.skip(path, "missing")
    except paramiko.PasswordRequiredException:
        keys.skip(path, "encrypted")
    except TypeError as exc:
        # paramiko lets cryptography's "password-protected, but password was not provided" through
        if "password" not in str(exc).lower():
            raise
        keys.skip(path, "encrypted")
    except (paramiko.SSHException, OSError, ValueError) as exc:
        keys.skip(path, f"unreadable: {exc}")
    return None


def _offer_keys(transport: paramiko.Transport, candidates: Sequence[_Candidate], resolved: ResolvedHost,
                host: str) -> list[str]:
    """Offer the keys in turn until the server accepts one; return the labels of those offered.

    Raises:
        AuthError: The server refuses public keys, closed the connection, or wants more than a key.
    """
    tried: list[str] = []
    for candidate in candidates:
        tried.append(candidate.label)
        try:
            remaining = transport.auth_publickey(resolved.user, candidate.key)
        except paramiko.BadAuthenticationType as exc:
            allowed = ", ".join(exc.allowed_types) or "none"
            raise AuthError(host, f"{resolved.address} does not accept public keys for "
                                  f"{resolved.user} (it allows: {allowed})") from exc
        except paramiko.AuthenticationException:
            logger.debug("%s: %s refused %s", host, resolved.address, candidate.label)
            if not transport.is_active():
                raise AuthError(host, f"{resolved.address} closed the connection after "
                                      f"{len(tried)} refused keys ({', '.join(tried)})",
                                hint="too many keys in the agent? set IdentitiesOnly yes and an "
                                     "IdentityFile in ssh_config") from None
            continue
        if transport.is_authenticated():
            logger.debug("%s: authenticated as %s with %s", host, resolved.user, candidate.label)
            return tried
        raise AuthError(host, f"{resolved.address} wants more than a public key for {resolved.user} "
                              f"(next: {', '.join(remaining)}), which rx does not do")
    return tried


def _authenticate(transport: paramiko.Transport, resolved: ResolvedHost, host: str) -> None:
    """Authenticate with agent keys, then identity files, in OpenSSH's order.

    Raises:
        AuthError: No key was accepted (the message lists what was tried, and why files were skipped).
    """
    agent, agent_keys = _agent_keys()
    try:
        keys = _gather_keys(agent_keys, resolved)
        tried = _offer_keys(transport, keys.candidates, resolved, host)
    finally:
        if agent is not None:
            agent.close()
    if transport.is_authenticated():
        return
    everything = [*tried, *keys.notes]
    what = ", ".join(everything) if everything else "nothing (no ssh-agent, no IdentityFile, no ~/.ssh/id_*)"
    hint = None
    if keys.encrypted:
        hint = locked_identity_hint(keys.encrypted[0])
    raise AuthError(host, f"{resolved.address} refused every key for {resolved.user}; tried: {what}", hint=hint)


# --------------------------------------------------------------------------------------------------------
# the connection


class _Link:
    """One SSH connection: the transport, the link it tunnels through (ProxyJump), and its watchdog.

    The watchdog sends a probe that the server must answer (``keepalive@openssh.com`` with want-reply,
    as OpenSSH's ServerAliveInterval does) every ``keepalive_interval`` seconds; if no answer comes within
    ``dead_after`` seconds the transport is closed, which ends every read on its channels.
    """

    def __init__(self, transport: paramiko.Transport, resolved: ResolvedHost, via: _Link | None,
                 spec: HostSpec, sock: socket.socket | CommandSocket | None) -> None:
        self.transport = transport
        self.resolved = resolved
        self.via = via
        self.sock = sock
        self.dead = False
        self._stop = threading.Event()
        self._interval = max(spec.keepalive_interval, 0.1)
        self._dead_after = spec.dead_after
        self._watchdog = threading.Thread(target=self._watch, name=f"rx-keepalive-{resolved.alias}",
                                          daemon=True)
        if spec.keepalive_interval > 0:
            self._watchdog.start()

    @property
    def active(self) -> bool:
        """True while the transport (and every hop under it) is up."""
        return (not self.dead and self.transport.is_active()
                and (self.via is None or self.via.active))

    def _watch(self) -> None:
        while not self._stop.wait(self._interval):
            if not self.transport.is_active():
                return
            answered = threading.Event()
            threading.Thread(target=self._probe, args=(answered,), name="rx-keepalive-probe",
                             daemon=True).start()
            if not answered.wait(self._dead_after) and not self._stop.is_set():
                logger.warning("%s: no answer to keepalive for %.0f s; closing the connection",
                               self.resolved.address, self._dead_after)
                self.dead = True
                self.transport.close()
                return

    def _probe(self, answered: threading.Event) -> None:
        with contextlib.suppress(Exception):
            self.transport.global_request("keepalive@openssh.com", wait=True)
        answered.set()

    def close(self) -> None:
        """Close the transport, then the hops under it. Safe to call twice."""
        self._stop.set()
        with contextlib.suppress(Exception):
            self.transport.close()
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
        if self.via is not None:
            self.via.close()


def _open_link(spec: HostSpec, resolved: ResolvedHost, host: str, nodelay: bool, depth: int = 0) -> _Link:
    """Connect, check the host key, authenticate: a ready link to ``resolved``.

    Raises:
        ConnectError, HostKeyError, AuthError: As named.
        ConfigError: The ProxyJump chain loops or is malformed.
    """
    if depth > MAX_JUMP_DEPTH:
        raise ConfigError(f"ProxyJump chain to {resolved.alias} is longer than {MAX_JUMP_DEPTH} hops "
                          "(a loop in ssh_config?)")
    via: _Link | None = None
    sock: socket.socket | CommandSocket | None = None
    try:
        if resolved.proxy_jump:
            via, channel = _tunnel(spec, resolved, parse_jump(resolved.proxy_jump), host, nodelay, depth)
            transport = _start_transport(channel, spec, resolved, host)
        elif resolved.proxy_command:
            sock = CommandSocket.start(resolved.proxy_command, host)
            try:
                transport = _start_transport(sock, spec, resolved, host)
            except ConnectError as exc:
                raise sock.failure(exc) from exc
        else:
            sock = _dial(resolved, host, nodelay, spec.connect_timeout)
            transport = _start_transport(sock, spec, resolved, host)
    except BaseException:
        if sock is not None:
            sock.close()
        if via is not None:
            via.close()
        raise
    logger.info("%s: connected to %s@%s%s", host, resolved.user, resolved.address,
                f" via {via.resolved.address}" if via else " through its ProxyCommand" if resolved.proxy_command
                else "")
    return _Link(transport, resolved, via, spec, sock)


class CommandSocket:
    """The pipes of a ``ProxyCommand`` as the socket a :class:`paramiko.Transport` reads and writes.

    The command runs as OpenSSH runs it: ``exec``-ed by the user's shell (``$SHELL -c``, else ``/bin/sh``), in
    a session of its own; what it says on stderr is kept (an anonymous file) for the error when the
    connection fails. Unlike :class:`paramiko.ProxyCommand`, the end of its output is the end of the
    connection (that one spins on it until its timeout), and closing it ends the command and reaps it.
    """

    def __init__(self, process: subprocess.Popen[bytes], command: str, host: str, stderr: IO[bytes]) -> None:
        self.process = process
        self.command = command
        self.host = host
        self.stderr = stderr
        self.timeout: float | None = None
        self._said: str | None = None  # what it said, once closed

    @classmethod
    def start(cls, command: str, host: str) -> CommandSocket:
        """Start ``command`` (tokens expanded) for ``host``.

        Raises:
            ConnectError: It could not be started.
        """
        import tempfile

        shell = os.environ.get("SHELL") or "/bin/sh"
        stderr = tempfile.TemporaryFile()  # noqa: SIM115 - the command's stderr until close()
        logger.debug("%s: connecting through its ProxyCommand: %s", host, command)
        try:
            process = subprocess.Popen([shell, "-c", f"exec {command}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=stderr, bufsize=0, start_new_session=True)
        except OSError as exc:
            stderr.close()
            raise ConnectError(host, f"cannot run its ProxyCommand with {shell}: {exc.strerror or exc}") from exc
        return cls(process, command, host, stderr)

    def send(self, data: bytes) -> int:
        assert self.process.stdin is not None
        try:
            return os.write(self.process.stdin.fileno(), data)
        except OSError as exc:
            raise ConnectionResetError(errno.EPIPE, f"the ProxyCommand stopped reading: {exc.strerror}") from exc

    def recv(self, size: int) -> bytes:
        """Up to ``size`` bytes; b"" at the end of the command's output. Raises TimeoutError past the
        timeout (paramiko's reader loops on that)."""
        import select

        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        if not select.select([fd], [], [], self.timeout)[0]:
            raise TimeoutError()
        return os.read(fd, size)

    def settimeout(self, timeout: float | None) -> None:
        self.timeout = timeout

    def said(self) -> str:
        """The end of what the command wrote to stderr, on one line."""
        if self._said is not None:
            return self._said
        try:
            self.stderr.seek(0)
            text = self.stderr.read()[-2000:].decode("utf-8", "replace")
        except (OSError, ValueError):
            return ""
        return " / ".join(line.strip() for line in text.splitlines() if line.strip())[-300:]

    def failure(self, exc: ConnectError) -> ConnectError:
        """``exc`` (the connection through the command failed), saying how the command ended and what it said."""
        code = self.process.poll()
        if code is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = self.process.wait(0.2)
        said = self.said()
        if code is None and not said:
            return exc
        ended = f"its ProxyCommand exited with status {code}" if code is not None else "its ProxyCommand failed"
        return ConnectError(self.host, f"{ended} before the SSH handshake" + (f": {said}" if said else ""),
                            hint=f"the command: {self.command}; run it by hand to see why")

    def close(self) -> None:
        """End the command (SIGTERM, then SIGKILL after a second) and reap it."""
        self._said = self.said()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        if self.process.poll() is None:
            with contextlib.suppress(OSError):
                self.process.terminate()
            try:
                self.process.wait(1)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    self.process.kill()
                self.process.wait(5)
        with contextlib.suppress(OSError):
            self.stderr.close()

    @property
    def closed(self) -> bool:
        return self.process.returncode is not None

    @property
    def _closed(self) -> bool:  # (paramiko's Packetizer asks a socket this)
        return self.closed


def _dial(resolved: ResolvedHost, host: str, nodelay: bool, timeout: float) -> socket.socket:
    """A TCP connection to the host (``TCP_NODELAY`` on unless told otherwise)."""
    with map_paramiko_errors(host, resolved.address, "connect to", timeout):
        sock = _dialed_ahead(resolved, host, timeout) or socket.create_connection((resolved.hostname, resolved.port),
                                                                             timeout=timeout)
        if nodelay:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _dialed_ahead(resolved: ResolvedHost, host: str, timeout: float) -> socket.socket | None:
    """The TCP connection to the host that the process opened as it started, from the memo of its last
    run (:func:`remote_exec.prestart.take_dial`), when it is to this very address; else None."""
    prestart = sys.modules.get("remote_exec.prestart")
    if prestart is None:
        return None
    sock: socket.socket | None = prestart.take_dial(resolved.hostname, resolved.port, timeout)
    if sock is not None:
        logger.debug("%s: using the TCP connection to %s that rx made from its memo as the process started",
                     host, resolved.address)
    return sock


def _tunnel(spec: HostSpec, resolved: ResolvedHost, hops: Sequence[HostSpec], host: str, nodelay: bool,
            depth: int) -> tuple[_Link, paramiko.Channel]:
    """A ``direct-tcpip`` channel to the host through its ProxyJump ``hops``, and the link to the last hop
    that carries it (opened here, with the hops before it under it)."""
    timeout = spec.connect_timeout
    last = hops[-1]
    jump_spec = dataclasses.replace(spec, host=last.host, user=last.user, port=last.port, identity_file=None)
    jump = resolve(jump_spec)
    if len(hops) > 1:
        jump = dataclasses.replace(jump, proxy_jump=",".join(hop.label for hop in hops[:-1]))
    logger.debug("%s: connecting through %s", host, jump.address)
    via = _open_link(jump_spec, jump, jump_spec.label, nodelay, depth + 1)
    try:
        with map_paramiko_errors(host, resolved.address, f"open a tunnel through {jump.address} to", timeout):
            channel = via.transport.open_channel("direct-tcpip", (resolved.hostname, resolved.port),
                                                 ("127.0.0.1", 0), timeout=timeout)
    except BaseException:
        via.close()
        raise
    return via, channel


def _start_transport(sock: socket.socket | paramiko.Channel | CommandSocket, spec: HostSpec, resolved: ResolvedHost,
                     host: str) -> paramiko.Transport:
    """SSH over ``sock``: key exchange (recorded key types asked for first), the host key checked before
    anything else, authentication, keepalives. The transport is closed again if any step fails."""
    address, timeout = resolved.address, spec.connect_timeout
    with map_paramiko_errors(host, address, "connect to", timeout):
        known = KnownHosts.load(resolved.known_hosts_files)
        recorded = [entry.key for entry in known.lookup(resolved.known_hosts_name)]
        transport = paramiko.Transport(sock,  # type: ignore[arg-type]  # (a CommandSocket: socket-like)
                                       default_window_size=WINDOW_SIZE,
                                       default_max_packet_size=MAX_PACKET_SIZE)
    try:
        with map_paramiko_errors(host, address, "connect to", timeout):
            transport.banner_timeout = timeout
            transport.handshake_timeout = timeout
            transport.auth_timeout = timeout
            options = transport.get_security_options()
            options.key_types = host_key_algorithms(options.key_types, recorded)
            transport.start_client(timeout=timeout)
            if not transport.is_active() or not transport.initial_kex_done:
                raise ConnectError(host, f"SSH handshake with {address} timed out within {timeout:g} s")
            server_key = transport.get_remote_server_key()
            check_host_key(host, resolved.known_hosts_name, server_key, known, spec.host_key_policy)
            _authenticate(transport, resolved, host)
            transport.set_keepalive(int(spec.keepalive_interval))
    except BaseException:
        transport.close()
        raise
    return transport


# --------------------------------------------------------------------------------------------------------
# commands


class ParamikoProcess(Process):
    """One command running in a session channel of the backend's transport.

    Attributes:
        channel: The session channel.
        host: The host as the user named it.
        kill_grace: Seconds :meth:`kill` waits after SIGTERM before sending SIGKILL.
    """

    def __init__(self, channel: paramiko.Channel, host: str, kill_grace: float = 2.0) -> None:
        self.channel = channel
        self.host = host
        self.kill_grace = kill_grace
        self._kill_lock = threading.Lock()
        self._killed = False

    def read_stdout(self, size: int = 65536) -> bytes:
        # recv returns b"" at end of stream and once the channel is closed, also when the transport dies.
        try:
            return self.channel.recv(size)
        except (OSError, EOFError, paramiko.SSHException):
            return b""

    def read_stderr(self, size: int = 65536) -> bytes:
        try:
            return self.channel.recv_stderr(size)
        except (OSError, EOFError, paramiko.SSHException):
            return b""

    def write_stdin(self, data: bytes) -> None:
        try:
            self.channel.sendall(data)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise ConnectError(self.host, f"cannot write to the command's stdin: {exc}") from exc

    def close_stdin(self) -> None:
        with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
            self.channel.shutdown_write()

    def wait(self, timeout: float | None = None) -> int | None:
        if not self.channel.status_event.wait(timeout):
            return None
        return self.channel.recv_exit_status()

    def kill(self) -> None:
        """Stop the command: SIGTERM to its process group, SIGKILL after :attr:`kill_grace`, close.

        The signals travel as RFC 4254 ``signal`` requests, which sshd delivers with ``killpg`` to the
        session's process group (it refuses them for root logins; then only the close remains). Closing
        the channel alone does not stop a command that is not writing: without a pty sshd sends no signal.
        """
        with self._kill_lock:
            if self._killed:
                return
            self._killed = True
        if self._signal("TERM") and not self.channel.status_event.wait(self.kill_grace):
            self._signal("KILL")
        with contextlib.suppress(Exception):
            self.channel.close()

    def abandon(self) -> None:
        """Close the channel at once, sending no signal (the host does not answer)."""
        with self._kill_lock:
            if self._killed:
                return
            self._killed = True
        with contextlib.suppress(Exception):
            self.channel.close()

    def _signal(self, name: str) -> bool:
        """Send a ``signal`` channel request (paramiko has no public call for it); False if impossible."""
        channel = self.channel
        transport = channel.get_transport()
        if channel.closed or not channel.active or channel.exit_status_ready() or transport is None:
            return False
        try:
            _channel_request(channel, transport, "signal", name, reply=False)
        except Exception:  # the link is gone: nothing left to signal through
            return False
        return True


def _exec_unanswered(channel: paramiko.Channel, command: str) -> None:
    """Send ``channel``'s ``exec`` request as :meth:`paramiko.Channel.exec_command` does, without waiting for
    the server's answer (``channel._wait_for_event()`` waits for it, and raises a refusal): what is written
    to the command's stdin meanwhile follows the request on the link, and the server reads it once the
    command runs (RFC 4254 orders a channel's messages)."""
    channel._event_pending()  # type: ignore[attr-defined]
    _channel_request(channel, channel.get_transport(), "exec", command, reply=True)


def _channel_request(channel: paramiko.Channel, transport: paramiko.Transport, kind: str, value: str, *,
                     reply: bool) -> None:
    """Send a channel request of ``kind`` with one string (paramiko's calls for them wait for the answer, or
    do not exist); with ``reply`` the server answers it, and paramiko sets the channel's event then."""
    message = Message()
    message.add_byte(cMSG_CHANNEL_REQUEST)
    message.add_int(channel.remote_chanid)
    message.add_string(kind)
    message.add_boolean(reply)
    message.add_string(value)
    transport._send_user_message(message)  # type: ignore[attr-defined]


class ParamikoBackend(Backend):
    """A host reached with paramiko: one transport, opened on first use, shared by every call.

    Attributes:
        tcp_nodelay: Set ``TCP_NODELAY`` on the socket (on by default; off only to measure its effect).
        kill_grace: Seconds between SIGTERM and SIGKILL when a command is stopped.
    """

    name: ClassVar[str] = "paramiko"
    kill_grace: ClassVar[float] = 2.0

    def __init__(self, spec: HostSpec, *, tcp_nodelay: bool = True) -> None:
        super().__init__(spec)
        self.tcp_nodelay = tcp_nodelay
        self._lock = threading.Lock()
        self._link: _Link | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self._sftp_link: _Link | None = None
        self._spare: tuple[_Link, paramiko.Channel] | None = None
        #: (memo key, files) under which to note the host's address for the next run of the same line or
        #: ``@task``, whose process then connects to it as it starts (:mod:`~remote_exec.prestart`).
        self.prestart_memo: tuple[str, tuple[str, ...]] | None = None

    @property
    def resolved(self) -> ResolvedHost | None:
        """What the host resolved to at the last connect (None before the first one)."""
        return self._link.resolved if self._link is not None else None

    @property
    def transport(self) -> paramiko.Transport | None:
        """The current transport, if connected (for diagnostics and tests)."""
        return self._link.transport if self._link is not None else None

    def connect(self) -> None:
        self._connect()

    def connect_ahead(self) -> None:
        """Connect, then open the first command's session channel right away (see :meth:`_open_spare`)."""
        super().connect_ahead()
        if self._failed_ahead is None:
            self._open_spare()

    def _open_spare(self) -> None:
        """Open a session channel for the next :meth:`start` while the caller is still busy.

        sshd answers a connection's first session only once it has opened the login session (PAM's session
        stack on Debian and Ubuntu hosts: ~40 ms on the testbed), the longest single step of a first call
        after authentication. Opened here, on the thread that connected ahead, that wait overlaps with the
        caller's own work (rx's imports, the task's serialization) instead of following it. One channel,
        taken by the next command; a failure here is left for that command to meet and report itself.
        """
        link = self._link
        if link is None or not link.active:
            return
        try:
            channel = self._open_session(link)
        except Exception:  # the next start opens its own session and reports what fails
            logger.debug("%s: no session opened ahead", self.host, exc_info=True)
            return
        with self._lock:
            if self._spare is None and self._link is link:
                self._spare = (link, channel)
                return
        channel.close()

    def _take_spare(self, link: _Link) -> paramiko.Channel | None:
        """The session channel opened ahead on ``link``, if there is one still open (taken once)."""
        with self._lock:
            spare, self._spare = self._spare, None
        if spare is None:
            return None
        if spare[0] is link and link.active and not spare[1].closed and spare[1].active:
            logger.debug("%s: the command's session was opened ahead", self.host)
            return spare[1]
        spare[1].close()
        return None

    def _connect(self) -> _Link:
        """The live link, connecting (or reconnecting after a dead one) under the lock."""
        with self._lock:
            link = self._link
            if link is not None and link.active:
                return link
            if link is not None:
                logger.info("%s: connection lost; reconnecting", self.host)
                self._close_locked()
            resolved = resolve(self.spec)
            link = _open_link(self.spec, resolved, self.host, self.tcp_nodelay)
            hop: _Link | None = link
            while hop is not None:
                self.connections_opened += 1
                hop = hop.via
            self._link = link
        self._remember(link)
        return link

    def _remember(self, link: _Link) -> None:
        """Note the address of a direct connection for the next run of this line (see
        :attr:`prestart_memo`)."""
        memo, self.prestart_memo = self.prestart_memo, None
        if memo is None or link.via is not None or link.resolved.proxy_command:
            return
        from .. import prestart
        from .ssh import default_config_path

        key, files = memo
        resolved = link.resolved
        ssh_files = (str(resolved.config_file or default_config_path()),)
        prestart.remember_dial(key, (*files, *ssh_files), resolved.hostname, resolved.port,
                               self.spec.connect_timeout)

    def start(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
              cwd: PurePosixPath | None = None) -> Process:
        self.raise_failed_ahead()
        command = build_command(argv, env, cwd)
        link = self._connect()
        timeout = self.spec.connect_timeout
        fed = self._take_feed()
        with map_paramiko_errors(self.host, link.resolved.address, "run a command on", timeout):
            channel = self._take_spare(link) or self._open_session(link)
            process = ParamikoProcess(channel, self.host, self.kill_grace)
            try:
                if fed is None:
                    channel.exec_command(command)
                else:  # what goes ahead follows the request, as OpenSSH's client sends stdin, not its answer
                    _exec_unanswered(channel, command)
                    fed.begin(process.write_stdin)
                    channel._wait_for_event()  # type: ignore[attr-defined]  # the answer: a refusal raises
            except BaseException:
                channel.close()
                raise
        logger.debug("%s: started %s", self.host,
                     command if len(command) < 200 else f"{command[:60]}... ({len(command)} bytes)")
        return process

    def classify_exit(self, exit_code: int | None, stderr: bytes) -> RemoteExecError | None:
        """-1 is paramiko's "no exit status": the channel closed without one because the link died (or sshd
        reported a signal instead). Every status the server sent is the command's own.
        """
        if exit_code == -1:
            return ConnectError(self.host, "the connection was lost before the command reported its exit status")
        return None

    def _open_session(self, link: _Link) -> paramiko.Channel:
        """A new session channel; retried while the server is at its MaxSessions limit."""
        deadline = time.monotonic() + self.spec.connect_timeout
        delay = 0.02
        while True:
            try:
                return link.transport.open_session(window_size=WINDOW_SIZE, max_packet_size=MAX_PACKET_SIZE,
                                                   timeout=self.spec.connect_timeout)
            except paramiko.ChannelException as exc:
                # sshd's MaxSessions reached (it answers 1, administratively prohibited, 2, open failed, or
                # 4, resource shortage, depending on the version): wait for a session to end.
                if exc.code not in (1, 2, 4) or not link.active or time.monotonic() + delay > deadline:
                    raise
            except paramiko.SSHException as exc:
                # paramiko reports some refusals without the failure code; same wait while the link lives
                if "Unable to open channel" not in str(exc) or not link.active \
                        or time.monotonic() + delay > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    # ----------------------------------------------------------------------------------------------------
    # files

    def _sftp_client(self) -> tuple[_Link, paramiko.SFTPClient]:
        link = self._connect()
        with self._lock:
            if self._sftp is not None and self._sftp_link is link:
                return link, self._sftp
            with map_paramiko_errors(self.host, link.resolved.address, "open SFTP on",
                                     self.spec.connect_timeout):
                sftp = paramiko.SFTPClient.from_transport(link.transport, window_size=WINDOW_SIZE,
                                                          max_packet_size=MAX_PACKET_SIZE)
            if sftp is None:
                raise ConnectError(self.host, f"{link.resolved.address} refused the SFTP subsystem")
            sftp.get_channel().settimeout(None)  # type: ignore[union-attr]
            self._sftp, self._sftp_link = sftp, link
            return link, sftp

    @contextlib.contextmanager
    def _transfer_errors(self, what: str, address: str) -> Iterator[None]:
        """Every failure of a copy becomes a TransferError that says why (connect errors pass through)."""
        try:
            yield
        except TransferError:
            raise
        except RemoteExecError as exc:
            if isinstance(exc, ConfigError):
                raise
            raise TransferError(self.host, f"{what} failed: {exc.message}") from exc
        except FileNotFoundError as exc:
            raise TransferError(self.host, f"{what} failed: {exc.filename or 'file'}: no such file or "
                                           "directory") from exc
        except PermissionError as exc:
            raise TransferError(self.host, f"{what} failed: {exc.filename or 'file'}: permission denied"
                                ) from exc
        except (OSError, EOFError, paramiko.SSHException) as exc:
            reason = (exc.strerror if isinstance(exc, OSError) and exc.strerror
                      else str(exc) or type(exc).__name__)
            if not (self._link is not None and self._link.active):
                reason = f"lost the connection to {address} ({reason})"
            raise TransferError(self.host, f"{what} failed: {reason}") from exc

    def put(self, local: Path, remote: PurePosixPath) -> None:
        """Upload ``local`` to ``remote`` under a temporary name, then rename it into place."""
        what = f"put {local} -> {remote}"
        try:
            source = local.open("rb")
        except OSError as exc:
            raise TransferError(self.host, f"{what} failed: cannot read {local}: {exc.strerror or exc}"
                                ) from exc
        with source:
            link, sftp = self._sftp_client()
            temporary = str(remote.parent / f".{remote.name}.{os.urandom(6).hex()}.rx-tmp")
            started = time.monotonic()
            try:
                with self._transfer_errors(what, link.resolved.address):
                    size = os.fstat(source.fileno()).st_size
                    with _remote_errors(str(remote.parent)), sftp.open(temporary, "wb") as target:
                        target.MAX_REQUEST_SIZE = SFTP_REQUEST_SIZE
                        target.set_pipelined(True)
                        while chunk := source.read(SFTP_REQUEST_SIZE * 8):
                            target.write(chunk)
                    written = sftp.stat(temporary).st_size
                    if written != size:
                        raise TransferError(self.host, f"{what} failed: wrote {written} of {size} bytes")
                    sftp.posix_rename(temporary, str(remote))
            except BaseException:
                with contextlib.suppress(Exception):
                    sftp.remove(temporary)
                raise
        _log_rate("put", self.host, remote, size, time.monotonic() - started)

    def get(self, remote: PurePosixPath, local: Path) -> None:
        """Download ``remote`` into a temporary file next to ``local``, fsync it, rename it into place."""
        what = f"get {remote} -> {local}"
        link, sftp = self._sftp_client()
        temporary = local.with_name(f".{local.name}.{os.urandom(6).hex()}.rx-tmp")
        started = time.monotonic()
        with self._transfer_errors(what, link.resolved.address), _remote_errors(str(remote)):
            attributes = sftp.stat(str(remote))
            if attributes.st_mode is not None and not stat.S_ISREG(attributes.st_mode):
                kind = "a directory" if stat.S_ISDIR(attributes.st_mode) else "not a regular file"
                raise TransferError(self.host, f"{what} failed: {remote} is {kind}")
        try:
            target = open(temporary, "wb")  # noqa: SIM115 (closed below, also on errors)
        except OSError as exc:
            raise TransferError(self.host, f"{what} failed: cannot write in {local.parent}: "
                                           f"{exc.strerror or exc}") from exc
        try:
            with target, self._transfer_errors(what, link.resolved.address):
                with _remote_errors(str(remote)), sftp.open(str(remote), "rb") as source:
                    size = source.stat().st_size or 0
                    source.MAX_REQUEST_SIZE = SFTP_REQUEST_SIZE
                    source.prefetch(size, max_concurrent_requests=SFTP_READ_AHEAD)
                    received = 0
                    while received < size and (chunk := source.read(min(size - received, 2**20))):
                        target.write(chunk)
                        received += len(chunk)
                target.flush()
                os.fsync(target.fileno())
                if received != size:
                    raise TransferError(self.host, f"{what} failed: received {received} of {size} bytes")
                os.replace(temporary, local)
        except BaseException:
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise
        _log_rate("get", self.host, remote, size, time.monotonic() - started)

    # ----------------------------------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if self._sftp is not None:
            with contextlib.suppress(Exception):
                self._sftp.close()
        self._sftp = self._sftp_link = None
        self._spare = None  # (its channel ends with the link)
        if self._link is not None:
            self._link.close()
            self._link = None


@contextlib.contextmanager
def _remote_errors(path: str) -> Iterator[None]:
    """Name the remote path in SFTP status errors (paramiko raises them without a file name)."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None and exc.errno in (errno.ENOENT, errno.EACCES, errno.EISDIR):
            raise type(exc)(exc.errno, os.strerror(exc.errno), path) from exc
        raise


def _log_rate(verb: str, host: str, path: PurePosixPath, size: int, seconds: float) -> None:
    rate = size / seconds / 1e6 if seconds > 0 else float("inf")
    logger.debug("%s: %s %s, %d bytes in %.3f s (%.1f MB/s)", host, verb, path, size, seconds, rate)
