"""The distribution archive: deterministic, built once, carries the runner and the user's local code."""

from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from remote_exec import Configuration
from remote_exec.errors import PackError
from remote_exec.packing import REMOTE_MODULES, DistributionArchive, Packer, discover_modules
from remote_exec.session import Session
from remote_exec.task import Execution, Task

Python = Callable[..., subprocess.CompletedProcess[bytes]]
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A script with a helper module and a helper package next to it."""
    folder = tmp_path / "project"
    (folder / "helpers_pkg").mkdir(parents=True)
    (folder / "helpers_pkg" / "__init__.py").write_text("from .inner import twice\n")
    (folder / "helpers_pkg" / "inner.py").write_text("def twice(x):\n    return 2 * x\n")
    (folder / "helper_mod.py").write_text("import json\nimport helpers_pkg\n\nSCALE = 3\n")
    (folder / "unused_mod.py").write_text("X = 1\n")
    (folder / "main.py").write_text(textwrap.dedent("""
        import os
        import sys
        import platformdirs  # site-packages: not shipped unless listed
        import remote_exec  # never shipped as user code
        from helper_mod import SCALE
        print(SCALE)
    """))
    return folder


def _names(archive: DistributionArchive) -> set[str]:
    with zipfile.ZipFile(archive.path) as zf:
        return set(zf.namelist())


def _build(project: Path, cache: Path, **kwargs: Any) -> DistributionArchive:
    return DistributionArchive.build(entry_files=[project / "main.py"], roots=[project], cache_dir=cache, **kwargs)


def test_archive_carries_runner_remote_modules_cloudpickle_and_local_imports(project: Path,
                                                                            tmp_path: Path) -> None:
    archive = _build(project, tmp_path / "cache")
    names = _names(archive)
    assert "__main__.py" in names
    assert {f"remote_exec/{name}.py" for name in REMOTE_MODULES} <= names
    assert "remote_exec/runner/__init__.py" in names and "remote_exec/protocol/wire.py" in names
    assert "cloudpickle/__init__.py" in names and "cloudpickle/cloudpickle.py" in names
    assert {"helper_mod.py", "helpers_pkg/__init__.py", "helpers_pkg/inner.py"} <= names
    assert archive.modules == ("helper_mod", "helpers_pkg")
    assert "unused_mod.py" not in names
    assert not any(name.startswith(("platformdirs/", "json", "os.py")) for name in names)
    # the public API travels for task modules that import it, in one stored file a host unpacks on demand
    assert "remote_exec/config.py" not in names and ".rx-lazy.zip" in names
    with zipfile.ZipFile(archive.path) as zf:
        assert zf.getinfo(".rx-lazy.zip").compress_type == zipfile.ZIP_STORED
        with zipfile.ZipFile(zf.open(".rx-lazy.zip")) as lazy:
            held = set(lazy.namelist())
    assert {"remote_exec/config.py", "remote_exec/backends/openssh.py", "remote_exec/protocol/call.py"} <= held
    assert not held & names and all(name.startswith("remote_exec/") for name in held)
    assert not any(name.startswith("remote_exec/cli/") for name in names | held), "the CLI stays home"
    assert archive.sha256 == hashlib.sha256(archive.path.read_bytes()).hexdigest()
    assert archive.size == archive.path.stat().st_size


def test_discover_modules_follows_imports_of_imports(project: Path) -> None:
    found = discover_modules([project / "main.py"], [project])
    assert [module.name for module in found] == ["helper_mod", "helpers_pkg"]


def test_site_packages_modules_are_left_out_unless_listed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          project: Path) -> None:
    site = tmp_path / "venv" / "lib" / "python3" / "site-packages"
    (site / "vendored_rx_dep").mkdir(parents=True)
    (site / "vendored_rx_dep" / "__init__.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(site))
    (project / "main.py").write_text("import vendored_rx_dep\nimport helper_mod\n")
    roots = [project, site]
    assert [m.name for m in discover_modules([project / "main.py"], roots)] == ["helper_mod", "helpers_pkg"]

    plain = DistributionArchive.build(entry_files=[project / "main.py"], roots=roots, cache_dir=tmp_path / "c")
    assert "vendored_rx_dep/__init__.py" not in _names(plain)
    listed = DistributionArchive.build(entry_files=[project / "main.py"], roots=roots, cache_dir=tmp_path / "c",
                                       extra_modules=["vendored_rx_dep", "platformdirs"])
    names = _names(listed)
    assert "vendored_rx_dep/__init__.py" in names and "platformdirs/__init__.py" in names
    assert listed.sha256 != plain.sha256


def test_add_modules_for_distribution_ships_a_third_party_package(isolated: Any, project: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(project)
    t = Task.from_script(project / "main.py")
    plain = Packer().archive_for(t, Configuration().distribution_modules)
    assert "platformdirs/__init__.py" not in _names(plain)
    shipped = Packer().archive_for(t, Configuration().add_modules_for_distribution("platformdirs").distribution_modules)
    names = _names(shipped)
    assert "platformdirs/__init__.py" in names and "platformdirs/unix.py" in names
    assert "helper_mod.py" in names


@pytest.mark.parametrize(("name", "message"), [
    ("sys", "not a module file"),
    ("no_such_module_for_rx_tests", "cannot ship module 'no_such_module_for_rx_tests'"),
])
def test_modules_that_cannot_be_shipped_are_pack_errors(tmp_path: Path, name: str, message: str) -> None:
    with pytest.raises(PackError, match=message):
        DistributionArchive.build(extra_modules=[name], cache_dir=tmp_path / "cache")


def test_same_content_gives_the_same_archive(project: Path, tmp_path: Path, python: Python) -> None:
    first = _build(project, tmp_path / "one")
    for path in project.rglob("*.py"):  # new timestamps, same bytes
        os.utime(path, (1_000_000_000, 1_000_000_000))
    second = _build(project, tmp_path / "one")
    assert second.sha256 == first.sha256
    code = ("import sys; from pathlib import Path; from remote_exec.packing import DistributionArchive as D;"
            "p = Path(sys.argv[1]); print(D.build(entry_files=[p / 'main.py'], roots=[p],"
            " cache_dir=Path(sys.argv[2])).sha256)")
    other = python(["-c", code, str(project), str(tmp_path / "other-process")], cwd=tmp_path,
                   env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert other.returncode == 0, other.stderr.decode()
    assert other.stdout.decode().strip() == first.sha256

    (project / "helpers_pkg" / "inner.py").write_text("def twice(x):\n    return x + x\n")
    assert _build(project, tmp_path / "one").sha256 != first.sha256


def test_archive_is_built_once_per_content(project: Path, tmp_path: Path, python: Python) -> None:
    cache = tmp_path / "cache"
    first = _build(project, cache)
    before = first.path.stat()
    again = _build(project, cache)
    assert again.path == first.path
    code = ("import sys; from pathlib import Path; from remote_exec.packing import DistributionArchive as D;"
            "p = Path(sys.argv[1]); print(D.build(entry_files=[p / 'main.py'], roots=[p],"
            " cache_dir=Path(sys.argv[2])).path)")
    other = python(["-c", code, str(project), str(cache)], cwd=tmp_path,
                   env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert other.returncode == 0, other.stderr.decode()
    assert other.stdout.decode().strip() == str(first.path)
    after = first.path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not rewritten
    assert sorted(p.name for p in cache.iterdir()) == [".memo.json", first.path.name]  # no temporary left


def test_a_new_process_takes_an_earlier_build_from_the_memo(project: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A process's first build of unchanged files reads none of rx's ~100 sources (the memo on disk says
    which archive they made); a garbled memo is ignored and rewritten."""
    cache = tmp_path / "cache"
    first = _build(project, cache)
    package = Path(remote_exec_file()).parent
    read: list[Path] = []
    real_read_bytes = Path.read_bytes

    def recording(path: Path) -> bytes:
        read.append(path)
        return real_read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", recording)
    again = _build(project, cache)  # a new Packer: nothing in memory but the process-wide file list
    assert (again.path, again.sha256, again.size, again.modules) == (first.path, first.sha256, first.size,
                                                                     first.modules)
    assert not [path for path in read if package in path.parents]
    (cache / ".memo.json").write_text("{not json")
    read.clear()
    assert _build(project, cache).sha256 == first.sha256
    assert [path for path in read if package in path.parents]  # built (from the files) again
    assert _build(project, cache).sha256 == first.sha256
    assert first.sha256 in (cache / ".memo.json").read_text()


def test_a_cached_archive_changed_on_disk_is_refused_and_built_again(project: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = _build(project, cache)
    assert hashlib.sha256(first.read()).hexdigest() == first.sha256
    data = first.path.read_bytes()
    first.path.write_bytes(data[:-10] + b"0123456789")  # same size: the memo still names it
    taken = _build(project, cache)
    with pytest.raises(PackError, match="changed on disk"):
        taken.read()
    assert not first.path.exists()
    rebuilt = _build(project, cache)
    assert rebuilt.sha256 == first.sha256
    assert rebuilt.read() == data


def remote_exec_file() -> str:
    import remote_exec

    return str(Path(remote_exec.__file__).resolve())


def test_each_cache_dir_gets_its_own_copy(project: Path, tmp_path: Path) -> None:
    first = _build(project, tmp_path / "one")
    second = _build(project, tmp_path / "two")
    assert second.sha256 == first.sha256
    assert second.path.parent == tmp_path / "two"
    assert second.path.is_file()


def test_the_archive_is_the_runner(tmp_path: Path, frames: Any) -> None:
    """``python archive.pyz`` serves a call with nothing but the archive: no site-packages, no repo."""
    archive = DistributionArchive.build(cache_dir=tmp_path / "cache")
    factor = 6

    def closure(x: int) -> list[int]:
        return [x * factor, os.getpid()]

    t = Task.from_function(closure)
    session = Session(task=t, execution=Execution.create(t, (7,)), run_id="pyz")
    served = frames.serve([sys.executable, "-I", "-S", str(archive.path), str(tmp_path / "remote"), "serve"],
                          session.dumps(), cwd=tmp_path, env={"PATH": os.environ.get("PATH", "")})
    assert served.returncode == 0, served.stderr.decode()
    kinds = served.kinds()
    assert kinds[0] == b"P" and kinds[-1] == b"Z" and b"R" in kinds
    assert served.header()["status"] == "finished"
    number, pid = pickle.loads(served.payload(b"V"))
    assert number == 42 and pid != os.getpid()


def test_archive_entries_have_fixed_timestamps(project: Path, tmp_path: Path) -> None:
    archive = _build(project, tmp_path / "cache")
    with zipfile.ZipFile(archive.path) as zf:
        infos = zf.infolist()
    assert {info.date_time for info in infos} == {(1980, 1, 1, 0, 0, 0)}
    assert [info.filename for info in infos] == sorted(info.filename for info in infos)
