"""The runner's code bundle: shipped in the archive for the coordinator's interpreter, written after a call
served without it for any other, read by the bootstrap, never in the way (see remote_exec.runner.bundle)."""

from __future__ import annotations

import json
import marshal
import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from remote_exec.packing import DistributionArchive
from remote_exec.protocol import wire
from remote_exec.protocol.bootstrap import BOOTSTRAP, find_handshake
from remote_exec.runner.bundle import PREFIX, bundle_name
from remote_exec.session import Session
from remote_exec.task import Execution, Task
from tests.unit.conftest import install_archive

#: conftest's call_frames (set by the autouse fixture below).
_CALL: list[Any] = []


@pytest.fixture(autouse=True)
def _call_frames(frames: Any) -> None:
    _CALL[:] = [frames.call]


def _env(home: Path) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", ""), "HOME": str(home)}


# The tasks, as a user's script defines them (``__main__``: they travel by value, nothing to import there).
_TASKS: dict[str, Any] = {"__name__": "__main__"}
exec(
    "import sys\n"
    "def report():\n"
    "    def loader(name):\n"
    "        found = sys.modules[name].__spec__.loader\n"
    "        return getattr(found, '__name__', type(found).__name__)\n"
    "    return {'runner': loader('remote_exec.runner'), 'child': loader('remote_exec.runner.child'),\n"
    "            'session': loader('remote_exec.session'), 'file': sys.modules['remote_exec.session'].__file__,\n"
    "            'package': list(sys.modules['remote_exec.runner'].__path__),\n"
    "            'code_file': sys.modules['remote_exec.session'].wire_pickles.__code__.co_filename,\n"
    "            'elsewhere': sorted(name for name in sys.modules if name.startswith('remote_exec')\n"
    "                                and loader(name) != 'RxBundle')}\n"
    "def fails():\n"
    "    raise ValueError('from the task')\n", _TASKS)
_report, _fails = _TASKS["report"], _TASKS["fails"]


def _serve(archive: DistributionArchive, workdir: Path, function: Any) -> tuple[dict[str, Any], bytes]:
    """One call through the bootstrap (the archive installed): the result header and its value frame."""
    task = Task.from_function(function)
    session = Session(task=task, execution=Execution.create(task, ()), run_id="bundle")
    process = subprocess.Popen([sys.executable, "-S", "-c", BOOTSTRAP, "tok", archive.sha256, str(workdir), "serve"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=_env(workdir.parent))
    assert process.stdin is not None and process.stdout is not None and process.stderr is not None
    timer = threading.Timer(60, process.kill)
    timer.start()
    try:
        process.stdin.write(_CALL[0](session.to_wire(), b"k" * 32))
        process.stdin.flush()
        data, frames = b"", []
        reader: wire.FrameReader | None = None
        while not frames or frames[-1][0] != b"Z":
            chunk = os.read(process.stdout.fileno(), 1 << 16)
            assert chunk, process.stderr.read().decode()
            if reader is None:
                data += chunk
                found = find_handshake(data, "tok")
                if found is None:
                    continue
                assert found.word == "HAVE"
                reader, chunk = wire.FrameReader(), found.rest
            frames += reader.feed(chunk)
        process.stdin.close()
        process.wait(30)
    finally:
        timer.cancel()
    stderr = process.stderr.read()
    process.stdout.close()
    process.stderr.close()
    assert process.returncode == 0, stderr.decode()
    header = json.loads(b"".join(payload for kind, payload in frames if kind == b"R"))
    return header, b"".join(payload for kind, payload in frames if kind == b"V")


def test_a_hosts_first_call_imports_the_runner_from_the_bundle_the_archive_ships(archive: DistributionArchive,
                                                                                  tmp_path: Path) -> None:
    """An interpreter of the coordinator's version: the archive's own bundle serves the very first call."""
    workdir = tmp_path / "cache"
    installed = install_archive(archive, workdir)
    name = bundle_name()
    assert name is not None and name.startswith(PREFIX)
    shipped = (installed / name).read_bytes()
    assert name.encode() not in (installed / ".rx-sizes").read_bytes()  # it checks its own size
    assert not list(installed.rglob("*.pyc"))  # the bundle instead of a .pyc per module
    header, value = _serve(archive, workdir, _report)
    assert header["status"] == "finished", header
    first = pickle.loads(value)
    assert first["runner"] == first["child"] == first["session"] == "RxBundle"
    assert first["elsewhere"] == []  # every rx module the task process holds came from the bundle
    # the modules look as they would from the archive's files, and their code names that file
    assert first["file"] == first["code_file"] == str(installed / "remote_exec" / "session.py")
    assert first["package"] == [str(installed / "remote_exec" / "runner")]
    assert (installed / name).read_bytes() == shipped  # taken as it is, not written again


def test_another_interpreter_gets_a_bundle_its_first_call_writes(archive: DistributionArchive,
                                                                 tmp_path: Path) -> None:
    """The shipped bundle is the coordinator's interpreter's; on a host of another (its name differs, here
    removed) the first call imports the usual way and writes the bundle the next call imports from."""
    workdir = tmp_path / "cache"
    installed = install_archive(archive, workdir)
    name = bundle_name()
    assert name is not None
    (installed / name).unlink()
    header, value = _serve(archive, workdir, _report)
    assert header["status"] == "finished", header
    first = pickle.loads(value)
    assert first["runner"] == first["session"] == "SourceFileLoader"  # no bundle: the usual imports
    assert (installed / name).is_file()  # written once that call was served

    header, value = _serve(archive, workdir, _report)
    assert header["status"] == "finished", header
    second = pickle.loads(value)
    assert second["runner"] == second["child"] == second["session"] == "RxBundle"
    assert second["elsewhere"] == []
    assert second["file"] == first["file"] == str(installed / "remote_exec" / "session.py")
    assert second["package"] == first["package"] == [str(installed / "remote_exec" / "runner")]
    # its code names the file it came from (the .pyc it was taken from may name another place)
    assert second["code_file"] == first["code_file"] == second["file"]


def test_a_task_that_raises_still_gets_its_traceback_through_the_bundle(archive: DistributionArchive,
                                                                        tmp_path: Path) -> None:
    workdir = tmp_path / "cache"
    installed = install_archive(archive, workdir)
    name = bundle_name()
    assert name is not None and (installed / name).is_file()
    header, _ = _serve(archive, workdir, _fails)
    assert header["status"] == "raised"
    assert "ValueError: from the task" in str(header.get("traceback") or header)


@pytest.mark.parametrize("damage", [b"", b"not a marshal", b"\xe3" * 40])
def test_a_damaged_bundle_is_passed_over_and_written_again(archive: DistributionArchive, tmp_path: Path,
                                                           damage: bytes) -> None:
    workdir = tmp_path / "cache"
    installed = install_archive(archive, workdir)
    name = bundle_name()
    assert name is not None
    (installed / name).write_bytes(damage)
    header, value = _serve(archive, workdir, _report)
    assert header["status"] == "finished", header
    assert pickle.loads(value)["session"] == "SourceFileLoader"
    assert (installed / name).read_bytes() != damage  # the runner wrote it again
    _, value = _serve(archive, workdir, _report)
    assert pickle.loads(value)["session"] == "RxBundle"


def test_only_a_pyc_the_import_system_would_take_goes_in(tmp_path: Path) -> None:
    """Timestamp ``.pyc`` files are checked against their source's mtime and size, checked hash-based ones
    against its content; an unchecked one is taken as Python takes it; another interpreter's magic never."""
    import py_compile
    from py_compile import PycInvalidationMode as Mode

    from remote_exec.runner.bundle import collect

    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    modes = {"__init__": Mode.UNCHECKED_HASH, "stamped": Mode.TIMESTAMP, "hashed": Mode.CHECKED_HASH,
             "sub/__init__": Mode.TIMESTAMP, "other": Mode.TIMESTAMP}
    for name, mode in modes.items():
        source = package / f"{name}.py"
        source.write_text(f"NAME = {name!r}\n", encoding="utf-8")
        py_compile.compile(str(source), cfile=None, invalidation_mode=mode, doraise=True)
    wanted = ("pkg/", "pkg/sub/")
    found = collect(str(package), wanted)
    assert set(found) == {"pkg", "pkg.stamped", "pkg.hashed", "pkg.sub", "pkg.other"}
    assert found["pkg"][:2] == (True, "pkg/__init__.py") and found["pkg.stamped"][:2] == (False, "pkg/stamped.py")
    namespace: dict[str, Any] = {}
    exec(marshal.loads(found["pkg.hashed"][2]), namespace)
    assert namespace["NAME"] == "hashed"

    stamped = package / "stamped.py"
    stat = stamped.stat()
    os.utime(stamped, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5 * 10**9))
    (package / "hashed.py").write_text("NAME = 'HASHED'\n", encoding="utf-8")  # the same size
    (package / "__init__.py").write_text("NAME = 'changed'\n", encoding="utf-8")
    cached = package / "__pycache__" / f"other.{sys.implementation.cache_tag}.pyc"
    cached.write_bytes(b"\0\0\r\n" + cached.read_bytes()[4:])
    assert set(collect(str(package), wanted)) == {"pkg", "pkg.sub"}
    assert set(collect(str(package), ("pkg/sub/",))) == {"pkg.sub"}


def test_no_bundle_is_written_outside_an_installed_archive(tmp_path: Path) -> None:
    """A runner run from a source tree (no ``.rx-sizes`` beside its package) writes nothing there."""
    from remote_exec.runner.bundle import write_bundle

    assert write_bundle() is None
    root = Path(__file__).resolve().parents[2]
    assert not [path for path in root.iterdir() if path.name.startswith(PREFIX)]


def test_a_module_whose_code_does_not_load_comes_from_its_file(archive: DistributionArchive,
                                                              tmp_path: Path) -> None:
    """A bundle of the right size whose code for one module is damaged: that module is loaded from the
    archive's files, the call goes on, and the bundle is removed, to be written again."""
    workdir = tmp_path / "cache"
    installed = install_archive(archive, workdir)
    name = bundle_name()
    assert name is not None
    bundle = installed / name
    data = bytearray(bundle.read_bytes())
    head = int.from_bytes(data[:8], "big")
    index = marshal.loads(bytes(data[16:16 + head]))
    _, _, offset, length = index["remote_exec.session"]
    data[16 + head + offset:16 + head + offset + length] = b"\0" * length
    bundle.write_bytes(bytes(data))
    header, value = _serve(archive, workdir, _report)
    assert header["status"] == "finished", header
    assert pickle.loads(value)["session"] == "RxBundle"  # its spec's, though its code came from the file
    assert not bundle.exists()  # removed: the next call's runner writes it again
    assert pickle.loads(_serve(archive, workdir, _report)[1])["session"] == "SourceFileLoader"
    third = pickle.loads(_serve(archive, workdir, _report)[1])
    assert third["session"] == "RxBundle" and third["elsewhere"] == []
