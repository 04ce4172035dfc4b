"""land_files: the pulled files of a result are checked as they are staged in the run's store, then land all
at once; one bad member lands none and leaves no temporary."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import pytest

from remote_exec.errors import IntegrityError
from remote_exec.protocol import collect
from remote_exec.protocol.collect import SPOOL_VALUE, Received, land_files
from remote_exec.workspace.manager import Workspace
from remote_exec.workspace.recorder import FileLanding


def _received(tmp_path: Path, members: list[tuple[str, bytes]]) -> Received:
    received = Received(b"k")
    spool = tmp_path / "spool" / "files.tar"
    spool.parent.mkdir()
    with tarfile.open(spool, "w", format=tarfile.PAX_FORMAT) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    received.files_path = spool
    return received


def _manifest(members: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
    return [{"path": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in members]


@pytest.fixture
def lander(tmp_path: Path) -> FileLanding:
    run = Workspace(tmp_path / "ws").new_run(target="t.py", kind="script")
    return FileLanding(run, "files")


def test_checked_files_land_under_their_names(tmp_path: Path, lander: FileLanding) -> None:
    members = [("a.txt", b"a"), ("deep/er/b.bin", b"\0" * 8192 + b"b"), ("empty", b"")]
    landed = land_files(_received(tmp_path, members), "h", _manifest(members), lander)
    files = lander.run.dir / "files"
    assert landed == [files / "a.txt", files / "deep" / "er" / "b.bin", files / "empty"]
    assert [path.read_bytes() for path in landed] == [data for _, data in members]
    assert lander.run.store.temporaries() == []


@pytest.mark.parametrize(("members", "manifest", "error"), [
    ([("a", b"1"), ("b", b"2")], [("a", b"1"), ("b", b"X")], "'b' is damaged"),
    ([("a", b"1"), ("c", b"3")], [("a", b"1")], "unlisted file 'c'"),
    ([("a", b"1")], [("a", b"1"), ("b", b"2")], "missing listed files: b"),
    ([("a", b"1"), ("a/b", b"2")], [("a", b"1"), ("a/b", b"2")], "clashes with another"),
    ([("a", b"1"), ("../up", b"2")], [("a", b"1"), ("../up", b"2")], "outside"),
])
def test_one_bad_member_lands_nothing(tmp_path: Path, lander: FileLanding, members: list[tuple[str, bytes]],
                                      manifest: list[tuple[str, bytes]], error: str) -> None:
    with pytest.raises(IntegrityError, match=error):
        land_files(_received(tmp_path, members), "h", _manifest(manifest), lander)
    assert not (lander.run.dir / "files").exists()
    assert lander.run.store.temporaries() == []


def test_files_spool_on_the_landing_file_system(tmp_path: Path, lander: FileLanding) -> None:
    """The tar stream is spooled in the run's store (where it lands), not in a /tmp that may be memory."""
    received = Received(b"k", spool=lander.stage)
    received.add(b"F", b"x" * 512)
    received.close_spool()
    assert received.files_path is not None
    assert received.files_path.parent.parent == lander.run.dir / ".store" / "tmp"
    received.discard()
    assert lander.run.store.temporaries() == []


def test_a_spool_that_cannot_be_made_is_a_full_disk(tmp_path: Path, lander: FileLanding,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The frames are still read to their end (the host keeps the result), and collect says the disk is full."""
    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "mkdir", full)
    received = Received(b"k", spool=lander.stage)
    received.add(b"F", b"x")
    received.add(b"F", b"y")
    assert isinstance(received.failed, OSError) and received.failed.errno == errno.ENOSPC


def test_landed_files_and_folders_have_the_umasks_modes(tmp_path: Path, lander: FileLanding) -> None:
    members = [("sub/a.txt", b"a")]
    previous = os.umask(0o022)
    try:
        land_files(_received(tmp_path, members), "h", _manifest(members), lander)
    finally:
        os.umask(previous)
    files = lander.run.dir / "files"
    assert [oct(path.stat().st_mode & 0o777) for path in (files, files / "sub", files / "sub" / "a.txt")] == \
        ["0o755", "0o755", "0o644"]


def _header(size: int) -> bytes:
    return json.dumps({"value": {"size": size, "encoding": "pickle"}}).encode()


@pytest.mark.parametrize(("free_store", "free_tmp", "where"), [
    (1 << 40, 1 << 40, "store"),  # fits beside the files: spooled there
    (1 << 20, 1 << 40, "tmp"),  # the workspace's disk is short of room, TMPDIR is not: the value is still had
    (1 << 20, 1 << 20, "store"),  # neither: beside the files all the same (the full disk says so)
])
def test_a_large_value_spools_where_it_fits(tmp_path: Path, lander: FileLanding, monkeypatch: pytest.MonkeyPatch,
                                            free_store: int, free_tmp: int, where: str) -> None:
    store_tmp = lander.run.dir / ".store" / "tmp"
    temp = tmp_path / "TMPDIR"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.setattr(collect, "_free", lambda folder: free_store if folder.parent == store_tmp else free_tmp)
    received = Received(b"k", spool=lander.stage)
    received.add(b"R", _header(SPOOL_VALUE + 1))
    received.add(b"V", b"v" * 1000)
    received.close_spool()
    assert received.value_path is not None and received.value_path.read_bytes() == b"v" * 1000
    folder = received.value_path.parent
    assert folder.parent == (store_tmp if where == "store" else temp)
    assert len(lander.run.store.temporaries()) == (1 if where == "store" else 0)  # no folder left unused
    received.discard()
    assert not folder.exists() and lander.run.store.temporaries() == [] and list(temp.iterdir()) == []
