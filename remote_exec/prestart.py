"""Starting an ``rx run``'s SSH master within milliseconds of the interpreter's start.

A first ``rx run`` (no shared master up: the last one ended ``ControlPersist`` seconds after its last use)
spends most of its time in ``ssh``'s own connection: TCP, the key exchange, authentication. Working out
which ``ssh`` to start takes rx ~30 ms before that (its imports, the project's configuration, ``ssh -G``),
and the master started that much later is up that much later. So the OpenSSH backend remembers, per
command line, working directory and environment, the command that opened (or found) its shared master
(:func:`remember`, in a memo in rx's cache directory), and ``rx run`` starts that very command as its first
act (:func:`start`, from :func:`remote_exec.cli.main`), before it imports anything else. The first ``@task``
call of a process does the same for its host and options (from :func:`remote_exec.api.run_task`), before
it imports rx's configuration.

It is a guess, and it is never trusted:

* The memo is used only when the files it was made from are unchanged (the project's ``pyproject.toml``,
  the ssh_config files), and only when no master answers at its socket already (a second ``rx run`` adopts
  that one, as always).
* The guessed master listens at a socket of its own (``p-...`` beside the shared ones), a name no other
  process looks for. The backend works out its master as it always does (the configuration, ``ssh -G``,
  the socket named by the settings), and only when that gives the very same command does it take the
  guessed one (:func:`take`): it waits for it and renames its socket to the shared name, holding the
  shared socket's lock from before the guess started to after the rename. Otherwise, or when nothing
  takes it before the process ends, the guessed master is stopped (:func:`abandon`).

So a stale memo costs one wasted connection, never a session over a master opened with other settings.

The paramiko backend has no master to start: it notes the host's address instead (:func:`remember_dial`),
and the head start is a TCP connection to it, made on a thread of its own (:class:`Dialed`) while the
interpreter imports rx and paramiko. sshd forks and re-executes itself for a new connection before it
sends its banner (~17 ms on the testbed); that now happens meanwhile. The backend uses the connection
only for that very address (:func:`take_dial`): everything after the TCP handshake (the host key check,
authentication) is as without it.

The memo holds no secret: host aliases, paths and ssh options, keyed by a digest. POSIX only, as the
OpenSSH backend is; this module imports nothing that is not already loaded by a bare interpreter but
``marshal``, ``fcntl``, ``_socket`` and ``_sha256``, so the guessed ``ssh`` starts ~3 ms after
``python`` does.
"""

from __future__ import annotations

import _thread
import marshal
import os
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

__all__ = ["Dialed", "Prestarted", "abandon", "answers", "exit_master", "memo_key", "memo_path", "pending", "remember",
           "remember_dial", "runtime_dir", "start", "take", "take_dial"]

#: Bumped when the memo's layout changes (an older memo is then ignored).
_VERSION = 1
#: Entries kept (the most recently written; one per command line, directory and environment).
_KEEP = 32
#: Environment variables that may change which master a command line leads to.
_ENVIRON = ("HOME", "USER", "LOGNAME", "PATH", "XDG_RUNTIME_DIR", "XDG_CACHE_HOME", "XDG_CONFIG_HOME")

Stamp = tuple[object, ...]  # (path, mtime_ns, size, inode), or (path,) for a file that did not exist

_pending: Prestarted | None = None
_dialed: Dialed | None = None
#: The first word of a memo entry that is an address to dial (paramiko), not an ``ssh`` to start.
_DIAL = "tcp"
#: Held while a head start is decided (two threads making a process's first calls at once start one).
_starting = _thread.allocate_lock()


#: Unix socket paths are limited to 104 (macOS) / 108 (Linux) bytes; ssh adds a 17-byte temporary suffix.
_MAX_DIR = 60


def runtime_dir() -> str | None:
    """rx's private directory for its sockets (the shared SSH masters', the rx server's): made if missing,
    and used only when it is a real directory (no symlink) of this user that nobody else may enter;
    ``$XDG_RUNTIME_DIR/rx-ssh`` when that is set and short, else ``/tmp/rx-ssh-<uid>``. None when neither is
    safe."""
    import stat

    runtime = os.environ.get("XDG_RUNTIME_DIR")
    candidates = [os.path.join(runtime, "rx-ssh")] if runtime and os.path.isabs(runtime) else []
    candidates.append(os.path.join("/tmp", f"rx-ssh-{os.getuid()}"))
    for path in candidates:
        if len(path) > _MAX_DIR:
            continue
        try:
            os.mkdir(path, 0o700)
        except OSError:
            pass
        try:
            info = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o077:
            return path
    return None


def memo_path(environ: dict[str, str] | os._Environ[str] | None = None) -> str:
    """The memo's file: ``ssh-masters.memo`` in rx's cache directory (``RX_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/remote_exec``, else ``~/.cache/remote_exec``)."""
    env = os.environ if environ is None else environ
    base = env.get("RX_CACHE_DIR") or os.path.join(
        env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "remote_exec")
    return os.path.join(base, "ssh-masters.memo")


def memo_key(words: dict[str, str], cwd: str | None = None,
             environ: dict[str, str] | os._Environ[str] | None = None) -> str:
    """The memo's key for an ``rx run`` line's host options (:func:`remote_exec.cli.words.peek_run`'s
    ``remote``, ``backend``, ``ssh_config``), or a ``@task``'s (the same, and under ``task`` its other
    connection options), run in ``cwd`` with ``environ``: a digest of them, the Python that runs rx, and
    the environment variables that rx reads (``RX_*``) or that name the user's files."""
    env = os.environ if environ is None else environ
    named = sorted((name, value) for name, value in env.items() if name.startswith("RX_") or name in _ENVIRON)
    parts = (_VERSION, sys.executable, cwd if cwd is not None else os.getcwd(),
             words.get("remote", ""), words.get("backend", ""), words.get("ssh_config", ""), words.get("task", ""),
             tuple(named))
    return _digest(marshal.dumps(parts, 2))  # (version 2: equal values, equal bytes; 3+ marks shared objects)


def _digest(data: bytes) -> str:
    try:
        import _sha256 as module  # type: ignore[import-not-found]  # ~0.5 ms; hashlib (~3 ms) only where Python was built without it
    except ImportError:  # pragma: no cover
        import hashlib as module
    digest: str = module.sha256(data).hexdigest()
    return digest


def stamp(path: str) -> Stamp:
    """What :func:`remember` notes of a file the master's command was worked out from."""
    try:
        info = os.stat(path)
    except OSError:
        return (path,)
    return (path, info.st_mtime_ns, info.st_size, info.st_ino)


def _load(path: str) -> dict[str, tuple[tuple[Stamp, ...], str, tuple[str, ...]]]:
    """The memo's entries; none unless the file is this user's and nobody else may write it (its
    commands are run as they are)."""
    try:
        with open(path, "rb") as file:
            info = os.fstat(file.fileno())
            if info.st_uid != os.getuid() or info.st_mode & 0o022:
                return {}
            version, entries = marshal.loads(file.read())
    except Exception:  # missing, unreadable, truncated, another layout: no memo
        return {}
    if version != _VERSION or not isinstance(entries, dict):
        return {}
    return entries


def remember(key: str, files: Sequence[str], control_path: str, argv: Sequence[str]) -> None:
    """Note that ``rx run`` lines of ``key`` lead to the shared master at ``control_path``, opened by
    ``argv``, as worked out from ``files`` as they are now. Best effort: a cache."""
    _end_orphans(os.path.dirname(control_path))
    _store(key, (tuple(stamp(file) for file in dict.fromkeys(files)), control_path, tuple(argv)))


def remember_dial(key: str, files: Sequence[str], hostname: str, port: int, timeout: float) -> None:
    """Note that lines of ``key`` connect (paramiko) to ``hostname:port`` with ``timeout`` seconds to
    connect, as worked out from ``files`` as they are now. Best effort: a cache."""
    _store(key, (tuple(stamp(file) for file in dict.fromkeys(files)), "", (_DIAL, hostname, str(port), repr(timeout))))


def _store(key: str, entry: tuple[tuple[Stamp, ...], str, tuple[str, ...]]) -> None:
    path = memo_path()
    entries = _load(path)
    if entries.get(key) == entry and next(reversed(entries)) == key:
        return  # unchanged, and the latest: the oldest go first when there are too many
    entries.pop(key, None)
    entries[key] = entry
    while len(entries) > _KEEP:
        entries.pop(next(iter(entries)))
    write_private(path, marshal.dumps((_VERSION, entries)))


def write_private(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` at once (a temporary file renamed), readable by this user alone, its
    folder made (0700) if missing. Best effort, for rx's caches: a failure leaves the old file and no
    temporary."""
    temporary = f"{path}.{os.getpid()}.{_thread.get_ident()}.tmp"  # (two threads may write one file)
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except OSError:
        try:
            os.unlink(temporary)
        except OSError:
            pass


def _end_orphans(folder: str) -> None:
    """End the masters started from the memo by an rx that was killed before it took or stopped its own
    (``p-<pid>-...`` of a pid that is gone): nobody else uses their sockets."""
    try:
        names = [name for name in os.listdir(folder) if name.startswith("p-")]
    except OSError:
        return
    for name in names:
        try:
            os.kill(int(name.split("-")[1]), 0)
            continue  # its rx is alive (or the pid was reused: then its ControlPersist ends it)
        except ProcessLookupError:
            pass
        except (ValueError, IndexError, OSError):
            continue
        _end_master(os.path.join(folder, name), "orphan")


def _end_master(path: str, host: str) -> None:
    """End the master listening at ``path``, if one does, and remove its socket."""
    if answers(path):
        exit_master(path, host)
    try:
        os.unlink(path)
    except OSError:
        pass


def exit_master(path: str, host: str) -> bool:
    """``ssh -S PATH -O exit -- HOST``: end the master at ``path`` now; True when it went (also
    :func:`remote_exec.backends.controlpath.end_master`)."""
    import subprocess

    try:
        done = subprocess.run(["ssh", "-S", path, "-O", "exit", "--", host], stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def answers(path: str, timeout: float = 2.0) -> bool:
    """A master listens at ``path``: a connection to it is accepted (a dead master's socket refuses).
    Through ``_socket``, loaded with the interpreter (``socket`` costs ~6 ms); it is also
    :func:`remote_exec.backends.controlpath.socket_answers`."""
    import _socket

    client = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    client.settimeout(timeout)
    try:
        client.connect(path)
    except OSError:
        return False
    finally:
        client.close()
    return True


class Prestarted:
    """A master's ``ssh`` started from the memo: its pid (the leader of a session of its own), the shared
    socket's lock (held), the file its stderr goes to, the socket it listens at, and the command it was
    started as (with the shared socket's name, as the backend would have started it).

    It ends once, by :meth:`adopt` or :meth:`discard` (the backend's connect thread, or :func:`abandon` at
    exit, whichever comes first: a reentrant lock orders them)."""

    def __init__(self, pid: int, lock_fd: int, log_fd: int, control_path: str, listens: str,
                 argv: tuple[str, ...]) -> None:
        self.pid = pid
        self.lock_fd = lock_fd
        self.log = open(log_fd, "w+b")  # noqa: SIM115 - read once the ssh ended, closed by release()
        self.control_path = control_path
        self.listens = listens
        self.argv = argv
        self.returncode: int | None = None
        self.owner = os.getpid()
        self.taken = False  # by the backend, whose own working out gave this very command
        self.finished = False
        self._lock = _thread.RLock()

    def _reap(self) -> None:
        with self._lock:
            if self.returncode is None:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)

    def wait(self, timeout: float) -> int:
        """The exit status of the ``ssh`` (0 once its master is up and backgrounded), within ``timeout``
        seconds; raises ``subprocess.TimeoutExpired`` after that."""
        deadline = time.monotonic() + timeout
        delay = 0.0005
        while True:
            self._reap()
            if self.returncode is not None:
                return self.returncode
            if time.monotonic() > deadline:
                import subprocess

                raise subprocess.TimeoutExpired(self.argv, timeout)
            time.sleep(delay)
            delay = min(delay * 2, 0.004)

    def kill(self) -> None:
        """Stop the ``ssh`` while it is still connecting (it and what it started share a process group)."""
        with self._lock:
            if self.returncode is None:
                try:
                    os.killpg(self.pid, 9)
                except OSError:
                    pass
                try:
                    self.wait(5)
                except Exception:
                    pass

    def adopt(self) -> None:
        """The master is up and is the one the backend would have opened: give it the shared socket's name
        (under the lock, which this releases)."""
        with self._lock:
            if not self.finished:
                self.finished = True
                os.replace(self.listens, self.control_path)
                self.release()

    def release(self) -> None:
        """Release the shared socket's lock and close the log."""
        with self._lock:
            if self.lock_fd >= 0:
                os.close(self.lock_fd)
                self.lock_fd = -1
            self.log.close()

    def discard(self) -> None:
        """Stop the master, whether it is still connecting or came up (then it runs on in a session of its
        own, as ``ControlPersist`` makes it: ``ssh -O exit`` ends it), and remove what it left."""
        with self._lock:
            if self.finished:
                return
            self.finished = True
            self.kill()
            _end_master(self.listens, self.argv[-1])
            self.release()

    def finish(self) -> None:
        """At exit: a master the backend took and that is up gets the shared name (the next rx uses it, as
        it would one the backend started itself); anything else, still connecting or never taken, is
        stopped."""
        with self._lock:
            if self.finished:
                return
            self._reap()
            if self.taken and self.returncode is None and answers(self.listens):
                try:  # its socket listens a moment before the ssh that started it exits (into the background)
                    self.wait(1.0)
                except Exception:
                    pass
            if self.taken and self.returncode == 0 and answers(self.listens):
                self.adopt()
            else:
                self.discard()


def start(words: dict[str, str]) -> str | None:
    """Start the master the memo names for this ``rx run`` line or ``@task`` (``words``: see
    :func:`memo_key`; the module says when), once per process. Never raises: it is only a head start.
    Returns the memo's key of ``words``, for the backend to note its master under (None when it cannot
    be worked out: the working directory is gone)."""
    try:
        key = memo_key(words)
    except Exception:
        return None
    if os.name == "posix":
        with _starting:
            _start(key)
    return key


def _start(key: str) -> None:
    global _pending
    if _pending is not None:
        return
    try:
        entry = _load(memo_path()).get(key)
        if entry is None:
            return
        stamps, control_path, argv = entry
        if any(stamp(str(item[0])) != tuple(item) for item in stamps):
            return
        if argv[:1] == (_DIAL,) and len(argv) == 4:
            _dial(argv[1], int(argv[2]), float(argv[3]))
            return
        if argv[:1] != ("ssh",):
            return
        if answers(control_path):  # a master is up: the run adopts it, as always
            return
        _pending = _spawn(control_path, argv)
    except Exception:  # only a head start: the run connects as it always does
        _pending = None
        return
    import atexit

    atexit.register(abandon)


def _spawn(control_path: str, argv: tuple[str, ...]) -> Prestarted | None:
    import fcntl

    opened: list[int] = []
    try:
        lock_fd = os.open(f"{control_path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        opened.append(lock_fd)
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another rx opening it: leave it to that one
        if answers(control_path):
            return None
        try:
            os.unlink(control_path)  # a stale socket: its master ended
        except FileNotFoundError:
            pass
        listens = os.path.join(os.path.dirname(control_path), f"p-{os.getpid()}-{time.monotonic_ns() % 10**8}")
        log_fd = os.open(f"{listens}.log", os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        opened.append(log_fd)
        os.unlink(f"{listens}.log")  # anonymous: a killed rx leaves nothing behind
        spawned = list(argv)
        spawned[argv.index("-S", argv.index("-M")) + 1] = listens
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        opened.append(null)
        pid = os.posix_spawnp(argv[0], spawned, os.environ, setsid=True, file_actions=[
            (os.POSIX_SPAWN_DUP2, null, 0), (os.POSIX_SPAWN_DUP2, null, 1), (os.POSIX_SPAWN_DUP2, log_fd, 2)])
        os.close(opened.pop())
        prestarted = Prestarted(pid, lock_fd, log_fd, control_path, listens, tuple(argv))
        opened.clear()
        return prestarted
    finally:
        for fd in opened:
            os.close(fd)


def take(control_path: str, argv: Sequence[str]) -> Prestarted | None:
    """The master started from the memo when it is the one the backend would open at ``control_path``
    with ``argv`` (the caller waits for it, then :meth:`Prestarted.adopt` or :meth:`Prestarted.discard`);
    else None, and a master started from the memo for anything else is stopped."""
    started = _pending
    if started is None or started.taken:
        return None
    if started.control_path == control_path and started.argv == tuple(argv):
        started.taken = True
        return started
    started.discard()  # a memo made for other settings (rare: they changed since)
    return None


class Dialed:
    """A TCP connection to ``hostname:port`` made on a thread of its own, as ``socket.create_connection``
    makes one (each address in turn, ``timeout`` seconds each), for :func:`take_dial`."""

    def __init__(self, hostname: str, port: int, timeout: float) -> None:
        self.hostname, self.port, self.timeout = hostname, port, timeout
        self.owner = os.getpid()
        self.sock: Any = None  # the connected _socket.socket, once made
        self.error: BaseException | None = None
        self.abandoned = False
        self._state = _thread.allocate_lock()  # orders the connection's arrival and close()
        self._done = _thread.allocate_lock()
        self._done.acquire()
        _thread.start_new_thread(self._connect, ())

    def _connect(self) -> None:
        import _socket

        made = None
        error: BaseException | None = None
        try:
            for family, kind, proto, _name, address in _socket.getaddrinfo(self.hostname, self.port, 0,
                                                                           _socket.SOCK_STREAM):
                sock = _socket.socket(family, kind, proto)
                try:
                    sock.settimeout(self.timeout)
                    sock.connect(address)
                except OSError as exc:
                    sock.close()
                    error = exc
                    continue
                made, error = sock, None
                break
            else:
                error = error or OSError(f"no address for {self.hostname}")
        except BaseException as exc:  # getaddrinfo's gaierror, or the interpreter ending
            error = exc
        finally:
            with self._state:
                if made is not None and self.abandoned:
                    made.close()
                    made = None
                self.sock, self.error = made, error
            self._done.release()

    def wait(self) -> bool:
        """Wait for the connection to be made or to fail (at most ``timeout`` and a second); True when it is
        done."""
        if self._done.acquire(timeout=self.timeout + 1.0):
            self._done.release()
            return True
        return False

    def close(self) -> None:
        """Close the connection, without waiting for it: one still being made is closed as it arrives."""
        with self._state:
            self.abandoned = True
            if self.sock is not None:
                self.sock.close()
                self.sock = None


def _dial(hostname: str, port: int, timeout: float) -> None:
    global _dialed
    if _dialed is not None:
        return
    _dialed = Dialed(hostname, port, timeout)
    import atexit

    atexit.register(abandon)


def take_dial(hostname: str, port: int, timeout: float) -> Any:
    """The connection made from the memo when it is to ``hostname:port`` with this ``timeout`` (waited for,
    once made: a ``socket.socket``), else None (a connection to anything else is closed). Raises what the
    connection failed with when that was a timeout (the host did not answer: trying again would double
    the wait); after any other failure (refused: sshd may be up now) the caller connects itself."""
    global _dialed
    dialed = _dialed
    if dialed is None or dialed.owner != os.getpid():
        return None
    _dialed = None
    if (dialed.hostname, dialed.port, dialed.timeout) != (hostname, port, timeout):
        dialed.close()
        return None
    if not dialed.wait():
        dialed.close()
        raise TimeoutError(f"timed out connecting to {hostname}:{port}")
    with dialed._state:
        raw, dialed.sock = dialed.sock, None
    if raw is None:
        if isinstance(dialed.error, TimeoutError):
            raise dialed.error
        return None
    import socket

    sock = socket.socket(fileno=raw.detach())
    sock.settimeout(timeout)  # (the descriptor is non-blocking already, as a timeout makes it)
    return sock


def pending() -> bool:
    """A master started from the memo waits to be taken (see :func:`take`)."""
    return _pending is not None and not _pending.taken and not _pending.finished


def abandon() -> None:
    """At exit (not in a forked child): end the master started from the memo, see
    :meth:`Prestarted.finish`."""
    global _pending, _dialed
    started = _pending
    if started is not None and started.owner == os.getpid():
        _pending = None
        started.finish()
    dialed = _dialed
    if dialed is not None and dialed.owner == os.getpid():
        _dialed = None
        dialed.close()
