"""``@task(remote="rx-testbed-1")`` against the testbed, on both backends: values back from a module
function, a closure and a lambda; remote exceptions as their own type with the remote traceback; project
helpers shipped without listing them; and a second call that uploads nothing over the same connection."""

from __future__ import annotations

import platform
import sys
import warnings
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest

from remote_exec import RemoteTraceback, get_run_id, task
from remote_exec.config import Configuration
from remote_exec.coordinator import Coordinator
from remote_exec.workspace import Workspace
from testbed import exec_root

DATA = Path(__file__).resolve().parent / "data"
if str(DATA) not in sys.path:
    sys.path.insert(0, str(DATA))
pytest.register_assert_rewrite("remote_support")

import rxhelper  # noqa: E402
from remote_support import HOST, Remote, settle_background_reapers  # noqa: E402
from rxproj import tasks  # noqa: E402
from rxproj.errors import BadInput  # noqa: E402

pytest_plugins = ["remote_support"]


RUNS_UNDER = "/home/rx/.cache/remote_exec/runs/"
ARCHIVES_UNDER = "/home/rx/.cache/remote_exec/archives/"


def test_a_module_function_returns_its_value_computed_remotely(remote: Remote) -> None:
    answer = tasks.where(41)

    assert answer["value"] == 42
    assert answer["node"] == HOST
    assert answer["node"] != platform.node()
    assert answer["cwd"].startswith(RUNS_UNDER)
    assert answer["file"].startswith(ARCHIVES_UNDER) and answer["file"].endswith("/rxproj/tasks.py")


def test_a_closure_and_a_lambda_return_their_values(remote: Remote) -> None:
    def make_adder(offset: int) -> Callable[[int], tuple[int, str]]:
        def add(value: int) -> tuple[int, str]:
            return value + offset, platform.node()

        return add

    adder = task(remote=HOST)(make_adder(40))
    reverser = task(remote=HOST)(lambda text: (text[::-1], platform.node()))

    assert adder(2) == (42, HOST)
    assert adder(-40) == (0, HOST)
    assert reverser("abc") == ("cba", HOST)


def test_a_remote_exception_arrives_as_its_own_type_with_the_remote_traceback(remote: Remote) -> None:
    with pytest.raises(BadInput) as raised:
        tasks.check_positive(-5)

    error = raised.value
    assert type(error) is BadInput
    assert str(error) == "negative: -5"
    assert error.value == -5
    cause = error.__cause__
    assert isinstance(cause, RemoteTraceback)
    text = cause.tb
    assert text.startswith("Traceback (most recent call last):")
    assert 'raise BadInput(f"negative: {x}", value=x)' in text
    assert text.rstrip().endswith("rxproj.errors.BadInput: negative: -5")
    # The frames are mapped back to this checkout's files (the user's code, with its source lines); the
    # host's own text, with its paths and rx's frames, is kept beside it.
    assert text.splitlines()[1] == f'  File "{DATA / "rxproj" / "tasks.py"}", line 36, in check_positive'
    assert ARCHIVES_UNDER not in text and "runner" not in text
    assert tasks.check_positive(7) == 7


def test_a_builtin_exception_arrives_as_itself(remote: Remote) -> None:
    with pytest.raises(ZeroDivisionError) as raised:
        tasks.divide(1, 0)

    assert isinstance(raised.value.__cause__, RemoteTraceback)
    assert "return a / b" in raised.value.__cause__.tb
    assert raised.value.__cause__.tb.rstrip().endswith("ZeroDivisionError: division by zero")
    assert tasks.divide(1, 4) == 0.25


def test_a_project_helper_module_is_shipped_without_listing_it(remote: Remote) -> None:
    assert Configuration.load().distribution_modules == []

    received = tasks.fingerprint("helper")

    assert received["helper_file"].startswith(ARCHIVES_UNDER)
    assert received["helper_file"].endswith("/rxhelper.py")
    assert received["node"] == HOST
    assert {key: received[key] for key in ("hex", "sha256", "codepoints")} == rxhelper.describe("helper")


def test_the_second_call_uploads_nothing_and_opens_no_connection(remote: Remote, fresh_workdir: str) -> None:
    square = task(remote=HOST, workdir=fresh_workdir)(tasks.square)
    config = Configuration.load()
    spec = config.remote(HOST).spec(ssh_config=config.effective_ssh_config(), host_key_policy="accept-new",
                                    connect_timeout=config.connect_timeout)
    backend = Coordinator.current().backend(spec, remote.backend)
    opened_before = backend.connections_opened

    first = square(3)
    opened_after_first = backend.connections_opened
    second = square(4)
    opened_after_second = backend.connections_opened

    assert (first["value"], second["value"]) == (9, 16)
    remote_home = "/home/rx/" + fresh_workdir.removeprefix("~/")
    assert first["cwd"].startswith(remote_home + "/runs/")
    # The pooled backend is the one the calls used: it holds one connection, opened at most by the first.
    assert opened_after_first >= 1
    assert opened_after_first - opened_before <= 1
    assert opened_after_second == opened_after_first
    # The workspace records each call's phases: only the first had to upload the archive.
    run = Workspace.resolve().run(str(get_run_id()))
    entries = sorted(run.tasks().values(), key=lambda entry: datetime.fromisoformat(entry["started"]))
    assert [entry["status"] for entry in entries] == ["done", "done"]
    assert [entry["host"] for entry in entries] == [HOST, HOST]
    assert "upload" in entries[0]["phases"]
    assert "upload" not in entries[1]["phases"]
    assert set(entries[1]["phases"]) == {"connect", "execute", "collect"}
    # And the host holds exactly one archive in this workdir.
    code, listing = exec_root(remote.host, f"ls {remote_home}/archives")
    assert code == 0, listing
    assert len(listing.split()) == 1


def test_task_calls_leave_no_unclosed_pipes(remote: Remote) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        for value in range(3):
            assert tasks.where(value)["value"] == value + 1
        settle_background_reapers()

    unclosed = [str(warning.message) for warning in caught if issubclass(warning.category, ResourceWarning)]
    assert unclosed == []
