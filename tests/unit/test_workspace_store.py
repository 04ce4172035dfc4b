"""Store: atomic whole-file writes (tmp -> new -> cur), hash checks, refused names, sweeping."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from remote_exec.errors import IntegrityError, WorkspaceError
from remote_exec.workspace.store import STALE_AFTER, Store


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_write_bytes_lands_whole_under_its_name(tmp_path: Path) -> None:
    store = Store(tmp_path)
    path = store.write_bytes("files/a/b.txt", b"hello", sha256=sha(b"hello"))
    assert path == tmp_path / "files" / "a" / "b.txt"
    assert path.read_bytes() == b"hello"
    assert store.temporaries() == []


def test_write_replaces_an_existing_file(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.write_bytes("result.json", b"old")
    store.write_bytes("result.json", b"new")
    assert (tmp_path / "result.json").read_bytes() == b"new"


def test_sha256_mismatch_writes_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.write_bytes("result.json", b"previous")
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        store.write_bytes("result.json", b"damaged", sha256=sha(b"intact"))
    assert (tmp_path / "result.json").read_bytes() == b"previous"
    with pytest.raises(IntegrityError):
        store.write_stream("files/x.bin", [b"a", b"b"], sha256="0" * 64)
    assert not (tmp_path / "files" / "x.bin").exists()
    assert store.temporaries() == []


def test_write_stream_that_fails_midway_leaves_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path)

    def chunks() -> Iterator[bytes]:
        yield b"first part"
        raise ConnectionError("link lost")

    with pytest.raises(ConnectionError):
        store.write_stream("files/big.bin", chunks())
    assert not (tmp_path / "files" / "big.bin").exists()
    assert store.temporaries() == []


def test_write_stream_hashes_all_chunks(tmp_path: Path) -> None:
    store = Store(tmp_path)
    parts = [os.urandom(100_000) for _ in range(5)]
    whole = b"".join(parts)
    path = store.write_stream("files/big.bin", iter(parts), sha256=sha(whole))
    assert path.read_bytes() == whole


def test_write_file_copies_or_moves(tmp_path: Path) -> None:
    store = Store(tmp_path / "run")
    source = tmp_path / "src.bin"
    source.write_bytes(b"payload")
    copied = store.write_file("files/copy.bin", source, sha256=sha(b"payload"))
    assert copied.read_bytes() == b"payload" and source.exists()
    moved = store.write_file("files/moved.bin", source, move=True)
    assert moved.read_bytes() == b"payload" and not source.exists()


def test_write_file_move_with_bad_hash_keeps_the_source(tmp_path: Path) -> None:
    store = Store(tmp_path / "run")
    source = tmp_path / "src.bin"
    source.write_bytes(b"payload")
    with pytest.raises(IntegrityError):
        store.write_file("files/moved.bin", source, sha256=sha(b"other"), move=True)
    assert source.read_bytes() == b"payload"
    assert not (tmp_path / "run" / "files" / "moved.bin").exists()


def test_write_file_missing_source_is_a_workspace_error(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with pytest.raises(WorkspaceError, match="cannot read"):
        store.write_file("x", tmp_path / "missing")


@pytest.mark.parametrize("name", [
    "/etc/passwd", "../outside.txt", "files/../../outside.txt", "a/../../b", "", ".", "files\\..\\x",
    ".store/tmp/x", "./.store/new/y",
])
def test_names_that_escape_or_touch_the_store_are_refused(tmp_path: Path, name: str) -> None:
    store = Store(tmp_path / "run")
    with pytest.raises(WorkspaceError, match="refusing file name"):
        store.write_bytes(name, b"x")
    with pytest.raises(WorkspaceError, match="refusing file name"):
        store.open_append(name)
    assert not (tmp_path / "outside.txt").exists()


@pytest.mark.parametrize(("name", "reason"), [
    ("", "empty or not a string"), ("a\x00b", "empty or not a string"),
    ("files\\x", "backslashes are not allowed"), ("/etc/passwd", "absolute paths are not allowed"),
    ("a/../../b", "'..' would leave"), ("./.", "it names the store root itself"),
    ("./.store/new/y", ".store/ is private to the store"),
])
def test_each_refused_name_says_why(tmp_path: Path, name: str, reason: str) -> None:
    store = Store(tmp_path / "run")
    with pytest.raises(WorkspaceError) as refused:
        store.path(name)
    assert str(refused.value).startswith(f"refusing file name {name!r}: {reason}")
    assert store.path("./files/a/./b.txt") == tmp_path / "run" / "files" / "a" / "b.txt"


def test_write_file_moves_across_file_systems_by_copying(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import remote_exec.workspace.store as store_module

    store = Store(tmp_path / "run")
    source = tmp_path / "src.bin"
    source.write_bytes(b"payload")
    rename = os.rename

    def other_file_system(src: object, dst: object) -> None:
        if Path(str(src)) == source:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        rename(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(store_module.os, "rename", other_file_system)
    moved = store.write_file("files/moved.bin", source, sha256=sha(b"payload"), move=True)
    assert moved.read_bytes() == b"payload" and not source.exists()


def test_write_file_move_of_a_missing_source_is_a_workspace_error(tmp_path: Path) -> None:
    store = Store(tmp_path / "run")
    with pytest.raises(WorkspaceError, match=r"cannot move .*missing into"):
        store.write_file("x", tmp_path / "missing", move=True)
    with pytest.raises(WorkspaceError, match=r"cannot read .*missing"):
        store.write_file("x", tmp_path / "missing", sha256=sha(b""), move=True)
    assert store.temporaries() == []


def test_a_symlink_pointing_outside_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    run = tmp_path / "run"
    store = Store(run)
    (run / "files").symlink_to(outside)
    with pytest.raises(WorkspaceError, match="outside"):
        store.write_bytes("files/x.txt", b"x")
    assert list(outside.iterdir()) == []


def test_open_append_grows_in_place_and_is_visible_at_once(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with store.open_append("stdout.log") as log:
        log.write(b"line 1\n")
        # No flush: another reader must already see it.
        assert (tmp_path / "stdout.log").read_bytes() == b"line 1\n"
        log.write(b"line 2\n")
    with store.open_append("stdout.log") as log:
        log.write(b"line 3\n")
    assert (tmp_path / "stdout.log").read_bytes() == b"line 1\nline 2\nline 3\n"


def test_concurrent_writers_of_one_name_never_mix_contents(tmp_path: Path) -> None:
    store = Store(tmp_path)
    blobs = [bytes([i]) * 200_000 for i in range(8)]
    seen: list[bytes] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            with contextlib.suppress(FileNotFoundError):
                seen.append((tmp_path / "same.bin").read_bytes())

    def writer(blob: bytes) -> None:
        for _ in range(10):
            store.write_bytes("same.bin", blob)

    watcher = threading.Thread(target=reader)
    watcher.start()
    threads = [threading.Thread(target=writer, args=(b,)) for b in blobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watcher.join()
    assert (tmp_path / "same.bin").read_bytes() in blobs
    assert seen and all(content in blobs for content in seen)


def test_sweep_removes_temporaries_of_dead_writers_and_old_ones_only(tmp_path: Path) -> None:
    store = Store(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    host = store._unique().split(".")[2]
    dead = tmp_path / ".store" / "tmp" / f"{time.time_ns()}.{proc.pid}.{host}.abcdef"
    dead_new = tmp_path / ".store" / "new" / f"{time.time_ns()}.{proc.pid}.{host}.abcdef"
    live = tmp_path / ".store" / "tmp" / f"{time.time_ns()}.{os.getpid()}.{host}.123456"
    old_live = tmp_path / ".store" / "tmp" / f"{time.time_ns()}.{os.getpid()}.{host}.654321"
    other_host = tmp_path / ".store" / "tmp" / f"{time.time_ns()}.{proc.pid}.elsewhere.aaaaaa"
    for path in (dead, dead_new, live, old_live, other_host):
        path.write_bytes(b"partial")
    long_ago = time.time() - STALE_AFTER - 60
    os.utime(old_live, (long_ago, long_ago))

    Store(tmp_path)  # opening sweeps

    remaining = {p.name for p in store.temporaries()}
    assert remaining == {live.name, other_host.name}


def test_a_disk_failure_is_a_workspace_error_and_leaves_no_temporary(tmp_path: Path) -> None:
    store = Store(tmp_path)
    (tmp_path / "files").write_bytes(b"a file where a directory is needed")
    with pytest.raises(WorkspaceError, match=r"cannot write files/x\.txt"):
        store.write_bytes("files/x.txt", b"x")
    with pytest.raises(WorkspaceError, match="cannot write files/log"):
        store.open_append("files/log")
    assert store.temporaries() == []
