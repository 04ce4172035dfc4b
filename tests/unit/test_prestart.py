"""The ssh master ``rx run`` starts from its memo (remote_exec/prestart.py), with a stand-in ``ssh`` on PATH
that does what OpenSSH's does with ``-M -N -S PATH -o ControlPersist``: it listens at PATH, goes to the
background and exits 0; ``-S PATH -O exit`` ends that master. No network."""

from __future__ import annotations

import fcntl
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from remote_exec import prestart

FAKE_SSH = """#!{python}
import os, socket, sys, time
args = sys.argv[1:]
path = args[args.index("-S") + 1]
if "-O" in args:
    client = socket.socket(socket.AF_UNIX)
    client.connect(path)
    client.sendall(b"exit")
    client.close()
    sys.exit(0)
if os.environ.get("FAKE_SSH_FAIL"):
    sys.stderr.write("rx@h: Permission denied (publickey).\\n")
    sys.exit(255)
time.sleep(float(os.environ.get("FAKE_SSH_DELAY", "0")))
server = socket.socket(socket.AF_UNIX)
server.bind(path)
server.listen(8)
time.sleep(float(os.environ.get("FAKE_SSH_LINGER", "0")))  # listening, not yet gone into the background
if os.fork():
    os._exit(0)
os.setsid()
server.settimeout(20)  # a stand-in never outlives the test by long
try:
    while True:
        connection, _ = server.accept()
        if connection.recv(16) == b"exit":
            break
        connection.close()
except OSError:
    pass
"""


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A stand-in ``ssh`` first on PATH, a cache of this test, and a private directory for sockets (short:
    socket paths are limited); yields that directory. Whatever the test left pending is stopped."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ssh = bin_dir / "ssh"
    ssh.write_text(FAKE_SSH.format(python=sys.executable))
    ssh.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("RX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    sockets = Path(f"/tmp/rxp-{os.getpid()}-{time.monotonic_ns() % 10**6}")
    sockets.mkdir(mode=0o700)
    yield sockets
    prestart.abandon()
    for path in sockets.glob("[mp]-*"):
        if not path.name.endswith(".lock") and prestart.answers(str(path)):
            os.spawnvp(os.P_WAIT, "ssh", ["ssh", "-S", str(path), "-O", "exit", "--", "h"])
    for path in sockets.iterdir():
        path.unlink()
    sockets.rmdir()


WORDS = {"remote": "gpu1", "script": "train.py"}


def _argv(control_path: Path) -> list[str]:
    return ["ssh", "-o", "BatchMode=yes", "-M", "-N", "-S", str(control_path), "-o", "ControlPersist=300", "--",
            "gpu1"]


def _remembered(sockets: Path, tmp_path: Path) -> tuple[Path, list[str], Path]:
    """A memo entry for WORDS in this directory: (the shared socket, the command, the stamped file)."""
    control_path = sockets / "m-0123456789abcdef0123"
    config = tmp_path / "pyproject.toml"
    config.write_text("[tool.rx]\n")
    argv = _argv(control_path)
    prestart.remember(prestart.memo_key(WORDS), [str(config)], str(control_path), argv)
    return control_path, argv, config


def _lock_is_free(control_path: Path) -> bool:
    fd = os.open(f"{control_path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def test_the_master_of_the_memo_starts_listens_apart_and_takes_the_shared_name(fake: Path, tmp_path: Path) -> None:
    control_path, argv, _ = _remembered(fake, tmp_path)

    prestart.start(WORDS)

    assert prestart.pending()
    assert not _lock_is_free(control_path)  # held from before the ssh started
    early = prestart.take(str(control_path), argv)
    assert early is not None and not prestart.pending()
    assert early.wait(10) == 0
    assert Path(early.listens).parent == fake and Path(early.listens).name.startswith("p-")
    assert prestart.answers(early.listens) and not control_path.exists()  # no one else looks there
    early.adopt()
    assert prestart.answers(str(control_path)) and not Path(early.listens).exists()
    assert _lock_is_free(control_path)


def test_a_master_for_other_settings_is_stopped_and_leaves_nothing(fake: Path, tmp_path: Path) -> None:
    control_path, argv, _ = _remembered(fake, tmp_path)
    prestart.start(WORDS)
    assert prestart.pending()
    started = prestart._pending
    assert started is not None
    started.wait(10)  # up and in the background: stopping it takes `ssh -O exit`
    assert prestart.answers(started.listens)

    assert prestart.take(str(control_path), [*argv[:-1], "gpu2"]) is None

    assert not prestart.pending()
    assert not Path(started.listens).exists() and not control_path.exists()
    assert _lock_is_free(control_path)


def test_a_master_still_connecting_is_killed_when_nothing_takes_it(fake: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    control_path, _, _ = _remembered(fake, tmp_path)
    monkeypatch.setenv("FAKE_SSH_DELAY", "30")
    prestart.start(WORDS)
    started = prestart._pending
    assert started is not None

    prestart.abandon()  # what atexit does

    assert started.returncode is not None and started.returncode < 0  # killed, not waited 30 s for
    assert not Path(started.listens).exists() and _lock_is_free(control_path)


def test_a_failed_ssh_reports_its_status_and_what_it_said(fake: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    control_path, argv, _ = _remembered(fake, tmp_path)
    monkeypatch.setenv("FAKE_SSH_FAIL", "1")
    prestart.start(WORDS)
    early = prestart.take(str(control_path), argv)
    assert early is not None

    assert early.wait(10) == 255
    early.log.seek(0)
    assert b"Permission denied" in early.log.read()
    early.discard()
    assert _lock_is_free(control_path)


def test_nothing_starts_without_a_memo_that_fits(fake: Path, tmp_path: Path) -> None:
    _, _, config = _remembered(fake, tmp_path)

    prestart.start({"remote": "gpu2"})  # another line
    assert not prestart.pending()

    config.write_text("[tool.rx]\nworkdir = '/scratch'\n")  # a file it was worked out from changed
    prestart.start(WORDS)
    assert not prestart.pending()


def test_nothing_starts_while_a_master_answers_or_another_rx_opens_one(fake: Path, tmp_path: Path) -> None:
    control_path, _, _ = _remembered(fake, tmp_path)
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(control_path))
    server.listen(1)
    try:
        prestart.start(WORDS)
        assert not prestart.pending()  # the run adopts the master that is up
    finally:
        server.close()
        control_path.unlink()

    fd = os.open(f"{control_path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        prestart.start(WORDS)
        assert not prestart.pending()  # leave it to the rx that is opening it
    finally:
        os.close(fd)


def test_a_memo_others_may_write_is_not_used(fake: Path, tmp_path: Path) -> None:
    _remembered(fake, tmp_path)
    memo = Path(prestart.memo_path())
    assert memo.stat().st_mode & 0o777 == 0o600
    memo.chmod(0o666)

    prestart.start(WORDS)

    assert not prestart.pending()


def test_the_memo_key_follows_the_line_the_directory_and_rx_s_environment(tmp_path: Path) -> None:
    environ = {"HOME": "/home/a", "RX_SSH_PERSIST": "300", "TERM": "xterm"}
    key = prestart.memo_key(WORDS, "/p", environ)
    assert prestart.memo_key({**WORDS, "script": "other.py"}, "/p", environ) == key  # the script: no matter
    assert prestart.memo_key({**WORDS, "backend": "openssh"}, "/p", environ) != key
    assert prestart.memo_key(WORDS, "/q", environ) != key
    assert prestart.memo_key(WORDS, "/p", {**environ, "RX_SSH_PERSIST": "60"}) != key
    assert prestart.memo_key(WORDS, "/p", {**environ, "TERM": "dumb"}) == key
    assert len(key) == 64 and set(key) <= set("0123456789abcdef")  # a digest: no value of the environment in it


def test_the_memo_key_is_the_same_for_equal_values_however_they_are_shared() -> None:
    """Another process builds the same line from strings of its own: one object twice in the key (the
    working directory also the home) or two equal ones must give the same digest (marshal's version 3+
    writes a back-reference for an object it saw before, so equal values could give other bytes)."""
    folder = "".join(["/home/a/", "project"])
    again = "".join(["/home/a/", "project"])
    assert folder == again and folder is not again
    assert prestart.memo_key(WORDS, folder, {"HOME": folder}) == prestart.memo_key(WORDS, folder, {"HOME": again})


def test_the_memo_keeps_the_latest_entries(fake: Path, tmp_path: Path) -> None:
    for number in range(prestart._KEEP + 5):
        prestart.remember(f"key{number}", [], str(fake / "m-x"), ["ssh", "-M", "-S", str(fake / "m-x")])
    entries = prestart._load(prestart.memo_path())
    assert len(entries) == prestart._KEEP and "key4" not in entries and f"key{prestart._KEEP + 4}" in entries


def _taken_and_listening(fake: Path, tmp_path: Path) -> tuple[Path, list[str], prestart.Prestarted]:
    """The memo's master started and taken by the backend, once its socket answers."""
    control_path, argv, _ = _remembered(fake, tmp_path)
    prestart.start(WORDS)
    early = prestart.take(str(control_path), argv)
    assert early is not None
    deadline = time.monotonic() + 10
    while not prestart.answers(early.listens) and time.monotonic() < deadline:
        time.sleep(0.01)
    return control_path, argv, early


def test_at_exit_a_taken_master_that_is_up_is_kept_and_one_still_connecting_is_stopped(
        fake: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """rx may end while its connect thread waits for the memo's master (`rx run` of a missing script): the
    master then gets the shared name when it is up and was taken (the next rx uses it, as it would one the
    backend opened itself), and is stopped when it is still connecting."""
    control_path, argv, early = _taken_and_listening(fake, tmp_path)

    prestart.abandon()

    assert early.finished and prestart.answers(str(control_path)) and not Path(early.listens).exists()
    os.spawnvp(os.P_WAIT, "ssh", ["ssh", "-S", str(control_path), "-O", "exit", "--", "h"])
    control_path.unlink()

    monkeypatch.setenv("FAKE_SSH_DELAY", "30")
    prestart.start(WORDS)
    early = prestart.take(str(control_path), argv)
    assert early is not None

    prestart.abandon()

    assert early.finished and early.returncode is not None and early.returncode < 0
    assert not control_path.exists() and _lock_is_free(control_path)


def test_at_exit_a_master_that_listens_before_its_ssh_has_exited_is_kept(
        fake: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A master's socket answers a moment before the ssh that started it exits into the background (longer on
    a loaded machine): rx ending in that moment keeps the master all the same."""
    monkeypatch.setenv("FAKE_SSH_LINGER", "0.3")
    control_path, _, early = _taken_and_listening(fake, tmp_path)

    prestart.abandon()

    assert early.finished and early.returncode == 0 and prestart.answers(str(control_path))


def test_the_next_rx_ends_what_a_killed_one_left(fake: Path, tmp_path: Path) -> None:
    """An rx killed with SIGKILL after starting the memo's master leaves it at its own p-<pid>-... socket;
    the next one that notes its master ends it (its pid is gone), and leaves a living rx's alone."""
    gone = os.spawnvp(os.P_NOWAIT, "true", ["true"])
    os.waitpid(gone, 0)
    orphan = fake / f"p-{gone}-1"
    living = fake / f"p-{os.getpid()}-2"
    for path in (orphan, living):
        os.spawnvp(os.P_WAIT, "ssh", ["ssh", "-M", "-N", "-S", str(path), "--", "gpu1"])
        assert prestart.answers(str(path))

    _remembered(fake, tmp_path)

    assert not orphan.exists() and prestart.answers(str(living))
    os.spawnvp(os.P_WAIT, "ssh", ["ssh", "-S", str(living), "-O", "exit", "--", "gpu1"])


def test_without_posix_spawn_s_setsid_nothing_starts_and_nothing_is_held(
        fake: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where posix_spawn cannot start a session (older macOS: NotImplementedError), there is no head start:
    the run connects as it always does, and the shared socket's lock is not left held."""
    control_path, _, _ = _remembered(fake, tmp_path)

    def refuse(*args: object, **kwargs: object) -> int:
        raise NotImplementedError("setsid")

    monkeypatch.setattr(os, "posix_spawnp", refuse)
    prestart.start(WORDS)

    assert not prestart.pending() and _lock_is_free(control_path)
    assert not list(fake.glob("p-*"))


def test_a_task_s_first_call_starts_the_memo_s_master_before_rx_s_configuration(
        fake: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first ``@task`` call of a process starts its host's remembered master first thing, keyed by its
    host and connection options (not an ``rx run`` line's key), and has its backend remember under it."""
    from remote_exec import api, task
    from remote_exec import early as early_module

    train = task(remote="gpu1", backend="openssh")(lambda: None)
    words = api._memo_words(train)
    assert words is not None
    key = prestart.memo_key(words)
    assert key != prestart.memo_key({"remote": "gpu1", "backend": "openssh"})  # an rx run line's
    assert key == prestart.memo_key(api._memo_words(task(remote="gpu1", backend="openssh")(print)) or {})
    assert key != prestart.memo_key(
        api._memo_words(task(remote="gpu1", backend="openssh", connect_timeout=3)(print)) or {})
    control_path = fake / "m-0123456789abcdef0123"
    argv = _argv(control_path)
    prestart.remember(key, [], str(control_path), argv)
    remembered: list[object] = []

    def connect_early(config: object, remote: str, options: dict[str, object],
                      prestart_memo: object = None) -> None:
        remembered.append((remote, prestart.pending(), prestart_memo))

    monkeypatch.setattr(early_module, "connect_early", connect_early)
    assert api._connect_first(train) is None
    assert remembered == [("gpu1", True, (key, ()))]  # started before the connection was worked out
    started = prestart.take(str(control_path), argv)
    assert started is not None and started.wait(10) == 0
    started.adopt()

    from remote_exec.config import Configuration

    explicit = task(remote="gpu1", config=Configuration())(print)  # an object of the caller's: no key
    assert api._memo_words(explicit) is None


# --- paramiko's head start: a TCP connection to the remembered address (loopback listeners only) ---------


@pytest.fixture
def listener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A TCP listener on 127.0.0.1 standing in for sshd, a cache of this test; whatever the test left
    dialed is closed."""
    monkeypatch.setenv("RX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(10)
    yield server
    prestart.abandon()
    server.close()


def _remember_dial(tmp_path: Path, port: int, timeout: float = 7.0) -> Path:
    config = tmp_path / "ssh_config"
    config.write_text("Host gpu1\n")
    prestart.remember_dial(prestart.memo_key(WORDS), [str(config)], "127.0.0.1", port, timeout)
    return config


def test_a_remembered_address_is_dialed_as_the_process_starts_and_taken_for_that_address(
        listener: socket.socket, tmp_path: Path) -> None:
    port = listener.getsockname()[1]
    _remember_dial(tmp_path, port)

    prestart.start(WORDS)
    accepted, _ = listener.accept()  # connected before anything asked for it
    try:
        sock = prestart.take_dial("127.0.0.1", port, 7.0)
        assert sock is not None and sock.getpeername() == accepted.getsockname()
        assert sock.gettimeout() == 7.0
        sock.sendall(b"SSH-2.0-x\r\n")  # an ordinary socket the transport can use
        assert accepted.recv(64) == b"SSH-2.0-x\r\n"
        sock.close()
        assert prestart.take_dial("127.0.0.1", port, 7.0) is None  # taken once
    finally:
        accepted.close()


def test_a_dial_for_another_address_or_timeout_is_closed_and_not_used(listener: socket.socket,
                                                                     tmp_path: Path) -> None:
    port = listener.getsockname()[1]
    _remember_dial(tmp_path, port)
    for asked in (("127.0.0.1", port + 1, 7.0), ("127.0.0.1", port, 3.0)):
        prestart.start(WORDS)
        accepted, _ = listener.accept()
        try:
            assert prestart.take_dial(*asked) is None
            accepted.settimeout(5)
            assert accepted.recv(1) == b""  # closed: sshd sees it go
        finally:
            accepted.close()


def test_nothing_is_dialed_for_a_changed_file_and_a_refused_dial_leaves_the_connecting_to_the_caller(
        listener: socket.socket, tmp_path: Path) -> None:
    port = listener.getsockname()[1]
    config = _remember_dial(tmp_path, port)
    config.write_text("Host gpu1\n    Port 2222\n")
    prestart.start(WORDS)
    assert prestart._dialed is None

    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    closed_port = free.getsockname()[1]
    free.close()  # nothing listens there now: refused
    _remember_dial(tmp_path, closed_port)
    prestart.start(WORDS)
    assert prestart.take_dial("127.0.0.1", closed_port, 7.0) is None


def test_a_dial_nothing_took_is_closed_at_exit_and_a_forked_child_does_not_take_its_parent_s(
        listener: socket.socket, tmp_path: Path) -> None:
    port = listener.getsockname()[1]
    _remember_dial(tmp_path, port)
    prestart.start(WORDS)
    accepted, _ = listener.accept()
    try:
        assert prestart._dialed is not None and prestart._dialed.wait()
        prestart._dialed.owner = os.getpid() + 1  # as a forked child sees its parent's
        assert prestart.take_dial("127.0.0.1", port, 7.0) is None
        prestart._dialed.owner = os.getpid()
        prestart.abandon()
        accepted.settimeout(5)
        assert accepted.recv(1) == b""
        assert prestart._dialed is None
    finally:
        accepted.close()


def test_a_host_that_does_not_answer_costs_its_timeout_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A listener whose queue is full drops new connection attempts, as a host behind a silent firewall
    does: the head start's timeout is raised to the caller (the paramiko backend reports it), which would
    otherwise dial and wait again."""
    monkeypatch.setenv("RX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    queued = socket.create_connection(("127.0.0.1", port), timeout=5)  # fills the queue
    try:
        _remember_dial(tmp_path, port, timeout=0.5)
        prestart.start(WORDS)
        with pytest.raises(TimeoutError):
            prestart.take_dial("127.0.0.1", port, 0.5)
    finally:
        prestart.abandon()
        queued.close()
        server.close()
