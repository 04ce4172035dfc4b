"""The paramiko backend without a network: known_hosts decisions on generated keys, error mapping, and
authentication / command channels against an in-process paramiko server over a socketpair."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paramiko
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from paramiko.common import (
    AUTH_FAILED,
    AUTH_SUCCESSFUL,
    OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED,
    OPEN_SUCCEEDED,
)

from remote_exec.backends import paramiko as pm
from remote_exec.backends.base import HostSpec
from remote_exec.backends.ssh import ResolvedHost
from remote_exec.errors import AuthError, ConnectError, HostKeyError

# --- keys ---------------------------------------------------------------------------------------------------


def ed25519_public() -> paramiko.PKey:
    line = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return paramiko.PKey.from_type_string(line.split()[0], _blob(line))


def ecdsa_public() -> paramiko.PKey:
    line = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return paramiko.PKey.from_type_string(line.split()[0], _blob(line))


def _blob(line: str) -> bytes:
    import base64
    return base64.b64decode(line.split()[1])


def write_private_key(path: Path, password: bytes | None = None) -> paramiko.PKey:
    """Write a new ed25519 private key in OpenSSH format (and its .pub); return it as paramiko sees it."""
    key = ed25519.Ed25519PrivateKey.generate()
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption())
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       encryption))
    path.chmod(0o600)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    path.with_name(path.name + ".pub").write_bytes(public + b" test\n")
    return paramiko.PKey.from_type_string("ssh-ed25519", _blob(public.decode()))


def kh_line(name: str, key: paramiko.PKey) -> str:
    return f"{name} {key.get_name()} {key.get_base64()}\n"


# --- host key decisions -------------------------------------------------------------------------------------


def test_classify_known_unknown_changed_and_type_switched() -> None:
    ours, other = ed25519_public(), ed25519_public()
    ecdsa = ecdsa_public()
    assert pm.classify_host_key([], ours) == "unknown"
    assert pm.classify_host_key([ours], ours) == "known"
    assert pm.classify_host_key([ecdsa, ours], ours) == "known"
    assert pm.classify_host_key([other], ours) == "changed"
    # the host has a recorded key of another type only: refused, never accepted as new
    assert pm.classify_host_key([ecdsa], ours) == "changed"


def test_known_hosts_reads_plain_port_hashed_wildcard_negated_and_skips_junk(tmp_path: Path) -> None:
    plain, ported, hashed, wild, revoked = (ed25519_public() for _ in range(5))
    path = tmp_path / "known_hosts"
    path.write_text(
        "# a comment\n\n"
        + kh_line("alpha,10.0.0.1", plain)
        + kh_line("[alpha]:2222", ported)
        + kh_line(paramiko.HostKeys.hash_host("hidden"), hashed)
        + kh_line("*.lab.example,!secret.lab.example", wild)
        + "@revoked " + kh_line("*", revoked)
        + "@cert-authority *.example ssh-ed25519 AAAAnotakey\n"
        + "garbage line\n"
        + "beta ssh-unknown-type AAAA\n"
    )
    known = pm.KnownHosts.load([path, tmp_path / "missing"])
    assert [e.key for e in known.lookup("alpha")] == [plain]
    assert [e.key for e in known.lookup("ALPHA")] == [plain]  # host names are case-insensitive
    assert [e.key for e in known.lookup("10.0.0.1")] == [plain]
    assert [e.key for e in known.lookup("[alpha]:2222")] == [ported]
    assert known.lookup("[alpha]:2200") == []
    assert [e.key for e in known.lookup("hidden")] == [hashed]
    assert [e.key for e in known.lookup("gpu.lab.example")] == [wild]
    assert known.lookup("secret.lab.example") == []
    assert known.lookup("beta") == []
    entry = known.revoked(revoked)
    assert entry is not None and entry.lineno == 7
    assert known.lookup("alpha")[0].lineno == 3


def test_accept_new_records_unknown_key_in_openssh_format(tmp_path: Path) -> None:
    key = ed25519_public()
    path = tmp_path / "new-dir" / "known_hosts"
    known = pm.KnownHosts.load([path])
    status = pm.check_host_key("box", "[10.0.0.9]:2222", key, known, "accept-new")
    assert status == "unknown"
    assert path.read_text() == kh_line("[10.0.0.9]:2222", key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # the next connection knows it
    assert pm.check_host_key("box", "[10.0.0.9]:2222", key, pm.KnownHosts.load([path]), "accept-new") == "known"
    if shutil.which("ssh-keygen"):
        found = subprocess.run(["ssh-keygen", "-F", "[10.0.0.9]:2222", "-f", str(path)],
                               capture_output=True, text=True, timeout=30)
        assert found.returncode == 0 and key.get_base64() in found.stdout


def test_accept_new_appends_after_a_last_line_without_newline(tmp_path: Path) -> None:
    old, new = ed25519_public(), ed25519_public()
    path = tmp_path / "known_hosts"
    path.write_text(kh_line("old-host", old).rstrip("\n"))
    pm.check_host_key("n", "new-host", new, pm.KnownHosts.load([path]), "accept-new")
    assert path.read_text() == kh_line("old-host", old) + kh_line("new-host", new)


def test_changed_key_is_refused_naming_host_file_and_fingerprint(tmp_path: Path) -> None:
    recorded, offered = ed25519_public(), ed25519_public()
    path = tmp_path / "known_hosts"
    path.write_text(kh_line("gpu1.example", recorded))
    with pytest.raises(HostKeyError) as caught:
        pm.check_host_key("gpu1", "gpu1.example", offered, pm.KnownHosts.load([path]), "accept-new")
    message = str(caught.value)
    assert message.startswith("gpu1: ")
    assert f"{path}:1" in message
    assert pm.fingerprint(offered).split()[1] in message
    assert "ssh-keygen -R" in message
    assert caught.value.exit_code == 255
    assert path.read_text() == kh_line("gpu1.example", recorded)  # nothing was added


def test_key_of_unrecorded_type_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "known_hosts"
    path.write_text(kh_line("h", ecdsa_public()))
    with pytest.raises(HostKeyError, match="not of a recorded type"):
        pm.check_host_key("h", "h", ed25519_public(), pm.KnownHosts.load([path]), "accept-new")


def test_strict_refuses_unknown_and_accepts_known(tmp_path: Path) -> None:
    key = ed25519_public()
    path = tmp_path / "known_hosts"
    with pytest.raises(HostKeyError, match="strict"):
        pm.check_host_key("h", "h", key, pm.KnownHosts.load([path]), "strict")
    assert not path.exists()
    path.write_text(kh_line("h", key))
    assert pm.check_host_key("h", "h", key, pm.KnownHosts.load([path]), "strict") == "known"


def test_revoked_key_is_refused_even_when_also_recorded(tmp_path: Path) -> None:
    key = ed25519_public()
    path = tmp_path / "known_hosts"
    path.write_text(kh_line("h", key) + "@revoked " + kh_line("h", key))
    with pytest.raises(HostKeyError, match="revoked"):
        pm.check_host_key("h", "h", key, pm.KnownHosts.load([path]), "accept-new")


def test_off_checks_nothing_writes_nothing_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The warning is the coordinator's, once per host (tests/unit/test_first_day.py); this is the key, for -v.
    path = tmp_path / "known_hosts"
    path.write_text(kh_line("h", ed25519_public()))
    before = path.read_text()
    with caplog.at_level(logging.INFO, logger="remote_exec.backends.paramiko"):
        status = pm.check_host_key("h", "h", ed25519_public(), pm.KnownHosts.load([path]), "off")
    assert status == "changed"
    assert path.read_text() == before
    assert "host key checking is off" in caplog.text


def test_recorded_key_types_are_asked_for_first() -> None:
    available = ["ssh-ed25519", "ecdsa-sha2-nistp256", "rsa-sha2-512", "rsa-sha2-256"]
    assert pm.host_key_algorithms(available, []) == available
    assert pm.host_key_algorithms(available, [ecdsa_public()]) == [
        "ecdsa-sha2-nistp256", "ssh-ed25519", "rsa-sha2-512", "rsa-sha2-256"]
    rsa = paramiko.RSAKey.generate(1024)
    assert pm.host_key_algorithms(available, [rsa])[:2] == ["rsa-sha2-512", "rsa-sha2-256"]


# --- error mapping ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("raised", "expected", "words"), [
    (ConnectionRefusedError(111, "Connection refused"), ConnectError, "refused"),
    (TimeoutError("timed out"), ConnectError, "timed out within 3 s"),
    (socket.gaierror(-2, "Name or service not known"), ConnectError, "unknown host 'box.invalid'"),
    (OSError(113, "No route to host"), ConnectError, "No route to host"),
    (EOFError(), ConnectError, "closed the connection"),
    (paramiko.SSHException("Error reading SSH protocol banner"), ConnectError, "did not answer as an SSH"),
    (paramiko.SSHException("Negotiation failed."), ConnectError, "Negotiation failed"),
    (paramiko.ChannelException(2, "Connect failed"), ConnectError, "refused to open a channel"),
    (paramiko.AuthenticationException("Authentication failed."), AuthError, "authentication"),
    (paramiko.BadAuthenticationType("Bad authentication type", ["password"]), AuthError, "allows: password"),
    (paramiko.BadHostKeyException("box", ed25519_public(), ed25519_public()), HostKeyError, "does not match"),
])
def test_errors_are_mapped_at_the_boundary(raised: Exception, expected: type[Exception], words: str) -> None:
    with pytest.raises(expected) as caught, pm.map_paramiko_errors("box", "box.invalid:22", timeout=3):
        raise raised
    assert caught.value.__cause__ is raised
    assert str(caught.value).startswith("box: ")
    assert words in str(caught.value)
    if isinstance(caught.value, ConnectError):
        assert "box.invalid" in str(caught.value)


def test_rx_errors_pass_through_the_mapping_unchanged() -> None:
    original = AuthError("box", "already mapped")
    with pytest.raises(AuthError) as caught, pm.map_paramiko_errors("box", "box:22"):
        raise original
    assert caught.value is original


# --- an in-process SSH server over a socketpair -------------------------------------------------------------


@dataclass
class FakeServer(paramiko.ServerInterface):
    """Accepts the public keys in ``accepted``; runs ``exec`` requests through ``on_exec``."""

    accepted: list[paramiko.PKey] = field(default_factory=list)
    offered: list[bytes] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    channels: list[paramiko.Channel] = field(default_factory=list)
    exec_seen: threading.Event = field(default_factory=threading.Event)

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        self.offered.append(key.asbytes())
        if username == "alice" and any(key.asbytes() == k.asbytes() for k in self.accepted):
            return AUTH_SUCCESSFUL
        return AUTH_FAILED

    def check_channel_request(self, kind: str, chanid: int) -> int:
        return OPEN_SUCCEEDED if kind == "session" else OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        self.commands.append(command.decode())
        self.channels.append(channel)
        self.exec_seen.set()
        return True


@dataclass
class Pair:
    client: paramiko.Transport
    server: paramiko.Transport
    fake: FakeServer


@pytest.fixture
def pair() -> Iterator[Pair]:
    left, right = socket.socketpair()
    fake = FakeServer()
    server = paramiko.Transport(right)
    server.add_server_key(paramiko.ECDSAKey.generate())
    server.start_server(event=threading.Event(), server=fake)
    client = paramiko.Transport(left)
    client.start_client(timeout=10)
    try:
        yield Pair(client, server, fake)
    finally:
        client.close()
        server.close()
        left.close()
        right.close()


def resolved(identity_files: tuple[Path, ...], identities_only: bool = False) -> ResolvedHost:
    return ResolvedHost(alias="box", hostname="box.example", port=22, user="alice",
                        identity_files=identity_files, identities_only=identities_only)


def test_identity_file_key_authenticates(pair: Pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    refused = write_private_key(tmp_path / "id_refused")
    good = write_private_key(tmp_path / "id_good")
    pair.fake.accepted.append(good)
    pm._authenticate(pair.client, resolved((tmp_path / "id_missing", tmp_path / "id_refused",
                                            tmp_path / "id_good")), "box")
    assert pair.client.is_authenticated()
    assert pair.fake.offered == [refused.asbytes(), good.asbytes()]  # in IdentityFile order


def test_all_keys_refused_names_host_and_every_key_tried(pair: Pair, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    write_private_key(tmp_path / "id_one")
    with pytest.raises(AuthError) as caught:
        pm._authenticate(pair.client, resolved((tmp_path / "id_one", tmp_path / "id_gone")), "box")
    message = str(caught.value)
    assert message.startswith("box: ") and "box.example:22" in message and "alice" in message
    assert str(tmp_path / "id_one") in message and f"{tmp_path / 'id_gone'} (missing)" in message
    assert caught.value.exit_code == 255


def test_encrypted_key_without_agent_gives_a_hint(pair: Pair, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    key = write_private_key(tmp_path / "id_locked", password=b"secret")
    pair.fake.accepted.append(key)
    with pytest.raises(AuthError) as caught:
        pm._authenticate(pair.client, resolved((tmp_path / "id_locked",)), "box")
    assert "encrypted" in str(caught.value)
    assert caught.value.hint is not None and f"ssh-add {tmp_path / 'id_locked'}" in caught.value.hint
    assert pair.fake.offered == []  # nothing could be offered


@pytest.fixture
def agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private ssh-agent (unix socket in tmp_path), stopped by its pid afterwards."""
    if shutil.which("ssh-agent") is None or shutil.which("ssh-add") is None:
        pytest.skip("ssh-agent is not installed")
    sock = tmp_path / "agent.sock"
    process = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            if time.monotonic() > deadline:
                pytest.fail("ssh-agent did not create its socket")
            time.sleep(0.02)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
        yield sock
    finally:
        os.kill(process.pid, signal.SIGTERM)
        process.wait(10)


def ssh_add(path: Path, sock: Path) -> None:
    subprocess.run(["ssh-add", "-q", str(path)], env={**os.environ, "SSH_AUTH_SOCK": str(sock)},
                   check=True, timeout=30, capture_output=True)


def test_agent_keys_come_first(pair: Pair, agent: Path, tmp_path: Path) -> None:
    in_agent = write_private_key(tmp_path / "agent_key")
    ssh_add(tmp_path / "agent_key", agent)
    (tmp_path / "agent_key").unlink()  # only the agent holds it now
    on_disk = write_private_key(tmp_path / "id_disk")
    pair.fake.accepted.append(on_disk)
    pm._authenticate(pair.client, resolved((tmp_path / "id_disk",)), "box")
    assert pair.fake.offered == [in_agent.asbytes(), on_disk.asbytes()]


def test_identities_only_keeps_other_agent_keys_back(pair: Pair, agent: Path, tmp_path: Path) -> None:
    write_private_key(tmp_path / "agent_key")
    ssh_add(tmp_path / "agent_key", agent)
    on_disk = write_private_key(tmp_path / "id_disk")
    pair.fake.accepted.append(on_disk)
    pm._authenticate(pair.client, resolved((tmp_path / "id_disk",), identities_only=True), "box")
    assert pair.fake.offered == [on_disk.asbytes()]


def test_open_session_channel_process_reads_until_the_link_dies(pair: Pair, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    key = write_private_key(tmp_path / "id")
    pair.fake.accepted.append(key)
    pm._authenticate(pair.client, resolved((tmp_path / "id",)), "box")
    channel = pair.client.open_session(timeout=10)
    channel.exec_command("echo hi")
    process = pm.ParamikoProcess(channel, "box")
    assert pair.fake.exec_seen.wait(10)
    remote = pair.fake.channels[0]
    remote.sendall(b"out")
    remote.sendall_stderr(b"err")
    assert process.read_stdout() == b"out"
    assert process.read_stderr() == b"err"
    assert process.wait(0.2) is None  # still running
    pair.server.close()  # the link dies without an exit status
    started = time.monotonic()
    assert process.read_stdout() == b""
    assert process.read_stderr() == b""
    assert process.wait(10) == -1
    assert time.monotonic() - started < 5
    lost = pm.ParamikoBackend(HostSpec("box")).classify_exit(-1, b"")
    assert isinstance(lost, ConnectError)
    assert str(lost) == "box: the connection was lost before the command reported its exit status"
    with pytest.raises(ConnectError):
        process.write_stdin(b"more")
    process.close_stdin()  # no error on a dead channel
    process.kill()
    process.kill()  # twice is fine


def test_process_reports_the_exit_status(pair: Pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    key = write_private_key(tmp_path / "id")
    pair.fake.accepted.append(key)
    pm._authenticate(pair.client, resolved((tmp_path / "id",)), "box")
    channel = pair.client.open_session(timeout=10)
    channel.exec_command("exit 7")
    process = pm.ParamikoProcess(channel, "box")
    assert pair.fake.exec_seen.wait(10)
    process.write_stdin(b"input")
    process.close_stdin()
    remote = pair.fake.channels[0]
    assert remote.recv(100) == b"input"
    remote.send_exit_status(7)
    remote.close()
    assert process.read_stdout() == b""
    assert process.wait(10) == 7
    assert pair.fake.commands == ["exit 7"]
    assert pm.ParamikoBackend(HostSpec("box")).classify_exit(7, b"") is None


@pytest.mark.parametrize("code", [None, 0, 1, 124, 255])
def test_every_exit_status_the_server_sent_is_the_commands_own(code: int | None) -> None:
    """255 too: the server sent it, so the command exited with it (a lost link gives no status at all)."""
    assert pm.ParamikoBackend(HostSpec("box")).classify_exit(code, b"Connection reset by peer") is None


# --- ProxyCommand -------------------------------------------------------------------------------------------


def test_a_proxy_command_is_a_socket_that_ends_with_its_output_and_is_reaped_when_closed() -> None:
    """The command's pipes carry the bytes both ways; the end of its output reads as b"" (the end of the
    connection: paramiko's own ProxyCommand spins on it), a silent one times out, and close() ends it."""
    echo = pm.CommandSocket.start("cat", "h")
    echo.settimeout(5)
    assert echo.send(b"SSH-2.0-x\r\n") == 11
    assert echo.recv(100) == b"SSH-2.0-x\r\n"
    echo.settimeout(0.1)
    with pytest.raises(TimeoutError):
        echo.recv(100)
    echo.close()
    assert echo.closed and echo.process.returncode is not None

    finished = pm.CommandSocket.start("printf done", "h")
    finished.settimeout(5)
    assert finished.recv(100) == b"done"
    assert finished.recv(100) == b""
    finished.close()


def test_a_proxy_command_that_fails_says_how_it_ended_and_what_it_said() -> None:
    failing = pm.CommandSocket.start("sh -c 'echo \"gate: no route to gpu1\" >&2; exit 3'", "gpu1")
    failing.settimeout(5)
    assert failing.recv(100) == b""
    failing.close()  # (paramiko closes the socket before the error reaches the backend)
    error = failing.failure(ConnectError("gpu1", "the host closed the connection"))
    assert str(error).startswith("gpu1: its ProxyCommand exited with status 3 before the SSH handshake: "
                                 "gate: no route to gpu1")
    assert "exit 3" in (error.hint or "")


@pytest.mark.parametrize("accept", [True, False])
def test_stdin_written_ahead_follows_the_exec_request_without_waiting_for_its_answer(
        pair: Pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, accept: bool) -> None:
    """What goes ahead of a command (Backend.feeding) is on the link while the server is still answering the
    exec request; the server reads it once the command runs; a refusal is raised, and the write ends."""
    from remote_exec.backends.base import Feed

    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    key = write_private_key(tmp_path / "id")
    pair.fake.accepted.append(key)
    answer = threading.Event()
    pair.fake.check_channel_exec_request = lambda channel, command: (  # type: ignore[method-assign]
        pair.fake.channels.append(channel), answer.wait(10), accept)[-1]
    pm._authenticate(pair.client, resolved((tmp_path / "id",)), "box")
    channel = pair.client.open_session(timeout=10)
    process = pm.ParamikoProcess(channel, "box")
    fed = Feed(lambda: b"ahead of the answer")
    written = threading.Event()

    def write(data: bytes) -> None:
        process.write_stdin(data)
        written.set()

    pm._exec_unanswered(channel, "cat")
    fed.begin(write)
    assert written.wait(5)  # on its way before the server answered the request
    answer.set()
    if not accept:
        with pytest.raises(paramiko.SSHException):
            channel._wait_for_event()
        return
    channel._wait_for_event()
    fed.wait()
    assert not fed.failed
    assert pair.fake.channels[0].recv(100) == b"ahead of the answer"
