"""Fixtures of the fault-injection suite (marker ``faults``; the testbed fixtures come from
:mod:`testbed.pytest_plugin`, loaded by ``tests/conftest.py``).

Every trial of every scenario is recorded by the session's :class:`faultkit.Recorder`, and the results
file is written when the session ends (only when fault tests ran), for ``scripts/reliability_report.py``.
"""

from __future__ import annotations

import os
import sys
import zlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
pytest.register_assert_rewrite("faultkit")

from faultkit import Recorder, Rig, Trial, TrialFactory  # noqa: E402

from testbed import Testbed, TestbedHost  # noqa: E402

BACKENDS = ("openssh", "paramiko")
_RECORDER = pytest.StashKey[Recorder]()

def pytest_configure(config: pytest.Config) -> None:
    config.stash[_RECORDER] = Recorder()


def _is_fault_test(nodeid: str) -> bool:
    return "tests/faults/" in nodeid.replace("\\", "/")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not _is_fault_test(report.nodeid):
        return
    recorder = _recorder_of(report)
    if recorder is None:
        return
    if report.when == "call" or report.outcome != "passed":
        reason: str | None
        if hasattr(report, "wasxfail"):
            outcome = "xfailed" if report.outcome == "skipped" else "xpassed"
            reason = str(report.wasxfail)
        elif report.outcome == "failed":
            outcome = "failed" if report.when == "call" else "error"
            lines = report.longreprtext.strip().splitlines()
            reason = next((line[1:].strip() for line in lines if line.startswith("E ")), lines[-1] if lines else None)
            reason = reason[:300] if reason else None
        elif report.outcome == "skipped":
            outcome, reason = "skipped", str(report.longrepr)[-300:]
        else:
            outcome, reason = "passed", None
        recorder.test_outcome(report.nodeid, outcome, report.duration, reason)


_CONFIG: list[pytest.Config] = []


def _recorder_of(report: pytest.TestReport) -> Recorder | None:
    del report  # reports do not carry the config: the session's is kept in _CONFIG
    return _CONFIG[0].stash.get(_RECORDER, None) if _CONFIG else None


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    _CONFIG[:] = [session.config]


def pytest_sessionfinish(session: pytest.Session) -> None:
    recorder = session.config.stash.get(_RECORDER, None)
    if recorder is not None and recorder.tests:
        path = recorder.write(argv=session.config.invocation_params.args)
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"faults: {len(recorder.trials)} trial(s) recorded in {path}")


@pytest.fixture(scope="session")
def fault_seed(request: pytest.FixtureRequest) -> int:
    """The session's random seed (``RX_FAULTS_SEED`` to repeat a run); recorded in the results file."""
    recorder = request.config.stash[_RECORDER]
    return recorder.seed


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Each SSH backend in turn."""
    name: str = request.param
    return name


def through_server(request: pytest.FixtureRequest, backend: str) -> bool:
    """Whether this test's ``rx`` commands go through an rx server (:mod:`remote_exec.cli.server`, on by
    default for users once a first command started one): ``RX_FAULTS_SERVER=on`` all, ``off`` none, else
    (``mixed``) one backend of each test, picked by the test's name, so that every scenario runs both ways."""
    mode = os.environ.get("RX_FAULTS_SERVER", "mixed").strip().lower()
    if mode in ("on", "off"):
        return mode == "on"
    name = getattr(request.node, "originalname", None) or request.node.name
    return (zlib.crc32(name.encode()) + BACKENDS.index(backend)) % 2 == 0


@pytest.fixture
def rig(testbed: Testbed, backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        request: pytest.FixtureRequest) -> Iterator[Rig]:
    """This test's project folder, workspace and cache, for ``backend``; also set in this process. Its ``rx``
    commands go through an rx server of its own when :func:`through_server` says so."""
    made = Rig(testbed=testbed, backend=backend, root=tmp_path, server=through_server(request, backend))
    for name in ("RX_SSH_CONFIG", "RX_BACKEND", "RX_WORKSPACE", "RX_CACHE_DIR"):
        monkeypatch.setenv(name, made.env[name])
    monkeypatch.delenv("RX_DEBUG", raising=False)
    monkeypatch.chdir(made.project)
    try:
        if made.server:
            made.start_server()
        yield made
    finally:
        made.close()


@pytest.fixture
def trial(request: pytest.FixtureRequest, backend: str) -> TrialFactory:
    """``with trial("scenario", variant=..., bound=...) as t:`` records one trial of this test."""
    recorder = request.config.stash[_RECORDER]

    def make(scenario: str, *, variant: str = "", bound: float | None = None) -> AbstractContextManager[Trial]:
        if "rig" in request.fixturenames and through_server(request, backend):
            variant = f"{variant}, through the rx server" if variant else "through the rx server"
        return recorder.trial(scenario, backend, request.node.nodeid, variant=variant, bound=bound)

    return make


@pytest.fixture(scope="module")
def module_host(testbed: Testbed, request: pytest.FixtureRequest) -> Iterator[Callable[..., TestbedHost]]:
    """Start dedicated hosts shared by one module's tests (``module_host("name", mem_limit=...)``);
    each is started once and removed when the module is done."""
    from testbed import remove_host, start_host

    hosts: dict[str, TestbedHost] = {}

    def get(name: str, **options: object) -> TestbedHost:
        if name not in hosts:
            import secrets

            alias = f"rx-fault-{name}-{secrets.token_hex(3)}"
            hosts[name] = start_host(testbed.state_dir, alias, **options)  # type: ignore[arg-type]
        return hosts[name]

    try:
        yield get
    finally:
        for host in hosts.values():
            remove_host(host)
