"""Faults of the link: the host freezes (docker pause), sshd dies mid-transfer, the host key changes.

The pause and sshd scenarios share one dedicated host of this module; the host-key scenario has its own
(its keys are regenerated once, then every trial must be refused).
"""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from faultkit import (
    Rig,
    TrialFactory,
    audit_remote,
    cli_error_lines,
    error_summary,
    has_traceback,
    remote_baseline,
    traceback_message,
    workspace_files,
)

from remote_exec.backends import backend_class
from remote_exec.backends.base import HostSpec
from remote_exec.errors import HostKeyError, RemoteExecError
from testbed import Testbed, TestbedHost, exec_root, pause, regenerate_host_keys, unpause

KEEPALIVE_INTERVAL = 1.0
KEEPALIVE_COUNT = 2
DEAD_AFTER = KEEPALIVE_INTERVAL * KEEPALIVE_COUNT + 1.0
#: Detection may take up to one watchdog tick (1 s) and the kill of the link another second.
PAUSE_MARGIN = 2.0

BIG_RESULT = """\
import hashlib, os, sys
digest = hashlib.sha256()
with open("big.bin", "wb") as stream:
    for _ in range(50):
        block = os.urandom(1 << 20)
        digest.update(block)
        stream.write(block)
print("sha256", digest.hexdigest(), flush=True)
"""

# Kills every sshd process serving the user rx (not the listener), the moment a line arrives on stdin.
SSHD_KILLER = (
    "read go; for pid in $(ps -eo pid=,args= | awk '$2 == \"sshd:\" && $3 ~ /^rx/ {print $1}'); "
    "do kill -9 $pid; done; echo killed"
)


@pytest.fixture(scope="module")
def link_host(module_host: Callable[..., TestbedHost]) -> TestbedHost:
    """A host of this module's own, for pausing and for killing its sshd sessions."""
    return module_host("link")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("attempt", [1, 2])
def test_pause_mid_run_gives_connect_error_within_dead_after(rig: Rig, link_host: TestbedHost,
                                                             trial: TrialFactory, attempt: int) -> None:
    baseline = remote_baseline(link_host)
    variant = f"keepalive {KEEPALIVE_INTERVAL:g} s x {KEEPALIVE_COUNT}, attempt {attempt}"

    with trial("pause", variant=variant, bound=DEAD_AFTER) as t:
        watched = rig.watch(rig.driver_argv("nap", link_host.alias, "60"))
        started_at = watched.wait_for("task started", timeout=45)
        assert started_at is not None, "the task never started"
        pause(link_host)
        paused_at = time.monotonic()
        try:
            reported_at = watched.wait_for("RESULT ", timeout=DEAD_AFTER + 10)
            done = watched.wait(timeout=10)
        finally:
            unpause(link_host)
        seconds = (reported_at or time.monotonic()) - paused_at
        t.timed(seconds, hang=done.timed_out or reported_at is None)
        result = done.result_line()
        t.outcome = f"{result.get('type', 'no result').rsplit('.', 1)[-1]} (exit status {result.get('exit_code')})"
        left = audit_remote(link_host, baseline)
        t.audit(left)
        runs = rig.runs()
        tasks = list((runs[-1].get("tasks") or {}).values()) if runs else []
        t.note(run_status=runs[-1]["status"] if runs else None, traceback=has_traceback(done.stderr))

        assert reported_at is not None and not done.timed_out, done.stdout + done.stderr
        assert result["type"] == "remote_exec.errors.ConnectError", result
        assert result["exit_code"] == 255
        assert seconds <= DEAD_AFTER + PAUSE_MARGIN, seconds
        assert done.returncode == 0, done.stderr
        # The driver caught the error and exited 0: so is its run recorded; the failed call is counted apart.
        assert len(runs) == 1 and runs[0]["status"] == "finished", runs
        assert runs[0]["error"] == "1 of 1 call failed", runs
        assert [entry["status"] for entry in tasks] == ["failed"], tasks
        assert "ConnectError" in str(tasks[0].get("error")), tasks
        assert left.clean, left.describe()


def _spooled(workspace: Path, spool: Path) -> list[Path]:
    """What a result's files are spooled in: under the run's store (since 70c49b8), or ``TMPDIR`` before."""
    return [*workspace.glob("runs/*/.store/tmp/*/files.tar"), *spool.glob("rx-collect-*/*")]


def _spool_size(workspace: Path, spool: Path) -> int:
    size = 0
    for path in _spooled(workspace, spool):
        with contextlib.suppress(OSError):
            size += path.stat().st_size
    return size


@pytest.mark.timeout(120)
def test_sshd_killed_mid_transfer_leaves_no_partial_file(rig: Rig, link_host: TestbedHost,
                                                         trial: TrialFactory) -> None:
    rig.write("big_result.py", BIG_RESULT)
    spool = rig.root / "spool"
    spool.mkdir()
    baseline = remote_baseline(link_host)

    with trial("sshd_killed", variant="50 MB result file", bound=10.0) as t:
        killer = subprocess.Popen(["docker", "exec", "-i", link_host.container_id, "sh", "-c", SSHD_KILLER],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert killer.stdin is not None and killer.stdout is not None
        try:
            watched = rig.watch(rig.rx_argv("run", "--remote", link_host.alias, "big_result.py"),
                                env={"TMPDIR": str(spool)})
            deadline = time.monotonic() + 60
            while (watched.process.poll() is None and _spool_size(rig.workspace, spool) < (1 << 20)
                   and time.monotonic() < deadline):
                time.sleep(0.002)
            killer.stdin.write(b"go\n")
            killer.stdin.close()
            killed_at = time.monotonic()
            spooled = _spool_size(rig.workspace, spool)
            killed = killer.stdout.read().decode().strip() == "killed"
        finally:
            if killer.poll() is None:
                killer.kill()
            killer.wait(10)
            killer.stdout.close()
        done = watched.wait(timeout=30)
        t.timed(time.monotonic() - killed_at if done.returncode != 0 else 0.0, hang=done.timed_out)
        t.note(spooled_at_kill=spooled, traceback=has_traceback(done.stderr))
        digest = next((line.split()[1] for line in done.stdout.splitlines() if line.startswith("sha256 ")), None)
        landed = [path for path in workspace_files(rig.workspace) if path.name == "big.bin"]
        partial = [path for path in landed
                   if hashlib.sha256(path.read_bytes()).hexdigest() != digest]
        temporaries = [str(path) for path in workspace_files(rig.workspace) if "tmp" in path.name.lower()]
        left_in_spool = [str(path) for path in [*spool.rglob("*"), *rig.workspace.glob("runs/*/.store/tmp/*")]]
        t.note(corrupted=len(partial), leftover_local=len(temporaries) + len(left_in_spool))
        errors = cli_error_lines(done.stderr)
        t.outcome = f"exit {done.returncode}: {error_summary(done.stderr)}"
        t.audit(audit_remote(link_host, baseline))
        shown = rig.show()

        assert killed and 0 < spooled < 50 << 20, f"the kill did not land mid-transfer ({spooled} bytes spooled)"
        assert not done.timed_out
        assert done.returncode == 255, done.stderr
        assert len(errors) == 1 and not has_traceback(done.stderr), traceback_message(done.stderr)
        assert not landed, landed
        assert not temporaries and not left_in_spool, (temporaries, left_in_spool)
        assert shown["status"] == "failed", shown
        assert t.facts["orphans"] == 0 and t.facts["leftover_files"] == 0, t.facts


# --- host keys ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rekeyed_host(module_host: Callable[..., TestbedHost], testbed: Testbed) -> tuple[TestbedHost, list[str]]:
    """A host whose keys were regenerated after it was recorded, and its recorded (now stale) key lines."""
    host = module_host("rekeyed")
    prefix = f"[{host.hostname}]:{host.port} "
    stale = [line for line in testbed.known_hosts.read_text().splitlines() if line.startswith(prefix)]
    assert stale, f"no recorded keys for {prefix}"
    regenerate_host_keys(host)
    return host, stale


def _ssh_config(path: Path, testbed: Testbed, host: TestbedHost, known_hosts: Path) -> Path:
    path.write_text(
        f"Host {host.alias}\n    HostName {host.hostname}\n    Port {host.port}\n    User {host.user}\n"
        f'    IdentityFile "{testbed.identity_file}"\n    IdentitiesOnly yes\n'
        f'    UserKnownHostsFile "{known_hosts}"\n    LogLevel ERROR\n', encoding="utf-8")
    return path


HOST_KEY_VARIANTS: dict[str, Callable[[list[str]], list[str]]] = {
    "regenerated keys": lambda lines: lines,
    "only an ecdsa entry (another key type)": lambda lines: [ln for ln in lines if " ecdsa-" in ln],
    "only an rsa entry (another key type)": lambda lines: [ln for ln in lines if " ssh-rsa " in ln],
}


@pytest.mark.timeout(150)
@pytest.mark.parametrize("variant", list(HOST_KEY_VARIANTS))
def test_host_key_changed_is_refused(rig: Rig, rekeyed_host: tuple[TestbedHost, list[str]], testbed: Testbed,
                                     trial: TrialFactory, variant: str) -> None:
    host, stale = rekeyed_host
    entries = HOST_KEY_VARIANTS[variant](stale)
    assert entries, variant
    marker = f"/tmp/rx-hostkey-ran-{rig.backend}-{time.time_ns()}"
    rig.write("touch.py", f"open({marker!r}, 'w').close()\nprint('ran')\n")

    for attempt in range(2):
        known_hosts = rig.root / f"known_hosts-{attempt}"
        known_hosts.write_text("\n".join(entries) + "\n", encoding="utf-8")
        config = _ssh_config(rig.root / f"ssh_config-{attempt}", testbed, host, known_hosts)
        before = known_hosts.read_bytes()

        with trial("host_key", variant=f"{variant}, rx run", bound=15.0) as t:
            done = rig.rx("run", "--remote", host.alias, "touch.py", timeout=35, env={"RX_SSH_CONFIG": str(config)})
            t.timed(done.seconds, hang=done.timed_out)
            errors = cli_error_lines(done.stderr)
            unchanged = known_hosts.read_bytes() == before
            refused = done.returncode == 255 and "ran" not in done.stdout
            t.note(refused=refused, known_hosts_unchanged=unchanged, traceback=has_traceback(done.stderr))
            t.outcome = f"exit {done.returncode}: {error_summary(done.stderr)}"

            assert refused, done.stdout + done.stderr
            assert len(errors) == 1 and "host key" in errors[0].lower(), done.stderr
            assert not has_traceback(done.stderr), traceback_message(done.stderr)
            assert unchanged, known_hosts.read_text()

        with trial("host_key", variant=f"{variant}, backend.run", bound=15.0) as t:
            backend = backend_class(rig.backend)(HostSpec(host.alias, ssh_config=config))
            started = time.monotonic()
            try:
                backend.run(["python3", "-c", f"open({marker!r}, 'w').close()"], timeout=20)
            except RemoteExecError as exc:
                error: RemoteExecError | None = exc
            else:
                error = None
            finally:
                backend.close()
            t.timed(time.monotonic() - started)
            t.note(refused=isinstance(error, HostKeyError), known_hosts_unchanged=known_hosts.read_bytes() == before)
            t.outcome = type(error).__name__ if error else "connected"

            assert isinstance(error, HostKeyError), error
            assert known_hosts.read_bytes() == before, known_hosts.read_text()

    _, output = exec_root(host, f"test -e {marker} && echo present || echo absent")
    assert output.strip() == "absent", "a command ran on the host despite its changed key"
