"""ParamikoBackend against the Docker testbed: what is specific to paramiko (one Transport with
TCP_NODELAY, known_hosts handling, key auth without an agent, ProxyJump over direct-tcpip, SFTP, the
keepalive watchdog). The behaviour both backends share is in test_backends.py."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shlex
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path, PurePosixPath

import docker
import pytest

import testbed as tb
from remote_exec.backends.base import HostSpec
from remote_exec.backends.paramiko import ParamikoBackend, fingerprint
from remote_exec.errors import AuthError, CommandTimeout, ConnectError, HostKeyError, TransferError
from testbed import Testbed, TestbedHost


def spec_for(bed: Testbed, host: TestbedHost, **options: object) -> HostSpec:
    spec = HostSpec(host.alias, ssh_config=bed.ssh_config)
    return dataclasses.replace(spec, **options)  # type: ignore[arg-type]


@pytest.fixture
def backend(testbed: Testbed, testbed_host: TestbedHost) -> Iterator[ParamikoBackend]:
    with closing(ParamikoBackend(spec_for(testbed, testbed_host))) as instance:
        yield instance


def recorded_keys(bed: Testbed, host: TestbedHost) -> dict[str, str]:
    """The testbed's recorded host keys of ``host``: key type -> ``type base64``."""
    keys = {}
    for line in bed.known_hosts.read_text().splitlines():
        name, keytype, blob = line.split()[:3]
        if name == f"[{host.hostname}]:{host.port}":
            keys[keytype] = f"{keytype} {blob}"
    assert keys, f"no recorded keys for {host.alias}"
    return keys


def own_config(tmp_path: Path, host: TestbedHost, identity: Path, known_hosts: Path) -> Path:
    """An ssh_config of our own for ``host`` offering only ``identity``."""
    path = tmp_path / "ssh_config"
    path.write_text(
        f"Host target\n  HostName {host.hostname}\n  Port {host.port}\n  User {host.user}\n"
        f"  IdentityFile {identity}\n  IdentitiesOnly yes\n  UserKnownHostsFile {known_hosts}\n")
    return path


def nodelay(backend: ParamikoBackend) -> int:
    """The TCP_NODELAY option of the backend's socket."""
    transport = backend.transport
    assert transport is not None
    sock = transport.sock
    assert isinstance(sock, socket.socket)
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def server_key_type(backend: ParamikoBackend) -> str:
    transport = backend.transport
    assert transport is not None
    return transport.get_remote_server_key().get_name()


def keygen(path: Path, password: str = "") -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", password, "-f", str(path)], check=True,
                   timeout=30)
    return path


# --- one connection -----------------------------------------------------------------------------------------


def test_commands_reuse_one_transport_with_tcp_nodelay(backend: ParamikoBackend) -> None:
    assert backend.run(["id", "-un"]).stdout == b"rx\n"
    assert backend.run(["sh", "-c", "exit 5"]).exit_code == 5
    echoed = backend.run(["sh", "-c", "cat; echo \"$GREETING\" >&2"], stdin=b"in\n",
                         env={"GREETING": "hello 'quoted' $world"}, cwd=PurePosixPath("/tmp"))
    assert (echoed.stdout, echoed.stderr) == (b"in\n", b"hello 'quoted' $world\n")
    assert backend.run(["pwd"], cwd=PurePosixPath("/tmp")).stdout == b"/tmp\n"
    assert backend.connections_opened == 1
    assert nodelay(backend) != 0


def test_nodelay_can_be_switched_off_for_measurements(testbed: Testbed, testbed_host: TestbedHost) -> None:
    with closing(ParamikoBackend(spec_for(testbed, testbed_host), tcp_nodelay=False)) as backend:
        assert backend.run(["true"]).ok
        assert nodelay(backend) == 0


def test_threads_share_the_one_connection(testbed: Testbed, testbed_host: TestbedHost) -> None:
    with closing(ParamikoBackend(spec_for(testbed, testbed_host))) as backend:
        def work(index: int) -> list[bytes]:
            return [backend.run(["echo", f"{index}-{n}"]).stdout for n in range(5)]

        with ThreadPoolExecutor(8) as pool:  # the first calls race to open the connection
            outputs = list(pool.map(work, range(8)))
        assert outputs == [[f"{i}-{n}\n".encode() for n in range(5)] for i in range(8)]
        assert backend.connections_opened == 1


def test_close_then_next_call_reconnects(backend: ParamikoBackend) -> None:
    assert backend.run(["true"]).ok
    backend.close()
    backend.close()
    assert backend.run(["true"]).ok
    assert backend.connections_opened == 2


def test_a_connection_made_ahead_opens_the_first_command_s_session_meanwhile(backend: ParamikoBackend) -> None:
    """sshd answers a connection's first session only after its PAM session stack ran: a connection made
    ahead opens that session while the caller works, and the first command runs in it as in any other."""
    backend.connect_in_background()
    backend.raise_failed_ahead()
    assert backend._spare is not None
    echoed = backend.run(["sh", "-c", "cat; echo \"$GREETING\" >&2; pwd"], stdin=b"in\n", env={"GREETING": "hi"},
                         cwd=PurePosixPath("/tmp"))
    assert (echoed.stdout, echoed.stderr, echoed.exit_code) == (b"in\n/tmp\n", b"hi\n", 0)
    assert backend._spare is None and backend.connections_opened == 1
    assert backend.run(["true"]).ok  # the next commands open their own

    fresh = ParamikoBackend(backend.spec)
    with closing(fresh):
        fresh.connect_in_background()
        fresh.raise_failed_ahead()
        transport = fresh.transport
        assert transport is not None and fresh._spare is not None
        transport.close()  # the link died before the first command: its session went with it
        assert fresh.run(["echo", "again"]).stdout == b"again\n"
        assert fresh.connections_opened == 2


# --- authentication -----------------------------------------------------------------------------------------


def test_key_file_auth_without_an_agent(testbed: Testbed, testbed_host: TestbedHost,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    with closing(ParamikoBackend(spec_for(testbed, testbed_host))) as backend:
        assert backend.run(["id", "-un"]).stdout == b"rx\n"


def test_refused_key_is_an_auth_error_naming_it(testbed: Testbed, testbed_host: TestbedHost,
                                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    wrong = keygen(tmp_path / "wrong_key")
    config = own_config(tmp_path, testbed_host, wrong, testbed.known_hosts)
    with closing(ParamikoBackend(HostSpec("target", ssh_config=config))) as backend, \
            pytest.raises(AuthError) as caught:
        backend.run(["true"])
    assert str(caught.value).startswith("target: ")
    assert str(wrong) in str(caught.value)
    assert caught.value.exit_code == 255


def test_encrypted_key_without_agent_says_to_use_ssh_add(testbed: Testbed, testbed_host: TestbedHost,
                                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    locked = keygen(tmp_path / "locked_key", password="correct horse")
    config = own_config(tmp_path, testbed_host, locked, testbed.known_hosts)
    with closing(ParamikoBackend(HostSpec("target", ssh_config=config))) as backend, \
            pytest.raises(AuthError) as caught:
        backend.run(["true"])
    assert caught.value.hint is not None and "ssh-add" in caught.value.hint


# --- host keys ----------------------------------------------------------------------------------------------


def test_accept_new_records_a_line_ssh_keygen_finds(testbed: Testbed, testbed_host: TestbedHost,
                                                    tmp_path: Path) -> None:
    known_hosts = tmp_path / "fresh-dir" / "known_hosts"
    with closing(ParamikoBackend(spec_for(testbed, testbed_host, known_hosts=known_hosts))) as backend:
        assert backend.run(["true"]).ok
    assert stat.S_IMODE(known_hosts.stat().st_mode) == 0o600
    name = f"[{testbed_host.hostname}]:{testbed_host.port}"
    found = subprocess.run(["ssh-keygen", "-F", name, "-f", str(known_hosts)], capture_output=True,
                           text=True, timeout=30)
    assert found.returncode == 0, found.stderr
    recorded = [line for line in found.stdout.splitlines() if not line.startswith("#")]
    assert len(recorded) == 1
    assert " ".join(recorded[0].split()[1:3]) in recorded_keys(testbed, testbed_host).values()
    # the OpenSSH client trusts the line we wrote
    done = subprocess.run(["ssh", "-F", str(testbed.ssh_config), "-o", "BatchMode=yes",
                           "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known_hosts}",
                           testbed_host.alias, "true"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_strict_refuses_an_unknown_host(testbed: Testbed, testbed_host: TestbedHost, tmp_path: Path) -> None:
    known_hosts = tmp_path / "known_hosts"
    spec = spec_for(testbed, testbed_host, known_hosts=known_hosts, host_key_policy="strict")
    with closing(ParamikoBackend(spec)) as backend, pytest.raises(HostKeyError, match="strict"):
        backend.run(["true"])
    assert not known_hosts.exists()


def test_known_key_type_is_negotiated_first(testbed: Testbed, testbed_host: TestbedHost, tmp_path: Path) -> None:
    # Only the ECDSA key is recorded, though the server prefers ed25519: we must ask for ECDSA, as OpenSSH
    # does, rather than refuse a host whose recorded key is perfectly valid.
    known_hosts = tmp_path / "known_hosts"
    ecdsa = recorded_keys(testbed, testbed_host)["ecdsa-sha2-nistp256"]
    known_hosts.write_text(f"[{testbed_host.hostname}]:{testbed_host.port} {ecdsa}\n")
    spec = spec_for(testbed, testbed_host, known_hosts=known_hosts, host_key_policy="strict")
    with closing(ParamikoBackend(spec)) as backend:
        assert backend.run(["true"]).ok
        assert server_key_type(backend) == "ecdsa-sha2-nistp256"


def test_changed_host_key_is_refused(testbed: Testbed, dedicated_host: TestbedHost, tmp_path: Path) -> None:
    known_hosts = tmp_path / "known_hosts"
    shutil.copy(testbed.known_hosts, known_hosts)
    tb.regenerate_host_keys(dedicated_host)
    before = known_hosts.read_bytes()
    with closing(ParamikoBackend(spec_for(testbed, dedicated_host, known_hosts=known_hosts))) as backend, \
            pytest.raises(HostKeyError) as caught:
        backend.run(["true"])
    message = str(caught.value)
    assert dedicated_host.alias in message
    assert str(known_hosts) in message
    assert "SHA256:" in message
    assert caught.value.exit_code == 255
    assert known_hosts.read_bytes() == before


_DROP_ED25519 = r"""
import glob, os, signal, time
def listening():
    for line in open("/proc/net/tcp").readlines()[1:]:
        fields = line.split()
        if fields[1].endswith(":0016") and fields[3] == "0A":
            return fields[9]
before = listening()
for path in glob.glob("/etc/ssh/ssh_host_ed25519_key*"):
    os.remove(path)
os.kill(int(open("/run/sshd.pid").read()), signal.SIGHUP)
deadline = time.monotonic() + 20
while time.monotonic() < deadline and listening() in (None, before):
    time.sleep(0.05)
"""


def test_host_offering_only_an_unrecorded_key_type_is_refused(testbed: Testbed, dedicated_host: TestbedHost,
                                                             tmp_path: Path) -> None:
    known_hosts = tmp_path / "known_hosts"
    ed25519 = recorded_keys(testbed, dedicated_host)["ssh-ed25519"]
    known_hosts.write_text(f"[{dedicated_host.hostname}]:{dedicated_host.port} {ed25519}\n")
    code, output = tb.exec_root(dedicated_host, f"python3 -c {shlex.quote(_DROP_ED25519)}")
    assert code == 0, output
    spec = spec_for(testbed, dedicated_host, known_hosts=known_hosts)
    deadline = time.monotonic() + 20
    while True:
        with closing(ParamikoBackend(spec)) as backend:
            try:
                backend.run(["true"])
            except ConnectError:  # sshd still restarting
                assert time.monotonic() < deadline
                time.sleep(0.2)
                continue
            except HostKeyError as exc:
                assert "not of a recorded type" in str(exc)
                break
            pytest.fail("a host that no longer offers its recorded key type was accepted")
    assert known_hosts.read_text().count("\n") == 1


# --- ProxyJump ----------------------------------------------------------------------------------------------


def container_ip(host: TestbedHost) -> str:
    client = docker.from_env()
    try:
        networks = client.containers.get(host.container_id).attrs["NetworkSettings"]["Networks"]
    finally:
        client.close()
    addresses = [net["IPAddress"] for net in networks.values() if net.get("IPAddress")]
    if not addresses:
        pytest.skip(f"{host.container_name} has no container network address")
    return str(addresses[0])


def test_proxy_jump_through_host_1_to_host_2(testbed: Testbed, tmp_path: Path) -> None:
    jump, target = testbed.host(0), testbed.host(1)
    address = container_ip(target)
    known_hosts = tmp_path / "known_hosts"
    config = tmp_path / "ssh_config"
    config.write_text(
        f"Host inner\n  HostName {address}\n  User {target.user}\n  IdentityFile {testbed.identity_file}\n"
        f"  IdentitiesOnly yes\n  UserKnownHostsFile {known_hosts}\n  ProxyJump {jump.alias}\n"
        f"Include {testbed.ssh_config}\n")
    with closing(ParamikoBackend(HostSpec("inner", ssh_config=config))) as backend:
        assert backend.run(["hostname"]).stdout.decode().strip() == target.alias
        assert backend.run(["true"]).ok
        assert backend.connections_opened == 2  # the jump host's transport and the target's
    # the target's key was recorded under the address the jump host reached it by (port 22: bare)
    line = known_hosts.read_text().split()
    assert line[0] == address
    assert f"{line[1]} {line[2]}" in recorded_keys(testbed, target).values()


# --- files --------------------------------------------------------------------------------------------------


def test_put_and_get_round_trip(backend: ParamikoBackend, tmp_path: Path) -> None:
    data = os.urandom(5 * 2**20 + 123)
    local = tmp_path / "data.bin"
    local.write_bytes(data)
    remote = PurePosixPath(f"/tmp/rx-paramiko-{os.getpid()}.bin")
    try:
        backend.put(local, remote)
        sha = backend.run(["sha256sum", str(remote)]).stdout.split()[0].decode()
        assert sha == hashlib.sha256(data).hexdigest()
        back = tmp_path / "back.bin"
        backend.get(remote, back)
        assert back.read_bytes() == data
        empty = tmp_path / "empty"
        empty.write_bytes(b"")
        backend.put(empty, remote)
        backend.get(remote, back)
        assert back.read_bytes() == b""
        assert sorted(p.name for p in tmp_path.iterdir()) == ["back.bin", "data.bin", "empty"]
    finally:
        backend.run(["rm", "-f", str(remote)])
    assert backend.connections_opened == 1


def test_put_into_missing_directory_is_a_transfer_error(backend: ParamikoBackend, tmp_path: Path) -> None:
    local = tmp_path / "f"
    local.write_bytes(b"x")
    with pytest.raises(TransferError) as caught:
        backend.put(local, PurePosixPath("/tmp/no-such-dir-rx/f"))
    assert "/tmp/no-such-dir-rx" in str(caught.value)
    assert caught.value.exit_code == 255


def test_put_leaves_nothing_half_written(backend: ParamikoBackend, tmp_path: Path) -> None:
    local = tmp_path / "f"
    local.write_bytes(b"x" * 1000)
    directory = f"/tmp/rx-readonly-{os.getpid()}"
    backend.run(["mkdir", "-p", directory])
    backend.run(["chmod", "555", directory])
    try:
        with pytest.raises(TransferError, match=r"(?i)permission denied"):
            backend.put(local, PurePosixPath(directory) / "f")
        assert backend.run(["ls", "-A", directory]).stdout == b""
    finally:
        backend.run(["sh", "-c", f"chmod 755 {directory} && rm -rf {directory}"])


def test_get_of_missing_file_names_it_and_writes_nothing(backend: ParamikoBackend, tmp_path: Path) -> None:
    target = tmp_path / "out"
    with pytest.raises(TransferError) as caught:
        backend.get(PurePosixPath("/tmp/rx-does-not-exist"), target)
    assert "/tmp/rx-does-not-exist" in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_get_of_a_directory_or_into_a_missing_directory_is_refused(backend: ParamikoBackend,
                                                                    tmp_path: Path) -> None:
    with pytest.raises(TransferError, match="/tmp is a directory"):
        backend.get(PurePosixPath("/tmp"), tmp_path / "x")
    with pytest.raises(TransferError, match=f"cannot write in {tmp_path / 'missing'}"):
        backend.get(PurePosixPath("/etc/hostname"), tmp_path / "missing" / "x")
    assert list(tmp_path.iterdir()) == []


def test_put_of_missing_local_file_is_a_transfer_error(backend: ParamikoBackend, tmp_path: Path) -> None:
    with pytest.raises(TransferError, match="cannot read"):
        backend.put(tmp_path / "nope", PurePosixPath("/tmp/nope"))


# --- stopping commands, dead links, unreachable hosts --------------------------------------------------------


def test_timeout_stops_the_remote_process_group(backend: ParamikoBackend) -> None:
    marker = f"{os.getpid() % 1000 + 2000}"
    started = time.monotonic()
    with pytest.raises(CommandTimeout):
        backend.run(["sh", "-c", f"sleep {marker}1 & sleep {marker}2; echo never"], timeout=1)
    assert time.monotonic() - started < 5
    deadline = time.monotonic() + 5
    while backend.run(["pgrep", "-f", f"sleep {marker}"]).exit_code == 0:
        assert time.monotonic() < deadline, "the remote sleeps survived the timeout"
        time.sleep(0.1)


def test_dead_link_ends_reads_and_the_next_call_reconnects(testbed: Testbed, dedicated_host: TestbedHost) -> None:
    spec = spec_for(testbed, dedicated_host, keepalive_interval=0.5, keepalive_count=2, connect_timeout=5)
    with closing(ParamikoBackend(spec)) as backend:
        process = backend.start(["sleep", "60"])
        tb.pause(dedicated_host)
        try:
            started = time.monotonic()
            assert process.read_stdout() == b""
            assert process.wait(5) == -1
            elapsed = time.monotonic() - started
            assert elapsed < spec.dead_after + 3, elapsed
        finally:
            tb.unpause(dedicated_host)
        assert backend.run(["true"]).ok
        assert backend.connections_opened == 2


def test_paused_host_is_a_connect_timeout(testbed: Testbed, dedicated_host: TestbedHost) -> None:
    tb.pause(dedicated_host)
    try:
        started = time.monotonic()
        with closing(ParamikoBackend(spec_for(testbed, dedicated_host, connect_timeout=2))) as backend, \
                pytest.raises(ConnectError) as caught:
            backend.run(["true"])
        assert time.monotonic() - started < 8
        assert f"{dedicated_host.hostname}:{dedicated_host.port}" in str(caught.value)
        assert "2 s" in str(caught.value)
    finally:
        tb.unpause(dedicated_host)


def test_closed_port_is_refused(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    spec = HostSpec("127.0.0.1", port=port, known_hosts=tmp_path / "kh", connect_timeout=5)
    with closing(ParamikoBackend(spec)) as backend, pytest.raises(ConnectError, match="refused") as caught:
        backend.run(["true"])
    assert f"127.0.0.1:{port}" in str(caught.value)
    assert isinstance(caught.value.__cause__, ConnectionRefusedError)


def test_fingerprint_matches_ssh_keygen(testbed: Testbed, testbed_host: TestbedHost, tmp_path: Path) -> None:
    with closing(ParamikoBackend(spec_for(testbed, testbed_host))) as backend:
        assert backend.run(["true"]).ok
        assert backend.transport is not None
        key = backend.transport.get_remote_server_key()
    pub = tmp_path / "key.pub"
    pub.write_text(f"{key.get_name()} {key.get_base64()}\n")
    shown = subprocess.run(["ssh-keygen", "-l", "-f", str(pub)], capture_output=True, text=True, timeout=30)
    assert fingerprint(key).split()[1] in shown.stdout
