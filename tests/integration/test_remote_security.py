"""Quoting and host trust against the testbed, on both backends: hostile strings arrive byte for byte
(script arguments, ``--env`` values, ``@task`` arguments, file and directory names), a changed host key is
refused, and an unreachable host fails within the connect timeout with one line and exit status 255."""

from __future__ import annotations

import json
import secrets
import shlex
import shutil
import sys
import time
from pathlib import Path

import pytest

from remote_exec import task
from testbed import TestbedHost, exec_root, regenerate_host_keys

DATA = Path(__file__).resolve().parent / "data"
if str(DATA) not in sys.path:
    sys.path.insert(0, str(DATA))
pytest.register_assert_rewrite("remote_support")

import rxhelper  # noqa: E402
from remote_support import HOST, Remote, closed_port, write_ssh_config  # noqa: E402
from rxproj import tasks  # noqa: E402

pytest_plugins = ["remote_support"]

#: Strings a shell would mangle if any of them were ever interpolated unquoted.
HOSTILE = [
    "two words",
    "  leading and trailing  ",
    "it's",
    'say "hi"',
    "$HOME",
    "${PATH:-x}",
    "a;b && c || d | e",
    "`id`",
    "$(id)",
    "line one\nline two\n",
    "back\\slash\\\\",
    "tab\there",
    "ü€😀 ñ 中文",
    "*",
    "~",
    "!event",
    "",
    "--json",
    "-m",
]
#: A file or directory name with the same hazards (no newline: that would be cruel to everyone).
HOSTILE_NAME = "it's \"q\" $HOME;`x` ü"
CONNECT_TIMEOUT = 3.0


def hex_of(text: str) -> str:
    return text.encode("utf-8", "surrogateescape").hex()


def test_script_arguments_env_values_and_paths_arrive_byte_for_byte(remote: Remote, tmp_path: Path) -> None:
    script = remote.copy_script("echo_args.py", f"echo {HOSTILE_NAME}.py")
    odd_dir = tmp_path / f"dir {HOSTILE_NAME}"
    odd_dir.mkdir()
    ssh_config = odd_dir / "ssh_config"
    shutil.copyfile(remote.testbed.ssh_config, ssh_config)
    workspace = odd_dir / "workspace"
    env = {f"RX_PROBE_{index}": value for index, value in enumerate(HOSTILE)}
    env["RX_PROBE_EQUALS"] = "a=b=c"
    env_options = [word for name, value in env.items() for word in ("--env", f"{name}={value}")]

    done = remote.rx("run", "--remote", HOST, "--ssh-config", str(ssh_config), "--workspace", str(workspace),
                     *env_options, script.name, *HOSTILE)

    assert done.returncode == 0, done.stderr
    expected = {"script": script.name, "args_hex": [hex_of(arg) for arg in HOSTILE],
                "env_hex": {name: hex_of(value) for name, value in env.items()}}
    printed = json.loads(done.stdout)
    assert {key: printed[key] for key in expected} == expected
    assert printed["cwd"].startswith("/home/rx/.cache/remote_exec/runs/")
    (run_dir,) = (workspace / "runs").iterdir()
    pulled = json.loads((run_dir / "files" / "received.json").read_text(encoding="utf-8"))
    assert pulled == printed
    state = json.loads((run_dir / "state.json").read_text(encoding="utf-8"))
    assert state["argv"] == HOSTILE


def test_task_string_arguments_arrive_byte_for_byte(remote: Remote) -> None:
    # One call carries every hazard at once; a few more check the edge cases on their own.
    everything = "\x1f".join(HOSTILE)

    for text in (everything, "", "line one\nline two\n", "ü€😀 ñ 中文", "$(id)`id`'\""):
        received = tasks.fingerprint(text=text)
        assert received["node"] == HOST
        assert received["hex"] == hex_of(text), text
        assert {key: received[key] for key in ("hex", "sha256", "codepoints")} == rxhelper.describe(text)


def test_a_remote_workdir_with_spaces_and_quotes_is_used_literally(remote: Remote) -> None:
    relative = f".cache/rx test {HOSTILE_NAME} {secrets.token_hex(4)}"
    absolute = f"/home/rx/{relative}"
    square = task(remote=HOST, workdir=f"~/{relative}")(tasks.square)
    try:
        answer = square(12)

        assert answer["value"] == 144
        assert answer["cwd"].startswith(f"{absolute}/runs/")
        code, output = exec_root(remote.host, f"test -d {shlex.quote(absolute + '/archives')} && echo yes")
        assert (code, output.strip()) == (0, "yes")
    finally:
        exec_root(remote.host, f"rm -rf {shlex.quote(absolute)}")


def test_a_changed_host_key_is_refused(remote: Remote, dedicated_host: TestbedHost) -> None:
    remote.copy_script("exit_with.py")
    trusted = remote.rx("run", "--remote", dedicated_host.alias, "exit_with.py", "0")
    assert trusted.returncode == 0, trusted.stderr
    known_hosts = remote.testbed.known_hosts.read_bytes()

    regenerate_host_keys(dedicated_host)
    refused = remote.rx("run", "--remote", dedicated_host.alias, "exit_with.py", "0")

    assert refused.returncode == 255, refused.stderr
    assert refused.stdout == ""
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, refused.stderr
    assert dedicated_host.alias in lines[0]
    assert "Traceback" not in refused.stderr
    # The old key stays: a refused key is never recorded in its place.
    assert remote.testbed.known_hosts.read_bytes() == known_hosts
    info = remote.latest()
    assert (info["status"], info["exit_code"]) == ("failed", 255)


def test_a_closed_port_fails_at_once_with_one_line(remote: Remote, tmp_path: Path) -> None:
    remote.copy_script("exit_with.py")
    config = write_ssh_config(tmp_path / "ssh_config", remote.testbed, [("closed-port", "127.0.0.1", closed_port())])

    started = time.monotonic()
    done = remote.rx("run", "--remote", "closed-port", "--ssh-config", str(config),
                     "--connect-timeout", f"{CONNECT_TIMEOUT:g}", "exit_with.py", "0")
    elapsed = time.monotonic() - started

    assert done.returncode == 255, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "closed-port" in lines[0] and "refused" in lines[0]
    assert elapsed < CONNECT_TIMEOUT + 3, elapsed


def test_a_silent_host_fails_within_the_connect_timeout(remote: Remote, tmp_path: Path,
                                                       silent_listener: int) -> None:
    remote.copy_script("exit_with.py")
    config = write_ssh_config(tmp_path / "ssh_config", remote.testbed, [("silent-host", "127.0.0.1", silent_listener)])

    started = time.monotonic()
    done = remote.rx("run", "--remote", "silent-host", "--ssh-config", str(config),
                     "--connect-timeout", f"{CONNECT_TIMEOUT:g}", "exit_with.py", "0")
    elapsed = time.monotonic() - started

    assert done.returncode == 255, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "silent-host" in lines[0] and "Traceback" not in done.stderr
    # It waited for the timeout (the listener never answers), and not much longer.
    assert CONNECT_TIMEOUT - 0.5 <= elapsed < CONNECT_TIMEOUT + 3, elapsed
