"""OpenSSH: one master per host serves every rx of the user (``RX_SSH_PERSIST``), alive-checked before use."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent / "data"
if str(DATA) not in sys.path:
    sys.path.insert(0, str(DATA))
pytest.register_assert_rewrite("remote_support")

from remote_support import HOST, Remote  # noqa: E402

from testbed import TestbedHost, regenerate_host_keys  # noqa: E402

pytest_plugins = ["remote_support"]


@pytest.fixture
def runtime_dir() -> Iterator[Path]:
    """A short XDG_RUNTIME_DIR of this test: its shared masters are its own; each is ended afterwards."""
    path = Path(tempfile.mkdtemp(prefix="rxs-", dir="/tmp"))
    yield path
    for socket_path in (path / "rx-ssh").glob("m-*[!k]"):
        subprocess.run(["ssh", "-S", str(socket_path), "-O", "exit", "x"], capture_output=True, timeout=10,
                       check=False)
    shutil.rmtree(path, ignore_errors=True)


def sockets(runtime_dir: Path) -> list[Path]:
    return sorted(path for path in (runtime_dir / "rx-ssh").glob("m-*") if not path.name.endswith(".lock"))


def master_pid(socket_path: Path) -> int | None:
    done = subprocess.run(["ssh", "-S", str(socket_path), "-O", "check", "x"], capture_output=True, text=True,
                          timeout=10, check=False)
    found = re.search(r"pid=(\d+)", done.stderr)
    return int(found[1]) if done.returncode == 0 and found else None


def run_twice(remote: Remote, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], ...]:
    (remote.project / "hi.py").write_text("print('hi')\n")
    return tuple(remote.rx("run", "--remote", HOST, "hi.py", env=env) for _ in range(2))


def test_a_second_rx_run_uses_the_master_the_first_left(remote: Remote, runtime_dir: Path) -> None:
    if remote.backend != "openssh":
        pytest.skip("paramiko's connection lives and ends with its process")
    env = {"XDG_RUNTIME_DIR": str(runtime_dir), "RX_SSH_PERSIST": "300"}
    (remote.project / "hi.py").write_text("print('hi')\n")

    first = remote.rx("run", "--remote", HOST, "hi.py", env=env)
    assert first.returncode == 0 and first.stdout == "hi\n", first.stderr
    [socket_path] = sockets(runtime_dir)
    pid = master_pid(socket_path)
    assert pid is not None  # the master outlives the rx that opened it
    assert oct((runtime_dir / "rx-ssh").stat().st_mode & 0o777) == "0o700"

    second = remote.rx("-vv", "run", "--remote", HOST, "hi.py", env=env)
    assert second.returncode == 0 and second.stdout == "hi\n", second.stderr
    assert "using the shared ssh master" in second.stderr
    assert sockets(runtime_dir) == [socket_path] and master_pid(socket_path) == pid  # no new connection

    # another ssh_config file is another setting: another master, the first one left alone
    config = remote.project / "other_ssh_config"
    config.write_text(Path(remote.env["RX_SSH_CONFIG"]).read_text())
    third = remote.rx("run", "--remote", HOST, "--ssh-config", str(config), "hi.py", env=env)
    assert third.returncode == 0, third.stderr
    assert len(sockets(runtime_dir)) == 2 and master_pid(socket_path) == pid

    ended = remote.rx("hosts", "--disconnect", env=env)  # the way to end them now
    assert ended.returncode == 0, ended.stderr
    assert ended.stdout.count(f"{HOST} (") == 2 and ended.stdout.count("disconnected") == 2, ended.stdout
    assert master_pid(socket_path) is None


def test_a_dead_master_is_replaced_before_use(remote: Remote, runtime_dir: Path) -> None:
    if remote.backend != "openssh":
        pytest.skip("openssh only")
    env = {"XDG_RUNTIME_DIR": str(runtime_dir), "RX_SSH_PERSIST": "300"}
    first, _ = run_twice(remote, env)
    assert first.returncode == 0, first.stderr
    [socket_path] = sockets(runtime_dir)
    pid = master_pid(socket_path)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # its socket file stays, refusing connections
    time.sleep(0.2)
    assert socket_path.exists()

    again = remote.rx("run", "--remote", HOST, "hi.py", env=env)

    assert again.returncode == 0 and again.stdout == "hi\n", again.stderr
    new_pid = master_pid(socket_path)
    assert new_pid is not None and new_pid != pid


def test_rx_ssh_persist_0_leaves_no_master(remote: Remote, runtime_dir: Path) -> None:
    if remote.backend != "openssh":
        pytest.skip("openssh only")
    env = {"XDG_RUNTIME_DIR": str(runtime_dir), "RX_SSH_PERSIST": "0"}
    first, second = run_twice(remote, env)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert sockets(runtime_dir) == []  # each rx had a master of its own, stopped when it exited


def test_the_users_own_master_is_used_only_when_their_ssh_config_asks(remote: Remote, runtime_dir: Path) -> None:
    if remote.backend != "openssh":
        pytest.skip("openssh only")
    env = {"XDG_RUNTIME_DIR": str(runtime_dir), "RX_SSH_PERSIST": "300"}
    own = runtime_dir / "own-master"
    config = remote.project / "ssh_config_with_master"
    config.write_text(f"Host {HOST}\n    ControlMaster auto\n    ControlPath {own}\n\n"
                      + Path(remote.env["RX_SSH_CONFIG"]).read_text())
    (remote.project / "hi.py").write_text("print('hi')\n")
    started = subprocess.run(["ssh", "-F", str(config), "-o", "ControlPersist=60", "-f", "-N", HOST],
                             capture_output=True, text=True, timeout=30, check=False)
    assert started.returncode == 0, started.stderr
    try:
        pid = master_pid(own)
        done = remote.rx("-vv", "run", "--remote", HOST, "--ssh-config", str(config), "hi.py", env=env)
        assert done.returncode == 0 and done.stdout == "hi\n", done.stderr
        assert "using the master of your ssh_config" in done.stderr
        assert sockets(runtime_dir) == [] and master_pid(own) == pid  # none of rx's own; theirs left running
    finally:
        subprocess.run(["ssh", "-S", str(own), "-O", "exit", "x"], capture_output=True, timeout=10, check=False)

    # without a master of theirs up, rx opens its own (it never starts one at the user's ControlPath)
    again = remote.rx("run", "--remote", HOST, "--ssh-config", str(config), "hi.py", env=env)
    assert again.returncode == 0, again.stderr
    assert len(sockets(runtime_dir)) == 1 and not own.exists()


def test_a_changed_host_key_is_checked_by_the_next_connection(remote: Remote, runtime_dir: Path,
                                                              dedicated_host: TestbedHost) -> None:
    """A master's connection was verified when it was made and keeps serving; the next connection (after
    the master ends, or rx hosts --disconnect) checks the host key again and refuses a changed one."""
    if remote.backend != "openssh":
        pytest.skip("openssh only")
    env = {"XDG_RUNTIME_DIR": str(runtime_dir), "RX_SSH_PERSIST": "300"}
    (remote.project / "hi.py").write_text("print('hi')\n")
    assert remote.rx("run", "--remote", dedicated_host.alias, "hi.py", env=env).returncode == 0

    regenerate_host_keys(dedicated_host)
    over_the_master = remote.rx("run", "--remote", dedicated_host.alias, "hi.py", env=env)
    assert over_the_master.returncode == 0, over_the_master.stderr  # the connection made before the change

    assert remote.rx("hosts", "--disconnect", dedicated_host.alias, env=env).returncode == 0
    refused = remote.rx("run", "--remote", dedicated_host.alias, "hi.py", env=env)
    assert refused.returncode == 255, refused.stderr
    assert dedicated_host.alias in refused.stderr and "Traceback" not in refused.stderr
    again = remote.rx("-vv", "run", "--remote", dedicated_host.alias, "hi.py", env=env)
    assert again.returncode == 255, again.stderr
    assert "taking the ssh that rx started from its memo" in again.stderr  # the memo's ssh, checked the same
    assert list((runtime_dir / "rx-ssh").glob("p-*")) == [] and _ssh_processes(runtime_dir) == []


def _end_master(socket_path: Path) -> None:
    subprocess.run(["ssh", "-S", str(socket_path), "-O", "exit", "x"], capture_output=True, timeout=10, check=False)
    deadline = time.monotonic() + 10
    while master_pid(socket_path) is not None and time.monotonic() < deadline:
        time.sleep(0.05)


def _ssh_processes(runtime_dir: Path) -> list[str]:
    """The command lines of the ssh processes of this test's masters (a master's title names its socket)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(runtime_dir) in text and text.startswith("ssh"):
            found.append(text)
    return found


def test_a_first_rx_run_starts_the_master_its_memo_names_and_checks_it(remote: Remote, runtime_dir: Path) -> None:
    """After the shared master ended (its idle ControlPersist), the next `rx run` of the same line starts
    the ssh the last one used before anything else, and takes it only when its own working out gives the
    very same command; one started for settings that changed since is stopped, and the run connects anew."""
    if remote.backend != "openssh":
        pytest.skip("openssh only")
    env = {"XDG_RUNTIME_DIR": str(runtime_dir), "RX_SSH_PERSIST": "300"}
    (remote.project / "hi.py").write_text("print('hi')\n")
    included = remote.project / "ssh_hosts"
    included.write_text(Path(remote.env["RX_SSH_CONFIG"]).read_text())
    config = remote.project / "ssh_config"
    config.write_text(f"Include {included}\n")  # a change in here leaves the memo's file stamps as they were
    line = ("run", "--remote", HOST, "--ssh-config", str(config), "hi.py")

    first = remote.rx(*line, env=env)
    assert first.returncode == 0 and first.stdout == "hi\n", first.stderr
    [socket_path] = sockets(runtime_dir)
    assert (Path(remote.env["RX_CACHE_DIR"]) / "ssh-masters.memo").stat().st_mode & 0o777 == 0o600
    _end_master(socket_path)

    second = remote.rx("-vv", *line, env=env)
    assert second.returncode == 0 and second.stdout == "hi\n", second.stderr
    assert "taking the ssh that rx started from its memo" in second.stderr
    assert sockets(runtime_dir) == [socket_path] and master_pid(socket_path) is not None  # the shared one
    assert list((runtime_dir / "rx-ssh").glob("p-*")) == []  # renamed to it
    assert len(_ssh_processes(runtime_dir)) == 1
    _end_master(socket_path)

    # settings that changed where the memo's stamps do not look: the memo's master is not the run's
    text = included.read_text()
    included.write_text(text.replace(f"Host {HOST}\n", f"Host {HOST}\n    ConnectionAttempts 2\n", 1))
    third = remote.rx("-vv", *line, env=env)
    assert third.returncode == 0 and third.stdout == "hi\n", third.stderr
    assert "taking the ssh that rx started from its memo" not in third.stderr
    [other] = [path for path in sockets(runtime_dir) if path != socket_path]
    assert master_pid(other) is not None
    assert list((runtime_dir / "rx-ssh").glob("p-*")) == []
    deadline = time.monotonic() + 5  # the memo's master was told to exit: only the run's own is left
    while len(_ssh_processes(runtime_dir)) > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(_ssh_processes(runtime_dir)) == 1, _ssh_processes(runtime_dir)


TASK_SCRIPT = """
import logging, sys
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
from remote_exec import task

def double(x):
    return 2 * x

print(task(remote=sys.argv[1])(double)(21))
"""


def test_a_task_s_first_call_starts_the_master_its_memo_names(remote: Remote, runtime_dir: Path) -> None:
    """A script's first ``@task`` call after the shared master ended starts the ssh its last run used
    before rx's configuration is worked out, and takes it (the same command): the call goes over it."""
    if remote.backend != "openssh":
        pytest.skip("openssh only")
    env = {**remote.env, "XDG_RUNTIME_DIR": str(runtime_dir), "RX_SSH_PERSIST": "300"}
    script = remote.project / "sweep.py"
    script.write_text(TASK_SCRIPT)

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(script), HOST], cwd=remote.project, env=env, capture_output=True,
                              text=True, timeout=60, check=False)

    first = run()
    assert first.returncode == 0 and first.stdout == "42\n", first.stderr
    assert "taking the ssh that rx started from its memo" not in first.stderr
    [socket_path] = sockets(runtime_dir)
    _end_master(socket_path)

    second = run()
    assert second.returncode == 0 and second.stdout == "42\n", second.stderr
    assert "taking the ssh that rx started from its memo" in second.stderr
    assert sockets(runtime_dir) == [socket_path] and master_pid(socket_path) is not None
    assert list((runtime_dir / "rx-ssh").glob("p-*")) == [] and len(_ssh_processes(runtime_dir)) == 1


def test_a_first_paramiko_run_connects_to_the_address_its_memo_names_as_it_starts(remote: Remote) -> None:
    """paramiko has no master to keep: the next `rx run` of the same line opens the TCP connection to the
    address the last one connected to first thing (sshd starts its side meanwhile), and uses it only for
    that very address."""
    if remote.backend != "paramiko":
        pytest.skip("paramiko only")
    (remote.project / "hi.py").write_text("print('hi')\n")
    config = remote.project / "ssh_config"
    config.write_text(Path(remote.env["RX_SSH_CONFIG"]).read_text())
    line = ("-vv", "run", "--remote", HOST, "--ssh-config", str(config), "hi.py")
    used = "that rx made from its memo as the process started"

    first = remote.rx(*line)
    assert first.returncode == 0 and first.stdout == "hi\n", first.stderr
    assert used not in first.stderr
    second = remote.rx(*line)
    assert second.returncode == 0 and second.stdout == "hi\n", second.stderr
    assert used in second.stderr
    assert "the command's session was opened ahead" in second.stderr

    text = config.read_text()  # the ssh_config changed: the memo's stamp of it no longer fits
    config.write_text(text.replace(f"Host {HOST}\n", f"Host {HOST}\n    ConnectionAttempts 1\n", 1))
    third = remote.rx(*line)
    assert third.returncode == 0 and third.stdout == "hi\n", third.stderr
    assert used not in third.stderr
