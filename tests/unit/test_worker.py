"""The persistent worker (``keep_warm``) end to end through dispatch and a real runner in a local subprocess:
calls share one process but not their files, environment or working directory."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from remote_exec.backends.local import LocalBackend


@pytest.fixture
def backend(dispatcher: Any) -> Iterator[LocalBackend]:
    """One backend for the test's calls (a worker is kept per backend), its workers stopped after."""
    yield LocalBackend()
    dispatcher.workers.close()


def warm(dispatcher: Any, backend: LocalBackend, source: str, **options: Any) -> Any:
    return dispatcher.run(source, backend=backend, keep_warm=True, **options)


def test_calls_share_the_worker_but_not_files_environment_or_directory(dispatcher: Any,
                                                                       backend: LocalBackend) -> None:
    first = warm(dispatcher, backend, """
        import os
        os.environ["LEFT_BEHIND"] = "1"
        os.environ.pop("KEPT", None)
        open("result.txt", "w").write("first")
        print(os.getpid(), os.getcwd(), os.environ["RX_RUN_DIR"], os.environ.get("CALL_ONLY"))
        os.chdir("/")
    """, env={"CALL_ONLY": "yes"})
    assert first.result.ok
    pid, cwd, run_dir, call_only = first.text().split()
    assert cwd == run_dir and call_only == "yes"
    assert (first.landed / "result.txt").read_text() == "first"
    assert not Path(cwd).exists()  # its files went home with the result

    os.environ["KEPT"] = "from the worker's start"  # not seen: the worker started before
    second = warm(dispatcher, backend, """
        import os
        print(os.getpid(), os.getcwd(), sorted(os.listdir(".")) == [".rx"], os.environ.get("LEFT_BEHIND"),
              os.environ.get("CALL_ONLY"))
    """)
    os.environ.pop("KEPT")
    assert second.result.ok
    pid2, cwd2, only_the_script, left, call_only2 = second.text().split()
    assert pid2 == pid, "the second call ran in another process"
    assert Path(cwd2).parent == dispatcher.workdir / "runs" and cwd2 != cwd
    assert only_the_script == "True" and left == "None" and call_only2 == "None"


def test_an_empty_run_directory_is_kept_for_the_next_call_and_removed_at_the_end(dispatcher: Any,
                                                                                  backend: LocalBackend) -> None:
    from remote_exec.task import Task

    def where() -> str:
        return os.getcwd()

    calls = [dispatcher.run(Task.from_function(where), backend=backend, keep_warm=True) for _ in range(3)]
    directories = {call.result.value for call in calls}
    assert len(directories) == 1, "a call that wrote nothing left a new run directory each time"
    (directory,) = directories
    assert os.listdir(directory) == []
    dispatcher.workers.close()
    assert not Path(directory).exists()


def test_a_worker_that_timed_out_is_replaced(dispatcher: Any, backend: LocalBackend) -> None:
    slow = warm(dispatcher, backend, "import time\nprint('started', flush=True)\ntime.sleep(30)\n", timeout=1)
    assert slow.result.status == "timeout"
    assert "started" in slow.text()
    assert slow.ended - slow.started < 10
    after = warm(dispatcher, backend, "print('fine')\n")
    assert after.result.ok and after.text().strip() == "fine"


def test_a_worker_whose_coordinator_goes_away_mid_call_ends_with_its_task(dispatcher: Any, backend: LocalBackend,
                                                                           tmp_path: Path) -> None:
    """The watcher thread ends the worker and the task's process group (signal handling is the main
    thread's: the watcher must not need it)."""
    import threading
    import time

    pid_file = tmp_path / "pids"
    done = threading.Event()

    def call() -> None:
        try:
            warm(dispatcher, backend, """
                import os, subprocess
                child = subprocess.Popen(["sleep", "30"])
                open(os.environ["PID_FILE"], "w").write(f"{os.getpid()} {child.pid}")
                child.wait()
            """, env={"PID_FILE": str(pid_file)})
        except Exception:
            pass
        finally:
            done.set()

    threading.Thread(target=call, daemon=True).start()
    deadline = time.monotonic() + 30
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    pids = [int(word) for word in pid_file.read_text().split()]
    assert len(pids) == 2 and not any(dispatcher.gone(pid) for pid in pids)
    (worker,) = dispatcher.workers.channels()
    worker.process.close_stdin()  # the channel goes away, as when the coordinator is killed
    assert done.wait(30)
    while time.monotonic() < deadline and not all(dispatcher.gone(pid) for pid in pids):
        time.sleep(0.1)
    assert all(dispatcher.gone(pid) for pid in pids), pids
