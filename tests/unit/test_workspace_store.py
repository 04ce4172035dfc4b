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


# -- trees: stage, then land all at once ---------------------------------------------------------------


def _staged(store: Store, files: dict[str, bytes]) -> Path:
    staged = store.stage()
    for name, data in files.items():
        (staged / name).parent.mkdir(parents=True, exist_ok=True)
        (staged / name).write_bytes(data)
    return staged


def test_a_tree_lands_into_a_new_folder_in_one_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(tmp_path)
    staged = _staged(store, {"a.txt": b"a", "deep/b.txt": b"b"})
    renames: list[tuple[str, str]] = []
    real_rename = os.rename
    monkeypatch.setattr(os, "rename", lambda src, dst: (renames.append((str(src), str(dst))), real_rename(src, dst)))
    landed = store.land_tree(staged, "files/k1", ["a.txt", "deep/b.txt"])
    assert landed == [tmp_path / "files" / "k1" / "a.txt", tmp_path / "files" / "k1" / "deep" / "b.txt"]
    assert [p.read_bytes() for p in landed] == [b"a", b"b"]
    assert renames == [(str(staged), str(tmp_path / "files" / "k1"))]  # the whole tree appeared at once
    assert not staged.exists() and store.temporaries() == []


def test_a_tree_merges_into_an_existing_folder(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.write_bytes("files/keep.txt", b"kept")
    store.write_bytes("files/a.txt", b"old")
    staged = _staged(store, {"a.txt": b"new", "sub/c.txt": b"c"})
    landed = store.land_tree(staged, "files", ["a.txt", "sub/c.txt"])
    assert [p.read_bytes() for p in landed] == [b"new", b"c"]
    assert (tmp_path / "files" / "keep.txt").read_bytes() == b"kept"
    assert not staged.exists() and store.temporaries() == []


def _linked_out(tmp_path: Path) -> tuple[Store, Path]:
    """A store whose ``files/link`` leads to a folder outside it (returned with it)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    store = Store(tmp_path / "run")
    store.write_bytes("files/first.txt", b"x")
    (tmp_path / "run" / "files" / "link").symlink_to(outside)
    return store, outside


def test_a_tree_with_one_refused_name_lands_nothing(tmp_path: Path) -> None:
    store, outside = _linked_out(tmp_path)
    staged = _staged(store, {"0.txt": b"fine", "link/evil.txt": b"evil"})
    with pytest.raises(WorkspaceError, match="outside"):
        store.land_tree(staged, "files", ["0.txt", "link/evil.txt"])
    assert not (tmp_path / "run" / "files" / "0.txt").exists()  # moved before the refusal: removed again
    assert list(outside.iterdir()) == []
    assert not staged.exists() and store.temporaries() == []
    with pytest.raises(WorkspaceError, match=r"'\.\.'"):
        store.land_tree(_staged(store, {"x": b""}), "files", ["../x"])
    assert store.temporaries() == []


def test_a_link_out_of_the_root_gets_no_folder_made_through_it(tmp_path: Path) -> None:
    store, outside = _linked_out(tmp_path)
    staged = _staged(store, {"link/sub/deeper/x.txt": b"evil"})
    with pytest.raises(WorkspaceError, match=r"refusing file name 'files/link/sub/deeper/x\.txt'.*outside"):
        store.land_tree(staged, "files", ["link/sub/deeper/x.txt"])
    assert list(outside.iterdir()) == []  # not even an empty folder
    assert not staged.exists() and store.temporaries() == []


@pytest.mark.parametrize("syncfs", [True, False])
def test_a_large_tree_is_made_durable_before_it_lands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      syncfs: bool) -> None:
    from remote_exec.workspace import store as store_module

    store = Store(tmp_path)
    names = [f"d{i % 3}/{i}.txt" for i in range(store_module.SYNCFS_FROM)]
    staged = _staged(store, {name: name.encode() for name in names})
    events: list[str] = []
    monkeypatch.setattr(store_module, "_syncfs", lambda path: events.append(f"syncfs {path}") or syncfs)
    real_fsync, real_rename = os.fsync, os.rename
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "rename", lambda src, dst: (events.append("rename"), real_rename(src, dst))[1])
    store.land_tree(staged, "files", names)
    assert events[0] == f"syncfs {staged}"
    synced = events.index("rename")
    if syncfs:  # one call for the whole file system
        assert "fsync" not in events[:synced]
    else:  # each file, then each of its 4 folders
        assert events[1:synced] == ["fsync"] * (len(names) + 4)
    assert sorted(p.relative_to(tmp_path / "files").as_posix() for p in (tmp_path / "files").rglob("*.txt")) == \
        sorted(names)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="syncfs(2) is Linux's")
def test_syncfs_is_called_for_real(tmp_path: Path) -> None:
    from remote_exec.workspace.store import _syncfs

    assert _syncfs(tmp_path) is True


def test_a_staged_tree_of_a_dead_writer_is_swept(tmp_path: Path) -> None:
    store = Store(tmp_path)
    staged = _staged(store, {"a/b.txt": b"x"})
    dead = staged.with_name(staged.name.replace(f".{os.getpid()}.", ".999999999."))
    staged.rename(dead)
    assert Store(tmp_path).temporaries() == []
