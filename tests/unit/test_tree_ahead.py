"""A project tree sent unasked with the call (remote_exec.protocol.places records which trees a host has):
where rx's record says the host lacks the call's tree, its manifest and the blobs new since the last tree
seen there go right behind the G frame, and the runner asks only for what is still missing. Through
dispatch and a real runner over the LocalBackend, and the runner's store over a pipe."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from remote_exec.protocol import places, wire
from remote_exec.protocol.tree import TreeSender, ahead_frames
from remote_exec.runner.store import Inbox, StoreError, ensure_tree, take_ahead
from remote_exec.sync.project import Project, ProjectSpec
from tests.unit.test_snapshot import TRAIN, make_project, project_call


@pytest.fixture
def proj(tmp_path: Path) -> Path:
    return make_project(tmp_path / "proj")


@pytest.fixture
def asked(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The kinds of the tree frames the runners sent (T: the tree asked for; N, n: blobs asked for)."""
    kinds: list[bytes] = []
    handle = TreeSender.handle

    def recording(self: TreeSender, kind: bytes, payload: bytes) -> None:
        kinds.append(kind)
        handle(self, kind, payload)

    monkeypatch.setattr(TreeSender, "handle", recording)
    return kinds


def test_a_new_and_an_edited_tree_go_with_the_call_and_the_runner_asks_nothing(
        dispatcher: Any, proj: Path, asked: list[bytes]) -> None:
    task = dispatcher.script(TRAIN, "train.py")
    first = dispatcher.run(task, ("configs/a.json",), project=project_call(proj))
    assert first.result.status == "finished", first.stderr.decode()
    assert json.loads(first.text())["rows"] == [["1", "2"], ["3", "4"]]
    assert first.outcome.synced == (5, sum(len(p.read_bytes()) for p in proj.rglob("*") if p.is_file()))
    again = dispatcher.run(task, ("configs/a.json",), project=project_call(proj))
    assert again.outcome.synced is None  # recorded as there: nothing went
    (proj / "configs" / "a.json").write_text(json.dumps({"data": "data/x.csv", "scale": 3}))
    edited = dispatcher.run(task, ("configs/a.json",), project=project_call(proj))
    assert (edited.landed / "outputs" / "model.pt").read_bytes() == b"weights" * 3
    assert edited.outcome.synced == (1, len((proj / "configs" / "a.json").read_bytes()))  # the new blob alone
    assert asked == []  # not one round trip to ask for the tree or a blob


def test_blobs_over_the_limit_are_asked_for_and_only_they(dispatcher: Any, proj: Path, asked: list[bytes],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    (proj / "data" / "big.bin").write_bytes(os.urandom(50_000))
    monkeypatch.setattr(places, "TREE_AHEAD_LIMIT", 4096)  # the manifest fits; the blobs do not
    task = dispatcher.script("import os\nprint(os.path.getsize('data/big.bin'))\n", "size.py")
    call = dispatcher.run(task, project=project_call(proj, script=None))
    assert call.text().strip() == "50000"
    assert asked == [b"N", b"n"]  # the manifest went unasked; the blobs were asked for, once


def test_a_host_that_has_the_tree_rx_forgot_reads_what_came_and_runs(dispatcher: Any, proj: Path,
                                                                      asked: list[bytes]) -> None:
    task = dispatcher.script(TRAIN, "train.py")
    dispatcher.run(task, ("configs/a.json",), project=project_call(proj))
    shutil.rmtree(places._folder())  # as on another machine, or a cleared cache: the record says nothing
    for _ in range(2):  # from the store, then from the snapshot pooled after the last run
        call = dispatcher.run(task, ("configs/a.json",), project=project_call(proj))
        assert call.result.status == "finished", call.stderr.decode()
        assert json.loads(call.text())["rows"] == [["1", "2"], ["3", "4"]]
        shutil.rmtree(places._folder())
    assert asked == []


def test_a_worker_is_sent_no_tree_unasked(dispatcher: Any, proj: Path, asked: list[bytes]) -> None:
    task = dispatcher.script("print('warm')\n", "w.py")
    call = dispatcher.run(task, project=project_call(proj, script=None), keep_warm=True)
    assert call.text().strip() == "warm"
    assert asked[0] == b"T"


# --- the runner's side, over a pipe ------------------------------------------------------------------------

def _inbox(data: bytes, sent: list[bytes]) -> tuple[Inbox, int]:
    read_end, write_end = os.pipe()
    os.write(write_end, data)
    os.close(write_end)
    return Inbox(read_end, wire.FrameReader(), lambda kind, _: sent.append(kind)), read_end


def test_the_runner_stores_what_came_and_asks_only_for_the_rest(tmp_path: Path, proj: Path) -> None:
    tree = Project(ProjectSpec(root=proj.resolve())).scan()
    train = next(entry for entry in tree.entries if entry.path == "train.py")
    previous = wire.dump_manifest([entry for entry in tree.wire_entries if entry[3] != train.digest])
    ahead = ahead_frames(tree, previous, 1 << 20)
    assert ahead is not None and ahead.files == 1 and ahead.size == train.size
    rest = [entry for digest, entry in tree.sources.items() if digest != train.digest]
    rest.sort(key=lambda entry: [e[3] for e in wire.load_manifest(tree.manifest)].index(entry.digest))
    answer = wire.encode(b"D", b"".join(Path(str(e.source)).read_bytes() for e in rest))
    answer += wire.encode(b"d", wire.dump_options({}))
    sent: list[bytes] = []
    inbox, fd = _inbox(ahead.frames + answer, sent)
    try:
        take_ahead(str(tmp_path / "cache"), {"tree": tree.tree_id, "tree_ahead": True}, inbox)
        entries = ensure_tree(str(tmp_path / "cache"), tree.tree_id, inbox)
    finally:
        os.close(fd)
    assert sent == [b"N", b"n"]  # no T
    assert [entry[0] for entry in entries] == sorted(entry.path for entry in tree.entries)
    assert (tmp_path / "cache" / "trees" / tree.tree_id).is_file()
    for blob in (tmp_path / "cache" / "blobs").rglob("*"):
        assert blob.is_dir() or hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name


def test_a_damaged_blob_that_came_unasked_is_never_stored(tmp_path: Path, proj: Path) -> None:
    tree = Project(ProjectSpec(root=proj.resolve())).scan()
    ahead = ahead_frames(tree, None, 1 << 20)
    assert ahead is not None
    frames = bytearray(ahead.frames)
    frames[-40] ^= 1  # a byte of the last blob (the d frame's options are shorter)
    inbox, fd = _inbox(bytes(frames), [])
    try:
        with pytest.raises(StoreError, match="arrived damaged"):
            take_ahead(str(tmp_path / "cache"), {"tree": tree.tree_id, "tree_ahead": True}, inbox)
    finally:
        os.close(fd)
    assert not (tmp_path / "cache" / "trees").exists()
    assert not list((tmp_path / "cache" / "tmp").iterdir())


def test_a_manifest_of_another_tree_is_refused(tmp_path: Path, proj: Path) -> None:
    tree = Project(ProjectSpec(root=proj.resolve())).scan()
    ahead = ahead_frames(tree, tree.manifest, 1 << 20)  # the manifest alone: no blob is new
    assert ahead is not None and ahead.files == 0
    inbox, fd = _inbox(ahead.frames, [])
    try:
        with pytest.raises(StoreError, match="does not hash to its id"):
            take_ahead(str(tmp_path / "cache"), {"tree": "0" * 64, "tree_ahead": True}, inbox)
    finally:
        os.close(fd)


def test_frames_held_by_the_reader_are_read_without_waiting_for_more(tmp_path: Path) -> None:
    """What came with the call (held in the reader) is the transfer's: the inbox must not wait on its input
    for bytes that will not come (the coordinator sent it all and waits for the result)."""
    read_end, write_end = os.pipe()  # the writer stays open and silent, as a waiting coordinator's
    os.set_blocking(read_end, False)  # a read now would fail the test rather than hang it
    reader = wire.FrameReader()
    reader.unread([(b"M", b"manifest"), (b"m", wire.dump_options({"size": 8}))])
    try:
        parts, end = Inbox(read_end, reader, lambda *_: None).until(b"m", b"M")
    finally:
        os.close(read_end)
        os.close(write_end)
    assert parts == [b"manifest"] and end == {"size": 8}


# --- the record ----------------------------------------------------------------------------------------------

class _Tree:
    def __init__(self, number: int) -> None:
        self.tree_id = f"{number:064x}"
        self.manifest = b"m%d" % number


def test_the_record_keeps_archives_and_the_latest_trees_apart(isolated: Any) -> None:
    record = places.Place(str(Path(places._folder()) / "p"))
    record.note("a" * 64, prompt=True)
    for number in range(places.KEEP + 3):
        record.note_tree(_Tree(number))  # type: ignore[arg-type]
    again = places.Place(record.path)
    assert again.has("a" * 64) and again.entries == ["a" * 64]
    assert again.trees == [f"{number:064x}" for number in range(3, places.KEEP + 3)]
    assert not again.has_tree(f"{0:064x}") and again.has_tree(f"{places.KEEP + 2:064x}")
    again.note("b" * 64, prompt=False)  # a login shell that replaced itself: no archive ahead, trees kept
    assert not places.Place(record.path).ahead and places.Place(record.path).trees == again.trees


def test_kept_manifests_are_the_latest(isolated: Any) -> None:
    for number in range(places.MANIFESTS + 4):
        places.save_manifest(f"{number:064x}", b"m%d" % number)
        os.utime(Path(places._folder()).parent / "manifests" / f"{number:064x}", ns=(number * 10**9,) * 2)
    assert places.load_manifest(f"{0:064x}") is None
    assert places.load_manifest(f"{places.MANIFESTS + 3:064x}") == b"m%d" % (places.MANIFESTS + 3)
    assert len(os.listdir(Path(places._folder()).parent / "manifests")) == places.MANIFESTS


def test_records_of_places_long_unused_are_pruned(isolated: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(places, "PLACES", 3)
    folder = Path(places._folder())
    for number in range(5):
        places.Place(str(folder / f"place{number}")).note("a" * 64, prompt=True)
        os.utime(folder / f"place{number}", ns=(number * 10**9,) * 2)
    assert sorted(os.listdir(folder)) == ["place2", "place3", "place4"]
