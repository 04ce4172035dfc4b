"""ssh_config resolution (remote_exec.backends.sshconfig): what the paramiko backend connects to and what
``rx hosts`` lists, from config files written by the tests. No network."""

from __future__ import annotations

import getpass
from pathlib import Path

import pytest

from remote_exec.backends.base import HostSpec
from remote_exec.backends.sshconfig import list_aliases, parse_jump, resolve
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
        "from remote_exec.backends.sshconfig import resolve\n"
        f"host = resolve(HostSpec('lab', ssh_config=Path({str(config)!r}), user='carol'))\n"
        "print(host.hostname, host.user)\n"
        "import invoke\n"
        "print(invoke.__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:3] == ["False", "192.0.2.9 carol", "invoke"]
