"""``rx`` starts lean: a command imports only the module that registers it, and that map stays whole."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from remote_exec.cli import COMMAND_MODULES, app


def test_every_command_is_mapped_to_the_module_that_registers_it() -> None:
    from remote_exec.cli import _register

    _register()
    registered = {(info.name or info.callback.__name__): info.callback.__module__  # type: ignore[union-attr]
                  for info in app.registered_commands}
    assert {name: f"remote_exec.cli.{module}" for name, module in COMMAND_MODULES.items()} == registered


def _modules_after_a_local_rx_run(isolated: Any) -> set[str]:
    """The modules a local ``rx run job.py`` imported (it ran: printed ``ran``)."""
    (isolated.root / "job.py").write_text("print('ran')\n")
    probe = ("import sys\n"
             "from remote_exec.cli import main\n"
             "try:\n"
             "    main(['run', 'job.py'])  # (main() of the console script ends the process when done)\n"
             "except SystemExit:\n"
             "    pass\n"
             "print(' '.join(sorted(sys.modules)), file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=isolated.root, env=isolated.env(), capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.stdout == "ran\n", done.stderr
    return set(done.stderr.strip().splitlines()[-1].split())


def test_rx_run_imports_neither_the_ledger_nor_the_hosts_commands(isolated: Any) -> None:
    loaded = _modules_after_a_local_rx_run(isolated)
    assert "remote_exec.cli.run" in loaded
    for other in ("ledger", "hosts", "pool"):  # (run uses sync's progress bar)
        assert f"remote_exec.cli.{other}" not in loaded, sorted(loaded)


def test_a_plain_rx_run_leaves_the_heavy_and_the_unused_unimported(isolated: Any) -> None:
    """What a run that declares no dependencies, submits no job and prints no table never needs: rich (~15 ms
    to import), filelock (~10 ms), the scheduler and environment machinery."""
    loaded = _modules_after_a_local_rx_run(isolated)
    assert "remote_exec.coordinator" in loaded
    unwanted = {"rich", "rich.console", "filelock", "remote_exec.jobs", "remote_exec.envs.manager",
                "remote_exec.protocol.envs", "remote_exec.launchers.slurm", "remote_exec.launchers.jobs",
                "remote_exec.tracebacks", "remote_exec.envs.resolve", "tarfile"}
    assert not loaded & unwanted, sorted(loaded & unwanted)


def test_typer_finds_the_commands_annotations_evaluated_and_builds_only_the_named_one(
        capsys: pytest.CaptureFixture[str]) -> None:
    """A command module's annotations are objects, not strings (``from __future__ import annotations`` made
    typer evaluate ~150 of them on every start: ~6 ms of ``rx run``); a command line builds only its command,
    and the application keeps every command for the next call."""
    import inspect

    from remote_exec.cli import _command, _register

    _register()
    callbacks = [info.callback for info in app.registered_commands]
    callbacks.append(app.registered_callback.callback)  # type: ignore[union-attr]
    for callback in callbacks:
        strings = [name for name, value in inspect.get_annotations(callback).items() if isinstance(value, str)]
        assert not strings, (callback.__module__, callback.__name__, strings)
    everything = list(app.registered_commands)
    with pytest.raises(SystemExit) as exited:
        _command(["run", "--help"])
    assert exited.value.code == 0
    assert "Usage: rx run [OPTIONS] [SCRIPT] [ARGS]..." in capsys.readouterr().out
    assert app.registered_commands == everything


def test_help_and_a_mistyped_command_still_see_every_command(isolated: Any) -> None:
    helped = subprocess.run([sys.executable, "-m", "remote_exec", "--help"], env=isolated.env(), capture_output=True,
                            text=True, timeout=60, check=False)
    for name in COMMAND_MODULES:
        assert f"\n  {name} " in helped.stdout, (name, helped.stdout)
    typo = subprocess.run([sys.executable, "-m", "remote_exec", "rnu"], env=isolated.env(), capture_output=True,
                          text=True, timeout=60, check=False)
    assert typo.returncode == 2 and "run" in typo.stderr, typo.stderr


def test_the_console_script_ends_without_teardown_but_keeps_what_exit_does(tmp_path: Any) -> None:
    """exit_now: the status as sys.exit gives it, non-daemon threads waited for, atexit callbacks run, the
    streams flushed."""
    mark = tmp_path / "mark"
    probe = ("import atexit, sys, threading, time\n"
             "from remote_exec.cli import exit_now\n"
             f"atexit.register(lambda: open({str(mark)!r}, 'a').write('atexit\\n'))\n"
             f"late = lambda: (time.sleep(0.3), open({str(mark)!r}, 'a').write('thread\\n'))\n"
             "threading.Thread(target=late).start()\n"
             "sys.stdout.write('buffered, no newline')\n"
             "exit_now(5)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 5, done.stderr
    assert done.stdout == "buffered, no newline"
    assert mark.read_text() == "thread\natexit\n"
    said = subprocess.run([sys.executable, "-c", "from remote_exec.cli import exit_now; exit_now('no luck')"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert (said.returncode, said.stderr) == (1, "no luck\n")


def test_the_early_peek_knows_every_flag_of_rx_run() -> None:
    """cli/early.py reads `rx run` lines before the parser exists: its list of options that take no value
    must be the command's own, or it would take a script for an option's value."""
    import typer.main

    from remote_exec.cli import _register
    from remote_exec.cli.early import RUN_FLAGS

    _register(["run"])
    group = typer.main.get_command(app)
    run = group.commands["run"]  # type: ignore[attr-defined]
    flags = {name for param in run.params if getattr(param, "is_flag", False) for name in param.opts}
    assert flags | {"--help"} == RUN_FLAGS


def test_the_early_peek_reads_only_plain_rx_run_lines() -> None:
    from remote_exec.cli.early import peek_run

    assert peek_run(["run", "--remote", "gpu1", "train.py", "--remote", "other"]) == {"remote": "gpu1",
                                                                                      "script": "train.py"}
    assert peek_run(["run", "--json", "-r", "gpu1", "--backend=paramiko", "x.py"]) == {
        "remote": "gpu1", "backend": "paramiko", "script": "x.py"}
    assert peek_run(["run", "--timeout", "5", "--remote=gpu1", "--ssh-config", "cfg", "x.py"]) == {
        "remote": "gpu1", "ssh_config": "cfg", "script": "x.py"}
    assert peek_run(["-vv", "run", "--remote", "gpu1", "--", "x.py"]) == {"remote": "gpu1"}
    assert peek_run(["run", "x.py", "--remote", "gpu1"]) is None  # the script's own arguments
    assert peek_run(["run", "-m", "pkg.mod", "--remote", "gpu1"]) == {"remote": "gpu1", "module": "pkg.mod"}
    assert peek_run(["run", "-m", "pkg.mod", "--remote", "gpu1", "arg"]) == {"remote": "gpu1", "module": "pkg.mod",
                                                                             "script": "arg"}  # (not a script)
    assert peek_run(["run", "--remote", "gpu1", "--python", "/opt/conda/envs/a/bin/python", "x.py"]) == {
        "remote": "gpu1", "python": "/opt/conda/envs/a/bin/python", "script": "x.py"}  # the head start's runner's
    assert peek_run(["run", "-d", "--remote", "gpu1", "x.py"]) is None
    assert peek_run(["run", "--slurm", "--gres=gpu:1", "--remote", "login", "x.py"]) is None
    assert peek_run(["run", "--insecure-no-host-key-check", "--remote", "gpu1", "x.py"]) is None
    assert peek_run(["run", "-rgpu1", "x.py"]) is None
    assert peek_run(["--version", "run", "--remote", "gpu1", "x.py"]) is None
    assert peek_run(["runs", "--remote", "gpu1"]) is None
    assert peek_run(["run", "--remote"]) is None


def test_closing_a_coordinator_that_made_no_job_imports_none() -> None:
    """The scheduler side is made on first use, and closing never makes it (an import at exit, after an
    uncaught Ctrl-C, cost the process its exit by SIGINT: tests/unit/test_first_day.py saw exit 1)."""
    probe = ("import sys\n"
             "from remote_exec.coordinator import Coordinator\n"
             "Coordinator.current().close()\n"
             "print('remote_exec.jobs' in sys.modules, 'remote_exec.envs.manager' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False)
    assert done.stdout.split() == ["False", "False"], done.stderr


def test_a_runner_started_for_a_command_line_that_is_refused_is_stopped(tmp_path: Any) -> None:
    """The runner started from the raw words (cli/early.py) is stopped when the parser then refuses the
    line: nothing is left running on the host for a run that never came."""
    mark = tmp_path / "closed"
    probe = ("import sys\n"
             "import remote_exec.cli.early as early\n"
             "class Runner:\n"
             f"    def close(self): open({str(mark)!r}, 'w').write('closed')\n"
             "early.connect_from_argv = lambda words, seen=None, key=None: early.HeadStart(\n"
             "    connection=None, config=None, runner=Runner())\n"
             "sys.argv = ['rx', 'run', '--remote', 'h', '--timeout', 'soon', 'x.py']\n"
             "from remote_exec.cli import main\n"
             "main()\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 2, done.stderr
    assert "'soon' is not a valid float" in done.stderr
    assert mark.read_text() == "closed"


def test_ctrl_c_before_rx_is_imported_is_one_line_and_exit_130() -> None:
    """Ctrl-C in the first milliseconds (while rx connects early and imports itself): rx's line, no traceback."""
    probe = ("import sys\n"
             "import remote_exec.cli.early as early\n"
             "def interrupted(words, seen=None, key=None):\n"
             "    raise KeyboardInterrupt\n"
             "early.connect_from_argv = interrupted\n"
             "sys.argv = ['rx', 'run', '--remote', 'h', 'x.py']\n"
             "from remote_exec.cli import main\n"
             "main()\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False)
    assert (done.returncode, done.stderr) == (130, "rx: error: interrupted\n")


def test_rx_run_starts_its_memo_s_ssh_before_anything_heavy_is_imported() -> None:
    """What `rx run` imports before it starts the ssh its memo names (remote_exec/prestart.py): rx's entry
    point, the words' reader and the memo, and built-in modules, nothing that takes milliseconds (re,
    typing, enum, dataclasses, subprocess, socket, pathlib: all come later, while ssh connects)."""
    probe = ("import sys\n"
             "before = set(sys.modules)\n"
             "import remote_exec.cli, remote_exec.cli.words, remote_exec.prestart\n"
             "import _signal, _socket, fcntl\n"
             "remote_exec.prestart._digest(b'')\n"
             "print(' '.join(sorted(set(sys.modules) - before)))\n")
    done = subprocess.run([sys.executable, "-S", "-c", probe], capture_output=True, text=True, timeout=60,
                          check=False, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert done.returncode == 0, done.stderr
    loaded = set(done.stdout.split())
    heavy = {"re", "typing", "enum", "dataclasses", "subprocess", "socket", "pathlib", "json", "hashlib",
             "logging", "threading", "tempfile", "contextlib"}
    assert not loaded & heavy, sorted(loaded & heavy)
    assert {"remote_exec.prestart", "remote_exec.cli.words"} <= loaded
