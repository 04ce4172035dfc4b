"""A resident rx: the next ``rx`` command starts in milliseconds, not in the time its imports take.

Most of a short ``rx`` command's time is the interpreter importing rx and what it is built on (typer, the
coordinator, the backends, paramiko: ~150-250 ms on a laptop-class CPU, more than a whole run over a live
SSH master). So, as OpenSSH keeps its master ``ControlPersist`` seconds for the next ``ssh``, rx keeps one
process with all of that imported, the *server*, for the next ``rx``:

* **Started after a command, never before one.** An ``rx`` command that found no server runs as always,
  in its own process, and when it has ended (its output written, its status known) it starts one in the
  background (:func:`spawn`): the imports then cost nothing anybody waits for.
* **The next command is a client** (:func:`delegate`, the first thing :func:`remote_exec.cli.main` does):
  it connects to the server's socket and hands over its command line, working directory, environment,
  umask and its standard streams themselves (the descriptors, over the socket: ``SCM_RIGHTS``). The server
  forks a *worker*, which takes them as its own and runs the very same :func:`remote_exec.cli.main` as the
  client would have: same output, same files, same exit status (the client exits with it). The client
  forwards the signals a terminal or a supervisor sends to the worker: Ctrl-C, ``SIGTERM``, ``SIGHUP``,
  ``SIGQUIT``, a resized window, and Ctrl-Z / ``fg`` (the worker is stopped and continued with the client).
  A client killed outright (``SIGKILL``) is noticed by its worker, which then stops as on ``SIGTERM``.
* **Only for the same rx, Python and environment.** The socket's name is a digest of the interpreter
  (``sys.executable``, its version and flags, ``sys.path``), every file of the ``remote_exec`` package (name,
  size, modification time; unless it is installed in a ``site-packages``), the ``site-packages`` folders on
  ``sys.path`` (installing, upgrading or removing a package changes them), the user, and the environment but
  the variables a shell changes from one command to the next (``PWD``, ``OLDPWD``, ``_``, ``SHLVL``,
  ``COLUMNS``, ``LINES``), and what else a process inherits (:func:`_surroundings`: resource limits,
  priority, CPU affinity, cgroup, namespaces). Anything else changed, another server is started for it; an
  old one is not used again and ends after its idle time. A signal the client ignores (``nohup``) is not
  forwarded, and its worker ignores it too; the runs a worker records name the client's pid beside its own
  (:data:`remote_exec.workspace.manager.client_pid`), and messages show that one.
* **Private.** The socket is in rx's private runtime directory (:func:`remote_exec.prestart.runtime_dir`:
  mode 0700, this user's, the one the shared SSH masters use), and on Linux the server also checks the
  peer's uid. What travels is the environment of the user's own command, over a Unix socket between two of
  their processes: nothing is written to disk, and no process list shows it.
* **Ends by itself** ``RX_SERVER`` seconds (default :data:`DEFAULT_PERSIST`) after its last command, when
  its socket is removed or replaced, or on ``SIGTERM``; ``python -m remote_exec.cli.server stop`` ends the
  user's servers now. ``RX_SERVER=0`` turns it off: every command then runs in its own process, as before.
* **Never in the way.** A server that does not answer within :data:`_TAKE_TIMEOUT` is given up: the worker,
  if one comes later, sees its client gone and runs nothing, and the command runs in the client's process.
  The client hands its streams over only once the worker has answered, so none is left open in the socket
  of a server that does not take them (a ``| less`` would wait for their end). A background job of a
  terminal (``rx run job.py &``, stdin the terminal) runs in its own process: a worker is in no job of that
  terminal, so a script reading it would take the keys typed to the shell instead of being stopped.
  Shell completion (which looks at the parent process) never goes through the server.

POSIX only (Unix sockets passing descriptors: Linux and macOS). This module is imported by every ``rx``
command before anything else, so it imports nothing that a bare interpreter has not loaded but ``marshal``,
``_socket``, ``_signal`` and ``_sha256``.
"""

from __future__ import annotations

import marshal
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, NoReturn

__all__ = ["DEFAULT_PERSIST", "delegate", "enabled", "persist_seconds", "serve", "server_key", "servers", "spawn",
           "stop_all"]

#: Bumped when the request or the digest changes (a client then never talks to an older server).
_VERSION = 2
#: Seconds an idle server stays, unless ``RX_SERVER`` says otherwise (the SSH masters' default).
DEFAULT_PERSIST = 300
#: Seconds a client waits for the server's worker before it runs the command itself.
_TAKE_TIMEOUT = 5.0
#: Environment variables a shell changes between two commands: not part of the server's digest.
_VOLATILE = frozenset({"PWD", "OLDPWD", "_", "SHLVL", "COLUMNS", "LINES"})
#: The folders packages are installed in: a change of what is installed there changes the folder.
_SITE = ("site-packages", "dist-packages")
#: Signals a client passes on to its worker (Ctrl-Z and ``fg`` are handled apart).
_FORWARDED = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGWINCH", "SIGUSR1", "SIGUSR2")

#: Set in a worker: the command runs here, and no other server is asked or started.
_in_worker = False
#: The digest, socket and environment a command that found no server starts one with, at its end (:func:`spawn`).
_wanted: tuple[str, str, dict[str, str]] | None = None


def persist_seconds(environ: dict[str, str] | os._Environ[str] | None = None) -> int:
    """``RX_SERVER`` as seconds (0: no server; unset, empty or not a number: :data:`DEFAULT_PERSIST`)."""
    value = (os.environ if environ is None else environ).get("RX_SERVER", "").strip().lower()
    if value in ("0", "off", "no", "false"):
        return 0
    try:
        return max(0, int(value))
    except ValueError:
        return DEFAULT_PERSIST


def enabled(argv: list[str]) -> bool:
    """Whether the command line ``argv`` (without the program) may go through a server."""
    if os.name != "posix" or _in_worker or not persist_seconds():
        return False
    if any(name.startswith("_RX_COMPLETE") or name == "_TYPER_COMPLETE_ARGS" for name in os.environ):
        return False  # completion: its shell is found from the parent process
    return not any(word in ("--install-completion", "--show-completion") for word in argv)


def server_key(environ: dict[str, str] | os._Environ[str] | None = None) -> str:
    """The digest that names the server for this interpreter, rx's code and ``environ`` (see the module)."""
    env = os.environ if environ is None else environ
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code: list[tuple[str, int, int]] = []
    if os.path.basename(os.path.dirname(package)) not in _SITE:  # (installed: its site-packages tells)
        _scan(package, "", code)
    folders = []  # installing, upgrading or removing a package changes its folder (not so the script's own)
    for entry in sys.path:
        if os.path.basename(entry.rstrip("/")) in _SITE:
            try:
                folders.append((entry, os.stat(entry).st_mtime_ns))
            except OSError:
                folders.append((entry, 0))
    parts = (_VERSION, sys.executable, sys.version, tuple(sys.flags), tuple(sys.warnoptions),
             tuple(sorted((str(k), str(v)) for k, v in sys._xoptions.items())), tuple(folders), tuple(code),
             os.getuid(), tuple(sorted((k, v) for k, v in env.items() if k not in _VOLATILE)), _surroundings())
    try:
        import _sha256 as module  # type: ignore[import-not-found]  # hashlib takes ~3 ms to import
    except ImportError:  # pragma: no cover
        import hashlib as module
    digest: str = module.sha256(marshal.dumps(parts, 2)).hexdigest()  # (2: no back-references, equal bytes)
    return digest[:24]


def _surroundings() -> tuple[Any, ...]:
    """What a process inherits beside its environment and a server's worker would not share with its client:
    the resource limits (``ulimit``), the scheduling priority (``nice``), the CPUs it may run on
    (``taskset``), its cgroup (``systemd-run --scope``) and its namespaces (``unshare``, a container). A
    server has its first client's (it is spawned by it), so a command started in other surroundings gets a
    server of its own."""
    found: list[Any] = []
    try:
        with open("/proc/self/limits", "rb") as limits:  # (Linux: ~1 ms less than importing resource)
            found.append(limits.read())
    except OSError:
        import resource

        found.append(tuple(resource.getrlimit(getattr(resource, name)) for name in sorted(dir(resource))
                           if name.startswith("RLIMIT_")))
    for probe in (lambda: os.getpriority(os.PRIO_PROCESS, 0), lambda: tuple(sorted(os.sched_getaffinity(0)))):
        try:
            found.append(probe())
        except (AttributeError, OSError):
            found.append(None)
    try:
        with open("/proc/self/cgroup", "rb") as cgroup:
            found.append(cgroup.read())
    except OSError:
        found.append(None)
    for kind in ("mnt", "net", "pid", "user", "ipc", "uts", "cgroup"):
        try:
            found.append(os.stat(f"/proc/self/ns/{kind}").st_ino)
        except OSError:
            found.append(None)
    return tuple(found)


def _scan(folder: str, prefix: str, into: list[tuple[str, int, int]]) -> None:
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name == "__pycache__":
                continue
            if entry.is_dir(follow_symlinks=False):
                _scan(entry.path, f"{prefix}{entry.name}/", into)
            else:
                info = entry.stat()
                into.append((prefix + entry.name, info.st_mtime_ns, info.st_size))


def _socket_path(key: str) -> str | None:
    from ..prestart import runtime_dir

    folder = runtime_dir()
    return None if folder is None else os.path.join(folder, f"rx-{key}")


# --- the client -----------------------------------------------------------------------------------------------


def delegate(argv: list[str]) -> None:
    """Run the command ``argv`` (without the program) in a server's worker and end the process with its
    status; return at once when no server may or does take it (the caller runs it, and :func:`spawn` at its
    end starts a server for the next command)."""
    global _wanted
    if not enabled(argv):
        return
    try:
        for fd in (0, 1, 2):  # (one closed: the socket would take its number, and be handed over as it)
            os.fstat(fd)
        if os.isatty(0) and os.tcgetpgrp(0) != os.getpgrp():
            return  # a background job of a terminal: only in its own process does reading it stop the job
        environ = dict(os.environ)
        key = server_key(environ)
        path = _socket_path(key)
        ignored = _ignored()
    except Exception:  # a package folder that cannot be listed, no private directory: no server
        return
    if path is None:
        return
    import _socket

    client = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        client.settimeout(_TAKE_TIMEOUT)
        client.connect(path)
        _send_request(client, argv, environ, ignored)
        pid = _read_pid(client)
    except OSError:  # no server (none yet, or its idle time is over), or it did not answer in time
        client.close()
        _wanted = (key, path, environ)
        return
    except KeyboardInterrupt:  # Ctrl-C before anything ran (the worker, if any, sees this process go)
        sys.stderr.write("rx: error: interrupted\n")
        os._exit(130)
    client.settimeout(None)
    _wait_for_worker(client, pid, ignored)


def _send_request(client: Any, argv: list[str], environ: dict[str, str], ignored: list[int]) -> None:
    umask = os.umask(0o022)
    os.umask(umask)
    payload = marshal.dumps((_VERSION, sys.argv[0], list(argv), os.getcwd(), environ, umask, os.getpid(),
                             ignored))
    client.sendall(len(payload).to_bytes(4, "big") + payload)


def _ignored() -> list[int]:
    """The signals of :data:`_FORWARDED` this process ignores (``nohup``; SIGINT in a background job of a
    script): not forwarded, and ignored by the worker too, as they would be by rx in this process."""
    import _signal  # type: ignore[import-not-found]

    numbers = (getattr(_signal, name, None) for name in _FORWARDED if name != "SIGTERM")  # (rx handles SIGTERM)
    return [number for number in numbers if number is not None and _signal.getsignal(number) == _signal.SIG_IGN]


def _go(client: Any) -> None:
    """Tell the worker to run the command, and hand it this process's standard streams (only now: streams
    in flight to a server that never takes them would stay open, and a reader of them would never see
    their end)."""
    import _socket

    fds = b"".join(fd.to_bytes(4, sys.byteorder, signed=True) for fd in (0, 1, 2))
    client.sendmsg([b"G"], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])


def _read_pid(client: Any) -> int:
    data = _read_exactly(client, 5)
    if data[:1] != b"P":
        raise OSError("the rx server sent no worker")
    return int.from_bytes(data[1:], "big")


def _read_exactly(conn: Any, size: int) -> bytes:
    """``size`` bytes from the socket ``conn`` (raises OSError if it ends before)."""
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise OSError("the other side closed the connection")
        data += chunk
    return data


def _wait_for_worker(client: Any, pid: int, ignored: list[int]) -> NoReturn:
    """Let the worker ``pid`` run the command (:func:`_go`), forward signals to it (but the ``ignored``
    ones, see :func:`_ignored`) until it reports its status, end the process with that status."""
    import _signal

    last: list[int] = []

    def forward(signum: int, frame: object) -> None:
        last.append(signum)
        try:
            os.kill(pid, signum)
        except OSError:
            pass

    def suspend(signum: int, frame: object) -> None:  # Ctrl-Z: stop the worker, then stop here
        try:
            os.kill(pid, _signal.SIGSTOP)
        except OSError:
            pass
        _signal.signal(_signal.SIGTSTP, _signal.SIG_DFL)
        os.kill(os.getpid(), _signal.SIGTSTP)
        _signal.signal(_signal.SIGTSTP, suspend)  # (fg: here again)
        try:
            os.kill(pid, _signal.SIGCONT)
        except OSError:
            pass

    for name in _FORWARDED:
        number = getattr(_signal, name, None)
        if number is not None and number not in ignored:
            _signal.signal(number, forward)
    _signal.signal(_signal.SIGTSTP, suspend)
    try:
        _go(client)  # the worker runs the command only after this: never twice
        data = _read_exactly(client, 5)
        status = int.from_bytes(data[1:], "big", signed=True) if data[:1] == b"S" else None
    except OSError:
        status = None
    if status is None:
        fatal = [number for number in last if number != getattr(_signal, "SIGWINCH", -1)]
        if fatal:  # the worker ended on the signal this process was sent: end on it too, as rx would have
            _signal.signal(fatal[-1], _signal.SIG_DFL)
            os.kill(os.getpid(), fatal[-1])
        sys.stderr.write("rx: error: the rx server's worker ended without a status; RX_SERVER=0 runs rx "
                         "without a server\n")
        status = 3
    os._exit(status & 0xFF)


# --- starting a server --------------------------------------------------------------------------------------------

_BOOT = ("import sys, marshal\n"
         "sys.path[:], key, path = marshal.loads(bytes.fromhex(sys.argv[1]))\n"
         "import remote_exec.cli\n"
         "from remote_exec.cli.server import serve\n"
         "serve(key, path, remote_exec.cli)\n")


def spawn() -> None:
    """Start a server for the next command (in the background, in a session of its own), if this process's
    command found none (:func:`delegate`); never raises."""
    global _wanted
    wanted, _wanted = _wanted, None
    if wanted is None:
        return
    key, path, environ = wanted
    try:
        import subprocess

        flags = subprocess._args_from_interpreter_flags()  # type: ignore[attr-defined]  # (what multiprocessing uses)
        argv = [sys.executable, *flags, "-c", _BOOT,
                marshal.dumps((list(sys.path), key, path)).hex()]
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            os.posix_spawn(sys.executable, argv, environ, setsid=True, file_actions=[
                (os.POSIX_SPAWN_DUP2, null, 0), (os.POSIX_SPAWN_DUP2, null, 1), (os.POSIX_SPAWN_DUP2, null, 2)])
        finally:
            os.close(null)
    except Exception:  # only a head start for the next command
        return


# --- the server -------------------------------------------------------------------------------------------------------

#: What the server imports before it listens: every command's module, what a run and a @task call import.
_PRELOAD = ("remote_exec.cli.application", "remote_exec.coordinator", "remote_exec.api", "remote_exec.backends.openssh",
            "remote_exec.backends.paramiko", "remote_exec.backends.local", "remote_exec.protocol.call",
            "remote_exec.protocol.collect", "remote_exec.protocol.detached", "remote_exec.workspace.recorder",
            "remote_exec.sync.project", "remote_exec.sync.statcache", "remote_exec.serialization",
            "remote_exec.tracebacks", "remote_exec.hints", "remote_exec.packing", "cloudpickle", "rich.console",
            "rich.table", "rich.text", "rich.markup")


def serve(key: str, path: str, cli: Any) -> None:
    """Be the server named ``key`` (started by :func:`spawn`), at the socket ``path`` its client worked out
    (a runtime directory gone meanwhile is not replaced by another), of the command line
    :mod:`remote_exec.cli` (``cli``: its ``_register``, ``main`` and ``before_exit``): import, listen, fork a
    worker per command, end when idle (see the module). Returns when it ends; it never serves if ``key`` is
    not its own digest (the code or the environment changed meanwhile) or another server holds the name."""
    import errno
    import fcntl
    import importlib
    import threading

    environ = dict(os.environ)  # as the client had it (what the imports may change is not the client's)
    os.chdir("/")
    persist = persist_seconds()
    if not persist or os.path.basename(path) != f"rx-{key}":
        return
    try:
        lock = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:  # the directory is gone
        return
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return  # another server has this name
        raise
    os.ftruncate(lock, 0)
    os.write(lock, f"{os.getpid()}\n".encode())  # (python -m remote_exec.cli.server stop finds it from now on)
    cli._register(None)
    for name in _PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:  # an optional dependency missing: the worker imports what it needs
            pass
    try:
        if server_key(environ) != key or threading.active_count() != 1:
            return  # changed meanwhile (or something started a thread: a fork would copy it half-done)
        _listen_and_fork(path, persist, cli, lock)
    finally:
        try:
            os.unlink(f"{path}.lock")  # (a name no longer served leaves nothing behind)
        except OSError:
            pass


def _listen_and_fork(path: str, persist: int, cli: Any, lock: int) -> None:
    import _signal
    import _socket
    import gc
    import select
    import time

    stopping: list[int] = []
    _signal.signal(_signal.SIGTERM, lambda signum, frame: stopping.append(signum))
    _signal.signal(_signal.SIGINT, _signal.SIG_IGN)
    listener = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        os.unlink(temporary)
    except FileNotFoundError:
        pass
    listener.bind(temporary)
    listener.listen(64)
    os.replace(temporary, path)  # (its name appears only once it listens)
    mine = os.stat(path).st_ino
    gc.freeze()  # what was imported stays shared with the workers (no copy on a collection)
    last = time.monotonic()
    try:
        while not stopping and time.monotonic() - last < persist:
            try:
                ready, _, _ = select.select([listener], [], [], 1.0)
            except InterruptedError:
                continue
            _reap()
            try:
                if os.stat(path).st_ino != mine:
                    break  # removed or replaced: no client finds this server any more
            except OSError:
                break
            if not ready:
                continue
            try:
                conn, _ = listener._accept()  # type: ignore[attr-defined]  # (_socket's: a descriptor)
            except OSError:
                continue
            last = time.monotonic()
            pid = os.fork()
            if pid == 0:
                listener.close()
                os.close(lock)  # (a worker that kept it would hold the name after this server ended)
                _work(conn, cli)  # never returns
            os.close(conn)
    finally:
        listener.close()
        try:
            if os.stat(path).st_ino == mine:
                os.unlink(path)
        except OSError:
            pass


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


# --- a worker ---------------------------------------------------------------------------------------------------------


def _work(fd: int, cli: Any) -> NoReturn:
    """A forked worker: take the request from the connection ``fd`` (:func:`_receive`), take the client's
    streams and surroundings as its own (:func:`_adopt`), run the command, report its exit status."""
    global _in_worker
    _in_worker = True
    import _socket

    conn = _socket.socket(fileno=fd)
    try:
        conn.settimeout(60)  # (a client that connected and then hung)
        request = _receive(conn)
        conn.settimeout(None)
    except BaseException:
        os._exit(0)  # the client went away before the command started: nothing ran
    cli.before_exit = lambda code: _report(conn, code)
    try:
        _adopt(conn, *request)
        cli.main()  # ends the process through exit_now, which reports the status first
    except BaseException as exc:  # only if this worker could not become the command
        sys.stderr.write(f"rx: error: the rx server could not run the command: {exc}; RX_SERVER=0 runs rx "
                         "without a server\n")
        sys.stderr.flush()
    _report(conn, 3)
    os._exit(3)


def _receive(conn: Any) -> tuple[str, list[str], str, dict[str, str], int, list[int], list[int]]:
    """The request: (program, arguments, directory, environment, umask, the signals the client ignores, the
    client's three descriptors).
    Tells the client this worker's pid and returns once it says go (raises if it went away instead)."""
    import _socket

    credentials = getattr(_socket, "SO_PEERCRED", None)
    if credentials is not None:
        peer = conn.getsockopt(_socket.SOL_SOCKET, credentials, 12)
        if int.from_bytes(peer[4:8], sys.byteorder) != os.getuid():
            raise PermissionError("a client of another user")
    payload = _read_exactly(conn, int.from_bytes(_read_exactly(conn, 4), "big"))
    request = marshal.loads(payload)
    if request[0] != _VERSION:
        raise OSError("another version's client")
    _, program, argv, cwd, environ, umask, client, ignored = request
    conn.sendall(b"P" + os.getpid().to_bytes(4, "big"))
    go, ancillary, _, _ = conn.recvmsg(1, _socket.CMSG_SPACE(3 * 4))
    fds = [int.from_bytes(item[i:i + 4], sys.byteorder, signed=True)
           for level, kind, item in ancillary if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS
           for i in range(0, len(item) - len(item) % 4, 4)]
    if go != b"G" or len(fds) != 3:
        for fd in fds:
            os.close(fd)
        raise OSError("the client gave up")
    from ..workspace import manager

    manager.client_pid = int(client)  # the pid the user knows the command by (in messages of rx's locks)
    return program, list(argv), cwd, environ, umask, list(ignored), fds


def _adopt(conn: Any, program: str, argv: list[str], cwd: str, environ: dict[str, str], umask: int,
           ignored: list[int], fds: list[int]) -> None:
    """Make the client's streams, directory, umask, environment, ignored signals and command line this
    process's, as the interpreter would have set them up for the client; watch for the client's end."""
    import _signal
    import io
    import threading

    for target, received in enumerate(fds):
        os.dup2(received, target, inheritable=True)
        os.close(received)
    for name, fd, mode in (("stdin", 0, "r"), ("stdout", 1, "w"), ("stderr", 2, "w")):
        old = getattr(sys, name)
        raw = io.FileIO(fd, mode, closefd=False)
        tty = raw.isatty()
        buffered = io.BufferedReader(raw) if mode == "r" else io.BufferedWriter(raw)
        stream = io.TextIOWrapper(buffered, encoding=old.encoding, errors=old.errors, newline="\n",
                                  line_buffering=mode == "w" and (tty or fd == 2),
                                  write_through=mode == "w" and bool(getattr(old, "write_through", False)))
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)
    os.environ.clear()
    os.environ.update(environ)
    os.umask(umask)
    os.chdir(cwd)
    for name in _FORWARDED:  # (the server's own, or those of the client it was started by, otherwise)
        number = getattr(_signal, name, None)
        if number is not None:
            default = _signal.default_int_handler if name == "SIGINT" else _signal.SIG_DFL
            _signal.signal(number, _signal.SIG_IGN if number in ignored else default)
    sys.argv = [program, *argv]

    def watch() -> None:  # the client killed outright (SIGKILL): stop as on SIGTERM
        try:
            while conn.recv(1):
                pass
        except OSError:
            pass
        if not _reported:
            os.kill(os.getpid(), _signal.SIGTERM)

    threading.Thread(target=watch, name="rx-client-watch", daemon=True).start()


_reported: list[int] = []


def _report(conn: Any, status: int) -> None:
    """Tell the client the command's exit status (once)."""
    if _reported:
        return
    _reported.append(status)
    try:
        conn.sendall(b"S" + int(status).to_bytes(4, "big", signed=True))
    except OSError:
        pass


# --- ending servers ---------------------------------------------------------------------------------------------


def servers(folder: str | None = None) -> list[tuple[int, str]]:
    """The servers of this user that are up, (pid, socket), in rx's runtime directory (or ``folder``)."""
    import errno
    import fcntl

    from ..prestart import runtime_dir

    folder = runtime_dir() if folder is None else folder
    if folder is None or not os.path.isdir(folder):
        return []
    found = []
    for name in sorted(os.listdir(folder)):
        if not (name.startswith("rx-") and name.endswith(".lock")):
            continue
        lock = os.path.join(folder, name)
        try:
            fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                continue  # nobody holds it: no server
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    continue
            text = os.read(fd, 64).decode("ascii", "replace").strip()
        finally:
            os.close(fd)
        if text.isdigit():
            found.append((int(text), lock[:-len(".lock")]))
    return found


def stop_all(folder: str | None = None, timeout: float = 5.0) -> int:
    """End this user's servers now (``SIGTERM``; the commands they are running go on), those in rx's runtime
    directory (or ``folder``); returns how many."""
    import signal
    import time

    found = servers(folder)
    for pid, _ in found:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    until = time.monotonic() + timeout
    while time.monotonic() < until and servers(folder):
        time.sleep(0.02)
    return len(found)


if __name__ == "__main__":
    if sys.argv[1:] == ["stop"]:
        print(f"rx: {stop_all()} server(s) stopped")
    elif sys.argv[1:] == ["status"]:
        for pid, socket in servers():
            print(f"{pid}\t{socket}")
    else:
        sys.exit("usage: python -m remote_exec.cli.server stop|status")
