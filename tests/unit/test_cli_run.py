"""``rx run`` / ``rx rerun`` as a user types them: ``python -m remote_exec`` in a subprocess, no network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PI = REPO_ROOT / "examples" / "pi.py"


def rx(isolated: Any, *args: str, cwd: Path | None = None, timeout: float = 90,
       **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "remote_exec", *args], cwd=cwd or isolated.root,
                          env=isolated.env(**env), capture_output=True, text=True, timeout=timeout, check=False)


def _runs(isolated: Any) -> list[dict[str, Any]]:
    from remote_exec.workspace import Workspace

    return [run.info() for run in Workspace(isolated.workspace).runs()]


def _one_error_line(stderr: str) -> str:
    # A script outside any project gets rx's note saying so first.
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("rx: no project root")]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("rx: error: ")
    assert "Traceback" not in stderr
    return lines[0]


def test_version(isolated: Any) -> None:
    from remote_exec import __version__

    result = rx(isolated, "--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"rx {__version__}"


def test_run_pi_example(isolated: Any) -> None:
    result = rx(isolated, "run", str(PI), "--rounds", "2", "--pause", "0", "--samples", "2000")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("round 1/2: pi ~ 3.") and lines[1].startswith("round 2/2: pi ~ ")
    assert lines[2].startswith("wrote pi.json on ")
    (run,) = _runs(isolated)
    assert run["status"] == "finished" and run["exit_code"] == 0
    landed = json.loads((isolated.workspace / "runs" / run["run_id"] / "files" / "pi.json").read_text())
    assert landed["rounds"] == 2 and landed["samples"] == 2000 and 2.5 < landed["pi"] < 3.8
    stdout_log = (isolated.workspace / "runs" / run["run_id"] / "stdout.log").read_text()
    assert stdout_log == result.stdout
    assert f"run {run['run_id']} finished, exit 0" in result.stderr


@pytest.mark.parametrize(("source", "code"), [
    ("import sys\nprint('bye')\nsys.exit(7)\n", 7),
    ("raise RuntimeError('script failed')\n", 1),
    ("import os\nos._exit(9)\n", 9),
])
def test_the_scripts_exit_code_is_rx_exit_code(isolated: Any, source: str, code: int) -> None:
    script = isolated.root / "job.py"
    script.write_text(source)
    result = rx(isolated, "run", "job.py")
    assert result.returncode == code, result.stderr
    (run,) = _runs(isolated)
    assert run["exit_code"] == code and run["status"] == "failed"
    if code == 1:
        assert "RuntimeError: script failed" in result.stderr  # the script's own traceback


def test_run_a_module_from_the_current_directory_with_arguments(isolated: Any) -> None:
    package = isolated.root / "mytool"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "helpers.py").write_text("def shout(words):\n    return ' '.join(words).upper()\n")
    (package / "__main__.py").write_text(textwrap.dedent("""
        import sys
        from mytool.helpers import shout
        print(__name__, shout(sys.argv[1:]))
        sys.exit(len(sys.argv) - 1)
    """))
    (isolated.root / "single.py").write_text("import sys\nprint('single', sys.argv[1:])\n")
    result = rx(isolated, "run", "-m", "mytool", "alpha", "--beta")
    assert result.returncode == 2, result.stderr
    assert result.stdout == "__main__ ALPHA --BETA\n"
    single = rx(isolated, "run", "-m", "single", "x")
    assert single.returncode == 0, single.stderr
    assert single.stdout == "single ['x']\n"


def test_run_a_module_when_the_cwd_is_not_on_sys_path(isolated: Any, monkeypatch: pytest.MonkeyPatch,
                                                      capfd: pytest.CaptureFixture[str]) -> None:
    from remote_exec.cli import main

    (isolated.root / "onlyhere.py").write_text("print('ran onlyhere')\n")
    monkeypatch.chdir(isolated.root)
    assert str(isolated.root) not in sys.path and "" not in sys.path
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "-m", "onlyhere"])
    assert exit_info.value.code == 0, capfd.readouterr().err
    assert "ran onlyhere" in capfd.readouterr().out


def test_missing_script_is_one_error_line_and_exit_3(isolated: Any) -> None:
    result = rx(isolated, "run", "no_such_script.py")
    assert result.returncode == 3
    assert _one_error_line(result.stderr) == "rx: error: no such script: no_such_script.py"


def test_verbose_shows_the_traceback(isolated: Any) -> None:
    result = rx(isolated, "-v", "run", "no_such_script.py")
    assert result.returncode == 3
    assert "Traceback (most recent call last)" in result.stderr
    assert "ConfigError: no such script: no_such_script.py" in result.stderr
    assert result.stderr.rstrip().splitlines()[-1] == "rx: error: no such script: no_such_script.py"


def test_an_unresolvable_host_is_exit_255_with_one_line(isolated: Any) -> None:
    (isolated.root / "x.py").write_text("print('never runs')\n")
    result = rx(isolated, "run", "--remote", "host-that-does-not-resolve.invalid", "--connect-timeout", "3",
                "x.py", timeout=60)
    assert result.returncode == 255, result.stderr
    line = _one_error_line(result.stderr)
    assert "host-that-does-not-resolve.invalid" in line
    assert "never runs" not in result.stdout


def test_timeout_is_exit_124(isolated: Any) -> None:
    (isolated.root / "slow.py").write_text("import time\nprint('started', flush=True)\ntime.sleep(30)\n")
    result = rx(isolated, "run", "--timeout", "0.5", "slow.py")
    assert result.returncode == 124, result.stderr
    assert result.stdout == "started\n"
    assert "timed out after 0.5 s" in result.stderr


def test_env_pull_and_json(isolated: Any) -> None:
    (isolated.root / "files.py").write_text(textwrap.dedent("""
        import os
        open("keep.csv", "w").write(os.environ["RX_GREETING"])
        open("skip.log", "w").write("no")
    """))
    result = rx(isolated, "run", "--env", "RX_GREETING=hello", "--pull", "*.csv", "--json", "files.py")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["status"] == "finished" and info["exit_code"] == 0 and info["target"] == "files.py"
    files = isolated.workspace / "runs" / info["run_id"] / "files"
    assert (files / "keep.csv").read_text() == "hello"
    assert not (files / "skip.log").exists()

    bad = rx(isolated, "run", "--env", "NOEQUALS", "files.py")
    assert bad.returncode == 2  # a usage error
    assert "expected KEY=VALUE" in _one_error_line(bad.stderr)


def test_rerun_runs_the_recorded_script_again(isolated: Any) -> None:
    counter = isolated.root / "count.txt"
    (isolated.root / "again.py").write_text(textwrap.dedent(f"""
        import sys
        with open({str(counter)!r}, "a") as stream:
            stream.write("x")
        print("args", sys.argv[1:])
        sys.exit(5)
    """))
    first = rx(isolated, "run", "again.py", "one")
    assert first.returncode == 5
    (isolated.root / "again.py").unlink()  # the run holds its own copy of the script
    second = rx(isolated, "rerun", "latest")
    assert second.returncode == 5, second.stderr
    assert second.stdout == "args ['one']\n"
    assert counter.read_text() == "xx"
    runs = _runs(isolated)
    assert len(runs) == 2
    assert runs[1].get("parent") == runs[0]["run_id"]


def test_nothing_to_run_is_a_clear_error(isolated: Any) -> None:
    result = rx(isolated, "run")
    assert result.returncode == 3
    assert "nothing to run" in _one_error_line(result.stderr)


def test_rx_leaves_no_workspace_in_the_current_directory_when_told_where(isolated: Any) -> None:
    (isolated.root / "quiet.py").write_text("pass\n")
    work = isolated.root / "elsewhere"
    work.mkdir()
    result = rx(isolated, "run", "--workspace", str(isolated.root / "ws2"), str(isolated.root / "quiet.py"),
                cwd=work)
    assert result.returncode == 0, result.stderr
    assert not (work / ".rx").exists()
    assert (isolated.root / "ws2" / "runs").is_dir()
    assert os.listdir(work) == []


def test_the_workspace_is_at_the_project_root_wherever_rx_starts(isolated: Any) -> None:
    """Issue 12 item 13: runs started in any directory of a project land in one workspace, at its root."""
    project = isolated.root / "proj"
    (project / "scripts").mkdir(parents=True)
    (project / "pyproject.toml").write_text("[tool.rx]\n")
    (project / "scripts" / "job.py").write_text("print('from scripts')\n")
    (project / "top.py").write_text("print('from the root')\n")
    env = {key: value for key, value in isolated.env().items() if key != "RX_WORKSPACE"}
    below = subprocess.run([sys.executable, "-m", "remote_exec", "run", "job.py"], cwd=project / "scripts", env=env,
                           capture_output=True, text=True, timeout=120, check=False)
    above = subprocess.run([sys.executable, "-m", "remote_exec", "run", "top.py"], cwd=project, env=env,
                           capture_output=True, text=True, timeout=120, check=False)
    listed = subprocess.run([sys.executable, "-m", "remote_exec", "runs", "--json"], cwd=project / "scripts",
                            env=env, capture_output=True, text=True, timeout=60, check=False)
    assert below.returncode == 0 and above.returncode == 0, below.stderr + above.stderr
    assert not (project / "scripts" / ".rx").exists()
    assert (project / ".rx" / "runs").is_dir()
    assert [run["target"] for run in json.loads(listed.stdout)] == ["job.py", "top.py"]


READS_DATA = "print(open('data/x.txt').read().strip())\n"


def _outside_any_project(isolated: Any) -> Path:
    """``app/`` with ``read.py`` and ``data/x.txt``, under no project marker."""
    app: Path = isolated.root / "app"
    (app / "data").mkdir(parents=True)
    (app / "data" / "x.txt").write_text("the data\n")
    (app / "read.py").write_text(READS_DATA)
    return app


def test_project_option_makes_a_folder_without_a_marker_the_project(isolated: Any) -> None:
    app = _outside_any_project(isolated)

    without = rx(isolated, "run", "read.py", cwd=app)
    with_option = rx(isolated, "run", "--project", ".", "read.py", cwd=app)

    assert without.returncode == 1 and "rx: no project root above read.py" in without.stderr
    assert "FileNotFoundError" in without.stderr  # only the script travelled
    assert with_option.returncode == 0, with_option.stderr
    assert with_option.stdout == "the data\n"


def test_a_workspace_named_on_the_command_line_inside_the_project_never_travels(isolated: Any) -> None:
    """``--workspace DIR`` inside the project is left out of its snapshot like the configured one (it was
    shipped whole: every earlier run's logs, records and landed files, to every run)."""
    app = _outside_any_project(isolated)
    (app / "pyproject.toml").write_text("")

    first = rx(isolated, "run", "--workspace", "ws_here", "read.py", cwd=app)
    listed = rx(isolated, "run", "--dry-run", "--workspace", "ws_here", "read.py", cwd=app)

    assert first.returncode == 0, first.stderr
    assert (app / "ws_here" / "runs").is_dir()
    assert listed.returncode == 0, listed.stderr
    assert "read.py" in listed.stdout and "ws_here" not in listed.stdout + listed.stderr, listed.stdout
    assert "3 files" in listed.stdout + listed.stderr


def test_tool_rx_project_false_ships_only_the_script_and_its_imports(isolated: Any) -> None:
    app = _outside_any_project(isolated)
    (app / "pyproject.toml").write_text("[tool.rx]\nproject = false\n")

    done = rx(isolated, "run", "read.py", cwd=app)

    assert done.returncode == 1 and "FileNotFoundError" in done.stderr


def test_run_dry_run_lists_what_would_travel_and_runs_nothing(isolated: Any) -> None:
    app = _outside_any_project(isolated)
    (app / "pyproject.toml").write_text("")

    done = rx(isolated, "run", "--dry-run", "read.py", cwd=app)

    assert done.returncode == 0, done.stderr
    listed = done.stdout + done.stderr
    assert "data/x.txt" in listed and "read.py" in listed and "3 files" in listed, listed
    assert "the data" not in done.stdout  # nothing ran
    assert _runs(isolated) == []
