"""Sessions: tests (unit + integration + faults), unit, lint (ruff), typecheck (mypy strict), bench.

Like urllib3's noxfile, one helper serves the test sessions; pytest always gets --strict-config
--strict-markers -ra (from pyproject.toml).
"""

from __future__ import annotations

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
    """The whole suite: unit, integration (Docker testbed, both backends) and fault injection; the 40 slowest
    tests are listed at the end (what to run concurrently next)."""
    tests_impl(session, durations=40)


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
