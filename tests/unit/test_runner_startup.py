"""The runner's start-up is on every call's path: it must not import the heavy standard modules.

Each of these costs milliseconds to import (json and pickle pull in re and enum; zipfile pulls in
shutil, pathlib and importlib.util), which a warm call of a few tens of milliseconds would pay every
time. What the runner needs instead is in remote_exec.wire (JSON writer, option frames), _pickle,
_signal and select.poll.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

HEAVY = {"json", "re", "enum", "typing", "dataclasses", "zipfile", "pathlib", "selectors", "shutil",
         "signal", "inspect", "tarfile", "traceback", "pickle", "tempfile", "logging", "cloudpickle"}


def test_the_runner_and_what_a_call_loads_import_nothing_heavy() -> None:
    probe = (
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "before = set(sys.modules)\n"
        "import remote_exec.runner, remote_exec.session, remote_exec.serialization, remote_exec.task\n"
        "print(' '.join(sorted(set(sys.modules) - before)))\n"
    )
    loaded = set(subprocess.run([sys.executable, "-S", "-c", probe], capture_output=True, text=True,
                                check=True, timeout=60).stdout.split())
    assert "remote_exec.runner" in loaded
    assert loaded & HEAVY == set()
