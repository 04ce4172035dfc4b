"""The backend contract, run against the Docker testbed for every SSH backend (OpenSSH and paramiko).

Each test creates its backends through ``backend_class(name)(HostSpec(...))``, exactly as rx does, and
asserts what a user would notice: output, exit codes, exact bytes, timeouts that leave nothing running,
files that arrive whole, one connection for many commands, and a clear error for each way connecting
fails.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import secrets
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

import pytest

from remote_exec.backends import Backend, HostSpec, backend_class
from remote_exec.errors import AuthError, CommandTimeout, ConnectError, HostKeyError, TransferError
from testbed import Testbed, TestbedHost, exec_root, regenerate_host_keys

BACKENDS = ["openssh", "paramiko"]

MakeBackend = Callable[[HostSpec], Backend]


@pytest.fixture(params=BACKENDS)
def backend_name(request: pytest.FixtureRequest) -> str:
    """Each backend in turn; one not written yet is skipped with the reason."""
    name: str = request.param
    if importlib.util.find_spec(f"remote_exec.backends.{name}") is None:
        pytest.skip(f"remote_exec/backends/{name}.py does not exist yet")
    if name == "openssh" and shutil.which("ssh") is None:
        pytest.skip("the OpenSSH client (ssh) is not installed")
    return name


@pytest.fixture
def make_backend(backend_name: str) -> Iterator[MakeBackend]:
    """Create backends of the current kind; every one is closed after the test."""
    created: list[Backend] = []

    def make(spec: HostSpec) -> Backend:
        backend = backend_class(backend_name)(spec)
        created.append(backend)
        return backend

    yield make
    for backend in created:
        backend.close()


@pytest.fixture
def backend(make_backend: MakeBackend, testbed: Testbed) -> Backend:
    """A backend for ``rx-testbed-1`` through the testbed's ssh_config."""
    return make_backend(HostSpec(host="rx-testbed-1", ssh_config=testbed.ssh_config))


def _remote_args(host: TestbedHost) -> list[str]:
    """The command lines of every process on ``host`` (as root, through docker exec)."""
    code, output = exec_root(host, "ps -eo args=")
    assert code == 0, output
    return output.splitlines()


def _key_blobs(known_hosts: Path, port: int | None = None) -> set[str]:
    """The base64 key blobs of a known_hosts file (hashed or plain), optionally for one port only."""
    blobs = set()
    for line in known_hosts.read_text().splitlines():
        fields = line.split()
        if len(fields) < 3 or line.startswith("#"):
            continue
        if port is None or fields[0].startswith("|1|") or fields[0].endswith(f"]:{port}"):
            blobs.add(fields[2])
    return blobs


def _wait_until_reachable(make_backend: MakeBackend, spec: HostSpec, timeout: float = 20) -> None:
    """Connect with throwaway backends until one runs a command (a restarted sshd listens again)."""
    deadline = time.monotonic() + timeout
    while True:
        probe = make_backend(spec)
        try:
            if probe.run(["true"]).ok:
                return
        except ConnectError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
        finally:
            probe.close()


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --- commands ---------------------------------------------------------------------------------------------


def test_run_gives_stdout_stderr_and_exit_code(backend: Backend) -> None:
    result = backend.run(["sh", "-c", "echo out; echo err >&2; exit 3"])

    assert (result.stdout, result.stderr, result.exit_code) == (b"out\n", b"err\n", 3)
    assert result.failed
    assert backend.run(["python3", "-c", "print(6 * 7)"]).stdout == b"42\n"


def test_output_streams_while_the_command_runs(backend: Backend) -> None:
    arrivals: list[tuple[float, bytes]] = []
    script = "import time; print('first', flush=True); time.sleep(2); print('second', flush=True)"

    result = backend.run(["python3", "-c", script], on_stdout=lambda chunk: arrivals.append((time.monotonic(),
                                                                                              chunk)))
    ended = time.monotonic()

    assert result.exit_code == 0
    assert b"".join(chunk for _, chunk in arrivals) == b"first\nsecond\n"
    first_at = next(at for at, chunk in arrivals if b"first" in chunk)
    assert ended - first_at > 1.5, "the first line only arrived when the command ended"


def test_stdin_arrives_exactly(backend: Backend) -> None:
    payload = os.urandom(1024 * 1024)
    echo = "import sys; sys.stdout.buffer.write(sys.stdin.buffer.read())"

    result = backend.run(["python3", "-c", echo], stdin=payload)

    assert result.exit_code == 0
    assert result.stdout == payload


def test_timeout_raises_quickly_and_leaves_no_remote_process(backend: Backend, testbed: Testbed) -> None:
    duration = f"{600 + secrets.randbelow(10_000) / 1000:.3f}"  # a sleep no other test runs
    started = time.monotonic()

    with pytest.raises(CommandTimeout) as caught:
        backend.run(["sleep", duration], timeout=1.0)

    assert time.monotonic() - started < 4.0
    assert caught.value.exit_code == 124
    deadline = time.monotonic() + 5
    while any(duration in args for args in _remote_args(testbed.host(0))) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [args for args in _remote_args(testbed.host(0)) if duration in args]
    assert backend.run(["echo", "still usable"]).stdout == b"still usable\n"


TRICKY = ["a b", "it's", '"double"', "$HOME", "`id`", "a;b && c", "back\\slash", "new\nline", "ünï €",
          "*", "", "-n", "tab\there"]


def test_arguments_env_and_cwd_arrive_byte_for_byte(backend: Backend) -> None:
    env = {"RX_SPACE": "a b", "RX_MIXED": "'q' \"d\" $x ; \\ \n € `id`"}
    directory = PurePosixPath(f"/tmp/rx dir 'q' {secrets.token_hex(3)}")
    assert backend.run(["mkdir", "-p", str(directory)]).ok
    script = (
        "import os, sys; sys.stdout.buffer.write(b'\\0'.join("
        "[os.getcwdb(), os.environb[b'RX_SPACE'], os.environb[b'RX_MIXED']]"
        " + [os.fsencode(a) for a in sys.argv[1:]]))"
    )

    result = backend.run(["python3", "-c", script, *TRICKY], env=env, cwd=directory)

    assert result.exit_code == 0, result.stderr
    expected = [str(directory), env["RX_SPACE"], env["RX_MIXED"], *TRICKY]
    assert result.stdout == b"\0".join(value.encode() for value in expected)


def test_twenty_commands_share_one_connection(backend: Backend) -> None:
    for index in range(20):
        assert backend.run(["echo", str(index)]).stdout == f"{index}\n".encode()

    assert backend.connections_opened == 1


def test_a_lost_connection_is_reopened_on_the_next_call(make_backend: MakeBackend, testbed: Testbed,
                                                        dedicated_host: TestbedHost) -> None:
    backend = make_backend(HostSpec(host=dedicated_host.alias, ssh_config=testbed.ssh_config))
    assert backend.run(["true"]).ok
    # end the per-connection sshd processes of user rx (by pid, inside the dedicated container)
    code, output = exec_root(dedicated_host, "for p in $(pgrep -u rx sshd); do kill $p; done")
    assert code == 0, output
    time.sleep(1.0)

    result = backend.run(["echo", "back"])

    assert result.stdout == b"back\n"
    assert backend.connections_opened == 2


def test_ssh_config_alias_with_proxy_jump(make_backend: MakeBackend, testbed: Testbed, tmp_path: Path) -> None:
    """An alias whose HostName is only reachable through another testbed host (ProxyJump)."""
    target, jump = testbed.host(0), testbed.host(1)
    code, output = exec_root(target, "hostname -I")
    assert code == 0, output
    address = output.split()[0]  # the container's address on the Docker network, not published
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    config = tmp_path / "ssh_config"
    config.write_text(
        testbed.ssh_config.read_text()
        + f"\nHost behind-jump\n    HostName {address}\n    Port 22\n    User {target.user}\n"
        f"    IdentityFile {testbed.identity_file}\n    IdentitiesOnly yes\n    ProxyJump {jump.alias}\n"
        f"    UserKnownHostsFile {known_hosts}\n"
    )
    backend = make_backend(HostSpec(host="behind-jump", ssh_config=config))

    result = backend.run(["hostname", "-I"])

    assert result.exit_code == 0, result.stderr
    assert result.stdout.split()[0].decode() == address
    assert known_hosts.read_text().strip(), "the target's key was not recorded in its UserKnownHostsFile"


def test_what_a_command_reads_first_goes_as_it_starts(make_backend: MakeBackend, backend_name: str,
                                                      testbed: Testbed) -> None:
    """Backend.feeding: the bytes (here 2 MiB, more than a pipe holds) reach the command whole; OpenSSH writes
    them as it spawns ssh (they travel with the command, not a round trip after it), paramiko right behind
    the exec request (not after its answer), on a new connection and over an open one."""
    data = os.urandom(2 << 20)
    digest = hashlib.sha256(data).hexdigest()
    backend = make_backend(HostSpec(host=testbed.host(0).alias, ssh_config=testbed.ssh_config))
    for _ in range(2):  # the first starts the connection; the second goes over it
        with backend.feeding(lambda: data) as fed:
            process = backend.start(["sh", "-c", f"head -c {len(data)} | sha256sum"])
        if not fed.started:
            process.write_stdin(fed.feed())
        fed.wait()
        assert fed.started and not fed.failed
        out = b""
        while chunk := process.read_stdout():
            out += chunk
        while process.read_stderr():
            pass
        assert process.wait(30) == 0
        assert out.split()[0].decode() == digest


def _proxy_config(testbed: Testbed, tmp_path: Path, command: str) -> Path:
    """An ssh_config with the alias ``behind-proxy``: a host name that resolves nowhere, reached only through
    ``command`` (its ProxyCommand), which leads to the first testbed host."""
    host = testbed.host(0)
    config = tmp_path / "ssh_config"
    config.write_text(
        testbed.ssh_config.read_text()
        + f"\nHost behind-proxy\n    HostName no-such-host.invalid\n    Port {host.port}\n    User {host.user}\n"
        f"    IdentityFile {testbed.identity_file}\n    IdentitiesOnly yes\n    ProxyCommand {command}\n"
        f"    HostKeyAlias [{host.hostname}]:{host.port}\n    UserKnownHostsFile {testbed.known_hosts}\n"
    )
    return config


def test_ssh_config_alias_with_proxy_command(make_backend: MakeBackend, testbed: Testbed, tmp_path: Path) -> None:
    """An alias reached through its ProxyCommand (as `nc %h %p`, a bastion's `ssh -W`, a cloud tunnel do),
    run by the shell with its tokens expanded; paramiko used to ignore it and dial the HostName."""
    import sys

    repo = Path(__file__).resolve().parents[2]
    ran = tmp_path / "ran"
    relay = (f"sh -c 'echo %n %r > {ran}; cd {repo} && exec {sys.executable} -m testbed.delay --stdio --rtt 0 "
             f"--to 127.0.0.1:%p'")
    backend = make_backend(HostSpec(host="behind-proxy", ssh_config=_proxy_config(testbed, tmp_path, relay)))

    first = backend.run(["echo", "through"])
    second = backend.run(["echo", "again"])

    assert (first.stdout, second.stdout) == (b"through\n", b"again\n"), first.stderr + second.stderr
    assert ran.read_text().split() == ["behind-proxy", testbed.host(0).user]


def test_a_failing_proxy_command_is_one_clear_error(make_backend: MakeBackend, backend_name: str, testbed: Testbed,
                                                    tmp_path: Path) -> None:
    failing = "sh -c 'echo \"bastion: access denied by policy\" >&2; exit 3'"
    backend = make_backend(HostSpec(host="behind-proxy", ssh_config=_proxy_config(testbed, tmp_path, failing),
                                    connect_timeout=10))

    started = time.monotonic()
    with pytest.raises(ConnectError) as caught:
        backend.run(["true"])

    assert time.monotonic() - started < 10
    text = str(caught.value)
    assert "ProxyCommand" in text and "\n" not in text
    if backend_name == "paramiko":  # (ssh sends the command's stderr to /dev/null for a persisting master)
        assert "exited with status 3" in text and "access denied by policy" in text


# --- files ------------------------------------------------------------------------------------------------


def test_put_and_get_round_trip_20_mb(backend: Backend, tmp_path: Path) -> None:
    source = tmp_path / "payload.bin"
    source.write_bytes(os.urandom(20 * 1024 * 1024))
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    remote_dir = PurePosixPath(f"/tmp/rx-put {secrets.token_hex(4)}")
    assert backend.run(["mkdir", "-p", str(remote_dir)]).ok

    backend.put(source, remote_dir / "payload.bin")
    remote_sum = backend.run(["sha256sum", str(remote_dir / "payload.bin")]).stdout.split()[0].decode()
    back = tmp_path / "back.bin"
    backend.get(remote_dir / "payload.bin", back)

    assert remote_sum == digest
    assert hashlib.sha256(back.read_bytes()).hexdigest() == digest
    assert backend.run(["ls", "-A", str(remote_dir)]).stdout == b"payload.bin\n"  # no temporary left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back.bin", "payload.bin"]


def test_transfer_failures_raise_and_leave_nothing(backend: Backend, tmp_path: Path) -> None:
    source = tmp_path / "small.txt"
    source.write_bytes(b"x" * 1000)
    missing = PurePosixPath(f"/tmp/rx-missing-{secrets.token_hex(4)}")

    with pytest.raises(TransferError):
        backend.put(source, missing / "sub" / "small.txt")
    with pytest.raises(TransferError):
        backend.get(missing, tmp_path / "fetched.txt")
    with pytest.raises(TransferError):
        backend.put(tmp_path / "no-such-file", PurePosixPath("/tmp/whatever.txt"))

    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.txt"]
    assert backend.run(["true"]).ok  # a failed transfer leaves the connection usable


# --- connecting -------------------------------------------------------------------------------------------


def test_unknown_host_is_accepted_and_recorded(make_backend: MakeBackend, testbed: Testbed,
                                               tmp_path: Path) -> None:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    port = testbed.host(0).port
    backend = make_backend(HostSpec(host="rx-testbed-1", ssh_config=testbed.ssh_config, known_hosts=known_hosts,
                                    host_key_policy="accept-new"))

    assert backend.run(["true"]).ok

    recorded = _key_blobs(known_hosts)
    assert recorded, "accept-new recorded no key"
    assert recorded <= _key_blobs(testbed.known_hosts, port)  # the host's real key, nothing else


def test_changed_host_key_is_refused(make_backend: MakeBackend, testbed: Testbed,
                                     dedicated_host: TestbedHost) -> None:
    spec = HostSpec(host=dedicated_host.alias, ssh_config=testbed.ssh_config)
    first = make_backend(spec)
    assert first.run(["true"]).ok
    first.close()
    regenerate_host_keys(dedicated_host)
    before = testbed.known_hosts.read_bytes()

    with pytest.raises(HostKeyError) as caught:
        make_backend(spec).run(["true"])

    assert caught.value.host == dedicated_host.alias
    assert dedicated_host.alias in str(caught.value)
    assert "\n" not in str(caught.value)
    assert caught.value.exit_code == 255
    assert testbed.known_hosts.read_bytes() == before  # the old key stays; nothing is replaced


def test_strict_policy_refuses_an_unknown_key(make_backend: MakeBackend, testbed: Testbed,
                                              tmp_path: Path) -> None:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    backend = make_backend(HostSpec(host="rx-testbed-1", ssh_config=testbed.ssh_config, known_hosts=known_hosts,
                                    host_key_policy="strict"))

    with pytest.raises(HostKeyError) as caught:
        backend.run(["true"])

    assert caught.value.host == "rx-testbed-1"
    assert known_hosts.read_text() == ""


def test_closed_port_is_a_quick_connect_error(make_backend: MakeBackend, testbed: Testbed,
                                              tmp_path: Path) -> None:
    config = tmp_path / "ssh_config"
    config.write_text("")
    port = _closed_port()
    backend = make_backend(HostSpec(host="127.0.0.1", port=port, user="rx", ssh_config=config,
                                    identity_file=testbed.identity_file, known_hosts=testbed.known_hosts,
                                    connect_timeout=3))
    started = time.monotonic()

    with pytest.raises(ConnectError) as caught:
        backend.run(["true"])

    assert time.monotonic() - started < 3 + 2
    assert "refused" in str(caught.value).lower()
    assert caught.value.exit_code == 255


def test_wrong_key_is_an_auth_error(make_backend: MakeBackend, testbed: Testbed, tmp_path: Path) -> None:
    wrong_key = tmp_path / "id_wrong"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(wrong_key)], check=True,
                   timeout=30)
    host = testbed.host(0)
    config = tmp_path / "ssh_config"
    config.write_text(  # the host without the testbed's IdentityFile: only the wrong key is offered
        f"Host wrongkey\n    HostName {host.hostname}\n    Port {host.port}\n    User {host.user}\n"
        f"    UserKnownHostsFile {testbed.known_hosts}\n"
    )
    backend = make_backend(HostSpec(host="wrongkey", ssh_config=config, identity_file=wrong_key))

    with pytest.raises(AuthError) as caught:
        backend.run(["true"])

    assert caught.value.host == "wrongkey"
    assert caught.value.exit_code == 255


def test_concurrent_commands_share_the_connection(backend: Backend) -> None:
    results: dict[int, bytes | str] = {}

    def work(index: int) -> None:
        try:
            results[index] = backend.run(["sh", "-c", f"sleep 1; echo {index}"]).stdout
        except Exception as exc:  # recorded, so the assertion below shows it
            results[index] = repr(exc)

    started = time.monotonic()
    threads = [threading.Thread(target=work, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert results == {index: f"{index}\n".encode() for index in range(8)}
    assert time.monotonic() - started < 6, "the commands ran one after the other"
    assert backend.connections_opened == 1


def test_more_commands_than_max_sessions_wait_for_a_session(
    make_backend: MakeBackend, testbed: Testbed, dedicated_host: TestbedHost, backend_name: str,
    request: pytest.FixtureRequest,
) -> None:
    # sshd takes the first value it reads: a file sorting before the testbed's own wins
    limit = "echo 'MaxSessions 2' > /etc/ssh/sshd_config.d/00-max-sessions.conf && kill -HUP $(cat /run/sshd.pid)"
    code, output = exec_root(dedicated_host, limit)
    assert code == 0, output
    spec = HostSpec(host=dedicated_host.alias, ssh_config=testbed.ssh_config)
    _wait_until_reachable(make_backend, spec)  # sshd re-executes itself on SIGHUP
    backend = make_backend(spec)
    results: dict[int, int | str] = {}

    def work(index: int) -> None:
        try:
            results[index] = backend.run(["sleep", "0.5"]).exit_code
        except Exception as exc:  # recorded, so the assertion below shows it
            results[index] = repr(exc)

    threads = [threading.Thread(target=work, args=(index,)) for index in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert results == dict.fromkeys(range(5), 0)
    assert backend.connections_opened == 1
