"""A runner started ahead of its call (``rx run`` starts it while it records the run): the call takes it when
it fits, with the phases it went through; otherwise, or when the run ends before its call, it is stopped
and leaves no process behind."""

from __future__ import annotations

import sys
import time
from typing import Any

from remote_exec.backends.local import LocalBackend
from remote_exec.launchers import create_launcher
from remote_exec.protocol.call import RunnerAhead
from remote_exec.protocol.options import CallOptions


def _ahead(dispatcher: Any, **options: Any) -> tuple[RunnerAhead, Any, Any, CallOptions]:
    backend, launcher = LocalBackend(), create_launcher("direct")
    call_options = CallOptions(python=sys.executable, workdir=str(dispatcher.workdir), **options)
    return RunnerAhead(launcher, backend, dispatcher.archive, call_options), backend, launcher, call_options


def _ended(process: Any, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if process.wait(0.1) is not None:
            return True
    return False


def test_the_call_takes_the_runner_started_ahead(dispatcher: Any) -> None:
    ahead, backend, launcher, _ = _ahead(dispatcher)
    ahead._thread.join(30)
    runner = ahead._channel
    assert runner is not None

    call = dispatcher.run("print('hi')", backend=backend, launcher=launcher, ahead=ahead)

    assert call.text() == "hi\n"
    assert "connect" in call.outcome.phases and call.outcome.phases["connect"] > 0
    assert ahead._channel is None  # taken: no second runner was started
    assert _ended(runner.process)


def test_a_runner_that_does_not_fit_the_call_is_stopped(dispatcher: Any) -> None:
    ahead, backend, launcher, _ = _ahead(dispatcher, handshake_timeout=7.0)  # started otherwise than the call's
    ahead._thread.join(30)
    runner = ahead._channel
    assert runner is not None

    call = dispatcher.run("import os; print(os.getppid())", backend=backend, launcher=launcher, ahead=ahead)

    assert int(call.text()) != runner.process.popen.pid  # another runner served it
    assert _ended(runner.process)


def test_the_calls_own_options_travel_with_it_and_do_not_unfit_the_runner(dispatcher: Any) -> None:
    """A runner started before the command line was parsed knows only how to start; the call's timeout and
    environment reach it with the call."""
    ahead, backend, launcher, _ = _ahead(dispatcher)
    ahead._thread.join(30)
    assert ahead._channel is not None

    runner = ahead._channel
    call = dispatcher.run("import os; print(os.environ['LATE'], os.getppid())", backend=backend, launcher=launcher,
                          ahead=ahead, timeout=60, env={"LATE": "given"})

    assert call.text() == f"given {runner.process.popen.pid}\n"  # this runner served it


def test_a_runner_nobody_took_is_stopped(dispatcher: Any) -> None:
    ahead, *_ = _ahead(dispatcher)
    ahead.close()  # at once: it stops as soon as it is up
    ahead._thread.join(30)
    assert ahead._channel is None and ahead._error is None
    early, *_ = _ahead(dispatcher)
    early._thread.join(30)
    runner = early._channel
    assert runner is not None
    early.close()
    assert _ended(runner.process)
