"""Where the OpenSSH backend's shared masters listen, and how an ``rx`` finds one that another left.

One master per host and set of connection settings serves every ``rx`` of the user for as long as it is in
use, then ``ControlPersist`` seconds more (``RX_SSH_PERSIST``, default 300; 0: a master per process,
stopped when it exits). A second ``rx run`` within that window skips the TCP connection, the key exchange
and the authentication: it starts as a client of the master (~10 ms instead of ~200 ms).

* **A private directory.** ``$XDG_RUNTIME_DIR/rx-ssh`` when that is set and short, else
  ``/tmp/rx-ssh-<uid>``: created mode 0700, and used only when it is a real directory (no symlink) owned by
  this user and closed to others; otherwise the backend falls back to a master per process in a
  ``mkdtemp`` directory. Nobody else can connect to a socket in it, so nobody else can run commands
  through a master of ours.
* **The socket's name is a digest of the connection's settings**: everything ``ssh -G`` resolved for the
  host (HostName, Port, User, IdentityFile, ProxyJump, known_hosts ...) and the options rx adds. A changed
  ssh_config or another ``--ssh-config``, identity or host-key policy names another master; nothing is
  ever sent through a master opened for other settings.
* **Alive before use.** A socket that accepts a connection belongs to a running master; one that refuses
  (its master ended: idle timeout, the link dropped) is stale and removed before a new master takes its
  place. Two ``rx`` that connect at the same moment take ``<socket>.lock`` (``flock``) in turn: the second
  finds the first one's master and uses it.
* **Never the user's own masters**, unless their ssh_config asks for them: a host whose ssh_config sets
  ``ControlMaster`` (not ``no``) and a ``ControlPath`` whose master answers is reached through that master,
  which rx then never stops.

POSIX only, as the OpenSSH backend is.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..prestart import answers, exit_master, runtime_dir

__all__ = ["DEFAULT_PERSIST", "SharedMaster", "end_master", "label_master", "master_lock", "persist_seconds",
           "private_dir", "shared_masters", "socket_answers", "socket_name"]

logger = logging.getLogger(__name__)

DEFAULT_PERSIST = 300
"""Seconds an idle shared master stays up (``ControlPersist``), unless ``RX_SSH_PERSIST`` says otherwise."""

def persist_seconds(environ: dict[str, str] | None = None) -> int:
    """``RX_SSH_PERSIST`` (seconds; 0: a master per process), else :data:`DEFAULT_PERSIST`."""
    value = (os.environ if environ is None else environ).get("RX_SSH_PERSIST", "").strip()
    if not value:
        return DEFAULT_PERSIST
    try:
        seconds = int(value)
    except ValueError:
        logger.warning("RX_SSH_PERSIST=%r is not a number of seconds; using %d", value, DEFAULT_PERSIST)
        return DEFAULT_PERSIST
    return max(0, seconds)


def private_dir() -> Path | None:
    """The user's directory for shared control sockets (made if missing), or None when none is safe
    (:func:`remote_exec.prestart.runtime_dir`)."""
    found = runtime_dir()
    if found is None:
        logger.debug("no private directory of this user for shared ssh masters: a master per process")
        return None
    return Path(found)


def socket_name(settings: Sequence[str]) -> str:
    """The socket's file name for a connection with these settings (a digest: short and opaque)."""
    digest = hashlib.sha256("\0".join(settings).encode("utf-8", "surrogateescape")).hexdigest()
    return f"m-{digest[:20]}"


def socket_answers(path: Path, timeout: float = 2.0) -> bool:
    """A master listens on ``path``: a connection to it is accepted (a dead master's socket refuses)."""
    return answers(str(path), timeout)


@contextlib.contextmanager
def master_lock(path: Path, deadline: float) -> Iterator[None]:
    """Hold ``<path>.lock`` (``flock``) while a master for ``path`` is looked for or opened; waits for
    another process that is opening it, at most ``deadline`` seconds (then goes on without the lock:
    the worst case is a master that ssh refuses to bind beside another, and a second connection)."""
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        until = time.monotonic() + deadline
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN) or time.monotonic() > until:
                    logger.debug("no lock on %s.lock: %s", path, exc)
                    break
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)  # releases the lock


def label_master(path: Path, host: str, destination: str) -> None:
    """Note which host a shared master at ``path`` reaches (in its lock file), for ``rx hosts --disconnect``."""
    with contextlib.suppress(OSError):
        Path(f"{path}.lock").write_text(f"{host}\t{destination}\n", encoding="utf-8")


@dataclass(frozen=True)
class SharedMaster:
    """A shared master that answers: its socket, the host as rx was asked for it, and where it leads."""

    socket: Path
    host: str
    destination: str


def shared_masters() -> list[SharedMaster]:
    """The shared masters of this user that are up (stale sockets are skipped)."""
    root = private_dir()
    if root is None:
        return []
    found = []
    for path in sorted(root.glob("m-*")):
        if path.name.endswith(".lock") or not socket_answers(path, timeout=0.5):
            continue
        try:
            host, _, destination = Path(f"{path}.lock").read_text(encoding="utf-8").strip().partition("\t")
        except OSError:
            host, destination = "?", "?"
        found.append(SharedMaster(path, host or "?", destination or "?"))
    return found


def end_master(master: SharedMaster) -> bool:
    """End a shared master now (``ssh -O exit``); True when it went."""
    return exit_master(str(master.socket), master.host)
