"""The memo of ``ssh -G`` answers (remote_exec.backends.sshg): a new process's first connection spares the run
of ``ssh -G`` only while nothing the answer came from changed, and never where it depends on more than files."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from remote_exec.backends import sshg
from remote_exec.backends.base import HostSpec
from remote_exec.backends.openssh import OpenSSHBackend


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("RX_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _touch_later(path: Path, text: str) -> None:
    """Rewrite ``path`` so that its stat data surely changes (a coarse clock could keep the mtime)."""
    before = path.stat().st_mtime_ns
    path.write_text(text)
    os.utime(path, ns=(before + 10**9, before + 10**9))


def test_an_answer_is_kept_while_its_files_are_unchanged(cache: Path, tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    config = tmp_path / "config"
    config.write_text(f"Include {tmp_path}/conf.d/*.conf\nHost lab\n    HostName 192.0.2.7\n")
    (tmp_path / "conf.d" / "a.conf").write_text("Host other\n    Port 2200\n")
    argv = ["ssh", "-G", "-F", str(config), "--", "lab"]
    ssh = shutil.which("ssh") or "/usr/bin/ssh"
    sshg.remember(argv, ssh, "hostname 192.0.2.7\n")
    assert sshg.recall(argv, ssh) == "hostname 192.0.2.7\n"
    assert sshg.recall([*argv[:-1], "other"], ssh) is None  # another host: another key

    _touch_later(tmp_path / "conf.d" / "a.conf", "Host other\n    Port 2201\n")  # an included file changed
    assert sshg.recall(argv, ssh) is None
    sshg.remember(argv, ssh, "hostname 192.0.2.7\n")
    (tmp_path / "conf.d" / "b.conf").write_text("Host lab\n    Port 2202\n")  # a file added where Include looks
    os.utime(tmp_path / "conf.d", ns=(time.time_ns() + 10**9,) * 2)
    assert sshg.recall(argv, ssh) is None
    sshg.remember(argv, ssh, "hostname 192.0.2.7\n")
    _touch_later(config, config.read_text() + "    User carol\n")
    assert sshg.recall(argv, ssh) is None


@pytest.mark.parametrize("line", ["Match exec \"test -f /tmp/x\"", "Match host lab localnetwork 10.0.0.0/8",
                                  "CanonicalizeHostname yes", "Host lab\n    User ${LAB_USER}",
                                  "Include /etc/ssh/*/nested.conf"])
def test_nothing_is_kept_where_the_answer_can_change_without_a_file_changing(cache: Path, tmp_path: Path,
                                                                             line: str) -> None:
    config = tmp_path / "config"
    config.write_text(f"{line}\nHost lab\n    HostName 192.0.2.7\n")
    argv = ["ssh", "-G", "-F", str(config), "--", "lab"]
    sshg.remember(argv, "/usr/bin/ssh", "hostname 192.0.2.7\n")
    assert sshg.recall(argv, "/usr/bin/ssh") is None
    assert not (cache / "ssh-G").exists()


def test_a_memo_written_by_anyone_else_is_ignored(cache: Path, tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text("Host lab\n    HostName 192.0.2.7\n")
    argv = ["ssh", "-G", "-F", str(config), "--", "lab"]
    sshg.remember(argv, "/usr/bin/ssh", "hostname 192.0.2.7\n")
    [memo] = (cache / "ssh-G").iterdir()
    memo.chmod(0o666)
    assert sshg.recall(argv, "/usr/bin/ssh") is None


@pytest.mark.skipif(shutil.which("ssh") is None, reason="needs the OpenSSH client")
def test_a_new_backend_resolves_from_the_memo_and_sees_an_edit(cache: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config"
    config.write_text("Host lab\n    HostName 192.0.2.7\n    Port 2200\n")
    assert OpenSSHBackend(HostSpec(host="lab", ssh_config=config)).resolve().port == 2200

    def no_ssh(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("ssh -G ran again")

    with monkeypatch.context() as patched:
        patched.setattr(subprocess, "run", no_ssh)
        resolved = OpenSSHBackend(HostSpec(host="lab", ssh_config=config)).resolve()
    assert (resolved.hostname, resolved.port) == ("192.0.2.7", 2200)
    _touch_later(config, "Host lab\n    HostName 192.0.2.8\n    Port 2201\n")
    resolved = OpenSSHBackend(HostSpec(host="lab", ssh_config=config)).resolve()
    assert (resolved.hostname, resolved.port) == ("192.0.2.8", 2201)
