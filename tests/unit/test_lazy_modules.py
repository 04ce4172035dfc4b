"""The modules only a coordinator uses stay packed on a host until one is imported there (remote_exec.lazy)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from remote_exec.lazy import NAME, UNPACKED
from remote_exec.packing import DistributionArchive
from tests.unit.conftest import install_archive

#: What a task module on the host may do: the public API's lazy names, a coordinator-only package, a
#: coordinator-only module of a package the runner uses; each reports where it came from.
_USES = """
import sys
sys.path.insert(0, sys.argv[1])
from remote_exec import Configuration, Executor
import remote_exec.backends.openssh as openssh
import remote_exec.protocol.call as call
print(Configuration.__module__, Executor.__module__)
for module in (sys.modules["remote_exec.config"], openssh, call):
    print(module.__file__)
"""


def _use(installed: Path, code: str = _USES) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-S", "-c", code, str(installed)], capture_output=True, text=True,
                          timeout=60, env={"PATH": os.environ.get("PATH", "")}, check=False)


def test_an_install_extracts_only_what_the_host_imports(archive: DistributionArchive, tmp_path: Path) -> None:
    installed = install_archive(archive, tmp_path / "cache")
    assert (installed / NAME).is_file()
    assert (installed / "remote_exec" / "runner" / "supervise.py").is_file()
    assert not (installed / "remote_exec" / "config.py").exists()
    assert not (installed / "remote_exec" / "backends").exists()
    assert not (installed / "remote_exec" / "protocol" / "call.py").exists()
    sizes = (installed / ".rx-sizes").read_text()
    assert f" {NAME}\n" in sizes and "config.py" not in sizes


def test_a_coordinator_module_imported_on_the_host_is_unpacked_once(archive: DistributionArchive,
                                                                    tmp_path: Path) -> None:
    installed = install_archive(archive, tmp_path / "cache")
    first = _use(installed)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert lines[0] == "remote_exec.config remote_exec.pool.executor"
    assert lines[1:] == [str(installed / "remote_exec" / "config.py"),
                         str(installed / "remote_exec" / "backends" / "openssh.py"),
                         str(installed / "remote_exec" / "protocol" / "call.py")]
    assert not [path.name for path in installed.iterdir() if path.name.startswith(".tmp-")]
    # from now on they are files like the others: the next process finds them without the finder's help
    (installed / NAME).rename(tmp_path / NAME)
    again = _use(installed)
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout


def test_a_module_that_is_in_neither_place_is_still_not_found(archive: DistributionArchive, tmp_path: Path) -> None:
    installed = install_archive(archive, tmp_path / "cache")
    missing = "import sys\nsys.path.insert(0, sys.argv[1])\nimport remote_exec.cli\n"
    assert "ModuleNotFoundError: No module named 'remote_exec.cli'" in _use(installed, missing).stderr
    assert (installed / UNPACKED).exists() and (installed / "remote_exec" / "config.py").is_file()
    # once unpacked, the file is not opened again for a module it does not hold (a damaged one would say so)
    (installed / NAME).write_bytes(b"not a zip")
    assert "ModuleNotFoundError: No module named 'remote_exec.cli'" in _use(installed, missing).stderr


def test_processes_that_unpack_at_once_all_import(archive: DistributionArchive, tmp_path: Path) -> None:
    installed = install_archive(archive, tmp_path / "cache")
    processes = [subprocess.Popen([sys.executable, "-S", "-c", _USES, str(installed)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(6)]
    outputs = [process.communicate(timeout=60) for process in processes]
    assert [process.returncode for process in processes] == [0] * 6, [err for _, err in outputs]
    assert len({out for out, _ in outputs}) == 1
    assert not [path.name for path in installed.iterdir() if path.name.startswith(".tmp-")]


def test_a_lazy_file_that_does_not_unpack_is_an_import_error_naming_it(archive: DistributionArchive,
                                                                       tmp_path: Path) -> None:
    installed = install_archive(archive, tmp_path / "cache")
    (installed / NAME).write_bytes(b"not a zip")
    done = _use(installed)
    assert done.returncode != 0
    assert f"ImportError: rx: cannot unpack {NAME} in {installed} for remote_exec.config: " in done.stderr
    assert not (installed / "remote_exec" / "config.py").exists()
    assert not [path.name for path in installed.iterdir() if path.name.startswith(".tmp-")]
