"""Advice chains (order, conclude, extensions, refusals) and SubprocessAdvice running real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
from collections.abc import Callable
from typing import Any

import pytest

from remote_exec import (
    Advice,
    Configuration,
    Extension,
    Interpreter,
    LoggingAdvice,
    RemoteError,
    RemoteExecError,
    RemoteTraceback,
    Result,
    SubprocessAdvice,
    get_run_id,
    set_run_id,
    task,
)
from remote_exec.advice import run_chain
from remote_exec.coordinator import Coordinator
from remote_exec.errors import CommandTimeout, ConfigError, RunnerError, SessionError
from remote_exec.session import Session
from remote_exec.task import Execution, Task

ModuleFactory = Callable[[str, str], types.ModuleType]
Python = Callable[..., subprocess.CompletedProcess[bytes]]


# -- chains, in process ----------------------------------------------------------------------------------


class Recording(Advice):
    """Appends ``name.before`` / ``name.after`` to a shared log."""

    def __init__(self, label: str, log: list[str]) -> None:
        self.label = label
        self.log = log

    @property
    def name(self) -> str:
        return self.label

    def before(self, session: Session) -> None:
        self.log.append(f"{self.label}.before")
        session.proceed()

    def after(self, session: Session) -> None:
        self.log.append(f"{self.label}.after")


class Concluding(Recording):
    def before(self, session: Session) -> None:
        self.log.append(f"{self.label}.before")
        session.conclude(Result(value="from the advice"))


def _session(log: list[str], value: object = "from the task") -> Session:
    def work() -> object:
        log.append("task")
        return value

    t = Task.from_function(work)
    return Session(task=t, execution=Execution.create(t), run_id="r")


def test_before_in_order_after_in_reverse() -> None:
    log: list[str] = []
    result = run_chain(_session(log), [Recording("a", log), Recording("b", log), Recording("c", log)])
    assert log == ["a.before", "b.before", "c.before", "task", "c.after", "b.after", "a.after"]
    assert result.ok and result.value == "from the task"


def test_conclude_skips_the_task_and_later_advices_but_unwinds_the_entered_ones() -> None:
    log: list[str] = []
    result = run_chain(_session(log), [Recording("a", log), Concluding("b", log), Recording("c", log)])
    assert log == ["a.before", "b.before", "b.after", "a.after"]
    assert result.value == "from the advice"


def test_after_may_replace_the_result() -> None:
    class Doubling(Advice):
        def after(self, session: Session) -> None:
            assert session.result is not None
            session.conclude(Result(value=session.result.value * 2))

    log: list[str] = []
    assert run_chain(_session(log, value=21), [Doubling()]).value == 42


def test_advice_that_neither_proceeds_nor_concludes_is_named() -> None:
    class Forgetful(Advice):
        def before(self, session: Session) -> None:
            pass

    log: list[str] = []
    with pytest.raises(RemoteExecError, match="advice Forgetful neither proceeded nor concluded"):
        run_chain(_session(log), [Recording("a", log), Forgetful()])
    assert "task" not in log


def test_advice_that_decides_twice_is_refused() -> None:
    class Greedy(Advice):
        def before(self, session: Session) -> None:
            session.proceed()
            session.conclude(Result(value=1))

    with pytest.raises(SessionError, match="proceed or conclude once"):
        run_chain(_session([]), [Greedy()])


def test_a_task_exception_comes_back_with_its_traceback() -> None:
    def broken() -> None:
        raise LookupError("nothing here")

    t = Task.from_function(broken)
    result = run_chain(Session(task=t, execution=Execution.create(t)), [])
    assert result.status == "raised" and isinstance(result.exception, LookupError)
    assert "nothing here" in (result.traceback or "") and "broken" in (result.traceback or "")


def test_advice_after_an_executing_advice_is_refused() -> None:
    with pytest.raises(ConfigError, match="LoggingAdvice after SubprocessAdvice would never run") as error:
        run_chain(_session([]), [SubprocessAdvice(), LoggingAdvice()])
    assert "put SubprocessAdvice last" in str(error.value)

    config = Configuration().add_chain("wrong", [SubprocessAdvice(), LoggingAdvice()])

    @task(chain="wrong", config=config)
    def nothing() -> None:
        return None

    with pytest.raises(ConfigError, match="would never run"):
        nothing()


def test_extensions_observe_every_advice_call() -> None:
    log: list[str] = []

    class Observer(Extension):
        def on_init(self, configuration: Configuration) -> None:
            log.append(f"init:{sorted(configuration.chains)}")

        def on_before_advice(self, advice: Advice, session: Session) -> None:
            log.append(f"before:{advice.name}:{session.task.name.rpartition('.')[2]}")

        def on_after_advice(self, advice: Advice, session: Session) -> None:
            assert session.result is not None
            log.append(f"after:{advice.name}:{session.result.value}")

    config = Configuration().add_chain("traced", [Recording("a", log), Recording("b", log)])
    config.add_extension(Observer())
    assert log == ["init:['cached', 'default', 'traced']"]

    @task(chain="traced", config=config)
    def seven() -> int:
        log.append("task")
        return 7

    assert seven() == 7
    assert log[1:] == ["before:a:seven", "a.before", "before:b:seven", "b.before", "task",
                       "b.after", "after:b:7", "a.after", "after:a:7"]


def test_set_run_id_names_the_run_of_later_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Coordinator, "_current", Coordinator())  # a process that made no call yet
    seen: list[str] = []

    class RunId(Advice):
        def before(self, session: Session) -> None:
            seen.append(session.run_id)
            session.proceed()

    config = Configuration().add_chain("ids", [RunId()])

    @task(chain="ids", config=config)
    def noop() -> None:
        return None

    set_run_id("my-run-1")
    noop()
    noop()
    assert get_run_id() == "my-run-1" and seen == ["my-run-1", "my-run-1"]


def test_arguments_that_cannot_be_serialized_are_reported() -> None:
    import threading

    from remote_exec.errors import SerializationError

    config = Configuration().add_chain("here", [])

    @task(chain="here", config=config)
    def take(value: object) -> None:
        return None

    with pytest.raises(SerializationError, match="cannot serialize the arguments of"):
        take(threading.Lock())


# -- SubprocessAdvice: the real pipeline in a local subprocess ---------------------------------------------


@pytest.fixture
def sub(isolated: Any) -> Configuration:
    """A configuration whose chain ``sub`` runs tasks in a subprocess."""
    return Configuration().add_chain("sub", [SubprocessAdvice()])


TASKS = """
    import os
    import sys
    import threading


    def where(x):
        return x * 2, os.getpid()


    class TwoArgs(Exception):
        def __init__(self, code, reason):
            super().__init__(f"code {code}: {reason}")
            self.code = code
            self.reason = reason


    class Locked(Exception):
        def __init__(self, message):
            super().__init__(message)
            self.lock = threading.Lock()


    def fail_value():
        raise ValueError("bad value 17")


    def fail_two_args():
        raise TwoArgs(3, "no disk")


    def fail_locked():
        raise Locked("holding a lock")


    def probe():
        import importlib
        try:
            found = importlib.import_module("only_on_interpreter_path").VALUE
        except ImportError as exc:
            found = repr(exc)
        return found, os.environ.get("RX_PROBE"), sys.executable
"""


def test_module_function_runs_in_another_process(sub: Configuration, make_module: ModuleFactory) -> None:
    module = make_module("rx_unit_tasks", TASKS)
    where = task(chain="sub", config=sub)(module.where)
    value, pid = where(21)
    assert value == 42
    assert pid != os.getpid()


def test_closure_and_lambda_run_in_another_process(sub: Configuration) -> None:
    offset = 100

    def shifted(x: int) -> tuple[int, int]:
        return x + offset, os.getpid()

    value, pid = task(chain="sub", config=sub)(shifted)(1)
    assert (value, pid != os.getpid()) == (101, True)
    lam = task(chain="sub", config=sub)(lambda: (offset * 2, os.getpid()))
    value, pid = lam()
    assert (value, pid != os.getpid()) == (200, True)


def test_script_functions_closures_and_lambdas_run_in_other_processes(isolated: Any, python: Python) -> None:
    script = isolated.root / "job.py"
    script.write_text(textwrap.dedent("""
        import json, os
        from remote_exec import Configuration, SubprocessAdvice, task

        config = Configuration().add_chain("sub", [SubprocessAdvice()])

        @task(chain="sub", config=config)
        def decorated(x):
            return x + 1, os.getpid()

        def make(offset):
            def closure(x):
                return x + offset, os.getpid()
            return closure

        results = {
            "me": os.getpid(),
            "decorated": decorated(1),
            "closure": task(chain="sub", config=config)(make(10))(1),
            "lambda": task(chain="sub", config=config)(lambda x: (x * 3, os.getpid()))(5),
        }
        print(json.dumps(results))
    """))
    result = python([str(script)], cwd=isolated.root, env=isolated.env())
    assert result.returncode == 0, result.stderr.decode()
    data = json.loads(result.stdout.decode().strip().splitlines()[-1])
    assert data["decorated"][0] == 2 and data["closure"][0] == 11 and data["lambda"][0] == 15
    pids = {data["me"], data["decorated"][1], data["closure"][1], data["lambda"][1]}
    assert len(pids) == 4  # four different processes


def test_raised_exception_arrives_as_its_type_with_the_remote_traceback(
        sub: Configuration, make_module: ModuleFactory) -> None:
    module = make_module("rx_unit_tasks_raise", TASKS)
    with pytest.raises(ValueError, match="bad value 17") as raised:
        task(chain="sub", config=sub)(module.fail_value)()
    cause = raised.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "in fail_value" in cause.tb and 'raise ValueError("bad value 17")' in cause.tb
    assert cause.tb.rstrip().endswith("ValueError: bad value 17")


@pytest.mark.parametrize(("function", "type_name", "message", "line"), [
    ("fail_two_args", "TwoArgs", "code 3: no disk", 'raise TwoArgs(3, "no disk")'),
    ("fail_locked", "Locked", "holding a lock", 'raise Locked("holding a lock")'),
])
def test_exceptions_that_cannot_be_rebuilt_still_arrive_with_name_message_and_traceback(
        sub: Configuration, make_module: ModuleFactory, function: str, type_name: str, message: str,
        line: str) -> None:
    module = make_module("rx_unit_tasks_odd", TASKS)
    with pytest.raises(Exception) as raised:
        task(chain="sub", config=sub)(getattr(module, function))()
    error = raised.value
    if isinstance(error, RemoteError):
        assert error.type_name == f"rx_unit_tasks_odd.{type_name}"
        assert error.remote_message == message
        assert line in error.formatted
    else:
        assert type(error).__name__ == type_name and str(error) == message
    assert isinstance(error.__cause__, RemoteTraceback) and line in error.__cause__.tb
    assert message in error.__cause__.tb


def test_interpreter_executable_path_and_environment_reach_the_task(isolated: Any,
                                                                     make_module: ModuleFactory) -> None:
    extra = isolated.root / "interpreter-path"
    extra.mkdir()
    (extra / "only_on_interpreter_path.py").write_text("VALUE = 'found it'\n")
    executable = isolated.root / "bin" / "my-python"
    executable.parent.mkdir()
    executable.symlink_to(sys.executable)
    module = make_module("rx_unit_tasks_probe", TASKS)
    config = Configuration().add_chain("interp", [SubprocessAdvice(Interpreter(
        executable=str(executable), path=[str(extra)], environment={"RX_PROBE": "from the interpreter"}))])
    found, env_value, used = task(chain="interp", config=config)(module.probe)()
    assert used == str(executable)
    assert env_value == "from the interpreter"
    assert found == "found it"


def test_task_options_env_reaches_the_task(sub: Configuration) -> None:
    probe = task(chain="sub", config=sub, env={"RX_PROBE": "from the option"})(
        lambda: os.environ.get("RX_PROBE"))
    assert probe() == "from the option"


def test_a_task_that_times_out_or_dies_raises_instead_of_returning_none(sub: Configuration) -> None:
    import signal
    import time

    def sleepy() -> str:
        time.sleep(5)
        return "late"

    slow = task(chain="sub", config=sub, timeout=0.3)(sleepy)
    with pytest.raises(CommandTimeout, match=r"timed out after 0\.3 s"):
        print("timed-out task returned", repr(slow()))
    killed = task(chain="sub", config=sub)(lambda: os.kill(os.getpid(), signal.SIGKILL))
    with pytest.raises(RunnerError, match="SIGKILL"):
        print("killed task returned", repr(killed()))


def test_module_using_the_public_api_at_import_time_runs(isolated: Any, make_module: ModuleFactory) -> None:
    module = make_module("rx_unit_tasks_api", """
        import os
        from remote_exec import Configuration, SubprocessAdvice, task

        config = Configuration().add_chain("sub", [SubprocessAdvice()])

        @task(chain="sub", config=config)
        def where():
            return os.getpid()
    """)
    assert module.where() != os.getpid()


def test_calls_are_recorded_in_the_workspace(sub: Configuration, isolated: Any) -> None:
    from remote_exec.workspace import Workspace

    double = task(chain="sub", config=sub)(lambda x: 2 * x)
    assert double(4) == 8
    runs = Workspace(isolated.workspace).runs()
    assert len(runs) == 1 and runs[0].info()["kind"] == "task"
    entries = list(runs[0].tasks().values())
    assert entries and all(entry["status"] == "done" for entry in entries)
