"""OpenSSHBackend without a network: ssh -G parsing, the ssh argv as ssh itself reads it, the remote command
line, the pid header of a process, and the translation of OpenSSH's own error messages."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest

from remote_exec.backends import HostSpec, backend_class, openssh
from remote_exec.backends.openssh import (
    NO_MASTER_MARKER,
    OpenSSHBackend,
    SshProcess,
    client_argv,
    map_ssh_error,
    master_argv,
    preferred_ciphers,
    remote_command,
    ssh_options,
)
from remote_exec.backends.ssh import ResolvedHost, parse_ssh_g
from remote_exec.errors import AuthError, BackendError, ConfigError, ConnectError, HostKeyError

needs_ssh = pytest.mark.skipif(shutil.which("ssh") is None, reason="the OpenSSH client is not installed")

# The ciphers line of `ssh -G` from OpenSSH 9.2 (OpenSSH's default list).
SSH_G = """\
hostname 10.1.2.3
user alice
port 2222
ciphers chacha20-poly1305@openssh.com,aes128-ctr,aes192-ctr,aes256-ctr,aes128-gcm@openssh.com,aes256-gcm@openssh.com
"""

# Real OpenSSH 9.2 stderr, captured against a local sshd.
CHANGED_KEY = """\
@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @
@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
IT IS POSSIBLE THAT SOMEONE IS DOING SOMETHING NASTY!
Someone could be eavesdropping on you right now (man-in-the-middle attack)!
It is also possible that a host key has just been changed.
The fingerprint for the ED25519 key sent by the remote host is
SHA256:3Vaqy9XKpGDIGhTbXzCB99KmBEqPE7Nvy2Y92BQmV6I.
Please contact your system administrator.
Add correct host key in /tmp/osdev/kh_changed to get rid of this message.
Offending ED25519 key in /tmp/osdev/kh_changed:1
  remove with:
  ssh-keygen -f "/tmp/osdev/kh_changed" -R "[127.0.0.1]:22622"
Host key for [127.0.0.1]:22622 has changed and you have requested strict checking.
Host key verification failed.
"""
STRICT_UNKNOWN = """\
No ED25519 host key is known for [127.0.0.1]:22622 and you have requested strict checking.
Host key verification failed.
"""


# --- resolving with ssh -G (the record and its parsing: test_ssh.py) ---------------------------------------


@needs_ssh
def test_resolve_honours_ssh_config_and_overrides(tmp_path: Path) -> None:
    key = tmp_path / "id_test"
    key.write_text("not a real key, ssh -G does not read it\n")
    config = tmp_path / "ssh_config"
    config.write_text(
        "Host lab\n"
        "    HostName 192.0.2.7\n"
        "    User carol\n"
        "    Port 2200\n"
        f"    IdentityFile {key}\n"
        "    ProxyJump jumpy\n"
        f"    UserKnownHostsFile {tmp_path}/kh\n"
    )
    backend = OpenSSHBackend(HostSpec(host="lab", ssh_config=config))
    resolved = backend.resolve()
    assert (resolved.alias, resolved.hostname, resolved.user, resolved.port) == ("lab", "192.0.2.7", "carol", 2200)
    assert key in resolved.identity_files
    assert resolved.proxy_jump == "jumpy"
    assert resolved.known_hosts_file == tmp_path / "kh"
    assert backend.resolve() is resolved  # cached: ssh -G runs once per backend
    assert backend.connections_opened == 0  # resolving connects to nothing

    known = tmp_path / "my known hosts"
    override = OpenSSHBackend(HostSpec(host="lab", ssh_config=config, user="dave", port=2201, known_hosts=known))
    resolved = override.resolve()
    assert (resolved.user, resolved.port, resolved.known_hosts_files) == ("dave", 2201, (known,))


@needs_ssh
def test_resolve_reports_a_broken_or_missing_config(tmp_path: Path) -> None:
    config = tmp_path / "ssh_config"
    config.write_text("Host lab\n    Bogus yes\n")
    with pytest.raises(ConfigError, match="Bad configuration option: bogus"):
        OpenSSHBackend(HostSpec(host="lab", ssh_config=config)).resolve()
    with pytest.raises(ConfigError, match="does not exist"):
        OpenSSHBackend(HostSpec(host="lab", ssh_config=tmp_path / "missing")).resolve()
    with pytest.raises(ConfigError, match="identity file"):
        OpenSSHBackend(HostSpec(host="lab", identity_file=tmp_path / "no-key")).resolve()


def test_missing_ssh_binary_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(openssh, "SSH", "ssh-not-installed-rx-test")
    backend = OpenSSHBackend(HostSpec(host="lab"))
    with pytest.raises(ConfigError, match="`ssh` is not installed"):
        backend.run(["true"])
    with pytest.raises(ConfigError, match="`ssh` is not installed"):
        backend.resolve()


def test_backend_class_registry_gives_this_backend() -> None:
    assert backend_class("openssh") is OpenSSHBackend
    assert OpenSSHBackend.name == "openssh"


# --- argv -------------------------------------------------------------------------------------------------


def _ssh_g(argv_options: list[str], host: str = "target") -> dict[str, tuple[str, ...]]:
    """What ssh itself makes of our options: `ssh -G <options> -- host` (reads no network)."""
    done = subprocess.run(["ssh", "-G", *argv_options, "--", host], capture_output=True, text=True,
                          timeout=30, check=True, stdin=subprocess.DEVNULL)
    return parse_ssh_g(done.stdout)


@needs_ssh
@pytest.mark.parametrize(
    ("policy", "strict"),
    [("accept-new", "accept-new"), ("strict", "true"), ("off", "false")],
)
def test_options_as_ssh_reads_them(tmp_path: Path, policy: str, strict: str) -> None:
    config = tmp_path / "ssh_config"
    config.write_text("Host target\n    StrictHostKeyChecking ask\n    BatchMode no\n    User nobody\n")
    known = tmp_path / "dir with space" / "known%hosts"
    spec = HostSpec(host="target", ssh_config=config, user="u", port=2022, known_hosts=known,
                    host_key_policy=policy, connect_timeout=2.5,  # type: ignore[arg-type]
                    keepalive_interval=4, keepalive_count=2)
    options = _ssh_g(ssh_options(spec))
    assert options["user"] == ("u",)  # our overrides beat the config file
    assert options["port"] == ("2022",)
    assert options["batchmode"] == ("yes",)
    assert options["connecttimeout"] == ("3",)
    assert options["serveraliveinterval"] == ("4",)
    assert options["serveralivecountmax"] == ("2",)
    assert options["stricthostkeychecking"] == (strict,)
    if policy == "off":
        assert options["userknownhostsfile"] == ("/dev/null",)
    else:
        assert options["userknownhostsfile"] == (str(known),)  # one path, spaces and % intact


@needs_ssh
def test_identity_file_goes_first_and_agent_keys_stay_out(tmp_path: Path) -> None:
    key = tmp_path / "key with space"
    key.write_text("x\n")
    options = _ssh_g(ssh_options(HostSpec(host="target", ssh_config=Path("/dev/null"), identity_file=key)))
    assert options["identityfile"][0] == str(key)
    assert options["identitiesonly"] == ("yes",)


def test_a_path_with_a_double_quote_is_refused() -> None:
    with pytest.raises(ConfigError, match="double quote"):
        ssh_options(HostSpec(host="h", known_hosts=Path('/tmp/a"b')))


@needs_ssh
def test_master_and_client_argv(tmp_path: Path) -> None:
    spec = HostSpec(host="target", ssh_config=Path("/dev/null"), identity_file=tmp_path / "key")
    control = tmp_path / "s"
    master = master_argv(spec, control, persist=120, ciphers="aes128-gcm@openssh.com")
    assert master[-2:] == ["--", "target"]
    assert {"-M", "-N"} <= set(master)
    master_options = _ssh_g(master[1:-2])
    assert master_options["controlpersist"] == ("120",)
    assert master_options["controlpath"] == (str(control),)
    assert master_options["ciphers"] == ("aes128-gcm@openssh.com",)
    assert master_options["clearallforwardings"] == ("yes",)

    command = remote_command(["echo", "a b"])
    client = client_argv(spec, control, command)
    assert client[-3:] == ["--", "target", command]  # the command is one word, after the host
    assert "-i" not in client  # clients never authenticate
    client_options = _ssh_g(client[1:-3])
    assert client_options["controlmaster"] == ("false",)
    assert client_options["controlpath"] == (str(control),)
    assert client_options["batchmode"] == ("yes",)
    assert client_options["requesttty"][0] in ("no", "false")  # -T: no pty, stderr stays apart
    assert NO_MASTER_MARKER in client_options["proxycommand"][0]


def test_preferred_ciphers() -> None:
    stock = ResolvedHost.from_ssh_g("gpu1", SSH_G)
    preferred = preferred_ciphers(stock, hardware_aes=True)
    assert preferred is not None
    assert preferred.split(",")[:2] == ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com"]
    assert sorted(preferred.split(",")) == sorted(stock.options["ciphers"][0].split(","))
    assert preferred_ciphers(stock, hardware_aes=False) is None
    custom = ResolvedHost.from_ssh_g("h", "hostname h\nuser u\nport 22\nciphers aes256-ctr\n")
    assert preferred_ciphers(custom, hardware_aes=True) is None  # the user's choice stands


# --- the remote command line and the pid header -------------------------------------------------------------

TRICKY = ["a b", "it's", '"dq"', "$HOME", "`id`", "a;b", "back\\slash", "new\nline", "ünï €", "*", ""]


def test_remote_command_delivers_every_byte_and_a_pid_line() -> None:
    """The command line, run by a local POSIX shell as sshd would run it, echoes the arguments exactly."""
    script = "import sys, os; sys.stdout.buffer.write(repr((sys.argv[1:], os.environ['RX_V'])).encode())"
    command = remote_command([sys.executable, "-c", script, *TRICKY], env={"RX_V": "x $y 'z' \\n\n€"},
                             cwd=PurePosixPath("/"))
    done = subprocess.run(["sh", "-c", command], capture_output=True, timeout=30, check=True)
    assert done.stdout.decode() == repr((TRICKY, "x $y 'z' \\n\n€"))
    assert done.stderr.startswith(b"__rx_pid__=")


def _process(script: str) -> SshProcess:
    popen = subprocess.Popen(["sh", "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, bufsize=0)
    return SshProcess(OpenSSHBackend(HostSpec(host="h")), popen, "sh")


def _drain(process: SshProcess) -> tuple[bytes, bytes, int | None]:
    out = b"".join(iter(process.read_stdout, b""))
    err = b"".join(iter(process.read_stderr, b""))
    return out, err, process.wait(10)


def test_process_strips_the_pid_line_and_keeps_the_rest() -> None:
    process = _process("echo noise >&2; echo __rx_pid__=$$ >&2; echo out; echo err >&2; exit 7")
    process._read_header(10)
    assert process.remote_pid == process.pid  # sh -c is the process group leader here too
    assert not process.lost_master
    assert _drain(process) == (b"out\n", b"noise\nerr\n", 7)


def test_process_without_pid_line_passes_everything_through() -> None:
    process = _process("echo 'This account is currently not available.' >&2; exit 1")
    process._read_header(10)
    assert process.remote_pid is None
    assert _drain(process) == (b"", b"This account is currently not available.\n", 1)


def test_process_notices_a_missing_master() -> None:
    process = _process(f"echo '{NO_MASTER_MARKER}' >&2; exit 255")
    process._read_header(10)
    assert process.lost_master
    assert _drain(process)[2] == 255


def test_process_stdin_round_trip_and_kill() -> None:
    process = _process("echo __rx_pid__=$$ >&2; cat")
    process._read_header(10)
    process.write_stdin(b"x" * 50_000)  # less than a pipe buffer: nobody reads stdout yet
    process.close_stdin()
    assert _drain(process) == (b"x" * 50_000, b"", 0)

    sleeper = _process("echo __rx_pid__=$$ >&2; exec sleep 60")
    sleeper._read_header(10)
    sleeper.remote_pid = None  # no master to signal through: kill ends the local process
    sleeper.kill()
    sleeper.kill()  # twice is harmless
    assert _drain(sleeper)[2] == -1
    with pytest.raises(ConnectError, match="closed"):
        sleeper.write_stdin(b"late")


# --- error translation --------------------------------------------------------------------------------------


def _one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text
    return text


def test_changed_host_key_names_host_file_and_remedy() -> None:
    error = map_ssh_error("rx-testbed-1", CHANGED_KEY, known_hosts="/ignored")
    assert isinstance(error, HostKeyError)
    assert error.host == "rx-testbed-1"
    assert error.exit_code == 255
    text = _one_line(error)
    assert "host key has changed" in text
    assert "/tmp/osdev/kh_changed line 1" in text
    assert 'ssh-keygen -f "/tmp/osdev/kh_changed" -R "[127.0.0.1]:22622"' in text


def test_unknown_key_under_strict_checking() -> None:
    error = map_ssh_error("lab", STRICT_UNKNOWN, known_hosts="/home/u/.ssh/known_hosts")
    assert isinstance(error, HostKeyError)
    text = _one_line(error)
    assert "no ED25519 host key for [127.0.0.1]:22622" in text
    assert "/home/u/.ssh/known_hosts" in text
    bare = map_ssh_error("lab", "Host key verification failed.\r\n", known_hosts="/kh")
    assert isinstance(bare, HostKeyError)
    assert "/kh" in str(bare)


@pytest.mark.parametrize(
    ("stderr", "kind", "reason"),
    [
        ("rx@127.0.0.1: Permission denied (publickey).\r\n", AuthError, "Permission denied (publickey)"),
        ("Received disconnect from 127.0.0.1 port 22:2: Too many authentication failures\r\n", AuthError,
         "Too many authentication failures"),
        ("ssh: connect to host 127.0.0.1 port 1: Connection refused\r\n", ConnectError,
         "connect to host 127.0.0.1 port 1: Connection refused"),
        ("ssh: Could not resolve hostname nowhere.invalid: Name or service not known\r\n", ConnectError,
         "Could not resolve hostname nowhere.invalid: Name or service not known"),
        ("ssh: connect to host 10.0.0.1 port 22: Connection timed out\r\n", ConnectError,
         "port 22: Connection timed out"),
        ("Connection timed out during banner exchange\r\nConnection to UNKNOWN port 65535 timed out\r\n",
         ConnectError, "Connection timed out during banner exchange"),
        ("ssh: connect to host 10.0.0.1 port 22: No route to host\r\n", ConnectError, "No route to host"),
        ("kex_exchange_identification: Connection closed by remote host\r\n"
         "Connection closed by 127.0.0.1 port 2222\r\n", ConnectError, "kex_exchange_identification"),
        ("Warning: Permanently added '[127.0.0.1]:2222' (ED25519) to the list of known hosts.\r\n"
         "Timeout, server 127.0.0.1 not responding.\r\n", ConnectError, "Timeout, server 127.0.0.1 not responding"),
        (f"{NO_MASTER_MARKER}\n", ConnectError, "connection was lost"),
        ("", ConnectError, "no message"),
    ],
)
def test_ssh_messages_map_to_errors(stderr: str, kind: type[BackendError], reason: str) -> None:
    error = map_ssh_error("lab", stderr)
    assert type(error) is kind
    text = _one_line(error)
    assert text.startswith("lab: ")
    assert reason in text


@pytest.mark.parametrize(
    "stderr",
    [
        "/home/u/.ssh/config: line 2: Bad configuration option: bogus\n"
        "/home/u/.ssh/config: terminating, 1 bad configuration options\n",
        "Can't open user config file /nonexistent: No such file or directory\n",
    ],
)
def test_broken_ssh_config_is_a_config_error(stderr: str) -> None:
    error = map_ssh_error("lab", stderr)
    assert type(error) is ConfigError
    assert error.exit_code == 3
    assert stderr.splitlines()[0].rstrip(".") in _one_line(error)


# --- classify_exit: the link's failure or the command's exit -------------------------------------------------


@pytest.mark.parametrize(
    ("code", "stderr", "kind", "words"),
    [
        (255, CHANGED_KEY, HostKeyError, "host key has changed"),
        (255, "rx@127.0.0.1: Permission denied (publickey).\r\n", AuthError, "Permission denied"),
        (255, "Connection to 127.0.0.1 closed by remote host.\r\n", ConnectError, "Connection to 127.0.0.1 closed"),
        (255, "client_loop: send disconnect: Broken pipe\r\n", ConnectError, "Broken pipe"),
        (255, "", ConnectError, "exit status 255 and no message"),
        # a command's own words that look like a broken ssh_config: the link failed, not the configuration
        (255, "worker: terminating\n", ConnectError, "worker: terminating"),
        (-1, "", ConnectError, "the connection was lost"),
        (-15, "partial output", ConnectError, "the connection was lost"),
    ],
)
def test_exit_255_or_a_killed_client_is_the_links_failure(code: int, stderr: str, kind: type[BackendError],
                                                           words: str) -> None:
    error = OpenSSHBackend(HostSpec(host="lab")).classify_exit(code, stderr.encode())
    assert type(error) is kind
    assert error.host == "lab"
    assert words in _one_line(error)


@pytest.mark.parametrize("code", [None, 0, 1, 2, 124, 127, 254])
def test_other_exit_statuses_are_the_commands_own(code: int | None) -> None:
    assert OpenSSHBackend(HostSpec(host="lab")).classify_exit(code, b"Permission denied (publickey).") is None


def test_a_host_key_failure_names_the_configured_known_hosts_file() -> None:
    backend = OpenSSHBackend(HostSpec(host="lab", known_hosts=Path("/home/u/kh")))
    error = backend.classify_exit(255, b"Host key verification failed.\r\n")
    assert isinstance(error, HostKeyError)
    assert "/home/u/kh" in str(error)
