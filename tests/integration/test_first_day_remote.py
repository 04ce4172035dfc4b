"""A researcher's first day (issue 12) against the testbed, on both backends: tracebacks of their code mapped
back to their files, Python's semantics (Ctrl-C, stdin, exceptions) over the wire, hosts as ssh resolves them."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent / "data"
if str(DATA) not in sys.path:
    sys.path.insert(0, str(DATA))
pytest.register_assert_rewrite("remote_support")

from remote_support import HOST, Remote  # noqa: E402

pytest_plugins = ["remote_support"]


def write(path: Path, source: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source).lstrip(), encoding="utf-8")
    return path


def user_lines(text: str) -> list[str]:
    """The lines of a traceback a user reads, without Python's column marks (which vary between versions)."""
    return [line.rstrip() for line in text.splitlines() if line.strip() and set(line.strip()) - set("~^")]


# -- 7. tracebacks ------------------------------------------------------------------------------------------

def test_a_remote_failure_shows_the_users_frames_at_their_local_files(remote: Remote) -> None:
    write(remote.project / "mylib" / "__init__.py", "")
    write(remote.project / "mylib" / "steps.py", """
        def run(x):
            return 1 / x
    """)
    write(remote.project / "train.py", """
        from mylib import steps

        print("training")
        steps.run(0)
    """)

    done = remote.rx("run", "--remote", HOST, "train.py")

    assert done.returncode == 1, done.stderr
    assert done.stdout == "training\n"
    lines = user_lines(done.stderr)
    assert lines[:-1] == [
        "Traceback (most recent call last):",
        '  File "train.py", line 4, in <module>',
        "    steps.run(0)",
        f'  File "{os.path.join("mylib", "steps.py")}", line 2, in run',
        "    return 1 / x",
        "ZeroDivisionError: division by zero",
    ], done.stderr
    assert ".cache/remote_exec" not in done.stderr


def test_a_task_defined_in_the_script_shows_its_source_on_the_callers_side(remote: Remote) -> None:
    write(remote.project / "sweep.py", f"""
        import traceback
        from remote_exec import task

        @task(remote="{HOST}")
        def train(x):
            return 10 / x

        try:
            train(0)
        except ZeroDivisionError:
            traceback.print_exc()
    """)

    done = subprocess.run([sys.executable, "sweep.py"], cwd=remote.project, env=remote.env, capture_output=True,
                          text=True, timeout=90, check=False)

    remote_part = done.stderr.partition("The above exception was the direct cause")[0]
    assert user_lines(remote_part) == [
        "remote_exec.errors.RemoteTraceback:",
        "Traceback (most recent call last):",
        '  File "sweep.py", line 6, in train',
        "    return 10 / x",
        "ZeroDivisionError: division by zero",
    ], done.stderr


# -- 5. stdin -------------------------------------------------------------------------------------------------

def test_piped_stdin_reaches_the_remote_script_with_its_end(remote: Remote) -> None:
    write(remote.project / "cat_stdin.py", """
        import hashlib, sys
        data = sys.stdin.buffer.read()
        print(len(data), hashlib.sha256(data).hexdigest(), repr(data[:3]))
    """)
    payload = b"hi\n" + os.urandom(2 << 20)

    done = subprocess.run(remote.argv("run", "--remote", HOST, "cat_stdin.py"), cwd=remote.project, env=remote.env,
                          input=payload, capture_output=True, timeout=120, check=False)

    import hashlib

    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().split() == [str(len(payload)), hashlib.sha256(payload).hexdigest(), "b'hi\\n'"]


# -- 15, 16: hosts as ssh resolves them -------------------------------------------------------------------------

def _entry(remote: Remote, alias: str, identity: Path) -> str:
    host = remote.host
    return (f"Host {alias}\n    HostName {host.hostname}\n    Port {host.port}\n    User {host.user}\n"
            f"    IdentityFile {identity}\n    IdentitiesOnly yes\n"
            f"    UserKnownHostsFile {remote.testbed.known_hosts}\n")


def test_a_key_that_needs_a_passphrase_is_named_with_what_to_do(remote: Remote, tmp_path: Path) -> None:
    key = tmp_path / "locked_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "a passphrase", "-f", str(key)], check=True)
    config = tmp_path / "locked_config"
    config.write_text(_entry(remote, "locked", key))
    write(remote.project / "job.py", "print('never')\n")

    done = remote.rx("run", "--remote", "locked", "job.py",
                     env={"RX_SSH_CONFIG": str(config), "SSH_AUTH_SOCK": ""})

    assert done.returncode == 255, done.stderr
    assert f"{key} is encrypted and no agent holds it: run `ssh-add {key}`" in done.stderr, done.stderr


def test_an_ssh_url_is_a_host_and_an_insecure_run_warns_once(remote: Remote, tmp_path: Path) -> None:
    config = tmp_path / "keys_only"
    config.write_text(f"Host *\n    IdentityFile {remote.testbed.identity_file}\n")
    write(remote.project / "job.py", "print('ran')\n")
    host = remote.host
    url = f"ssh://{host.user}@{host.hostname}:{host.port}"

    done = remote.rx("run", "--remote", url, "--insecure-no-host-key-check", "job.py",
                     env={"RX_SSH_CONFIG": str(config)})

    assert done.returncode == 0, done.stderr
    assert done.stdout == "ran\n"
    warned = [line for line in done.stderr.splitlines() if "host key checking is OFF" in line]
    assert len(warned) == 1 and "error" not in warned[0].lower(), done.stderr


def test_a_configured_insecure_host_warns_once_in_rxs_format(remote: Remote) -> None:
    """``host_key_policy = "off"`` from pyproject.toml on a plain ``rx run`` line (which starts connecting
    before rx's log is set up): the one warning still comes as rx's log line."""
    (remote.project / "pyproject.toml").write_text('[tool.rx]\nhost_key_policy = "off"\n')
    write(remote.project / "job.py", "print('ran')\n")

    done = remote.rx("run", "--remote", HOST, "job.py")

    assert done.returncode == 0, done.stderr
    assert done.stdout == "ran\n"
    warned = [line for line in done.stderr.splitlines() if "host key checking is OFF" in line]
    assert len(warned) == 1 and warned[0].startswith("rx: WARNING"), done.stderr


def test_openssh_reads_the_ssh_config_under_home_as_paramiko_does(remote: Remote, tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text(_entry(remote, "homealias", remote.testbed.identity_file))
    write(remote.project / "job.py", "print('ran')\n")
    env = {key: value for key, value in remote.env.items() if key != "RX_SSH_CONFIG"}

    done = subprocess.run(remote.argv("run", "--remote", "homealias", "job.py"), cwd=remote.project,
                          env={**env, "HOME": str(home)}, capture_output=True, text=True, timeout=90, check=False)

    assert done.returncode == 0, done.stderr
    assert done.stdout == "ran\n"


def test_rx_logs_of_a_running_detached_run_shows_its_output_so_far(remote: Remote) -> None:
    write(remote.project / "ticker.py", """
        import time
        for i in range(300):
            print("tick", i, flush=True)
            time.sleep(0.1)
    """)
    started = remote.rx("run", "--remote", HOST, "--detach", "ticker.py")
    assert started.returncode == 0, started.stderr
    run_id = started.stdout.strip()
    try:
        import time

        time.sleep(2)
        logs = remote.rx("logs", run_id)
    finally:
        remote.rx("cancel", run_id)

    assert logs.returncode == 0, logs.stderr
    lines = logs.stdout.splitlines()
    assert len(lines) >= 5 and lines[0] == "tick 0" and lines[-1] == f"tick {len(lines) - 1}", logs.stdout
    assert f"rx logs -f {run_id}" in logs.stderr


# -- 2. Ctrl-C in a sweep of remote calls --------------------------------------------------------------------

def test_ctrl_c_in_a_remote_task_call_stops_a_sweep_that_catches_exception(
        remote: Remote, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "unit"))  # the pty helper
    from ptyrun import CTRL_C, run_in_pty

    write(remote.project / "sweep.py", f"""
        import time
        from remote_exec import task

        @task(remote="{HOST}")
        def step(i):
            print(f"step {{i}} running", flush=True)
            time.sleep(30)

        for i in range(3):
            try:
                step(i)
            except Exception as exc:
                print(f"step {{i}} failed: {{exc}}; continuing", flush=True)
        print("sweep done", flush=True)
    """)

    done = run_in_pty([sys.executable, "sweep.py"], cwd=remote.project, env=remote.env,
                      keys=[(b"step 0 running", CTRL_C)], timeout=60)

    assert "continuing" not in done.output and "sweep done" not in done.output, done.output
    assert f"KeyboardInterrupt: interrupted; the task on {HOST} was stopped" in done.output, done.output
    assert done.returncode in (130, -2), done.output
