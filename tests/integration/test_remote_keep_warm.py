"""``@task(remote="rx-testbed-1", keep_warm=True)`` against the testbed, on both backends: values come back
as with a call per process, exceptions arrive as their own type with the remote traceback, output streams
live, and every call of the process runs in one remote worker over one connection; the worker ends with
``Coordinator.current().workers.close()`` (as it does when the process exits)."""

from __future__ import annotations

import datetime
import decimal
import itertools
import os
import platform
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from remote_exec import RemoteTraceback, task
from remote_exec.config import Configuration
from remote_exec.coordinator import Coordinator
from testbed import exec_root

DATA = Path(__file__).resolve().parent / "data"
if str(DATA) not in sys.path:
    sys.path.insert(0, str(DATA))
pytest.register_assert_rewrite("remote_support")

from remote_support import HOST, Remote  # noqa: E402
from rxproj import tasks  # noqa: E402
from rxproj.errors import BadInput  # noqa: E402

pytest_plugins = ["remote_support"]

ARCHIVES_UNDER = "/home/rx/.cache/remote_exec/archives/"


@pytest.fixture
def warm(remote: Remote) -> Iterator[Remote]:
    """The remote fixture; this process's persistent workers are stopped after the test."""
    yield remote
    Coordinator.current().workers.close()


def remote_workers(remote: Remote) -> list[int]:
    """Pids of the persistent workers running on the host."""
    code, listing = exec_root(remote.host, "ps -eo pid=,user=,args=")
    assert code == 0, listing
    pids = []
    for line in listing.splitlines():
        words = line.split()
        if len(words) > 3 and words[1] == "rx" and words[-2] == "worker":
            pids.append(int(words[0]))
    return pids


def test_values_come_back_as_they_went(warm: Remote) -> None:
    echo = task(remote=HOST, keep_warm=True)(lambda value: value)
    values: list[Any] = [
        None, 0, -(2**70), 1.5, "ünïcode ✓", b"\x00\xff" * 1000, [1, [2, [3]]], (1, "a"), {"k": {"n": [None]}},
        {1, 2}, datetime.datetime(2026, 1, 2, 3, 4, 5), decimal.Decimal("1.10"), os.urandom(3 << 20),
    ]

    for value in values:
        assert echo(value) == value

    made = task(remote=HOST, keep_warm=True)(lambda n, *, scale: [n * scale, platform.node()])
    assert made(3, scale=7) == [21, HOST]


def test_an_exception_arrives_as_its_own_type_and_the_worker_goes_on(warm: Remote) -> None:
    checked = task(remote=HOST, keep_warm=True)(tasks.check_positive.function)
    before = set(remote_workers(warm))
    assert checked(1) == 1
    worker = set(remote_workers(warm)) - before
    assert len(worker) == 1, worker

    with pytest.raises(BadInput) as raised:
        checked(-5)

    error = raised.value
    assert type(error) is BadInput and str(error) == "negative: -5" and error.value == -5
    cause = error.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert cause.tb.startswith("Traceback (most recent call last):")
    assert 'raise BadInput(f"negative: {x}", value=x)' in cause.tb
    assert '/rxproj/tasks.py", line 36, in check_positive' in cause.tb  # mapped back to the local file
    assert ARCHIVES_UNDER not in cause.tb
    assert cause.tb.rstrip().endswith("rxproj.errors.BadInput: negative: -5")
    # An exception is a result like any other: the same worker serves the next call.
    assert checked(2) == 2
    assert worker <= set(remote_workers(warm))
    with pytest.raises(ZeroDivisionError) as divided:
        task(remote=HOST, keep_warm=True)(lambda: 1 / 0)()
    assert isinstance(divided.value.__cause__, RemoteTraceback)
    assert divided.value.__cause__.tb.rstrip().endswith("ZeroDivisionError: division by zero")


class Stamped:
    """A text stream that timestamps each write (rx writes task output to sys.stdout as it arrives)."""

    def __init__(self) -> None:
        self.writes: list[tuple[float, str]] = []
        self.lock = threading.Lock()

    def write(self, text: str) -> int:
        with self.lock:
            self.writes.append((time.monotonic(), text))
        return len(text)

    def flush(self) -> None:
        pass

    def text(self) -> str:
        return "".join(text for _, text in self.writes)

    def first(self, needle: str) -> float:
        """When the output first held ``needle``."""
        seen = ""
        for at, text in self.writes:
            seen += text
            if needle in seen:
                return at
        raise AssertionError(f"{needle!r} never came: {seen!r}")


def test_output_streams_live_from_the_worker(warm: Remote, monkeypatch: pytest.MonkeyPatch) -> None:
    def chatty(count: int) -> str:
        import sys
        import time

        for index in range(count):
            print("line", index, flush=True)
            print("err", index, file=sys.stderr, flush=True)
            time.sleep(0.6)
        return "done"

    call = task(remote=HOST, keep_warm=True)(chatty)
    call(0)  # the worker is up: what follows is a warm call
    out, err = Stamped(), Stamped()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    started = time.monotonic()

    value = call(4)

    ended = time.monotonic()
    monkeypatch.undo()
    assert value == "done"
    assert out.text() == "".join(f"line {index}\n" for index in range(4))
    assert err.text() == "".join(f"err {index}\n" for index in range(4))
    # Each line came while the call ran, about 0.6 s after the one before, not at its end.
    arrivals = [out.first(f"line {index}") for index in range(4)]
    assert arrivals[0] - started < 1.5, arrivals[0] - started
    assert ended - arrivals[0] > 1.2, (started, arrivals, ended)
    assert all(later - earlier > 0.3 for earlier, later in itertools.pairwise(arrivals)), arrivals


def test_every_call_runs_in_one_worker_over_one_connection(warm: Remote) -> None:
    config = Configuration.load()
    spec = config.remote(HOST).spec(ssh_config=config.effective_ssh_config(), host_key_policy="accept-new",
                                    connect_timeout=config.connect_timeout)
    backend = Coordinator.current().backend(spec, warm.backend)

    def where(value: int) -> tuple[int, int, str]:
        import os
        import platform

        return value, os.getpid(), platform.node()

    warm_where = task(remote=HOST, keep_warm=True)(where)
    cold_where = task(remote=HOST)(where)
    before = set(remote_workers(warm))

    first = warm_where(0)
    opened = backend.connections_opened
    results = [warm_where(index) for index in range(1, 11)]

    assert [value for value, _, _ in [first, *results]] == list(range(11))
    assert {pid for _, pid, _ in [first, *results]} == {first[1]}
    assert {node for _, _, node in results} == {HOST}
    assert backend.connections_opened == opened, "a warm call opened a connection"
    assert set(remote_workers(warm)) - before == {first[1]}
    # A call without keep_warm runs in a process of its own, beside the worker.
    _, cold_pid, _ = cold_where(0)
    assert cold_pid != first[1]
    assert warm_where(11)[1] == first[1]

    Coordinator.current().workers.close()

    deadline = time.monotonic() + 5
    while first[1] in remote_workers(warm) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert first[1] not in remote_workers(warm), "the worker outlived closing the workers"
