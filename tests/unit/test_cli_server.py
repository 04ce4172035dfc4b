"""The rx server (remote_exec/cli/server.py): an ``rx`` command that found none starts one when it ends; the
next command of the same environment runs in a worker the server forks, and behaves as if it had run in its
own process: output, exit status, stdin, Ctrl-C, a killed client. Local runs only (no network)."""

from __future__ import annotations

import ast
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ptyrun import CTRL_C, run_in_pty

from remote_exec.cli import server
from remote_exec.workspace import procinfo

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds processes' parents in /proc")

ANCESTORS = """
def ancestors():
    pid, found = os.getpid(), []
    while pid > 1:
        with open(f"/proc/{pid}/stat") as stat:
            pid = int(stat.read().rsplit(")", 1)[1].split()[1])
        found.append(pid)
    return found
"""


def write(path: Path, source: str) -> None:
    path.write_text(textwrap.dedent(source), encoding="utf-8")


@pytest.fixture
def served(isolated: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Servers on (60 s), in a runtime directory of this test's own; the folder their sockets are in."""
    runtime = Path(tempfile.mkdtemp(prefix="rxs", dir="/tmp"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    monkeypatch.setenv("RX_SERVER", "60")
    try:
        yield runtime / "rx-ssh"
    finally:
        server.stop_all(str(runtime / "rx-ssh"))
        shutil.rmtree(runtime, ignore_errors=True)


def rx(isolated: Any, *args: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "remote_exec", *args], cwd=isolated.root, env=isolated.env(**env),
                          input=stdin, capture_output=True, text=True, timeout=120, check=False)


def listening(folder: Path, timeout: float = 30) -> int:
    """The pid of the server that listens in ``folder`` (waits for it)."""
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        up = [pid for pid, socket in server.servers(str(folder)) if Path(socket).exists()]
        if up:
            return up[0]
        time.sleep(0.05)
    raise AssertionError(f"no rx server listened in {folder} within {timeout} s")


def through_a_server(isolated: Any, served: Path, script: str) -> tuple[int, subprocess.Popen[str]]:
    """Leave a server (a first command), then start ``rx run slow.py`` of ``script`` through it, its stdout a
    pipe: (the server's pid, the client)."""
    write(isolated.root / "slow.py", script)
    write(isolated.root / "quick.py", "print('ok')\n")
    rx(isolated, "run", "quick.py")
    pid = listening(served)
    client = subprocess.Popen([sys.executable, "-m", "remote_exec", "run", "slow.py"], cwd=isolated.root,
                              env=isolated.env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    return pid, client


def test_the_next_command_runs_in_the_server_as_it_would_in_its_own_process(isolated: Any, served: Path) -> None:
    write(isolated.root / "job.py", "import os, sys\n" + ANCESTORS + """
print("out", sys.stdin.read().strip(), ancestors())
print("err", file=sys.stderr)
sys.exit(7)
""")
    first = rx(isolated, "run", "job.py", stdin="one")
    pid = listening(served)
    second = rx(isolated, "run", "job.py", stdin="two")

    for done, text in ((first, "one"), (second, "two")):
        assert done.returncode == 7, done.stderr
        assert done.stdout.split(" ", 2)[:2] == ["out", text]
        assert "err\n" in done.stderr and "failed, exit 7" in done.stderr
    assert pid not in ast.literal_eval(first.stdout.split(" ", 2)[2])  # the first ran in its own process...
    assert pid in ast.literal_eval(second.stdout.split(" ", 2)[2])  # ...the second in a worker of the server it left
    runs = rx(isolated, "runs", "--json")
    assert runs.returncode == 0 and runs.stdout.count('"exit_code": 7') == 2, runs.stdout


def test_a_command_with_stdin_closed_runs_in_its_own_process(isolated: Any, served: Path) -> None:
    """``rx ... <&-``: the client's socket would get descriptor 0 and be handed over as the worker's stdin."""
    write(isolated.root / "job.py", "import sys\nprint('ran', len(sys.stdin.read()))\n")
    rx(isolated, "run", "job.py")
    listening(served)

    done = subprocess.run([sys.executable, "-m", "remote_exec", "run", "job.py"], cwd=isolated.root,
                          env=isolated.env(), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
                          check=False, preexec_fn=lambda: os.close(0))

    assert (done.returncode, done.stdout) == (0, "ran 0\n"), done.stderr
    assert "error" not in done.stderr


def test_no_server_when_turned_off(isolated: Any, served: Path) -> None:
    write(isolated.root / "job.py", "print('ran')\n")
    assert rx(isolated, "run", "job.py", RX_SERVER="0").stdout == "ran\n"
    time.sleep(1.5)
    assert server.servers(str(served)) == []


def test_ctrl_c_through_the_server_interrupts_the_script_and_exits_130(isolated: Any, served: Path) -> None:
    write(isolated.root / "slow.py", "import os, time\n" + ANCESTORS + """
print("working", ancestors(), flush=True)
try:
    time.sleep(30)
except KeyboardInterrupt:
    print("caught the interrupt", flush=True)
    raise
""")
    write(isolated.root / "quick.py", "print('ok')\n")
    rx(isolated, "run", "quick.py")
    pid = listening(served)

    done = run_in_pty([sys.executable, "-m", "remote_exec", "run", "slow.py"], cwd=isolated.root,
                      env=isolated.env(), keys=[(b"working", CTRL_C)])

    assert str(pid) in done.output.split("working", 1)[1].splitlines()[0], done.output  # (through the server)
    assert "caught the interrupt" in done.output, done.output
    assert done.returncode == 130, done.output
    assert "Traceback" not in done.output.split("caught the interrupt", 1)[1], done.output


def test_a_background_job_of_a_terminal_runs_in_its_own_process(isolated: Any, served: Path) -> None:
    """``rx run job.py &`` at a prompt: reading the terminal must stop the job (SIGTTIN) as it would in its
    own process; a worker is in no job of that terminal, and would read the keys typed to the shell."""
    write(isolated.root / "job.py", "import os\n" + ANCESTORS + "print('ancestors', ancestors(), flush=True)\n")
    rx(isolated, "run", "job.py")
    pid = listening(served)
    command = f"{shlex.quote(sys.executable)} -m remote_exec run job.py"

    background = run_in_pty(["bash", "--norc", "--noprofile", "-c", f"set -m; {command} & wait $!"],
                            cwd=isolated.root, env=isolated.env())
    foreground = run_in_pty(["bash", "--norc", "--noprofile", "-c", command], cwd=isolated.root,
                            env=isolated.env())

    assert background.returncode == 0 and "ancestors" in background.output, background.output
    assert str(pid) not in background.output.split("ancestors", 1)[1].splitlines()[0], background.output
    assert str(pid) in foreground.output.split("ancestors", 1)[1].splitlines()[0], foreground.output


def test_a_killed_client_stops_its_command(isolated: Any, served: Path) -> None:
    _, client = through_a_server(isolated, served, """
        import os, time
        print(os.getpid(), flush=True)
        time.sleep(60)
    """)
    assert client.stdout is not None
    task = int(client.stdout.readline())
    client.kill()  # SIGKILL: no chance to forward anything
    client.wait(timeout=10)
    client.stdout.close()

    until = time.monotonic() + 30
    while time.monotonic() < until and Path(f"/proc/{task}").exists():
        time.sleep(0.1)
    assert not Path(f"/proc/{task}").exists(), "the script of a killed rx went on running"
    runs = rx(isolated, "runs", "--json")
    assert '"status": "cancelled"' in runs.stdout, runs.stdout


def test_a_run_through_the_server_names_the_users_process_in_messages(isolated: Any, served: Path) -> None:
    """The worker is the run's coordinator (its pid is what liveness checks use), but the process the user
    started, sees in ``ps`` and may signal is the client: messages about who holds a run name that one."""
    from remote_exec.workspace.manager import Workspace, shown_pid

    server_pid, client = through_a_server(isolated, served, """
        import time
        print("started", flush=True)
        time.sleep(60)
    """)
    try:
        assert client.stdout is not None and client.stdout.readline() == "started\n"
        run = Workspace(isolated.workspace).run("latest")
        coordinator = run.info()["coordinator"]
        holder = isolated.root / "holder.json"
        holder.write_text(json.dumps(coordinator), encoding="utf-8")
        busy = str(run._busy("attach", holder))
    finally:
        client.send_signal(signal.SIGINT)
        client.wait(timeout=30)
        assert client.stdout is not None
        client.stdout.close()

    assert coordinator["client_pid"] == client.pid
    assert coordinator["pid"] not in (client.pid, server_pid)  # (the worker)
    assert shown_pid(coordinator) == client.pid
    assert f"already being attached by pid {client.pid} on " in busy, busy


def test_a_command_in_other_limits_runs_under_them(isolated: Any, served: Path) -> None:
    """``ulimit -f 1024; rx run ...``: the server was started with no such limit, so the command gets a server
    of its own surroundings (here: none yet, so it runs in its own process), never the first one's."""
    write(isolated.root / "job.py", "import os, resource\n" + ANCESTORS + """
print(resource.getrlimit(resource.RLIMIT_FSIZE)[0], ancestors())
""")
    first = rx(isolated, "run", "job.py")
    pid = listening(served)

    def limited() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    done = subprocess.run([sys.executable, "-m", "remote_exec", "run", "job.py"], cwd=isolated.root,
                          env=isolated.env(), capture_output=True, text=True, timeout=120, check=False,
                          preexec_fn=limited)
    limit, ancestors = done.stdout.split(" ", 1)
    assert first.returncode == 0, first.stderr
    assert (done.returncode, int(limit)) == (0, 1 << 20), done.stderr
    assert pid not in ast.literal_eval(ancestors)


def test_a_signal_the_client_ignores_is_ignored_by_its_worker(isolated: Any, served: Path) -> None:
    """``nohup rx run ...``: the terminal's hangup must not end the command run in a worker for it."""
    write(isolated.root / "job.py", """
        import time
        print("working", flush=True)
        time.sleep(1.5)
        print("done", flush=True)
    """)
    rx(isolated, "run", "job.py")
    listening(served)
    client = subprocess.Popen([sys.executable, "-m", "remote_exec", "run", "job.py"], cwd=isolated.root,
                              env=isolated.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    assert client.stdout is not None and client.stdout.readline() == "working\n"
    client.send_signal(signal.SIGHUP)
    out, err = client.communicate(timeout=60)

    assert (client.returncode, out) == (0, "done\n"), err


def test_a_server_that_ended_while_its_command_runs_frees_its_name(isolated: Any, served: Path) -> None:
    """The worker of a long command does not keep the server's lock: the server, once killed, is not listed
    (nor signalled by ``stop``: its pid may be another process's by then), and a new one can take its name."""
    pid, client = through_a_server(isolated, served, """
        import time
        print("working", flush=True)
        time.sleep(20)
    """)
    try:
        assert client.stdout is not None and client.stdout.readline() == "working\n"
        os.kill(pid, signal.SIGKILL)  # (no chance to remove its lock file)
        until = time.monotonic() + 10
        while time.monotonic() < until and procinfo.process_state(pid) not in (None, "Z"):
            time.sleep(0.05)
        assert server.servers(str(served)) == []
        assert rx(isolated, "run", "quick.py").stdout == "ok\n"  # runs here, and leaves a new server
        assert listening(served) != pid
    finally:
        client.kill()
        client.wait(timeout=10)
        if client.stdout is not None:
            client.stdout.close()


def test_a_server_that_does_not_answer_is_given_up_and_the_command_runs_once(isolated: Any, served: Path) -> None:
    write(isolated.root / "job.py", "print('ran')\n")
    rx(isolated, "run", "job.py")
    pid = listening(served)
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        done = rx(isolated, "run", "job.py")
        waited = time.monotonic() - started
    finally:
        os.kill(pid, signal.SIGCONT)
    time.sleep(1.0)  # the server's worker, forked now, finds its client gone and runs nothing

    assert done.returncode == 0 and done.stdout == "ran\n", done.stderr
    assert waited >= server._TAKE_TIMEOUT
    runs = rx(isolated, "runs", "--json")
    assert runs.stdout.count('"run_id"') == 2, runs.stdout


def test_a_server_whose_runtime_directory_went_away_serves_nowhere_else(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Its client's directory was removed before it started (a session's XDG_RUNTIME_DIR ended): it ends
    at once, and sets up in no other directory (where nobody would stop it)."""
    monkeypatch.setenv("RX_SERVER", "60")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    key = server.server_key()
    gone = tmp_path / "gone" / "rx-ssh" / f"rx-{key}"
    before = set(Path(server._socket_path(key) or "/nonexistent").parent.glob("rx-*"))

    server.serve(key, str(gone), object())  # (it would import rx's commands through this, if it went on)

    assert not gone.parent.exists()
    assert set(Path(server._socket_path(key) or "/nonexistent").parent.glob("rx-*")) == before


def test_the_server_is_named_by_the_environment_but_what_a_shell_changes_between_commands() -> None:
    base = {"HOME": "/home/a", "PATH": "/usr/bin", "PWD": "/home/a/p", "SHLVL": "1"}
    key = server.server_key(base)
    assert server.server_key(dict(base, PWD="/elsewhere", OLDPWD="/home/a/p", SHLVL="3", _="/usr/bin/rx")) == key
    assert server.server_key(dict(base, RX_SSH_CONFIG="/other")) != key
    assert server.server_key(dict(base, PATH="/opt/bin:/usr/bin")) != key


@pytest.mark.parametrize("folder", ["checkout", "site-packages"])
def test_a_changed_file_of_rx_names_another_server_unless_pip_installed_it(
        folder: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A source checkout (an editable install): every file counts. Installed in a site-packages: that folder
    changes when the package is installed again (it is on sys.path, and part of the digest)."""
    module = tmp_path / folder / "remote_exec" / "cli" / "server.py"
    module.parent.mkdir(parents=True)
    module.write_text("# the module\n")
    (module.parent.parent / "task.py").write_text("VERSION = 1\n")
    monkeypatch.setattr(server, "__file__", str(module))
    key = server.server_key({})
    (module.parent.parent / "task.py").write_text("VERSION = 22\n")
    assert (server.server_key({}) != key) == (folder == "checkout")


def test_completion_and_a_worker_never_go_through_a_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RX_SERVER", "60")
    assert server.enabled(["run", "job.py"])
    assert not server.enabled(["--install-completion"])
    monkeypatch.setenv("_RX_COMPLETE", "complete_bash")
    assert not server.enabled(["run", "job.py"])
    monkeypatch.delenv("_RX_COMPLETE")
    monkeypatch.setenv("RX_SERVER", "0")
    assert not server.enabled(["run", "job.py"])
