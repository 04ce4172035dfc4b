"""CachingAdvice: identical calls are answered from the cache, changed code and failures are not."""

from __future__ import annotations

import os
import threading
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from remote_exec import CachingAdvice, Configuration, SubprocessAdvice, task
from remote_exec.advices import cache as cache_module

ModuleFactory = Callable[[str, str], types.ModuleType]

# Every run appends a line to the file it is given: the number of lines is the number of real runs.
COUNTED = """
    def compute(x, log):
        with open(log, "a") as stream:
            stream.write("ran\\n")
        return {body}


    def flaky(x, log, flag):
        import os
        with open(log, "a") as stream:
            stream.write("ran\\n")
        if os.path.exists(flag):
            raise RuntimeError("not today")
        return x + 1
"""


def _runs(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def _entries(directory: Path) -> list[Path]:
    return sorted(path for path in directory.rglob("*") if path.is_file())


@pytest.fixture
def results_dir(isolated: Any) -> Path:
    return Path(isolated.root) / "results"


def test_same_code_and_arguments_return_the_cached_value(isolated: Any, make_module: ModuleFactory,
                                                         results_dir: Path) -> None:
    """Through a real subprocess: the second call does not run the task at all."""
    module = make_module("rx_cache_mod", COUNTED.format(body="x * 2"))
    config = Configuration().add_chain("c", [CachingAdvice(results_dir), SubprocessAdvice()])
    compute = task(chain="c", config=config)(module.compute)
    log = Path(isolated.root) / "runs.log"
    assert compute(21, str(log)) == 42
    assert _runs(log) == 1
    assert compute(21, str(log)) == 42
    assert _runs(log) == 1  # answered from the cache
    assert compute(22, str(log)) == 44
    assert _runs(log) == 2  # other arguments: another entry
    assert len(_entries(results_dir)) == 2


def test_editing_the_function_body_recomputes(isolated: Any, make_module: ModuleFactory,
                                              results_dir: Path) -> None:
    config = Configuration().add_chain("c", [CachingAdvice(results_dir)])
    log = Path(isolated.root) / "runs.log"
    module = make_module("rx_cache_edit", COUNTED.format(body="x * 2"))
    assert task(chain="c", config=config)(module.compute)(5, str(log)) == 10
    assert task(chain="c", config=config)(module.compute)(5, str(log)) == 10
    assert _runs(log) == 1

    module = make_module("rx_cache_edit", COUNTED.format(body="x * 2 + 1000"))
    assert task(chain="c", config=config)(module.compute)(5, str(log)) == 1010  # never the stale 10
    assert _runs(log) == 2
    assert task(chain="c", config=config)(module.compute)(5, str(log)) == 1010
    assert _runs(log) == 2


def test_a_failure_is_never_cached(isolated: Any, make_module: ModuleFactory, results_dir: Path) -> None:
    module = make_module("rx_cache_flaky", COUNTED.format(body="x"))
    config = Configuration().add_chain("c", [CachingAdvice(results_dir), SubprocessAdvice()])
    flaky = task(chain="c", config=config)(module.flaky)
    log = Path(isolated.root) / "runs.log"
    flag = Path(isolated.root) / "fail-now"
    flag.touch()
    with pytest.raises(RuntimeError, match="not today"):
        flaky(1, str(log), str(flag))
    assert _entries(results_dir) == []
    with pytest.raises(RuntimeError, match="not today"):
        flaky(1, str(log), str(flag))
    assert _runs(log) == 2  # the failure was not answered from the cache
    flag.unlink()
    assert flaky(1, str(log), str(flag)) == 2
    assert flaky(1, str(log), str(flag)) == 2
    assert _runs(log) == 3


def test_entries_are_written_under_a_temporary_name_first(isolated: Any, make_module: ModuleFactory,
                                                          results_dir: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """While the bytes are written and synced, the entry's final name does not exist yet."""
    module = make_module("rx_cache_atomic", COUNTED.format(body="x * 3"))
    config = Configuration().add_chain("c", [CachingAdvice(results_dir)])
    log = Path(isolated.root) / "runs.log"
    seen_while_syncing: list[list[str]] = []
    real_fsync = os.fsync

    def watching_fsync(fd: int) -> None:
        # Only the caller's own thread: the workspace records @task calls on a background thread.
        if threading.current_thread() is threading.main_thread():
            seen_while_syncing.append(sorted(path.name for path in _entries(results_dir)))
        real_fsync(fd)

    monkeypatch.setattr(f"{cache_module.__name__}.os.fsync", watching_fsync)
    assert task(chain="c", config=config)(module.compute)(2, str(log)) == 6
    assert len(seen_while_syncing) == 1
    names = seen_while_syncing[0]
    assert len(names) == 1 and not names[0].endswith(".pkl")  # only the temporary, never a partial entry
    final = [path.name for path in _entries(results_dir)]
    assert len(final) == 1 and final[0].endswith(".pkl") and not final[0].startswith(".")


def test_a_damaged_entry_is_a_miss_and_is_replaced(isolated: Any, make_module: ModuleFactory,
                                                   results_dir: Path) -> None:
    module = make_module("rx_cache_damaged", COUNTED.format(body="[x] * 2"))
    config = Configuration().add_chain("c", [CachingAdvice(results_dir)])
    compute = task(chain="c", config=config)(module.compute)
    log = Path(isolated.root) / "runs.log"
    assert compute(7, str(log)) == [7, 7]
    (entry,) = _entries(results_dir)
    entry.write_bytes(entry.read_bytes()[:5])  # as a crash half-way through a write would leave it
    assert compute(7, str(log)) == [7, 7]
    assert _runs(log) == 2
    assert compute(7, str(log)) == [7, 7]
    assert _runs(log) == 2  # the rewritten entry is good again


def test_scripts_are_not_cached(isolated: Any, results_dir: Path, tmp_path: Path) -> None:
    from remote_exec.advice import run_chain
    from remote_exec.session import Session
    from remote_exec.task import Execution, Task

    script = tmp_path / "s.py"
    script.write_text("print('hi')\n")
    t = Task.from_script(script)
    for _ in range(2):
        result = run_chain(Session(task=t, execution=Execution.create(t), run_id="r"),
                           [CachingAdvice(results_dir), SubprocessAdvice()])
        assert result.ok and not result.cached
    assert _entries(results_dir) == []
