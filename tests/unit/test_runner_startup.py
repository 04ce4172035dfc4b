"""The runner's start-up is on every call's path: it must not import the heavy standard modules.

Each of these costs milliseconds to import (json and pickle pull in re and enum; zipfile pulls in
shutil, pathlib and importlib.util; hashlib and hmac load OpenSSL), which a warm call of a few tens of
milliseconds would pay every time. What the runner needs instead is in remote_exec.protocol.wire (JSON writer,
option frames, HMAC over the built-in sha256), _pickle, _signal and select.poll.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

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


def test_the_bootstrap_reports_an_old_python_and_installs_an_archive(tmp_path: Path) -> None:
    """The bootstrap unpacks the archive without zipfile (and without OpenSSL), checks its sha256 first,
    and refuses a damaged upload."""
    import hashlib
    import io
    import zipfile

    from remote_exec.protocol.bootstrap import BOOTSTRAP

    compile(BOOTSTRAP, "bootstrap", "exec")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("remote_exec/__init__.py", "")
        archive.writestr("remote_exec/runner/__init__.py", "def main(argv):\n    print('runner', argv)\n    return 0\n")
        archive.writestr("pkg/deep/data.txt", "x" * 5000)
        archive.writestr("stored.txt", "as is", compress_type=zipfile.ZIP_STORED)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()

    def boot(payload: bytes) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([sys.executable, "-S", "-c", BOOTSTRAP, digest, str(tmp_path / "cache"), "serve"],
                              input=len(payload).to_bytes(8, "big") + payload, capture_output=True, timeout=60,
                              check=False)

    damaged = boot(data[:-1] + bytes([data[-1] ^ 1]))
    assert damaged.returncode != 0 and b"sha256 mismatch" in damaged.stderr
    assert not (tmp_path / "cache" / "archives" / digest).exists()
    done = boot(data)
    assert done.returncode == 0, done.stderr.decode()
    runner = f"runner [{str(tmp_path / 'cache')!r}, 'serve']"
    assert done.stdout.decode().splitlines() == ["RXBOOT1 NEED", "RXBOOT1 OK", runner]
    installed = tmp_path / "cache" / "archives" / digest
    assert (installed / "pkg" / "deep" / "data.txt").read_text() == "x" * 5000
    assert (installed / "stored.txt").read_text() == "as is"
    assert [p.name for p in (tmp_path / "cache" / "archives").iterdir()] == [digest]  # no temporaries left
    again = boot(b"")
    assert again.stdout.decode().splitlines() == ["RXBOOT1 HAVE", runner]
