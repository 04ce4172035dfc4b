"""The two seams of the core, shown with test doubles that live outside rx: a backend added by its own module
plus ``backends.registry.register`` alone, and a launcher added by its own module plus
``launchers.register_launcher`` alone, carry a real ``@task`` call end to end (a runner in a subprocess),
selected by a remote's ``backend`` and ``scheduler`` keys; nothing else in rx is touched."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from backend_double import TARGET as BACKEND_TARGET
from backend_double import DoubleBackend
from launcher_double import TARGET as LAUNCHER_TARGET
from launcher_double import WrappingLauncher

from remote_exec import task
from remote_exec.backends import register, unregister
from remote_exec.config import Configuration, Remote
from remote_exec.coordinator import Coordinator
from remote_exec.errors import ConfigError
from remote_exec.launchers import register_launcher, unregister_launcher


@pytest.fixture
def seams(isolated: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Coordinator]:
    """Both doubles registered; a coordinator of the test's own as the process's."""
    register("double", BACKEND_TARGET)
    register_launcher("wrapped", LAUNCHER_TARGET)
    WrappingLauncher.started.clear()
    coordinator = Coordinator()
    monkeypatch.setattr(Coordinator, "_current", coordinator)
    yield coordinator
    coordinator.close()
    unregister_launcher("wrapped")
    unregister("double")


def launched_by() -> tuple[str | None, int]:
    return os.environ.get("RX_LAUNCHED_BY"), os.getpid()


def test_a_registered_backend_and_launcher_carry_a_task_call(seams: Coordinator, tmp_path: Path) -> None:
    config = Configuration().add_remote(Remote(name="box", host="box", backend="double", scheduler="wrapped",
                                               python=sys.executable, workdir=str(tmp_path / "remote")))
    remote_call = task(remote="box", config=config)(launched_by)

    launcher, pid = remote_call()

    assert launcher == "wrapped" and pid != os.getpid()  # ran in a runner the launcher started
    assert len(WrappingLauncher.started) == 1
    assert WrappingLauncher.started[0][:2] == ["env", "RX_LAUNCHED_BY=wrapped"]
    backends = [backend for backend in seams._backends.backends() if isinstance(backend, DoubleBackend)]
    assert len(backends) == 1 and backends[0].commands >= 1


def test_the_keys_are_checked_against_the_registries(seams: Coordinator) -> None:
    assert Remote.from_table("box", {"backend": "double", "scheduler": "wrapped"}).scheduler == "wrapped"
    with pytest.raises(ConfigError, match="unknown scheduler 'slurmish'") as caught:
        Remote.from_table("box", {"scheduler": "slurmish"})
    assert caught.value.hint is not None and "wrapped" in caught.value.hint
    with pytest.raises(ConfigError, match="unknown backend 'telnet'"):
        Remote.from_table("box", {"backend": "telnet"})


def test_the_first_task_call_of_a_process_adopts_the_connection_it_started_first(tmp_path: Path) -> None:
    """The first @task call to a host starts connecting before rx's machinery is imported
    (remote_exec.early); the coordinator then uses that very backend, not a second one."""
    probe = (
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from backend_double import TARGET, DoubleBackend\n"
        "from remote_exec.backends import register\n"
        "register('double', TARGET)\n"
        "from remote_exec import task\n"
        "from remote_exec.config import Configuration, Remote\n"
        "config = Configuration().add_remote(Remote(name='box', host='box', backend='double',\n"
        f"    python=sys.executable, workdir={str(tmp_path / 'remote')!r}))\n"
        "def five():\n"
        "    return 5\n"
        "call = task(remote='box', config=config)(five)\n"
        "assert 'remote_exec.coordinator' not in sys.modules\n"
        "assert call() == 5\n"
        "from remote_exec.coordinator import Coordinator\n"
        "made = [b for b in Coordinator.current()._backends.backends() if isinstance(b, DoubleBackend)]\n"
        "print(len(made), made[0]._ahead is not None)\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          check=False, env={**os.environ, "RX_WORKSPACE": str(tmp_path / "ws"),
                                            "RX_CACHE_DIR": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "True"]
