"""@task, Task and Execution: how functions, closures, lambdas and scripts become tasks, and their ids."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
import types
from collections.abc import Callable
from pathlib import Path

import pytest

from remote_exec import Configuration, task
from remote_exec.api import TaskFunction
from remote_exec.serialization import PickleSerializer
from remote_exec.task import Execution, Task

Python = Callable[..., subprocess.CompletedProcess[bytes]]
ModuleFactory = Callable[[str, str], types.ModuleType]
REPO_ROOT = Path(__file__).resolve().parents[2]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), **extra}


# -- the decorator -----------------------------------------------------------------------------------


def test_bare_decorator_keeps_the_function_and_its_name() -> None:
    def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    decorated = task(add)
    assert isinstance(decorated, TaskFunction)
    assert decorated.function is add
    assert vars(decorated)["__name__"] == "add" and decorated.__doc__ == "Add two numbers."
    assert decorated.remote is None and decorated.chain == "default" and decorated.options == {}


def test_decorator_with_options_records_them() -> None:
    @task(remote="gpu1", chain="cached", timeout=5, python="/opt/py/bin/python3")
    def train(epochs: int) -> int:
        return epochs

    assert train.remote == "gpu1"
    assert train.chain == "cached"
    assert train.options == {"timeout": 5, "python": "/opt/py/bin/python3"}
    assert "gpu1" in repr(train)


def test_decorating_something_that_is_not_callable_is_refused() -> None:
    with pytest.raises(TypeError, match="decorates a function"):
        task(42)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="decorates a function"):
        task(remote="h")("not a function")  # type: ignore[arg-type]


def test_a_task_runs_through_a_chain_without_executing_advice_in_process() -> None:
    config = Configuration().add_chain("here", [])

    @task(chain="here", config=config)
    def where() -> int:
        return os.getpid()

    assert where() == os.getpid()


def test_a_task_called_inside_a_running_task_runs_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside the runner a nested @task call must not start another trip (it would recurse)."""
    monkeypatch.setenv("RX_INSIDE_RUNNER", "1")

    @task(remote="host-that-does-not-resolve.invalid")
    def double(x: int) -> int:
        return 2 * x

    assert double(21) == 42


def test_a_method_task_gets_its_instance() -> None:
    config = Configuration().add_chain("here", [])

    class Counter:
        def __init__(self) -> None:
            self.start = 10

        @task(chain="here", config=config)
        def plus(self, n: int) -> int:
            return self.start + n

    assert Counter().plus(5) == 15


# -- where the code comes from ------------------------------------------------------------------------


def test_module_function_travels_by_reference(make_module: ModuleFactory) -> None:
    module = make_module("rx_ref_tasks", """
        def square(x):
            return x * x
    """)
    t = Task.from_function(module.square)
    assert t.kind == "function" and t.name == "rx_ref_tasks:square" and t.module == "rx_ref_tasks"
    data = PickleSerializer().dumps(t)
    assert b"rx_ref_tasks" in data and b"square" in data
    assert b"x * x" not in data and module.square.__code__.co_code not in data  # no code inside
    restored = pickle.loads(data)
    assert restored.function is module.square
    assert restored.task_id == t.task_id
    assert restored.execute(Execution.create(restored, (7,))) == 49


def test_decorated_module_function_travels_by_reference(make_module: ModuleFactory) -> None:
    module = make_module("rx_ref_decorated", """
        from remote_exec import task

        @task
        def cube(x):
            return x ** 3
    """)
    t = module.cube.task
    assert t.name == "rx_ref_decorated:cube"
    restored = pickle.loads(PickleSerializer().dumps(t))
    assert restored.function is module.cube.function
    assert restored.execute(Execution.create(restored, (3,))) == 27


def test_closures_and_lambdas_travel_by_value() -> None:
    offset = 10

    def add_offset(x: int) -> int:
        return x + offset

    for function, expected in ((add_offset, 15), (lambda x: x * offset, 50)):
        t = Task.from_function(function)
        assert "<locals>" in t.name or "<lambda>" in t.name
        restored = pickle.loads(PickleSerializer().dumps(t))
        assert restored.function is not function
        assert restored.execute(Execution.create(restored, (5,))) == expected


def test_main_script_function_runs_in_another_process_without_the_script(tmp_path: Path,
                                                                         python: Python) -> None:
    """A function of a ``__main__`` script is shipped by value: a process without the script runs it."""
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent("""
        import sys
        from remote_exec.serialization import PickleSerializer
        from remote_exec.task import Task

        FACTOR = 3

        def helper(x):
            return x + 1

        def scaled(x):
            return helper(x) * FACTOR

        t = Task.from_function(scaled)
        open(sys.argv[1], "wb").write(PickleSerializer().dumps(t))
        print(t.kind, t.name)
    """))
    produced = python([str(script), str(tmp_path / "task.pkl")], cwd=tmp_path, env=_env())
    assert produced.returncode == 0, produced.stderr.decode()
    assert produced.stdout.decode().split() == ["function", "__main__:scaled"]
    script.unlink()
    loader = ("import pickle,sys; from remote_exec.task import Execution;"
              "t = pickle.load(open(sys.argv[1], 'rb')); print(t.execute(Execution.create(t, (4,))))")
    ran = python(["-c", loader, str(tmp_path / "task.pkl")], cwd=tmp_path, env=_env())
    assert ran.returncode == 0, ran.stderr.decode()
    assert ran.stdout.decode().strip() == "15"


# -- task ids -----------------------------------------------------------------------------------------

_ID_OF = ("import sys; sys.path.insert(0, '.'); import idmod; from remote_exec.task import Task;"
          "print(Task.from_function(idmod.{name}).task_id)")


def _task_id_in_new_process(folder: Path, name: str, python: Python, seed: str = "0") -> str:
    result = python(["-c", _ID_OF.format(name=name)], cwd=folder, env=_env(PYTHONHASHSEED=seed))
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode().strip()


def test_task_id_is_stable_across_processes_and_changes_with_the_body(tmp_path: Path, python: Python) -> None:
    module = tmp_path / "idmod.py"
    body = """
        def helper(x):
            return x + 1

        def work(x, scale=2):
            names = {"alpha", "beta", "gamma", "delta"}
            return helper(x) * scale if str(x) not in names else 0
    """
    module.write_text(textwrap.dedent(body))
    first = _task_id_in_new_process(tmp_path, "work", python, seed="1")
    second = _task_id_in_new_process(tmp_path, "work", python, seed="2")
    assert first == second
    assert len(first) == 64

    module.write_text(textwrap.dedent(body.replace("* scale", "* scale + 1")))
    assert _task_id_in_new_process(tmp_path, "work", python) != first

    # A changed helper of the same module is a changed task too.
    module.write_text(textwrap.dedent(body.replace("x + 1", "x + 2")))
    assert _task_id_in_new_process(tmp_path, "work", python) != first

    # So is a changed default argument.
    module.write_text(textwrap.dedent(body.replace("scale=2", "scale=3")))
    assert _task_id_in_new_process(tmp_path, "work", python) != first


def test_closure_task_id_is_stable_across_processes(tmp_path: Path, python: Python) -> None:
    """A closure over a set must not get a new id in every process (hash randomization)."""
    (tmp_path / "idmod.py").write_text(textwrap.dedent("""
        def make():
            allowed = {"alpha", "beta", "gamma", "delta", "epsilon"}
            def check(x):
                return x in allowed
            return check

        check = make()
    """))
    ids = {_task_id_in_new_process(tmp_path, "check", python, seed=seed) for seed in ("1", "2", "3")}
    assert len(ids) == 1


def test_closure_task_id_depends_on_the_captured_values() -> None:
    def make(offset: int) -> Callable[[int], int]:
        return lambda x: x + offset

    assert Task.from_function(make(1)).task_id == Task.from_function(make(1)).task_id
    assert Task.from_function(make(1)).task_id != Task.from_function(make(2)).task_id
    assert Task.from_function(lambda x: x + 1).task_id != Task.from_function(lambda x: x - 1).task_id


def test_script_and_module_task_ids(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text("print('v1')\n")
    first = Task.from_script(script)
    assert first.kind == "script" and first.name == "train.py" and first.source == "print('v1')\n"
    assert Task.from_script(script).task_id == first.task_id
    script.write_text("print('v2')\n")
    assert Task.from_script(script).task_id != first.task_id

    module_file = tmp_path / "mod.py"
    module_file.write_text("x = 1\n")
    module_task = Task.from_module("mod", module_file)
    assert module_task.kind == "module" and module_task.name == "-m mod"
    module_file.write_text("x = 2\n")
    assert Task.from_module("mod", module_file).task_id != module_task.task_id


# -- executions ---------------------------------------------------------------------------------------


def test_execution_id_depends_on_arguments_and_task() -> None:
    def f(*args: object, **kwargs: object) -> None:
        return None

    t = Task.from_function(f)
    other = Task.from_function(lambda *a, **k: None)
    base = Execution.create(t, (1, 2), {"k": "v"})
    assert base.args == (1, 2) and base.kwargs == {"k": "v"}
    assert Execution.create(t, (1, 2), {"k": "v"}).execution_id == base.execution_id
    assert Execution.create(t, (1, 3), {"k": "v"}).execution_id != base.execution_id
    assert Execution.create(t, (1, 2), {"k": "w"}).execution_id != base.execution_id
    assert Execution.create(t, (1, 2)).execution_id != base.execution_id
    assert Execution.create(other, (1, 2), {"k": "v"}).execution_id != base.execution_id


def test_script_execution_sees_its_argv_and_exit_code(tmp_path: Path) -> None:
    script = tmp_path / "args.py"
    script.write_text("import sys\nprint(sys.argv[1:])\nsys.exit(int(sys.argv[1]))\n")
    t = Task.from_script(script)
    saved = list(sys.argv)
    with pytest.raises(SystemExit) as exit_info:
        t.execute(Execution.create(t, (4, "b")), workdir=tmp_path)
    assert exit_info.value.code == 4
    assert sys.argv == saved


# -- a script runs as `python script.py` would run it (runpy's run_path, without importing runpy) -------

_VIEW = textwrap.dedent('''
    """The script's docstring."""
    import json
    import sys

    def where():
        return sys.modules["__main__"].where is where

    def typed(x: int) -> str:  # the script's own future flags, not those of the module that runs it
        return str(x)

    view = {name: repr(globals()[name]) for name in ("__name__", "__file__", "__cached__", "__doc__",
                                                      "__loader__", "__package__", "__spec__")}
    view.update(argv=sys.argv, found_as_main=where(), names=sorted(globals()),
                annotations=repr(typed.__annotations__))
    with open(sys.argv[1], "w") as out:
        json.dump(view, out)
''')


def _script_view(run: Callable[[str], object], script: Path, out: Path) -> dict[str, object]:
    saved_argv, saved_main = list(sys.argv), sys.modules["__main__"]
    sys.argv = [str(script), str(out)]
    try:
        run(str(script))
        assert sys.modules["__main__"] is saved_main
        assert sys.argv == [str(script), str(out)]
    finally:
        sys.argv = saved_argv
    import json

    view: dict[str, object] = json.loads(out.read_text())
    return view


def test_a_script_sees_what_runpy_would_give_it(tmp_path: Path) -> None:
    import runpy

    from remote_exec.task import run_script

    script = tmp_path / "view.py"
    script.write_text(_VIEW)
    ours = _script_view(run_script, script, tmp_path / "ours.json")
    theirs = _script_view(lambda path: runpy.run_path(path, run_name="__main__"), script, tmp_path / "runpy.json")
    assert ours.pop("argv") == [str(script), str(tmp_path / "ours.json")]
    assert theirs.pop("argv") == [str(script), str(tmp_path / "runpy.json")]
    assert ours == theirs
    assert ours["found_as_main"] is True and ours["__doc__"] == repr("The script's docstring.")


def test_a_failing_script_leaves_main_and_argv_as_they_were(tmp_path: Path) -> None:
    from remote_exec.task import run_script

    script = tmp_path / "fails.py"
    script.write_text("import sys\nassert sys.argv[0].endswith('fails.py')\nraise KeyError('boom')\n")
    saved_argv, saved_main = list(sys.argv), sys.modules["__main__"]
    sys.argv = ["placeholder"]
    try:
        with pytest.raises(KeyError, match="boom") as raised:
            run_script(str(script))
        assert raised.traceback[-1].path == script  # the script's own frame is the last one
        assert sys.argv == ["placeholder"] and sys.modules["__main__"] is saved_main
    finally:
        sys.argv = saved_argv


@pytest.mark.parametrize("form", ["zip", "pyc"])
def test_a_zip_archive_or_a_compiled_file_runs_as_a_script(tmp_path: Path, form: str) -> None:
    """A zip archive (with its ``__main__.py``) goes to runpy, a ``.pyc`` runs its code: as ``python FILE``."""
    import py_compile
    import zipfile

    from remote_exec.task import run_script

    out = tmp_path / "ran.txt"
    body = f"import sys\nwith open({str(out)!r}, 'w') as out:\n    out.write(__name__ + ' ' + repr(sys.argv[1:]))\n"
    if form == "zip":
        path = tmp_path / "app.pyz"
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("__main__.py", body)
    else:
        source = tmp_path / "app_source.py"
        source.write_text(body)
        path = tmp_path / "app.pyc"
        py_compile.compile(str(source), cfile=str(path), doraise=True)
    saved_argv, saved_path = list(sys.argv), list(sys.path)
    sys.argv = [str(path), "x"]
    try:
        run_script(str(path))
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    assert out.read_text() == "__main__ ['x']"


def test_running_a_script_imports_neither_runpy_nor_pkgutil(tmp_path: Path) -> None:
    script = tmp_path / "hi.py"
    script.write_text("print('hi')\n")
    probe = textwrap.dedent(f"""
        import sys
        from remote_exec.task import Execution, Task
        task = Task("script", "hi.py", "id", source="print('hi')\\n", filename={str(script)!r})
        task.execute(Execution("id"), script={str(script)!r})
        print(sorted(set(sys.modules) & {{"runpy", "pkgutil", "importlib.util", "typing", "re"}}))
    """)
    done = subprocess.run([sys.executable, "-S", "-c", probe], capture_output=True, text=True, env=_env(),
                          check=True, timeout=60)
    assert done.stdout.split("\n")[:2] == ["hi", "[]"]
