"""A large ``@task`` value streams to a spool file and is rebuilt from there: the coordinator's memory peaks
at about the value's size (at most twice it), not four times; the value is recorded whole, the spool file
removed. The spool is in the run's store (the workspace's disk), not in a ``TMPDIR`` that may be memory or
small."""

from __future__ import annotations

import array
import pickle
import tempfile
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from remote_exec import Configuration, SubprocessAdvice, task
from remote_exec.coordinator import Coordinator
from remote_exec.protocol.collect import Received
from remote_exec.workspace import Workspace

MIB = 1 << 20
SIZE = 48 * MIB  # past SPOOL_VALUE (16 MiB)


def make(kind: str, size: int) -> Any:
    return b"x" * size if kind == "bytes" else array.array("b", bytes(size))


@pytest.mark.parametrize("kind", ["bytes", "array"])  # marshal, and a pickle
def test_a_large_value_peaks_at_most_twice_its_size(isolated: Any, monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path, kind: str) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setenv("TMPDIR", str(spool))
    monkeypatch.setattr(tempfile, "tempdir", None)
    folders: list[Path] = []
    spool_folder = Received._spool_folder
    monkeypatch.setattr(Received, "_spool_folder", lambda self: folders.append(spool_folder(self)) or folders[-1])
    big = task(chain="sub", config=Configuration().add_chain("sub", [SubprocessAdvice()]))(make)
    big(kind, 1)  # warm: imports, archive
    tracemalloc.start()
    try:
        value = big(kind, SIZE)
        Coordinator.current().flush()  # recorded too
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert value == make(kind, SIZE)
    assert peak <= 2.1 * SIZE, f"peak {peak / MIB:.0f} MiB for a {SIZE // MIB} MiB value"
    (run,) = Workspace(isolated.workspace).runs()
    recorded = [entry for entry in run.tasks().values() if entry["status"] == "done"]
    assert len(recorded) == 2
    keys = [key for key, entry in run.tasks().items() if entry["started"] == max(e["started"] for e in recorded)]
    stored = run.call_record(f"results/{keys[0]}.pkl")
    assert stored is not None and pickle.loads(stored) == value
    assert list(spool.iterdir()) == []  # nothing went to TMPDIR
    (folder,) = folders  # the large value's, in the run's store: gone with its file
    assert folder.parent == run.dir / ".store" / "tmp" and not folder.exists(), folder
    assert run.store.temporaries() == []
