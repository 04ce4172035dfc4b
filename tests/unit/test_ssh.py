"""What the SSH backends share (remote_exec.backends.ssh), from config files written by the tests, no network:
the one ResolvedHost record built both ways (from ``ssh -G`` output, as the openssh backend does, and by
parsing the file, as the paramiko backend does), and the aliases ``rx hosts`` lists."""

from __future__ import annotations

import getpass
import shutil
import subprocess
from pathlib import Path

import pytest

from remote_exec.backends.base import HostSpec
from remote_exec.backends.ssh import ResolvedHost, list_aliases, parse_jump, parse_ssh_g, resolve
from remote_exec.errors import ConfigError


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh home directory with an empty ~/.ssh, so the developer's own files never leak in."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    return home


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_alias_takes_hostname_port_user_identity_and_known_hosts_from_the_file(home: Path) -> None:
    config = write(home / "cfg", """
Host gpu1
    HostName 10.1.2.3
    Port 2222
    User alice
    IdentityFile ~/.ssh/gpu_key
    IdentityFile /keys/%r-at-%h
    UserKnownHostsFile ~/.ssh/known_gpu /etc/ssh/known_extra
    IdentitiesOnly yes
""")
    host = resolve(HostSpec("gpu1", ssh_config=config))
    assert (host.alias, host.hostname, host.port, host.user) == ("gpu1", "10.1.2.3", 2222, "alice")
    assert host.identity_files == (home / ".ssh/gpu_key", Path("/keys/alice-at-10.1.2.3"))
    assert host.known_hosts_files == (home / ".ssh/known_gpu", Path("/etc/ssh/known_extra"))
    assert host.identities_only is True
    assert host.proxy_jump is None
    assert host.known_hosts_name == "[10.1.2.3]:2222"
    assert host.config_file == config


def test_first_value_wins_and_wildcard_blocks_fill_in_the_rest(home: Path) -> None:
    config = write(home / "cfg", """
Host web*
    User deploy
Host web1
    User ignored
    HostName web1.example.org
Host *
    Port 2200
    User fallback
""")
    web1 = resolve(HostSpec("web1", ssh_config=config))
    assert (web1.hostname, web1.user, web1.port) == ("web1.example.org", "deploy", 2200)
    other = resolve(HostSpec("db", ssh_config=config))
    assert (other.hostname, other.user, other.port) == ("db", "fallback", 2200)


def test_spec_overrides_beat_the_file(home: Path) -> None:
    config = write(home / "cfg", """
Host box
    HostName box.internal
    Port 2222
    User alice
    IdentityFile ~/.ssh/box_key
    UserKnownHostsFile ~/.ssh/known_box
""")
    spec = HostSpec("box", user="bob", port=2022, identity_file=Path("~/other_key"),
                    known_hosts=Path("~/kh"), ssh_config=config)
    host = resolve(spec)
    assert (host.hostname, host.user, host.port) == ("box.internal", "bob", 2022)
    # like ssh -i: the given key first, the configured ones after it
    assert host.identity_files == (home / "other_key", home / ".ssh/box_key")
    assert host.known_hosts_files == (home / "kh",)
    assert host.known_hosts_name == "[box.internal]:2022"


def test_defaults_follow_openssh_when_nothing_is_configured(home: Path) -> None:
    write(home / ".ssh/id_rsa", "not read here")
    write(home / ".ssh/id_ed25519", "not read here")
    host = resolve(HostSpec("plain.example.org"))  # no ~/.ssh/config
    assert host.hostname == "plain.example.org"
    assert host.port == 22
    assert host.user == getpass.getuser()
    assert host.config_file is None
    # only the default keys that exist, in OpenSSH's order (ed25519 before rsa)
    assert host.identity_files == (home / ".ssh/id_ed25519", home / ".ssh/id_rsa")
    assert host.known_hosts_files[0] == home / ".ssh/known_hosts"
    assert host.known_hosts_name == "plain.example.org"
    assert host.identities_only is False


def test_user_ssh_config_is_read_when_no_file_is_given(home: Path) -> None:
    write(home / ".ssh/config", "Host lab\n  HostName 192.0.2.7\n  User carol\n")
    host = resolve(HostSpec("lab"))
    assert (host.hostname, host.user) == ("192.0.2.7", "carol")
    assert host.config_file == home / ".ssh/config"


def test_configured_identity_file_replaces_the_defaults(home: Path) -> None:
    write(home / ".ssh/id_ed25519", "exists")
    config = write(home / "cfg", "Host x\n  IdentityFile ~/.ssh/missing_key\n")
    host = resolve(HostSpec("x", ssh_config=config))
    # kept although missing (the auth error names it); defaults are not added, as in OpenSSH
    assert host.identity_files == (home / ".ssh/missing_key",)


def test_proxy_jump_is_kept_and_none_means_no_jump(home: Path) -> None:
    config = write(home / "cfg", """
Host inner
    HostName 10.0.0.5
    ProxyJump admin@bastion:2200,gate
Host direct
    ProxyJump none
Host *
    ProxyJump fallback
""")
    assert resolve(HostSpec("inner", ssh_config=config)).proxy_jump == "admin@bastion:2200,gate"
    assert resolve(HostSpec("direct", ssh_config=config)).proxy_jump is None


def test_proxy_command_tokens_take_the_values_in_effect_and_the_first_proxy_setting_wins(home: Path) -> None:
    """%h %p %r %n %% expanded as OpenSSH does, with rx's overrides (a port given to rx, not the file's);
    ProxyCommand and ProxyJump compete: whichever the file sets first."""
    config = write(home / "cfg", """
Host gpu1
    HostName 10.0.0.5
    Port 2222
    User bob
    ProxyCommand ssh -W %h:%p gate # %r %n 100%%
Host plain
    ProxyCommand none
Host jump-first
    ProxyJump gate
    ProxyCommand nc %h %p
Host command-first
    ProxyCommand nc %h %p
    ProxyJump gate
Host fdpass
    ProxyCommand gate-helper %h
    ProxyUseFdpass yes
""")
    gpu1 = resolve(HostSpec("gpu1", ssh_config=config, port=2200))
    assert gpu1.proxy_command == "ssh -W 10.0.0.5:2200 gate # bob gpu1 100%"
    assert gpu1.proxy_jump is None
    assert resolve(HostSpec("plain", ssh_config=config)).proxy_command is None
    jump_first = resolve(HostSpec("jump-first", ssh_config=config))
    assert (jump_first.proxy_jump, jump_first.proxy_command) == ("gate", None)
    command_first = resolve(HostSpec("command-first", ssh_config=config))
    assert (command_first.proxy_jump, command_first.proxy_command) == (None, "nc command-first 22")
    with pytest.raises(ConfigError, match="ProxyUseFdpass"):
        resolve(HostSpec("fdpass", ssh_config=config))


def test_parse_jump_splits_hops_in_order() -> None:
    hops = parse_jump("admin@bastion:2200, ssh://gate,10.0.0.1")
    assert [(hop.user, hop.host, hop.port) for hop in hops] == [
        ("admin", "bastion", 2200), (None, "gate", None), (None, "10.0.0.1", None)]
    with pytest.raises(ConfigError):
        parse_jump("bastion:notaport")


def test_host_key_alias_names_the_known_hosts_entry(home: Path) -> None:
    config = write(home / "cfg", "Host tunnel\n  HostName localhost\n  Port 2201\n  HostKeyAlias real-box\n")
    host = resolve(HostSpec("tunnel", ssh_config=config))
    assert host.known_hosts_name == "[real-box]:2201"


def test_include_is_followed_absolute_relative_and_glob(home: Path) -> None:
    write(home / ".ssh/conf.d/10-lab", "Host lab1\n  HostName 10.9.0.1\n  User labuser\n")
    write(home / ".ssh/conf.d/20-lab", "Host lab2\n  HostName 10.9.0.2\n")
    extra = write(home / "elsewhere/extra.conf", "Host far\n  HostName far.example.org\n  Port 2022\n")
    config = write(home / "cfg", f"Include conf.d/*\nInclude {extra}\nInclude does-not-exist\n"
                                 "Host *\n  User default-user\n")
    lab1 = resolve(HostSpec("lab1", ssh_config=config))
    assert (lab1.hostname, lab1.user) == ("10.9.0.1", "labuser")
    lab2 = resolve(HostSpec("lab2", ssh_config=config))
    assert (lab2.hostname, lab2.user) == ("10.9.0.2", "default-user")
    far = resolve(HostSpec("far", ssh_config=config))
    assert (far.hostname, far.port) == ("far.example.org", 2022)
    assert list_aliases(config) == ["lab1", "lab2", "far"]


def test_include_loop_is_a_config_error(home: Path) -> None:
    config = home / "cfg"
    write(config, f"Include {config}\nHost a\n")
    with pytest.raises(ConfigError, match="nested too deeply"):
        resolve(HostSpec("a", ssh_config=config))


def test_missing_explicit_config_file_is_a_config_error(home: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        resolve(HostSpec("a", ssh_config=home / "nope"))


def test_bad_port_in_the_file_is_a_config_error(home: Path) -> None:
    config = write(home / "cfg", "Host a\n  Port twenty\n")
    with pytest.raises(ConfigError, match="Port"):
        resolve(HostSpec("a", ssh_config=config))


def test_list_aliases_leaves_out_patterns_and_negations(home: Path) -> None:
    config = write(home / "cfg", """
# comment
Host alpha beta
    User x
Host *.example.org !skip gamma
Host "quoted name"
Host beta
Host web?? delta
Match host zeta
    User y
""")
    assert list_aliases(config) == ["alpha", "beta", "gamma", "quoted name", "delta"]


def test_list_aliases_of_missing_file_is_empty(home: Path) -> None:
    assert list_aliases(home / "nothing-here") == []
    assert list_aliases(None) == []  # ~/.ssh/config does not exist in the fresh home


def test_list_aliases_defaults_to_user_config(home: Path) -> None:
    write(home / ".ssh/config", "Host mine\n")
    assert list_aliases() == ["mine"]


def test_paramiko_is_imported_without_invoke_and_match_exec_still_works(tmp_path: Path) -> None:
    """rx keeps invoke (50-80 ms, only for ``Match exec``) out of paramiko's import, and hands it over when
    an ssh_config needs it; a fresh interpreter shows both."""
    import subprocess
    import sys

    config = tmp_path / "ssh_config"
    config.write_text('Match host lab exec "test -d /"\n  HostName 192.0.2.9\n'
                      'Match host lab exec "false"\n  User never\n', encoding="utf-8")
    probe = (
        "import sys\n"
        "import remote_exec.backends.paramiko\n"
        "print('invoke' in sys.modules)\n"
        "from pathlib import Path\n"
        "from remote_exec.backends.base import HostSpec\n"
        "from remote_exec.backends.ssh import resolve\n"
        f"host = resolve(HostSpec('lab', ssh_config=Path({str(config)!r}), user='carol'))\n"
        "print(host.hostname, host.user)\n"
        "import invoke\n"
        "print(invoke.__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:3] == ["False", "192.0.2.9 carol", "invoke"]


def test_paramiko_s_version_is_read_without_importlib_metadata_and_is_the_same(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """paramiko asks importlib.metadata for its version as it is imported (email, zipfile, csv...: ~20 ms
    of a first call): rx answers from the distribution's folder name, the same version, and loads nothing
    of importlib.metadata; a folder it cannot read the version from leaves the question to the real one."""
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "from remote_exec.backends.ssh import import_paramiko\n"
        "import_paramiko()\n"
        "import paramiko\n"
        "print('importlib.metadata' in sys.modules, 'email' in sys.modules)\n"
        "import importlib.metadata\n"
        "print(paramiko.__version__ == importlib.metadata.version('paramiko'), paramiko.__version__)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split("\n")
    assert lines[0] == "False False" and lines[1].startswith("True ")

    from remote_exec.backends import ssh

    folder = tmp_path / "site"
    (folder / "paramiko").mkdir(parents=True)
    (folder / "paramiko" / "__init__.py").write_text("")
    (folder / "paramiko-3.4.0.dist-info").mkdir()
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "importlib.metadata", raising=False)
    monkeypatch.delitem(sys.modules, "paramiko", raising=False)
    import importlib

    importlib.invalidate_caches()
    stand_in = ssh._metadata_stand_in()
    assert stand_in is not None and stand_in.version("paramiko") == "3.4.0"
    (folder / "paramiko-5.0.0.dist-info").mkdir()  # two versions, half upgraded: the real answer
    assert ssh._metadata_stand_in() is None


# --- the same record from `ssh -G` (the openssh backend's way) ----------------------------------------------

# An excerpt of `ssh -G` from OpenSSH 9.2 (the real output has ~80 lines in this form).
SSH_G = """\
host gpu1
user alice
hostname 10.1.2.3
port 2222
addressfamily any
batchmode yes
connecttimeout 10
ciphers chacha20-poly1305@openssh.com,aes128-ctr,aes192-ctr,aes256-ctr,aes128-gcm@openssh.com,aes256-gcm@openssh.com
identityfile ~/.ssh/id_ed25519
identityfile /keys/lab key
globalknownhostsfile /etc/ssh/ssh_known_hosts /etc/ssh/ssh_known_hosts2
userknownhostsfile ~/.ssh/known_hosts ~/.ssh/known_hosts2
proxyjump bastion
stricthostkeychecking accept-new
serveraliveinterval 5
localforward [localhost]:8080 [localhost]:80
localforward [localhost]:8081 [localhost]:81
"""


def test_parse_ssh_g_keeps_repeated_keywords_in_order() -> None:
    options = parse_ssh_g(SSH_G)
    assert options["hostname"] == ("10.1.2.3",)
    assert options["identityfile"] == ("~/.ssh/id_ed25519", "/keys/lab key")
    assert options["localforward"] == ("[localhost]:8080 [localhost]:80", "[localhost]:8081 [localhost]:81")


def test_resolved_host_from_ssh_g() -> None:
    resolved = ResolvedHost.from_ssh_g("gpu1", SSH_G)
    home = str(Path.home())
    assert (resolved.hostname, resolved.user, resolved.port) == ("10.1.2.3", "alice", 2222)
    assert resolved.destination == "alice@10.1.2.3:2222"
    assert resolved.address == "10.1.2.3:2222"
    assert resolved.identity_files == (Path(f"{home}/.ssh/id_ed25519"), Path("/keys/lab key"))
    assert resolved.known_hosts_files == (Path(f"{home}/.ssh/known_hosts"), Path(f"{home}/.ssh/known_hosts2"))
    assert resolved.known_hosts_file == Path(f"{home}/.ssh/known_hosts")
    assert resolved.proxy_jump == "bastion"
    assert (resolved.identities_only, resolved.host_key_alias) == (False, None)
    assert resolved.known_hosts_name == "[10.1.2.3]:2222"


def test_resolved_host_without_jump_and_broken_output() -> None:
    direct = ResolvedHost.from_ssh_g("h", "hostname h.example\nuser bob\nport 22\nproxyjump none\n")
    assert direct.proxy_jump is None
    with pytest.raises(ConfigError, match="no host name"):
        ResolvedHost.from_ssh_g("h", "user bob\n")


def test_ssh_g_identities_only_and_host_key_alias() -> None:
    resolved = ResolvedHost.from_ssh_g("t", "hostname ::1\nuser u\nport 22\nidentitiesonly yes\n"
                                            "hostkeyalias real-box\n", config_file=Path("/cfg"))
    assert (resolved.identities_only, resolved.host_key_alias) == (True, "real-box")
    assert resolved.known_hosts_name == "real-box"
    assert resolved.address == "[::1]:22"
    assert resolved.config_file == Path("/cfg")


@pytest.mark.skipif(shutil.which("ssh") is None, reason="the OpenSSH client is not installed")
def test_both_ways_of_resolving_give_the_same_record(home: Path) -> None:
    """What ``ssh -G`` says and what parsing the file says agree on every field both backends read."""
    config = write(home / "cfg", f"""
Host lab
    HostName 192.0.2.7
    User carol
    Port 2200
    IdentityFile ~/.ssh/lab_key
    IdentityFile {home}/keys/second
    IdentitiesOnly yes
    ProxyJump admin@bastion:2200,gate
    UserKnownHostsFile {home}/known_lab {home}/kh_%h_%p
    HostKeyAlias real-lab
Host *
    User fallback
""")
    spec = HostSpec("lab", ssh_config=config)
    done = subprocess.run(["ssh", "-G", "-F", str(config), "--", "lab"], capture_output=True, text=True,
                          timeout=30, check=True, stdin=subprocess.DEVNULL)
    from_ssh = ResolvedHost.from_ssh_g("lab", done.stdout, config_file=config)
    parsed = resolve(spec)
    assert from_ssh == parsed  # options (ssh -G's raw output) does not take part in the comparison
    assert parsed.known_hosts_files == (home / "known_lab", home / "kh_192.0.2.7_2200")
    assert parsed.identity_files == (home / ".ssh/lab_key", home / "keys/second")
