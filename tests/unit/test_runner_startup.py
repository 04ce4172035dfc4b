"""The runner's start-up is on every call's path: it must not import the heavy standard modules.

Each of these costs milliseconds to import (json and pickle pull in re and enum; zipfile pulls in
shutil, pathlib and importlib.util; hashlib and hmac load OpenSSL), which a warm call of a few tens of
milliseconds would pay every time. What the runner needs instead is in remote_exec.protocol.wire (JSON writer,
option frames, HMAC over the built-in sha256), _pickle, _signal and select.poll.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

HEAVY = {"json", "re", "enum", "typing", "dataclasses", "zipfile", "pathlib", "selectors", "shutil",
         "signal", "inspect", "tarfile", "traceback", "pickle", "tempfile", "logging", "cloudpickle",
         # hashlib and hmac load OpenSSL (milliseconds); the runner signs small results without them
         "hashlib", "_hashlib", "hmac", "importlib",
         # even the C pickle module loads functools and collections: built-in data travels as marshal
         "_pickle", "functools", "collections", "copyreg"}


def _loaded_by(statement: str) -> set[str]:
    probe = (
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "before = set(sys.modules)\n"
        f"{statement}\n"
        "print(' '.join(sorted(set(sys.modules) - before)))\n"
    )
    return set(subprocess.run([sys.executable, "-S", "-c", probe], capture_output=True, text=True,
                              check=True, timeout=60).stdout.split())


def test_the_runner_and_what_a_call_loads_import_nothing_heavy() -> None:
    # What `serve` (a process-per-call runner) imports: the package, its per-call rooms, and in the task
    # process the session with its serialization and task modules.
    loaded = _loaded_by("import remote_exec.runner, remote_exec.runner.supervise, remote_exec.runner.policy, "
                        "remote_exec.runner.result, remote_exec.session, remote_exec.serialization, "
                        "remote_exec.task")
    assert "remote_exec.runner" in loaded
    assert loaded & HEAVY == set()


SERVE_AND_LIST = """
import sys
sys.path.insert(0, sys.argv[2])
from remote_exec.runner import main
code = main([sys.argv[1], "serve"])
sys.stderr.write("loaded: " + " ".join(sorted(sys.modules)) + "\\n")
sys.exit(code)
"""


def test_a_call_loads_neither_the_worker_nor_detached_runs(frames: Any, tmp_path: Path) -> None:
    """Each mode imports its own rooms: a process-per-call runner pays nothing for keep_warm or detached runs."""
    import operator

    from remote_exec.session import Session
    from remote_exec.task import Execution, Task

    task = Task.from_function(operator.mul)
    session = Session(task=task, execution=Execution.create(task, (6, 7)), run_id="startup")
    served = frames.serve([sys.executable, "-S", "-c", SERVE_AND_LIST, str(tmp_path / "cache"), str(ROOT)],
                          session.dumps(), cwd=tmp_path)
    assert served.returncode == 0 and served.header()["status"] == "finished", served.stderr.decode()
    loaded = set(served.stderr.decode().rpartition("loaded: ")[2].split())
    assert {"remote_exec.runner.supervise", "remote_exec.runner.policy", "remote_exec.runner.result"} <= loaded
    assert loaded & {"remote_exec.runner.worker", "remote_exec.runner.detached", "threading"} == set()


def test_the_small_hmac_is_hmac_sha256() -> None:
    import hashlib
    import hmac
    import os

    from remote_exec.protocol.wire import SmallHMAC, new_hmac

    for key_size in (0, 1, 32, 64, 65, 200):
        key = os.urandom(key_size)
        parts = [os.urandom(n) for n in (0, 1, 63, 64, 1000)]
        reference = hmac.new(key, b"".join(parts), hashlib.sha256).hexdigest()
        for mac in (SmallHMAC(key), new_hmac(key, bulk=True), new_hmac(key)):
            for part in parts:
                mac.update(memoryview(part))
            assert mac.hexdigest() == reference
            assert mac.hexdigest() == reference  # reading it does not change it


def _stand_in_archive() -> tuple[bytes, str]:
    """A small archive whose runner prints its arguments on the protocol fd (and something on fd 1)."""
    import hashlib
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("remote_exec/__init__.py", "")
        archive.writestr("remote_exec/runner/__init__.py",
                         "import os, sys\n"
                         "def main(argv, fd=1, leave=False):\n"
                         "    print('printed by an import')\n"
                         "    os.write(fd, ('runner %r\\n' % (argv,)).encode())\n"
                         "    return 0\n")
        archive.writestr("pkg/deep/data.txt", "x" * 5000)
        archive.writestr("stored.txt", "as is", compress_type=zipfile.ZIP_STORED)
    data = buffer.getvalue()
    return data, hashlib.sha256(data).hexdigest()


def _boot(tmp_path: Path, digest: str, payload: bytes, token: str = "t0k3n") -> subprocess.CompletedProcess[bytes]:
    from remote_exec.protocol.bootstrap import BOOTSTRAP

    return subprocess.run([sys.executable, "-S", "-c", BOOTSTRAP, token, digest, str(tmp_path / "cache"), "serve"],
                          input=len(payload).to_bytes(8, "big") + payload, capture_output=True, timeout=60,
                          check=False)


def test_the_bootstrap_installs_an_archive_and_answers_with_its_token(tmp_path: Path) -> None:
    """The bootstrap unpacks the archive without zipfile (and without OpenSSL), checks its sha256 first,
    and refuses a damaged upload; its answers carry the call's token; what the runner's imports print goes
    to stderr, never between the frames."""
    from remote_exec.protocol.bootstrap import BOOTSTRAP

    compile(BOOTSTRAP, "bootstrap", "exec")
    data, digest = _stand_in_archive()
    damaged = _boot(tmp_path, digest, data[:-1] + bytes([data[-1] ^ 1]))
    assert damaged.returncode != 0 and b"sha256 mismatch" in damaged.stderr
    assert not (tmp_path / "cache" / "archives" / digest).exists()
    done = _boot(tmp_path, digest, data)
    assert done.returncode == 0, done.stderr.decode()
    runner = f"runner [{str(tmp_path / 'cache')!r}, 'serve']"
    assert done.stdout.decode().splitlines() == ["", "RXBOOT2 t0k3n NEED", "", "RXBOOT2 t0k3n OK", runner]
    assert done.stderr.decode() == "printed by an import\n"
    installed = tmp_path / "cache" / "archives" / digest
    assert (installed / "pkg" / "deep" / "data.txt").read_text() == "x" * 5000
    assert (installed / "stored.txt").read_text() == "as is"
    assert [p.name for p in (tmp_path / "cache" / "archives").iterdir()] == [digest]  # no temporaries left
    again = _boot(tmp_path, digest, b"", token="other")
    assert again.stdout.decode().splitlines() == ["", "RXBOOT2 other HAVE", runner]


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_a_damaged_installed_archive_is_installed_again(tmp_path: Path, damage: str) -> None:
    """A file of an installed archive deleted or cut short (a scratch cleaner, a crash before the data
    reached the disk) fails the archive's size check: the bootstrap asks for it again."""
    data, digest = _stand_in_archive()
    assert _boot(tmp_path, digest, data).returncode == 0
    runner = tmp_path / "cache" / "archives" / digest / "remote_exec" / "runner" / "__init__.py"
    if damage == "deleted":
        runner.unlink()
    else:
        runner.write_bytes(runner.read_bytes()[:10])
    asked = _boot(tmp_path, digest, b"")
    assert asked.stdout.decode().splitlines()[:2] == ["", "RXBOOT2 t0k3n NEED damaged"]
    again = _boot(tmp_path, digest, data)
    assert again.returncode == 0, again.stderr.decode()
    assert again.stdout.decode().splitlines()[-1].startswith("runner ")
    assert sorted(p.name for p in (tmp_path / "cache" / "archives").iterdir()) == [digest]


def _archive_of(entries: list[tuple[str, bytes, int]]) -> tuple[bytes, str]:
    """A zip of ``(name, data, compression)`` entries and its sha256 (names written as given)."""
    import hashlib
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data, compression in entries:
            archive.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
    return buffer.getvalue(), hashlib.sha256(buffer.getvalue()).hexdigest()


@pytest.mark.parametrize(("entries", "said"), [
    ([("remote_exec/__init__.py", b"", 8), ("../evil.py", b"x", 8)], b"bad entry"),
    ([("remote_exec/__init__.py", b"", 8), ("/tmp/evil.py", b"x", 0)], b"bad entry"),
    ([("remote_exec/__init__.py", b"", 8), ("a/b.py", b"x" * 100, 12)], b"unknown compression"),
    # a file where another entry made a folder: the write fails in the first thread, or in the second
    ([("remote_exec/__init__.py", b"", 8), ("pkg/x.py", b"x", 8), ("pkg", b"y", 8)], b"IsADirectoryError"),
    ([("remote_exec/__init__.py", b"", 8), ("pkg", b"y", 8), ("pkg/x.py", b"x", 8)], b"IsADirectoryError"),
])
def test_an_archive_that_does_not_install_leaves_nothing(tmp_path: Path, entries: list[tuple[str, bytes, int]],
                                                         said: bytes) -> None:
    """Every entry is checked before any is written, and an error in either extracting thread fails the
    install: nothing is installed, nothing half-done is left, nothing is written outside."""
    data, digest = _archive_of(entries + [(f"f{number}.py", b"z" * number, 8) for number in range(40)])
    done = _boot(tmp_path, digest, data)
    assert done.returncode != 0 and said in done.stderr, done.stderr.decode()
    assert list((tmp_path / "cache" / "archives").iterdir()) == []
    assert not (tmp_path / "cache" / "evil.py").exists() and not (tmp_path / "evil.py").exists()


def test_an_archive_of_many_files_installs_each_with_its_size(tmp_path: Path) -> None:
    """Both extracting threads' files are there, whole, and in ``.rx-sizes``."""
    files = {f"pkg/m{number}.py": os.urandom(number * 37) for number in range(101)}
    data, digest = _archive_of([(name, content, 8 if number % 3 else 0)
                                for number, (name, content) in enumerate(files.items())]
                               + [("remote_exec/__init__.py", b"", 8),
                                  ("remote_exec/runner/__init__.py",
                                   b"def main(argv, fd=1, leave=False):\n    return 0\n", 8)])
    done = _boot(tmp_path, digest, data)
    assert done.returncode == 0, done.stderr.decode()
    installed = tmp_path / "cache" / "archives" / digest
    assert {name: (installed / name).read_bytes() for name in files} == files
    sizes = dict(line.split(" ", 1)[::-1] for line in (installed / ".rx-sizes").read_text().splitlines())
    assert len(sizes) == len(files) + 2 and all(int(sizes[name]) == len(files[name]) for name in files)


def test_the_handshake_is_found_after_login_noise() -> None:
    from remote_exec.protocol.bootstrap import find_handshake

    noise = b"Welcome to gpu1\n\x1b[1mconda activated\x1b[0m (no newline)"
    found = find_handshake(noise + b"\nRXBOOT2 abc HAVE\nFRAMES", "abc")
    assert found is not None
    assert (found.word, found.rest, found.noise) == ("HAVE", b"FRAMES", noise)
    assert found.shown() == "Welcome to gpu1 / \\x1b[1mconda activated\\x1b[0m (no newline)"
    assert find_handshake(b"RXBOOT2 abc HA", "abc") is None  # not whole yet
    assert find_handshake(b"RXBOOT2 xyz HAVE\n", "abc") is None  # another call's (or a forged) answer


def test_a_function_by_value_runs_without_importing_cloudpickle_on_the_host(frames: Any, tmp_path: Path) -> None:
    """A ``__main__`` function (what most sweeps call) is rebuilt without cloudpickle's ~20 ms import."""
    from remote_exec.session import Session
    from remote_exec.task import Execution, Task

    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec("import sys\n"
         "def probe(tag):\n"
         "    print(tag, sorted(name for name in sys.modules if 'cloudpickle' in name))\n", namespace)
    task = Task.from_function(namespace["probe"])
    session = Session(task=task, execution=Execution.create(task, ("loaded:",)), run_id="by-value")
    served = frames.serve([sys.executable, "-S", "-c", SERVE_AND_LIST, str(tmp_path / "cache"), str(ROOT)],
                          session.dumps(), cwd=tmp_path)
    assert served.returncode == 0 and served.header()["status"] == "finished", served.stderr.decode()
    assert served.payload(b"O").decode() == "loaded: []\n"


def test_a_function_by_reference_is_imported_without_importlib(frames: Any, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The task process imports a function's module by name without ``importlib`` (whose package imports
    ``warnings``: ~0.3 ms of every by-reference call on the host; seen failing before the fix)."""
    from remote_exec.session import Session
    from remote_exec.task import Execution, Task

    (tmp_path / "probe_module.py").write_text(
        "import sys\n"
        "def probe(tag):\n"
        "    print(tag, sorted(name for name in sys.modules if name in ('importlib', 'warnings')))\n",
        encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    import probe_module

    task = Task.from_function(probe_module.probe)
    session = Session(task=task, execution=Execution.create(task, ("loaded:",)), run_id="by-reference")
    served = frames.serve([sys.executable, "-S", "-c", SERVE_AND_LIST, str(tmp_path / "cache"), str(ROOT)],
                          session.to_wire(), cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert served.returncode == 0 and served.header()["status"] == "finished", served.stderr.decode()
    assert served.payload(b"O").decode() == "loaded: []\n"


def test_a_result_without_pull_globs_loads_no_pattern_matching(tmp_path: Path) -> None:
    """Listing a run's files for its result (a project's snapshot, or a plain run directory) loads fnmatch,
    and with it re, only for a call that gave ``pull`` globs: it cost every call of a project ~3 ms of
    the host's time (seen failing before the fix)."""
    (tmp_path / "out.txt").write_text("x", encoding="utf-8")
    probe = (
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from remote_exec.runner import result\n"
        "from remote_exec.runner.snapshot import Changes\n"
        "before = set(sys.modules)\n"
        f"found = result._files({{}}, {str(tmp_path)!r}, Changes(['out.txt'], False, []), lambda: None)\n"
        f"listed = result._manifest({str(tmp_path)!r}, [], lambda: None)\n"
        "assert [e['path'] for e in found[0]] == ['out.txt'] == [e['path'] for e in listed[0]], (found, listed)\n"
        "print(' '.join(sorted(set(sys.modules) - before)))\n"
    )
    loaded = set(subprocess.run([sys.executable, "-S", "-c", probe], capture_output=True, text=True, check=True,
                                timeout=60).stdout.split())
    assert loaded & {"fnmatch", "re"} == set()


def test_the_sweep_and_a_small_tree_load_neither_json_nor_openssl(tmp_path: Path) -> None:
    """The run directories' sweep (once a minute, so also on a host's first call) read each directory's
    status with json imported first: ~5 ms of that call on the host, for directories that have none. A
    small tree's blobs are checked with the built-in sha256, not OpenSSL's (~2 ms to load). Seen failing
    before the fix."""
    cache = tmp_path / "cache"
    (cache / "runs" / "r1-1.2.3-abc").mkdir(parents=True)
    probe = (
        "import os, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from remote_exec.runner import rundir, store\n"
        "before = set(sys.modules)\n"
        f"rundir.sweep_runs({str(cache)!r})\n"
        "data = b'x' * 1000\n"
        "receiver = store._Receiver(" + repr(str(cache)) + ", [(store.wire.builtin_sha256()(data).digest(), 1000)])\n"
        "receiver.feed(data)\n"
        f"assert os.path.isfile(store.blob_path({str(cache)!r}, receiver.wanted[0][0])), os.listdir({str(cache)!r})\n"
        "print(' '.join(sorted(set(sys.modules) - before)))\n"
    )
    loaded = set(subprocess.run([sys.executable, "-S", "-c", probe], capture_output=True, text=True, check=True,
                                timeout=60).stdout.split())
    assert loaded & {"json", "re", "hashlib", "_hashlib"} == set()
