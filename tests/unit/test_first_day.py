"""A researcher's first day (issue 12), as they would meet it: Python's semantics over the wire, tracebacks of
their own code, and a CLI that says what it means. Through the real CLI in a subprocess, Ctrl-C through a
pty; no network (runs without --remote go through the same runner in a local subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from ptyrun import CTRL_C, run_in_pty


def rx(isolated: Any, *args: str, cwd: Path | None = None, stdin: str | None = None, timeout: float = 90,
       **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "remote_exec", *args], cwd=cwd or isolated.root,
                          env=isolated.env(**env), input=stdin, capture_output=True, text=True, timeout=timeout,
                          check=False, stdin=None if stdin is not None else subprocess.DEVNULL)


def write(path: Path, source: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source).lstrip(), encoding="utf-8")
    return path


# -- 2. Ctrl-C is a KeyboardInterrupt ----------------------------------------------------------------------

SWEEP = """
    import sys, time
    from remote_exec import task

    @task
    def step(i):
        print(f"step {i} running", flush=True)
        time.sleep(30)
        return i

    for i in range(3):
        try:
            step(i)
        except Exception as exc:
            print(f"step {i} failed: {type(exc).__name__}: {exc}; continuing", flush=True)
    print("sweep done", flush=True)
"""


def test_ctrl_c_in_a_task_call_stops_a_sweep_that_catches_exception(isolated: Any) -> None:
    write(isolated.root / "sweep.py", SWEEP)

    done = run_in_pty([sys.executable, "sweep.py"], cwd=isolated.root, env=isolated.env(),
                      keys=[(b"step 0 running", CTRL_C)])

    assert "continuing" not in done.output and "sweep done" not in done.output, done.output
    assert "KeyboardInterrupt" in done.output or "Interrupted" in done.output, done.output
    assert done.returncode in (130, -2), done.output  # Python ends on an uncaught KeyboardInterrupt by SIGINT


def test_interrupted_is_a_keyboard_interrupt_and_not_an_exception() -> None:
    from remote_exec.errors import Interrupted

    assert issubclass(Interrupted, KeyboardInterrupt)
    assert not issubclass(Interrupted, Exception)
    assert Interrupted("interrupted; the task on gpu1 was stopped").exit_code == 130


def test_ctrl_c_in_rx_run_exits_130(isolated: Any) -> None:
    write(isolated.root / "slow.py", """
        import time
        print("working", flush=True)
        time.sleep(30)
    """)

    done = run_in_pty([sys.executable, "-m", "remote_exec", "run", "slow.py"], cwd=isolated.root,
                      env=isolated.env(), keys=[(b"working", CTRL_C)])

    assert done.returncode == 130, done.output
    assert "rx: error: interrupted" in done.output, done.output
    assert "Traceback" not in done.output, done.output


# -- 7. tracebacks of the user's code ---------------------------------------------------------------------

def user_lines(text: str) -> list[str]:
    """The lines of a traceback a user reads, without Python's column marks (which vary between versions)."""
    return [line.rstrip() for line in text.splitlines() if line.strip() and set(line.strip()) - set("~^")]


def make_project(root: Path) -> None:
    write(root / "pyproject.toml", "")  # a project: it runs in a snapshot of itself on the host
    write(root / "mylib" / "__init__.py", "")
    write(root / "mylib" / "steps.py", """
        def run(x):
            return 1 / x
    """)
    write(root / "train.py", """
        from mylib import steps

        print("training")
        steps.run(0)
    """)


EXPECTED_TRAIN = [
    "Traceback (most recent call last):",
    '  File "train.py", line 4, in <module>',
    "    steps.run(0)",
    f'  File "{os.path.join("mylib", "steps.py")}", line 2, in run',
    "    return 1 / x",
    "ZeroDivisionError: division by zero",
]


def test_a_failing_script_shows_only_its_own_frames_at_its_local_files(isolated: Any) -> None:
    make_project(isolated.root)

    done = rx(isolated, "run", "train.py")

    assert done.returncode == 1
    assert done.stdout == "training\n"
    lines = user_lines(done.stderr)
    assert lines[:-1] == EXPECTED_TRAIN, done.stderr
    assert lines[-1].startswith("rx: run ") and " failed, exit 1" in lines[-1]


def test_rx_show_and_the_html_export_show_the_same_traceback(isolated: Any) -> None:
    make_project(isolated.root)
    rx(isolated, "run", "train.py")

    shown = rx(isolated, "show", "latest")
    exported = rx(isolated, "export", "latest", "--format", "html")
    record = json.loads(rx(isolated, "show", "latest", "--json").stdout)

    assert shown.returncode == 0, shown.stderr
    lines = user_lines(shown.stdout)
    start = lines.index(EXPECTED_TRAIN[0])
    assert lines[start:start + len(EXPECTED_TRAIN)] == EXPECTED_TRAIN, shown.stdout
    assert "ZeroDivisionError: division by zero" in lines  # the error line, without builtins.
    html = exported.stdout
    assert "File &quot;train.py&quot;, line 4, in &lt;module&gt;" in html or 'File "train.py", line 4' in html, html
    assert ".rx/train.py" not in html and "remote_exec/runner" not in html
    exception = record["result"]["exception"]
    assert user_lines(exception["traceback"]) == EXPECTED_TRAIN
    assert "runner/child.py" in exception["remote_traceback"]  # the host's own text is kept


def test_rx_v_shows_rx_frames_too(isolated: Any) -> None:
    make_project(isolated.root)

    done = rx(isolated, "-v", "run", "train.py")

    lines = user_lines(done.stderr)
    assert any(line.endswith(", in run_task") and "runner" in line for line in lines), done.stderr
    assert any(line.endswith(", in run_script") and "task.py" in line for line in lines), done.stderr
    assert EXPECTED_TRAIN[1] in lines and EXPECTED_TRAIN[3] in lines


BY_VALUE = """
    import traceback
    from remote_exec import task

    def check(x):
        if x < 0:
            raise ValueError(f"negative: {x}")
        return x

    @task
    def train(x):
        return check(x) * 2

    try:
        train(-1)
    except ValueError:
        traceback.print_exc()
"""


def test_a_task_defined_in_the_main_script_shows_its_source_lines_and_no_rx_frames_pile_on_top(
        isolated: Any) -> None:
    write(isolated.root / "sweep.py", BY_VALUE)

    done = subprocess.run([sys.executable, "sweep.py"], cwd=isolated.root, env=isolated.env(), capture_output=True,
                          text=True, timeout=90, check=False)

    remote, _, caller = done.stderr.partition("The above exception was the direct cause of the following exception:")
    assert user_lines(remote) == [
        "remote_exec.errors.RemoteTraceback:",
        "Traceback (most recent call last):",
        '  File "sweep.py", line 11, in train',
        "    return check(x) * 2",
        '  File "sweep.py", line 6, in check',
        '    raise ValueError(f"negative: {x}")',
        "ValueError: negative: -1",
    ], done.stderr
    frames = [line for line in user_lines(caller) if line.startswith("  File ")]
    assert frames[0].endswith('sweep.py", line 14, in <module>'), caller
    assert len(frames) == 2 and "api.py" in frames[1], caller  # one frame of rx, where the call raised


def test_a_syntax_error_in_the_script_is_reported_before_anything_travels(isolated: Any) -> None:
    write(isolated.root / "bad.py", """
        print("never")
        x = (
    """)

    done = rx(isolated, "run", "--remote", "nowhere.invalid", "bad.py")

    assert done.returncode == 1
    assert user_lines(done.stderr) == ['  File "bad.py", line 2', "    x = (", "SyntaxError: '(' was never closed"]
    assert not (isolated.workspace / "runs").exists() or not list((isolated.workspace / "runs").iterdir())


# -- 6. exceptions rebuilt as their own type ----------------------------------------------------------------

DIVERGED = """
    import json, math, os
    from remote_exec import RemoteError, task

    class TrainingDiverged(Exception):
        def __init__(self, step, loss):
            super().__init__(f"diverged at step {step}: loss {loss}")
            self.step = step
            self.loss = loss

    @task
    def train(steps):
        raise TrainingDiverged(steps, math.inf)

    @task(env={"PYTHONPATH": os.path.abspath("elsewhere")})  # a module only "the host" has
    def only_there():
        import remoteonly
        remoteonly.fail()

    try:
        train(3)
    except TrainingDiverged as exc:
        print(json.dumps({"type": type(exc) is TrainingDiverged, "step": exc.step, "loss": str(exc.loss),
                          "args": list(exc.args), "message": str(exc)}))
    try:
        only_there()
    except RemoteError as exc:
        print(json.dumps({"type_name": exc.type_name, "message": exc.remote_message}))
"""


def test_an_exception_whose_init_takes_other_arguments_is_rebuilt_as_its_own_type(isolated: Any) -> None:
    write(isolated.root / "diverge.py", DIVERGED)
    write(isolated.root / "elsewhere" / "remoteonly.py", """
        class Oops(Exception):
            pass

        def fail():
            raise Oops("only the host has this class")
    """)

    done = subprocess.run([sys.executable, "diverge.py"], cwd=isolated.root, env=isolated.env(), capture_output=True,
                          text=True, timeout=90, check=False)

    assert done.returncode == 0, done.stderr
    rebuilt, remote_only = (json.loads(line) for line in done.stdout.splitlines())
    assert rebuilt == {"type": True, "step": 3, "loss": "inf", "args": ["diverged at step 3: loss inf"],
                       "message": "diverged at step 3: loss inf"}
    assert remote_only == {"type_name": "remoteonly.Oops", "message": "only the host has this class"}


def test_rebuild_exception_falls_back_to_new_as_pickle_allows() -> None:
    from remote_exec.serialization import exception_parts, rebuild_exception

    class Diverged(Exception):
        def __init__(self, step: int, loss: float) -> None:
            super().__init__(f"step {step}")
            self.step, self.loss = step, loss

    class Custom(Exception):
        def __reduce__(self) -> Any:
            return (Custom, ("custom",))

    rebuilt = rebuild_exception(exception_parts(Diverged(4, 1.5)))
    assert type(rebuilt) is Diverged and rebuilt.args == ("step 4",)
    assert (rebuilt.step, rebuilt.loss) == (4, 1.5)
    custom = Custom("x")
    assert exception_parts(custom) is custom  # a class that says how to pickle it is trusted
    assert rebuild_exception("not an exception") is None


# -- 5. stdin -------------------------------------------------------------------------------------------------

def test_piped_stdin_reaches_the_script_with_its_end(isolated: Any) -> None:
    write(isolated.root / "cat_stdin.py", """
        import sys
        print("got", repr(sys.stdin.read()))
        print("then", repr(sys.stdin.read()))
    """)

    done = rx(isolated, "run", "cat_stdin.py", stdin="hi\nthere\n")

    assert done.returncode == 0, done.stderr
    assert done.stdout == "got 'hi\\nthere\\n'\nthen ''\n"


def test_large_stdin_arrives_whole_through_the_window(isolated: Any) -> None:
    write(isolated.root / "count.py", """
        import hashlib, sys, time
        first = sys.stdin.buffer.read(10)
        time.sleep(0.5)  # a slow reader: the rest waits in the window, not in memory without bound
        data = first + sys.stdin.buffer.read()
        print(len(data), hashlib.sha256(data).hexdigest())
    """)
    payload = os.urandom(3 << 20)
    source = isolated.root / "payload.bin"
    source.write_bytes(payload)

    with source.open("rb") as stream:
        done = subprocess.run([sys.executable, "-m", "remote_exec", "run", "count.py"], cwd=isolated.root,
                              env=isolated.env(), stdin=stream, capture_output=True, timeout=120, check=False)

    import hashlib

    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().split() == [str(len(payload)), hashlib.sha256(payload).hexdigest()]


def test_a_script_that_does_not_read_its_stdin_is_not_held_up_by_it(isolated: Any) -> None:
    write(isolated.root / "first_line.py", """
        import sys
        print("first:", sys.stdin.readline().strip())
    """)
    # a writer that keeps its end open long after the script is done
    writer = subprocess.Popen([sys.executable, "-c", "import sys, time\nprint('one', flush=True)\ntime.sleep(60)"],
                              stdout=subprocess.PIPE)
    try:
        done = subprocess.run([sys.executable, "-m", "remote_exec", "run", "first_line.py"], cwd=isolated.root,
                              env=isolated.env(), stdin=writer.stdout, capture_output=True, text=True, timeout=60,
                              check=False)
    finally:
        writer.kill()
        writer.wait()
        assert writer.stdout is not None
        writer.stdout.close()

    assert done.returncode == 0, done.stderr
    assert done.stdout == "first: one\n"


def test_stdin_for_a_detached_run_is_refused_with_the_reason(isolated: Any) -> None:
    write(isolated.root / "cat_stdin.py", "import sys\nprint(sys.stdin.read())\n")

    done = rx(isolated, "run", "--detach", "cat_stdin.py", stdin="hi\n")

    assert done.returncode == 2, done.stderr  # a usage error
    assert done.stderr.startswith("rx: error: stdin cannot be forwarded to a detached run"), done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stdout == ""
    assert rx(isolated, "runs", "--json").stdout.strip() in ("", "[]")  # nothing recorded


def test_a_task_call_keeps_an_empty_stdin(isolated: Any) -> None:
    write(isolated.root / "reads.py", """
        import sys
        from remote_exec import task

        @task
        def read_stdin():
            return sys.stdin.read()

        print(repr(read_stdin()))
    """)

    done = subprocess.run([sys.executable, "reads.py"], cwd=isolated.root, env=isolated.env(), input="not for it",
                          capture_output=True, text=True, timeout=60, check=False)

    assert done.returncode == 0, done.stderr
    assert done.stdout == "''\n"


# -- 9. typos, 10. help at 80 columns, 12. --json ------------------------------------------------------------

def test_an_unknown_option_before_the_script_is_a_usage_error_with_a_suggestion(isolated: Any) -> None:
    write(isolated.root / "x.py", "print('ran')\n")

    done = rx(isolated, "run", "-r", "somewhere", "--timout", "5", "x.py")

    assert done.returncode == 2, done.stderr
    assert "No such option '--timout'. Did you mean '--timeout'?" in done.stderr
    assert done.stdout == "" and not (isolated.workspace / "runs").exists()


def test_a_mistyped_command_is_suggested_once(isolated: Any) -> None:
    done = rx(isolated, "rnu")

    assert done.returncode == 2
    assert done.stderr.count("Did you mean 'run'?") == 1, done.stderr


COMMANDS = ("", "run", "rerun", "runs", "show", "logs", "export", "clean", "hosts", "check", "attach", "cancel",
            "map", "top")


@pytest.mark.parametrize("command", COMMANDS)
def test_help_at_80_columns_keeps_brackets_and_whole_option_names(isolated: Any, command: str) -> None:
    import click
    import typer.main

    from remote_exec.cli import _register, app

    _register()
    group = typer.main.get_command(app)
    assert isinstance(group, click.Group)
    cmd = group.commands[command] if command else group

    done = rx(isolated, *([command] if command else []), "--help", COLUMNS="80")

    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert max(len(line) for line in text.splitlines()) <= 80, text
    assert "…" not in text and "..." not in text.replace("[ARGS]...", "").replace("COMMAND [ARGS]...", "") \
        .replace("RUN...", "").replace("[HOST]...", ""), text
    for param in cmd.params:  # every option by its whole name, every parameter with a help text
        assert getattr(param, "help", None), f"{command} {param.name} has no help"
        for name in param.opts:
            if name.startswith("--"):
                assert name in text, f"{name} missing from:\n{text}"
    if command == "run":
        assert "[tool.rx.remotes] name" in text and "[user@]host[:port]" in text and "[tool.rx] backend" in text
    if command == "":
        assert "ssh_config aliases and [tool.rx.remotes]." in text


def test_run_json_keeps_stdout_parseable(isolated: Any) -> None:
    write(isolated.root / "chatty.py", "print('hello from the script')\n")

    done = rx(isolated, "run", "--json", "chatty.py")

    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["status"] == "finished"
    assert "hello from the script" in done.stderr
    log = isolated.workspace / "runs" / record["run_id"] / "stdout.log"
    assert log.read_text() == "hello from the script\n"


# -- 11. shell completion -----------------------------------------------------------------------------------

def completion_env(isolated: Any) -> dict[str, str]:
    """An environment with an ``rx`` on PATH (this checkout), a host in ssh_config and one in pyproject."""
    bin_dir = isolated.root / "bin"
    bin_dir.mkdir(exist_ok=True)
    shim = bin_dir / "rx"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m remote_exec "$@"\n')
    shim.chmod(0o755)
    (isolated.root / "ssh_config").write_text("Host gpu1 gpu2\n    HostName 10.0.0.1\nHost *.lab\n    User me\n")
    write(isolated.root / "pyproject.toml", """
        [tool.rx.remotes.lab]
        host = "lab.example.org"
    """)
    return isolated.env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                        _TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION="1")


def bash_complete(isolated: Any, env: dict[str, str], words: list[str]) -> list[str]:
    """Source the script ``rx --install-completion bash`` installed, then let bash complete ``words``."""
    script = isolated.home / ".bash_completions" / "rx.sh"
    program = (f"source {script}\nCOMP_WORDS=({' '.join(repr(word) for word in words)})\n"
               f"COMP_CWORD={len(words) - 1}\n_rx_completion rx\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n")
    done = subprocess.run(["bash", "--norc", "-c", program], cwd=isolated.root, env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return [line for line in done.stdout.splitlines() if line]


def test_bash_completion_completes_hosts_and_runs(isolated: Any) -> None:
    env = completion_env(isolated)
    installed = subprocess.run(["rx", "--install-completion", "bash"], cwd=isolated.root, env=env,
                               capture_output=True, text=True, timeout=60, check=False)
    assert installed.returncode == 0, installed.stderr
    assert "source" in (isolated.home / ".bashrc").read_text()
    write(isolated.root / "ok.py", "print('ok')\n")
    for _ in range(2):
        assert rx(isolated, "run", "ok.py").returncode == 0
    ids = sorted(path.name for path in (isolated.workspace / "runs").iterdir())

    assert bash_complete(isolated, env, ["rx", "run", "--remote", ""]) == ["lab", "gpu1", "gpu2"]
    assert bash_complete(isolated, env, ["rx", "check", "gp"]) == ["gpu1", "gpu2"]
    assert bash_complete(isolated, env, ["rx", "show", ""]) == ["latest", ids[1], ids[0]]
    assert bash_complete(isolated, env, ["rx", "logs", ids[0][:-2]]) == [ids[0]]


@pytest.mark.parametrize("shell", ["zsh", "fish"])
def test_zsh_and_fish_completion_install_and_complete(isolated: Any, shell: str) -> None:
    env = completion_env(isolated)

    installed = subprocess.run(["rx", "--install-completion", shell], cwd=isolated.root, env=env,
                               capture_output=True, text=True, timeout=60, check=False)
    shown = subprocess.run(["rx", "--show-completion", shell], cwd=isolated.root, env=env, capture_output=True,
                           text=True, timeout=60, check=False)
    # What the installed script runs when the user presses TAB after "rx run --remote g" (zsh passes the
    # words so far, fish its command line), through typer's completion protocol.
    asked = subprocess.run(["rx"], cwd=isolated.root, capture_output=True, text=True, timeout=60, check=False,
                           env={**env, "_RX_COMPLETE": f"complete_{shell}",
                                "_TYPER_COMPLETE_ARGS": "rx run --remote g",
                                "_TYPER_COMPLETE_FISH_ACTION": "get-args"})

    assert installed.returncode == 0 and shown.returncode == 0, installed.stderr + shown.stderr
    target = isolated.home / (".zfunc/_rx" if shell == "zsh" else ".config/fish/completions/rx.fish")
    assert target.read_text().strip() == shown.stdout.strip()
    assert "_RX_COMPLETE=complete_" + shell in shown.stdout
    assert asked.returncode == 0, asked.stderr
    offered = asked.stdout
    assert "gpu1" in offered and "gpu2" in offered and "lab" not in offered.replace("gpu", "")


# -- 14. a @task run is recorded with the process's own exit status --------------------------------------------

SWEEP_WITH_FAILURES = """
    import sys
    from remote_exec import task

    @task
    def step(i):
        if i % 2:
            raise ValueError(f"step {i} diverged")
        return i

    for i in range(6):
        try:
            step(i)
        except ValueError as exc:
            print("caught:", exc)
    if len(sys.argv) > 1:
        sys.exit(int(sys.argv[1]))
"""


@pytest.mark.parametrize(("argv", "status", "exit_code"), [([], "finished", 0), (["4"], "failed", 4)])
def test_a_task_run_is_recorded_with_the_process_exit_code_and_its_failed_calls_counted(
        isolated: Any, argv: list[str], status: str, exit_code: int) -> None:
    write(isolated.root / "sweep.py", SWEEP_WITH_FAILURES)

    done = subprocess.run([sys.executable, "sweep.py", *argv], cwd=isolated.root, env=isolated.env(),
                          capture_output=True, text=True, timeout=120, check=False)
    listed = rx(isolated, "runs", COLUMNS="80")
    shown = rx(isolated, "show", "latest")

    assert done.returncode == exit_code, done.stderr
    (info,) = [json.loads(rx(isolated, "show", "latest", "--json").stdout)]
    assert (info["status"], info["exit_code"]) == (status, exit_code)
    assert info["error"] == ("3 of 6 calls failed" if not exit_code else "exit status 4; 3 of 6 calls failed")
    header, row = listed.stdout.splitlines()
    assert header.split() == ["id", "target", "host", "status", "calls", "exit"] or "calls" in header.split()
    assert "3/6 failed" in row and row.split()[-1] == str(exit_code), listed.stdout
    assert "3 of 6 calls failed" in shown.stdout


# -- 15. the small things of a first day ------------------------------------------------------------------------

def test_rx_runs_at_80_columns_keeps_host_names_whole_and_takes_last(isolated: Any) -> None:
    from remote_exec.workspace import Workspace

    ws = Workspace(isolated.workspace)
    for index in range(4):
        run = ws.new_run(target=f"experiments/deep/folder/train_model_{index}.py", kind="script", remote="rx-testbed-1",
                         backend="openssh")
        run.set_status("finished", exit_code=0)

    listed = rx(isolated, "runs", COLUMNS="80")
    last = rx(isolated, "runs", "--last", "2", COLUMNS="80")

    assert listed.returncode == 0, listed.stderr
    rows = listed.stdout.splitlines()[1:]
    assert len(rows) == 4 and all(len(line) <= 80 for line in listed.stdout.splitlines())
    assert all(" rx-testbed-1 " in row and row.split()[0] in ws.ids() for row in rows), listed.stdout
    assert all(row.split()[1].endswith(f"_{index}.py") for index, row in enumerate(rows)), listed.stdout
    assert [row.split()[0] for row in last.stdout.splitlines()[1:]] == ws.ids()[-2:]


def test_rx_hosts_shows_each_aliases_real_host_user_and_port(isolated: Any) -> None:
    (isolated.root / "ssh_config").write_text("Host gpu1\n    HostName 10.1.2.3\n    User alice\n    Port 2222\n")

    for backend in ("openssh", "paramiko"):
        done = rx(isolated, "hosts", "--json", RX_BACKEND=backend)
        assert done.returncode == 0, done.stderr
        (row,) = json.loads(done.stdout)
        assert (row["name"], row["host"], row["user"], row["port"]) == ("gpu1", "10.1.2.3", "alice", 2222), backend


def test_keep_remote_prints_where_the_run_directory_is(isolated: Any) -> None:
    write(isolated.root / "job.py", "open('out.txt', 'w').write('x')\n")

    done = rx(isolated, "run", "--keep-remote", "job.py")

    assert done.returncode == 0, done.stderr
    line = [line for line in done.stderr.splitlines() if "run directory is kept" in line]
    assert len(line) == 1, done.stderr
    kept = Path(line[0].rpartition(": ")[2])
    assert kept.is_dir() and (kept / "out.txt").read_text() == "x"


def test_vv_shows_rx_debug_lines_not_every_librarys(isolated: Any) -> None:
    write(isolated.root / "job.py", "print('ok')\n")

    done = rx(isolated, "-vv", "run", "job.py")

    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert any("DEBUG remote_exec." in line for line in lines), done.stderr
    assert not [line for line in lines if " DEBUG " in line and "remote_exec" not in line], done.stderr
    assert len(lines) < 15 and max(len(line) for line in lines) < 400, done.stderr


@pytest.mark.parametrize(("spec", "user", "host", "port"), [
    ("ssh://me@gpu1.lab:2222", "me", "gpu1.lab", 2222),
    ("ssh://gpu1/", None, "gpu1", None),
    ("ssh://[::1]:22", None, "::1", 22),
])
def test_an_ssh_url_is_a_host(spec: str, user: str | None, host: str, port: int | None) -> None:
    from remote_exec.backends.base import HostSpec

    parsed = HostSpec.parse(spec)

    assert (parsed.user, parsed.host, parsed.port) == (user, host, port)


# -- 16. both backends read the same ssh_config ----------------------------------------------------------------

def test_openssh_is_given_the_ssh_config_rx_reads_when_home_is_not_the_users(
        isolated: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from remote_exec.backends.base import HostSpec
    from remote_exec.backends.openssh import config_args, ssh_options

    monkeypatch.delenv("RX_SSH_CONFIG")
    meant = isolated.home / ".ssh" / "config"

    assert config_args(HostSpec("gpu1")) == ["-F", os.devnull]  # HOME has none: ssh reads none either
    meant.parent.mkdir()
    meant.write_text("Host gpu1\n    HostName 10.0.0.9\n")
    assert ssh_options(HostSpec("gpu1"))[:2] == ["-F", str(meant)]
    import pwd

    monkeypatch.setenv("HOME", pwd.getpwuid(os.getuid()).pw_dir)
    assert config_args(HostSpec("gpu1")) == []  # ssh reads that same file itself (and /etc/ssh/ssh_config)


# -- 8. hints when the two sides differ ---------------------------------------------------------------------------

def two_versions(root: Path) -> tuple[Path, Path]:
    """fakepkg 1.0 (its class in fakepkg.core) and 2.0 (moved to fakepkg._core, as numpy 2 did)."""
    old, new = root / "v1", root / "v2"
    write(old / "fakepkg" / "__init__.py", "__version__ = '1.0'\n")
    write(old / "fakepkg" / "core.py", "class Thing:\n    pass\n")
    write(new / "fakepkg" / "__init__.py", "__version__ = '2.0'\n")
    write(new / "fakepkg" / "_core.py", "class Thing:\n    pass\n")
    return old, new


MISMATCH = """
    import os, sys
    here, there = sys.argv[1], sys.argv[2]
    sys.path.insert(0, os.path.abspath(here))
    from remote_exec import task

    @task(env={"PYTHONPATH": os.path.abspath(there)})
    def make():
        from fakepkg._core import Thing
        return Thing()

    @task(env={"PYTHONPATH": os.path.abspath(there)})
    def take(thing):
        return 1

    if sys.argv[3] == "result":
        make()
    else:
        from fakepkg._core import Thing
        take(Thing())
"""


def test_a_result_written_by_another_version_names_the_package_and_both_versions(isolated: Any) -> None:
    two_versions(isolated.root)
    write(isolated.root / "mismatch.py", MISMATCH)

    done = subprocess.run([sys.executable, "mismatch.py", "v1", "v2", "result"], cwd=isolated.root,
                          env=isolated.env(), capture_output=True, text=True, timeout=90, check=False)

    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("remote_exec.errors.SerializationError: the result of __main__:make holds objects "
                           "written with fakepkg 2.0 on local, 1.0 here"), done.stderr
    assert "No module named 'fakepkg._core'" in last and "use the same version on both sides" in last


def test_arguments_the_host_cannot_read_name_the_package_and_both_versions(isolated: Any) -> None:
    two_versions(isolated.root)
    write(isolated.root / "mismatch.py", MISMATCH)

    done = subprocess.run([sys.executable, "mismatch.py", "v2", "v1", "arguments"], cwd=isolated.root,
                          env=isolated.env(), capture_output=True, text=True, timeout=90, check=False)

    lines = done.stderr.strip().splitlines()
    assert lines[-2] == "ModuleNotFoundError: No module named 'fakepkg._core'", done.stderr
    assert lines[-1] == ("rx: hint: the arguments hold objects of fakepkg, which local cannot read at its version "
                         "(fakepkg 2.0 here, 1.0 on local): use the same version on both sides"), done.stderr


def test_a_module_installed_here_but_not_there_and_an_unshipped_project_module_say_what_to_do(
        isolated: Any) -> None:
    site = isolated.root / "site"  # installed here only: on this process's path, not the task's
    write(site / "onlyhere" / "__init__.py", "")
    write(site / "onlyhere-3.1.dist-info" / "METADATA", "Metadata-Version: 2.1\nName: onlyhere\nVersion: 3.1\n")
    project = isolated.root / "project"
    write(project / "plugins_dyn.py", "VALUE = 1\n")
    write(project / "uses.py", "import onlyhere\n")
    write(project / "dynamic.py", "import importlib\nimportlib.import_module('plugins_dyn')\n")
    argv = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(site)!r}); sys.argv[0] = 'rx'\n"
                                  "from remote_exec.cli import main; main()"]

    uses = subprocess.run([*argv, "run", "uses.py"], cwd=project, env=isolated.env(), capture_output=True,
                          text=True, timeout=90, check=False)
    dynamic = subprocess.run([*argv, "run", "dynamic.py"], cwd=project, env=isolated.env(), capture_output=True,
                             text=True, timeout=90, check=False)

    assert ("rx: hint: onlyhere is installed here (onlyhere 3.1), not on local: have rx build it an environment "
            "there (rx run --deps 'onlyhere==3.1', @task(deps=[...]) or [tool.rx] deps), install it there "
            f"({sys.executable} -m pip install onlyhere)") in uses.stderr, uses.stderr
    assert ("rx: hint: plugins_dyn is a module of your project that was not shipped (imported by name at run "
            "time, where rx does not see it): add it to distribution_modules in [tool.rx]") in dynamic.stderr, \
        dynamic.stderr


# -- 19. the coordinator without /proc (macOS, the BSDs): simulated here ------------------------------------------

@pytest.fixture
def no_proc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A machine without /proc, whose sysctl knows a macOS boot session uuid; returns the fake tools' folder."""
    from remote_exec.workspace import procinfo

    monkeypatch.setattr(procinfo, "PROC", tmp_path / "no-proc")
    tools = tmp_path / "tools"
    tools.mkdir()
    sysctl = tools / "sysctl"
    sysctl.write_text('#!/bin/sh\n[ "$2" = kern.bootsessionuuid ] && cat "$(dirname "$0")/boot" || exit 1\n')
    sysctl.chmod(0o755)
    (tools / "boot").write_text("5F7C3A52-0000-4000-8000-BOOT00000001\n")
    monkeypatch.setenv("PATH", f"{tools}{os.pathsep}{os.environ['PATH']}")
    return tools


def test_without_proc_liveness_comes_from_ps_and_sysctl(no_proc: Path, tmp_path: Path) -> None:
    from remote_exec.workspace import Workspace, procinfo
    from remote_exec.workspace.manager import coordinator_alive, coordinator_record
    from remote_exec.workspace.store import pid_alive

    record = coordinator_record()
    assert record["start_ticks"] is None and record["process_start"]  # ps's start time
    assert record["boot_id"] == "5F7C3A52-0000-4000-8000-BOOT00000001"
    assert coordinator_alive(record) is True
    assert coordinator_alive({**record, "process_start": "Thu Jan  1 00:00:00 1970"}) is False  # pid reused
    (no_proc / "boot").write_text("5F7C3A52-0000-4000-8000-BOOT00000002\n")
    assert coordinator_alive(record) is False  # the machine booted again since
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    while procinfo.process_state(zombie.pid) not in ("Z", None):
        pass
    assert procinfo.process_state(zombie.pid) == "Z" and not pid_alive(zombie.pid)  # ps says Z: gone
    zombie.wait()
    run = Workspace(tmp_path / "ws").new_run(target="job.py", kind="script")
    run.set_status("running")
    assert run.info()["status"] == "running"


def test_without_proc_an_old_pid_taken_by_another_process_is_lost(no_proc: Path, tmp_path: Path) -> None:
    from remote_exec.workspace import Workspace

    run = Workspace(tmp_path / "ws").new_run(target="job.py", kind="script")
    run.set_status("running")
    coordinator = dict(run.info()["coordinator"])
    run.update(coordinator={**coordinator, "process_start": "Thu Jan  1 00:00:00 1970"})

    assert run.info()["status"] == "lost"


def test_pipe_sizes_are_only_asked_of_linux(monkeypatch: pytest.MonkeyPatch) -> None:
    import fcntl

    from remote_exec.protocol import wire

    asked: list[int] = []
    monkeypatch.setattr(fcntl, "fcntl", lambda fd, command, arg: asked.append(command))
    monkeypatch.delattr(fcntl, "F_SETPIPE_SZ", raising=False)
    monkeypatch.setattr(sys, "platform", "darwin")
    wire.grow_pipe(1)
    assert asked == []  # 1031 means something else (or nothing) on macOS
    monkeypatch.setattr(sys, "platform", "linux")
    wire.grow_pipe(1)
    assert asked == [1031]


MACOS_SSH_G = """\
host gpu1
user alice
hostname gpu1.lab.example.org
port 22
addressfamily any
batchmode yes
identityfile ~/.ssh/id_rsa
identityfile ~/.ssh/id_ecdsa
identityfile ~/.ssh/id_ed25519
userknownhostsfile ~/.ssh/known_hosts ~/.ssh/known_hosts2
proxyjump none
usekeychain no
ciphers chacha20-poly1305@openssh.com,aes128-ctr,aes192-ctr,aes256-ctr,aes128-gcm@openssh.com,aes256-gcm@openssh.com
"""


def test_macos_ssh_g_output_resolves_the_host() -> None:
    from remote_exec.backends.ssh import ResolvedHost

    resolved = ResolvedHost.from_ssh_g("gpu1", MACOS_SSH_G)

    assert (resolved.hostname, resolved.user, resolved.port) == ("gpu1.lab.example.org", "alice", 22)
    assert [path.name for path in resolved.identity_files] == ["id_rsa", "id_ecdsa", "id_ed25519"]
    assert all(not str(path).startswith("~") for path in (*resolved.identity_files, *resolved.known_hosts_files))
    assert resolved.proxy_jump is None


def test_rx_v_show_shows_the_traceback_as_the_host_printed_it(isolated: Any) -> None:
    make_project(isolated.root)
    rx(isolated, "run", "train.py")

    shown = rx(isolated, "-v", "show", "latest")

    # The host's own paths: rx's runner in its archive, the script in the run's snapshot of the project
    # (rich wraps long paths at 80 columns).
    flat = shown.stdout.replace("\n", "")
    assert "runner/child.py" in flat and "/local/runs/" in flat and "/train.py" in flat, shown.stdout


def test_the_path_mapping_is_a_function_of_remote_prefix_and_local_root_pairs(tmp_path: Path) -> None:
    from remote_exec.tracebacks import PathMap, Root, roots_for

    roots = roots_for(remote_roots={"archive": "/h/.cache/rx/archives/abc", "run_dir": "/h/.cache/rx/runs/r1"},
                      sources=[("mylib", str(tmp_path / "src" / "mylib")), ("helper.py", str(tmp_path / "helper.py"))],
                      project=tmp_path)
    paths = PathMap(roots)

    assert paths.find("/h/.cache/rx/archives/abc/mylib/steps.py") == (tmp_path / "src" / "mylib" / "steps.py", False)
    assert paths.find("/h/.cache/rx/archives/abc/helper.py") == (tmp_path / "helper.py", False)
    assert paths.find("/h/.cache/rx/archives/abc/remote_exec/runner/child.py")[1] is True  # rx's own
    assert paths.find("/h/.cache/rx/runs/r1/train/run.py") == (tmp_path / "train" / "run.py", False)  # snapshot
    assert paths.find("/usr/lib/python3/dist-packages/numpy/core.py") == (None, False)
    assert PathMap([Root("/a/b", tmp_path)]).find("/a/bc/x.py") == (None, False)  # whole path parts only
