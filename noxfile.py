"""Sessions: tests (unit + integration + faults), unit, lint (ruff), typecheck (mypy strict), bench.

Like urllib3's noxfile, one helper serves the test sessions; pytest always gets --strict-config
--strict-markers -ra (from pyproject.toml).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True


def tests_impl(session: nox.Session, *, markers: str | None = None, durations: int = 0) -> None:
    session.install("-e", ".[test]")
    args = ["-p", "no:cacheprovider"] + ([f"--durations={durations}"] if durations else [])
    if markers:
        args += ["-m", markers]
    session.run("python", "-m", "pytest", *args, *session.posargs)


@nox.session
def tests(session: nox.Session) -> None:
    """The whole suite: unit, integration (Docker testbed, both backends) and fault injection.

    The tests marked ``slow`` (tens of seconds spent mostly waiting: Slurm time limits, frozen hosts, slow
    consumers) run in a second pytest process beside the rest, each process with a testbed of its own; its
    output follows the main one's. The 40 slowest tests of each are listed (what to move to that lane next).
    With arguments (``nox -s tests -- tests/unit -k store``) it is one plain pytest run.
    """
    if session.posargs:
        tests_impl(session)
        return
    session.install("-e", ".[test]")
    # (not session.create_tmp(): that sets TMPDIR inside the repository, and tests' projects would be in it)
    log_path = Path(tempfile.mkdtemp(prefix="rx-slow-lane-")) / "slow-lane.log"
    argv = [str(Path(session.bin) / "python"), "-m", "pytest", "-p", "no:cacheprovider", "--durations=40",
            "-m", "slow"]
    session.log(f"slow lane: {' '.join(argv[1:])} > {log_path}")
    with open(log_path, "wb") as log:
        # its fault trials go to a results file of their own: the main process writes tests/faults/.results
        env = _session_env(session, RX_FAULTS_RESULTS=str(log_path.with_name("slow-lane-results.json")))
        lane = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        session.run("python", "-m", "pytest", "-p", "no:cacheprovider", "--durations=40", "-m", "not slow")
    finally:
        code = lane.wait()
        session.log(f"slow lane ({log_path}), exit {code}:")
        print(log_path.read_text(errors="replace"), flush=True)
    if code != 0:
        session.error(f"the slow lane failed (pytest -m slow exited {code})")


def _session_env(session: nox.Session, **extra: str) -> dict[str, str]:
    """The environment ``session.run`` gives a command (its venv first on PATH; a None in ``session.env``
    unsets the variable), with ``extra``."""
    env = dict(os.environ)
    for name, value in session.env.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    env["PATH"] = os.pathsep.join([str(session.bin), env.get("PATH", "")])
    env["VIRTUAL_ENV"] = str(Path(session.bin).parent)
    return {**env, **extra}


@nox.session
def unit(session: nox.Session) -> None:
    """Unit tests only: no network, no Docker."""
    tests_impl(session, markers="not integration and not faults")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the package, tests, testbed, benchmarks and scripts; the functions' shape (scripts/code_shape.py)."""
    session.install("ruff", "radon")
    session.run("ruff", "check", "remote_exec", "tests", "testbed", "benchmarks", "noxfile.py", "scripts")
    session.run("python", "scripts/code_shape.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on remote_exec and testbed (files and settings in pyproject.toml)."""
    session.install("-e", ".[dev]")
    session.run("mypy")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks against the testbed and the peers; writes benchmarks/RESULTS.md."""
    session.install("-e", ".[test]")
    session.install("-r", "benchmarks/requirements.txt")
    session.run("python", "-m", "benchmarks", *session.posargs)
