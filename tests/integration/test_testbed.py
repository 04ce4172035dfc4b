"""The Docker testbed itself: hosts reachable by ssh with the generated files, and the fault tools."""

from __future__ import annotations

import time
from pathlib import Path

import docker
import pytest

import testbed as tb
from testbed import Testbed, TestbedHost
from testbed.pytest_plugin import SSHCommand


def _keys_by_port(known_hosts: Path) -> dict[int, set[str]]:
    keys: dict[int, set[str]] = {}
    for line in known_hosts.read_text().splitlines():
        address, keytype, blob = line.split()
        port = int(address.rsplit(":", 1)[1])
        keys.setdefault(port, set()).add(f"{keytype} {blob}")
    return keys


def _container_ids(label: str) -> set[str]:
    client = docker.from_env()
    try:
        return {c.id for c in client.containers.list(all=True, filters={"label": label})}
    finally:
        client.close()


def test_ssh_runs_python_trusting_only_the_generated_known_hosts(testbed: Testbed, ssh: SSHCommand) -> None:
    before = testbed.known_hosts.read_bytes()

    done = ssh("rx-testbed-1", "python3 -c 'print(6*7)'")

    assert done.returncode == 0, done.stderr
    assert done.stdout == "42\n"
    assert testbed.known_hosts.read_bytes() == before


def test_every_host_answers_as_user_rx(testbed: Testbed, ssh: SSHCommand) -> None:
    assert [h.alias for h in testbed.hosts] == ["rx-testbed-1", "rx-testbed-2"]
    for host in testbed.hosts:
        done = ssh(host.alias, "id -un; id -u; echo $HOME")
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["rx", "1000", "/home/rx"]


def test_password_login_is_refused(testbed: Testbed, ssh: SSHCommand) -> None:
    done = ssh(
        "rx-testbed-1",
        "true",
        options=["PreferredAuthentications=password,keyboard-interactive", "PubkeyAuthentication=no"],
    )

    assert done.returncode == 255
    assert "Permission denied" in done.stderr


def test_hosts_have_their_own_host_keys(testbed: Testbed) -> None:
    recorded = _keys_by_port(testbed.known_hosts)
    first, second = testbed.host(0), testbed.host(1)

    assert {key.split()[0] for key in recorded[first.port]} >= {"ssh-ed25519", "ssh-rsa"}
    assert recorded[first.port].isdisjoint(recorded[second.port])
    code, output = tb.exec_root(first, "cat /etc/ssh/ssh_host_ed25519_key.pub")
    assert code == 0
    assert " ".join(output.split()[:2]) in recorded[first.port]


def test_ports_are_published_on_loopback_only(testbed: Testbed) -> None:
    client = docker.from_env()
    try:
        container = client.containers.get(testbed.host(0).container_id)
        bindings = container.attrs["NetworkSettings"]["Ports"]["22/tcp"]
    finally:
        client.close()

    assert bindings == [{"HostIp": "127.0.0.1", "HostPort": str(testbed.host(0).port)}]


def test_up_again_keeps_the_running_hosts(testbed: Testbed) -> None:
    known_hosts = testbed.known_hosts.read_bytes()

    again = tb.up(2, state_dir=testbed.state_dir)

    assert again.hosts == testbed.hosts
    assert testbed.known_hosts.read_bytes() == known_hosts
    assert tb.status(state_dir=testbed.state_dir) == again


def test_down_removes_only_its_own_state_dirs_containers(testbed: Testbed, tmp_path: Path) -> None:
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    try:
        first = tb.up(1, state_dir=first_dir)
        survivor = tb.start_host(second_dir, "rx-survivor")
        assert first.host(0).container_name != testbed.host(0).container_name

        removed = tb.down(state_dir=first_dir)

        assert removed == 1
        remaining = _container_ids("rx-testbed=1")
        assert first.host(0).container_id not in remaining
        assert survivor.container_id in remaining
        assert {h.container_id for h in testbed.hosts} <= remaining
        assert not first.ssh_config.exists()
        assert tb.status(state_dir=first_dir) is None
        status = tb.status(state_dir=second_dir)
        assert status is not None
        assert [h.alias for h in status.hosts] == ["rx-survivor"]
    finally:
        tb.down(state_dir=first_dir)
        tb.down(state_dir=second_dir)


def test_regenerated_host_keys_are_refused_by_strict_ssh(
    testbed: Testbed, dedicated_host: TestbedHost, ssh: SSHCommand
) -> None:
    assert ssh(dedicated_host.alias, "true").returncode == 0
    known_hosts = testbed.known_hosts.read_bytes()

    tb.regenerate_host_keys(dedicated_host)
    done = ssh(dedicated_host.alias, "true")

    assert done.returncode == 255
    assert "Host key verification failed" in done.stderr
    assert testbed.known_hosts.read_bytes() == known_hosts


def test_a_paused_host_hangs_until_unpaused(dedicated_host: TestbedHost, ssh: SSHCommand) -> None:
    tb.pause(dedicated_host)
    try:
        started = time.monotonic()
        done = ssh(dedicated_host.alias, "true", options=["ConnectTimeout=2"])
        assert done.returncode == 255
        assert "timed out" in done.stderr
        assert time.monotonic() - started >= 1.5
    finally:
        tb.unpause(dedicated_host)

    assert ssh(dedicated_host.alias, "true").returncode == 0


def test_dedicated_host_joins_the_ssh_config_and_leaves_it(testbed: Testbed, ssh: SSHCommand) -> None:
    host = tb.start_host(testbed.state_dir, "rx-limited", mem_limit="96m", tmpfs={"/scratch": "size=1m"})
    try:
        assert host.alias == "rx-limited"
        assert "Host rx-limited\n" in testbed.ssh_config.read_text()
        done = ssh("rx-limited", "df --output=size -k /scratch | tail -1")
        assert done.returncode == 0, done.stderr
        assert int(done.stdout) == 1024
        code, limit = tb.exec_root(
            host,
            "cat /sys/fs/cgroup/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory/memory.limit_in_bytes",
        )
        assert code == 0
        assert int(limit) == 96 * 1024 * 1024
    finally:
        tb.remove_host(host)

    assert "rx-limited" not in testbed.ssh_config.read_text()
    assert host.port not in _keys_by_port(testbed.known_hosts)
    assert ssh("rx-testbed-1", "true").returncode == 0


def test_exec_root_runs_as_root_and_is_bounded(testbed_host: TestbedHost) -> None:
    assert tb.exec_root(testbed_host, "id -u; exit 3") == (3, "0\n")

    started = time.monotonic()
    with pytest.raises(tb.TestbedError, match="ran past"):
        tb.exec_root(testbed_host, "sleep 30", timeout=1)
    assert time.monotonic() - started < 10


def test_killing_sshd_stops_a_dedicated_host(dedicated_host: TestbedHost, ssh: SSHCommand) -> None:
    code, _ = tb.exec_root(dedicated_host, "kill $(cat /run/sshd.pid)")
    assert code in (0, 137)  # 137: the exec died with the container, which ends with its sshd

    deadline = time.monotonic() + 10
    done = ssh(dedicated_host.alias, "true", options=["ConnectTimeout=2"])
    while done.returncode != 255 and time.monotonic() < deadline:
        time.sleep(0.2)
        done = ssh(dedicated_host.alias, "true", options=["ConnectTimeout=2"])
    assert done.returncode == 255


def test_prune_removes_containers_whose_state_dir_is_gone(testbed: Testbed, tmp_path: Path) -> None:
    doomed_dir = tmp_path / "doomed"
    doomed = tb.start_host(doomed_dir, "rx-orphan")
    try:
        for path in doomed_dir.iterdir():
            path.unlink()
        doomed_dir.rmdir()

        assert tb.prune() >= 1

        remaining = _container_ids("rx-testbed=1")
        assert doomed.container_id not in remaining
        assert {h.container_id for h in testbed.hosts} <= remaining
    finally:
        tb.remove_host(doomed)
