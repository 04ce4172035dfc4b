"""Runs in snapshots of a project, through dispatch and a real runner over the LocalBackend: the tree travels
once, only what changed travels later, each run has its own copy, the outputs are what it created or
changed, and the store never trusts what was not checked."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from remote_exec.errors import SyncError
from remote_exec.protocol import wire
from remote_exec.protocol.options import ProjectCall
from remote_exec.runner.rundir import sweep_runs
from remote_exec.sync.project import Project, ProjectSpec

TRAIN = """\
import json, os, sys
from pathlib import Path
import mylib
cfg = json.load(open(sys.argv[1]))
rows = mylib.load(cfg["data"])
here = Path(__file__).parent
print(json.dumps({"cwd": os.path.relpath(os.getcwd(), os.environ["RX_RUN_DIR"]),
                  "file": os.path.relpath(__file__, os.environ["RX_RUN_DIR"]),
                  "rows": rows, "config_next_to_me": (here / "configs" / "a.json").exists(),
                  "mylib": os.path.relpath(mylib.__file__, os.environ["RX_RUN_DIR"])}))
os.makedirs("outputs", exist_ok=True)
Path("outputs/model.pt").write_bytes(b"weights" * int(cfg.get("scale", 1)))
"""


def make_project(root: Path) -> Path:
    """A small training project: configs/, data/, src/mylib, train.py."""
    (root / "configs").mkdir(parents=True)
    (root / "data").mkdir()
    (root / "src" / "mylib").mkdir(parents=True)
    (root / "pyproject.toml").write_text('[project]\nname = "demo"\nversion = "0"\n')
    (root / "configs" / "a.json").write_text(json.dumps({"data": "data/x.csv"}))
    (root / "data" / "x.csv").write_text("a,b\n1,2\n3,4\n")
    (root / "src" / "mylib" / "__init__.py").write_text(
        "def load(path):\n    return [line.split(',') for line in open(path).read().split()[1:]]\n")
    (root / "train.py").write_text(TRAIN)
    return root


def project_call(root: Path, *, script: str | None = "train.py", cwd: str = "",
                 path: tuple[str, ...] = (".", "src")) -> ProjectCall:
    tree = Project(ProjectSpec(root=root.resolve(), always=(script,) if script else ())).scan()
    return ProjectCall(tree=tree, cwd=cwd, path=path, script=script, pool=root.name)


@pytest.fixture
def proj(tmp_path: Path) -> Path:
    return make_project(tmp_path / "proj")


def _store(dispatcher: Any) -> Path:
    return Path(dispatcher.workdir)


def test_a_run_reads_its_project_and_only_its_outputs_come_back(dispatcher: Any, proj: Path) -> None:
    task = dispatcher.script(TRAIN, "train.py")
    call = dispatcher.run(task, ("configs/a.json",), project=project_call(proj))
    assert call.result.status == "finished", call.stderr.decode()
    seen = json.loads(call.text())
    assert seen == {"cwd": ".", "file": "train.py", "rows": [["1", "2"], ["3", "4"]], "config_next_to_me": True,
                    "mylib": "src/mylib/__init__.py"}
    landed = sorted(str(path.relative_to(call.landed)) for path in call.outcome.files)
    assert landed == ["outputs/model.pt"]  # not the inputs, not __pycache__
    assert (call.landed / "outputs" / "model.pt").read_bytes() == b"weights"
    assert call.outcome.synced == (5, sum(len(p.read_bytes()) for p in proj.rglob("*") if p.is_file()))


def test_the_working_directory_is_the_same_offset_inside_the_snapshot(dispatcher: Any, proj: Path) -> None:
    (proj / "scripts").mkdir()
    (proj / "scripts" / "peek.py").write_text(
        "import os, sys\nprint(os.path.relpath(os.getcwd(), os.environ['RX_RUN_DIR']), sys.path[0].endswith('scripts'),"
        " open('../configs/a.json').read()[:1])\n")
    task = dispatcher.script((proj / "scripts" / "peek.py").read_text(), "peek.py")
    call = dispatcher.run(task, project=project_call(proj, script="scripts/peek.py", cwd="scripts",
                                                     path=("scripts", ".", "src")))
    assert call.text().split() == ["scripts", "True", "{"]


def test_a_second_run_sends_nothing_an_edit_one_blob_a_deletion_never_reappears(dispatcher: Any, proj: Path) -> None:
    task = dispatcher.script(TRAIN, "train.py")
    first = dispatcher.run(task, ("configs/a.json",), project=project_call(proj))
    again = dispatcher.run(task, ("configs/a.json",), project=project_call(proj))
    assert first.outcome.synced is not None and again.outcome.synced is None  # the host had the tree
    (proj / "configs" / "a.json").write_text(json.dumps({"data": "data/x.csv", "scale": 2}))
    edited = dispatcher.run(task, ("configs/a.json",), project=project_call(proj))
    assert edited.outcome.synced == (1, len((proj / "configs" / "a.json").read_bytes()))
    assert (edited.landed / "outputs" / "model.pt").read_bytes() == b"weights" * 2
    (proj / "data" / "x.csv").unlink()
    lister = dispatcher.script("import os\nprint(sorted(os.listdir('data')) if os.path.isdir('data') else 'none')\n",
                               "ls.py")
    gone = dispatcher.run(lister, project=project_call(proj, script=None))
    assert gone.text().strip() == "none"
    assert gone.outcome.synced == (0, 0)  # a tree of known blobs: only the manifest travelled


def test_a_run_that_rewrites_a_file_touches_neither_the_store_nor_the_next_run(dispatcher: Any, proj: Path) -> None:
    writer = dispatcher.script("open('data/x.csv', 'a').write('5,6\\n')\nos_ok = 1\n", "append.py")
    call = dispatcher.run(writer, project=project_call(proj, script=None))
    assert [path.name for path in call.outcome.files] == ["x.csv"]  # a changed file is an output
    assert (call.landed / "data" / "x.csv").read_text().endswith("5,6\n")
    reader = dispatcher.script("print(open('data/x.csv').read().count('\\n'))\n", "read.py")
    assert dispatcher.run(reader, project=project_call(proj, script=None)).text().strip() == "3"
    for blob in (_store(dispatcher) / "blobs").rglob("*"):
        if blob.is_file():
            assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name


def test_an_untouched_snapshot_serves_the_next_run_as_it_is(dispatcher: Any, proj: Path) -> None:
    reader = dispatcher.script("import os\nprint(open('data/x.csv').read().count('\\n'))\n", "read.py")
    project = project_call(proj, script=None)
    dispatcher.run(reader, project=project)
    pool = _store(dispatcher) / "snapshots" / "proj"
    [pooled] = list(pool.iterdir())
    inode = pooled.stat().st_ino
    probe = dispatcher.script("import os\nprint(os.stat(os.environ['RX_RUN_DIR']).st_ino)\n", "probe.py")
    assert int(dispatcher.run(probe, project=project).text()) == inode  # taken from the pool, not copied
    [pooled] = list(pool.iterdir())
    assert not (pooled / ".rx" / "stale").exists()  # nothing to undo: taken as it is
    assert dispatcher.run(reader, project=project).text().strip() == "3"


INODES = """\
import json, os
found = {}
for folder, dirs, files in os.walk("."):
    dirs[:] = [d for d in dirs if d not in (".rx", "__pycache__")]
    for name in files:
        path = os.path.normpath(os.path.join(folder, name))
        stat = os.stat(path)  # a file replaced may get the inode number its old self freed: mtime tells them apart
        found[path] = [[stat.st_ino, stat.st_mtime_ns], open(path, "rb").read().decode(errors="replace")[:20]]
print(json.dumps({"run_dir": os.stat(os.environ["RX_RUN_DIR"]).st_ino, "files": found}))
if os.environ.get("SCRIBBLE"):
    os.makedirs("outputs", exist_ok=True)
    open("outputs/model.pt", "w").write("weights")
    open("data/x.csv", "a").write("appended")
    os.remove("configs/a.json")
"""


def test_a_used_snapshot_is_brought_to_the_next_tree_touching_only_what_differs(dispatcher: Any, proj: Path) -> None:
    (proj / "snap.py").write_text(INODES)
    task = dispatcher.script(INODES, "snap.py")
    first = dispatcher.run(task, project=project_call(proj, script="snap.py"), env={"SCRIBBLE": "1"})
    assert sorted(str(p.relative_to(first.landed)) for p in first.outcome.files) == ["data/x.csv",
                                                                                       "outputs/model.pt"]
    before = json.loads(first.text())
    (proj / "train.py").write_text("# edited\n")
    (proj / "src" / "mylib" / "__init__.py").unlink()
    second = dispatcher.run(task, project=project_call(proj, script="snap.py"))
    after = json.loads(second.text())
    assert after["run_dir"] == before["run_dir"]  # the same snapshot, taken from the pool
    assert sorted(after["files"]) == ["configs/a.json", "data/x.csv", "pyproject.toml", "snap.py", "train.py"]
    assert after["files"]["data/x.csv"][1] == "a,b\n1,2\n3,4\n"  # the last run's change is undone
    assert after["files"]["train.py"][1] == "# edited\n"
    assert after["files"]["pyproject.toml"][0] == before["files"]["pyproject.toml"][0]  # untouched: kept
    assert after["files"]["train.py"][0] != before["files"]["train.py"][0]  # replaced (CI once saw its inode reused)


def test_a_damaged_blob_in_the_store_is_fetched_again(dispatcher: Any, proj: Path) -> None:
    reader = dispatcher.script("print(open('data/x.csv').read().count('\\n'))\n", "read.py")
    project = project_call(proj, script=None)
    dispatcher.run(reader, project=project)
    for snapshot in (_store(dispatcher) / "snapshots").rglob("*"):
        snapshot.chmod(0o700) if snapshot.is_dir() else None
    subprocess.run(["rm", "-rf", str(_store(dispatcher) / "snapshots")], check=True)
    digest = hashlib.sha256((proj / "data" / "x.csv").read_bytes()).hexdigest()
    blob = _store(dispatcher) / "blobs" / digest[:2] / digest
    blob.chmod(0o600)
    blob.write_bytes(b"")  # as a crash before the data reached the disk leaves it
    call = dispatcher.run(reader, project=project)
    assert call.text().strip() == "3", call.stderr.decode()
    assert call.outcome.synced is not None and call.outcome.synced[1] > 0
    assert blob.read_bytes() == (proj / "data" / "x.csv").read_bytes()


def test_links_modes_and_odd_names_survive_both_ways(dispatcher: Any, tmp_path: Path) -> None:
    root = tmp_path / "odd"
    (root / "with space").mkdir(parents=True)
    (root / "pyproject.toml").write_text("")
    (root / "with space" / "ü ni€\nline.txt").write_text("odd")
    (root / "run.sh").write_text("#!/bin/sh\necho ran\n")
    (root / "run.sh").chmod(0o755)
    os.symlink("with space", root / "alias")
    task = dispatcher.script(
        "import os, subprocess\n"
        "print(subprocess.run(['./run.sh'], capture_output=True, text=True).stdout.strip())\n"
        "print(os.readlink('alias'), repr(open('alias/ü ni€\\nline.txt').read()))\n"
        "open('out put ü\\n.txt', 'w').write('back')\n", "t.py")
    call = dispatcher.run(task, project=project_call(root, script=None))
    assert call.text().splitlines() == ["ran", "with space 'odd'"]
    assert (call.landed / "out put ü\n.txt").read_text() == "back"


def test_a_failed_and_a_timed_out_run_bring_back_what_they_wrote(dispatcher: Any, proj: Path) -> None:
    failing = dispatcher.script("open('ckpt.bin', 'wb').write(b'1')\nraise SystemExit(3)\n", "fail.py")
    failed = dispatcher.run(failing, project=project_call(proj, script=None))
    assert failed.result.exit_code == 3 and (failed.landed / "ckpt.bin").read_bytes() == b"1"
    slow = dispatcher.script("import time\nopen('ckpt.bin', 'wb').write(b'2')\ntime.sleep(60)\n", "slow.py")
    timed_out = dispatcher.run(slow, project=project_call(proj, script=None), timeout=1.5)
    assert timed_out.result.status == "timeout"
    assert (timed_out.landed / "ckpt.bin").read_bytes() == b"2"


def test_two_concurrent_runs_of_different_trees_each_see_their_own(dispatcher: Any, tmp_path: Path) -> None:
    roots = []
    for name in ("one", "two"):
        root = tmp_path / name
        root.mkdir()
        (root / "setup.py").write_text("")
        (root / "which.txt").write_text(name * 1000)
        roots.append(root)
    task = dispatcher.script("import time\ntime.sleep(0.5)\nprint(open('which.txt').read()[:3])\n", "w.py")
    results: dict[str, str] = {}

    def run(root: Path) -> None:
        results[root.name] = dispatcher.run(task, project=project_call(root, script=None)).text().strip()

    threads = [threading.Thread(target=run, args=(root,)) for root in roots]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == {"one": "one", "two": "two"}


def test_a_file_changed_while_it_is_sent_fails_the_run_with_its_name(dispatcher: Any, proj: Path) -> None:
    project = project_call(proj, script=None)
    (proj / "data" / "x.csv").write_text("changed after the scan\n")
    reader = dispatcher.script("print('ran')\n", "r.py")
    with pytest.raises(SyncError, match=r"data/x\.csv changed while it was sent"):
        dispatcher.run(reader, project=project)
    assert not (_store(dispatcher) / "trees" / project.tree.tree_id).exists()


def test_keep_warm_calls_run_in_the_snapshot_and_a_changed_tree_gets_a_new_worker(dispatcher: Any, proj: Path) -> None:
    from remote_exec.backends.local import LocalBackend
    from remote_exec.task import Task

    backend = LocalBackend()  # one host: its workers are reused
    import_probe = proj / "probe_mod.py"
    import_probe.write_text("import os\ndef where():\n    return os.path.relpath(__file__, os.environ['RX_RUN_DIR']), "
                            "os.getpid(), open('data/x.csv').read()\n")
    sys.path.insert(0, str(proj))
    try:
        import probe_mod

        task = Task.from_function(probe_mod.where)
        project = project_call(proj, script=None)
        first = dispatcher.run(task, project=project, keep_warm=True, backend=backend).result.value
        second = dispatcher.run(task, project=project, keep_warm=True, backend=backend).result.value
        (proj / "data" / "x.csv").write_text("new\n")
        third = dispatcher.run(task, project=project_call(proj, script=None), keep_warm=True,
                               backend=backend).result.value
    finally:
        sys.path.remove(str(proj))
        sys.modules.pop("probe_mod", None)
    assert first[0] == "probe_mod.py" and first[1] == second[1]  # one warm worker, from the snapshot
    assert third[1] != first[1] and third[2] == "new\n"


# -- the store, spoken to directly ----------------------------------------------------------------


def _runner(cache: Path) -> subprocess.Popen[bytes]:
    code = "import sys; from remote_exec.runner import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", code, str(cache), "sync"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})


def _conversation(cache: Path, proj: Path, blob_bytes: Any) -> tuple[int, bytes, list[bytes]]:
    """Speak the sync mode's side of a transfer by hand; ``blob_bytes(asked)`` gives the D bytes to send (None:
    close stdin there, as a killed coordinator does)."""
    tree = Project(ProjectSpec(root=proj.resolve())).scan()
    process = _runner(cache)
    assert process.stdin is not None and process.stdout is not None and process.stderr is not None
    process.stdin.write(wire.encode(b"G", wire.dump_options({"tree": tree.tree_id})))
    process.stdin.flush()
    reader = wire.FrameReader()
    kinds: list[bytes] = []
    wanted = bytearray()
    while True:
        data = os.read(process.stdout.fileno(), 65536)
        if not data:
            break
        for kind, payload in reader.feed(data):
            kinds.append(kind)
            if kind == b"T":
                process.stdin.write(wire.encode(b"M", tree.manifest)
                                    + wire.encode(b"m", wire.dump_options({"size": len(tree.manifest)})))
            elif kind == b"N":
                wanted += payload
            elif kind == b"n":
                asked = [bytes(wanted[i:i + 32]) for i in range(0, len(wanted), 32)]
                data_out = blob_bytes([tree.sources[digest] for digest in asked])
                if data_out is None:
                    process.stdin.close()
                    break
                process.stdin.write(wire.encode(b"D", data_out) + wire.encode(b"d", wire.dump_options({})))
            process.stdin.flush()
        else:
            continue
        break
    process.wait(30)
    stderr = process.stderr.read()
    for stream in (process.stdout, process.stderr):
        stream.close()
    if not process.stdin.closed:
        process.stdin.close()
    return process.returncode, stderr, kinds


def test_blobs_that_do_not_match_their_digest_are_never_stored(tmp_path: Path, proj: Path) -> None:
    def damaged(entries: list[Any]) -> bytes:
        data = b"".join(Path(entry.source).read_bytes() for entry in entries)
        return data[:-1] + bytes([data[-1] ^ 1])

    code, stderr, _ = _conversation(tmp_path / "cache", proj, damaged)
    assert code == 70 and b"arrived damaged" in stderr
    assert not list((tmp_path / "cache" / "trees").glob("*"))
    assert not list((tmp_path / "cache" / "tmp").iterdir())
    for blob in (tmp_path / "cache" / "blobs").rglob("*"):
        assert blob.is_dir() or hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name


def _fetch(cache: Path, proj: Path, later: list[Any] | None) -> tuple[str, Any, list[bytes]]:
    """ensure_tree over a pipe that holds the coordinator's side (the manifest, then every blob): the tree's
    id, the entries it returned and the kinds of the frames it sent."""
    from remote_exec.runner.store import Inbox, ensure_tree

    tree = Project(ProjectSpec(root=proj.resolve())).scan()
    blobs = b"".join(Path(tree.sources[entry[3]].source).read_bytes() for entry in wire.load_manifest(tree.manifest)
                     if entry[1] != wire.LINK_MODE)
    read_end, write_end = os.pipe()
    os.write(write_end, wire.encode(b"M", tree.manifest) + wire.encode(b"m", wire.dump_options({}))
             + wire.encode(b"D", blobs) + wire.encode(b"d", wire.dump_options({})))
    os.close(write_end)
    sent: list[bytes] = []
    try:
        entries = ensure_tree(str(cache), tree.tree_id, Inbox(read_end, wire.FrameReader(),
                                                              lambda kind, _: sent.append(kind)), later=later)
    finally:
        os.close(read_end)
    return tree.tree_id, entries, sent


def test_a_fetched_tree_is_made_durable_once_the_call_says_so(tmp_path: Path, proj: Path) -> None:
    """A call stores the manifest (after syncing the blobs) once its task started, not before."""
    from remote_exec.runner.store import load_tree, tree_path

    cache = tmp_path / "cache"
    later: list[Any] = []
    tree_id, entries, sent = _fetch(cache, proj, later)
    assert sent == [b"T", b"N", b"n"] and len(entries) == 5
    assert not Path(tree_path(str(cache), tree_id)).exists() and len(later) == 1  # the blobs, not the manifest
    assert len([blob for blob in (cache / "blobs").rglob("*") if blob.is_file()]) == 5
    later[0]()
    assert load_tree(str(cache), tree_id) == entries


def test_a_manifest_that_cannot_be_stored_later_leaves_the_call_alone(tmp_path: Path, proj: Path) -> None:
    from remote_exec.runner.store import load_tree

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "trees").write_text("a file where the manifests' folder goes")
    later: list[Any] = []
    tree_id, entries, _ = _fetch(cache, proj, later)
    later[0]()  # no error: the next call fetches the manifest again
    assert load_tree(str(cache), tree_id) is None
    (cache / "trees").unlink()
    assert _fetch(cache, proj, None)[2] == [b"T", b"n"]  # the manifest again, no blob asked for
    assert load_tree(str(cache), tree_id) == entries


def test_a_transfer_cut_short_leaves_nothing_a_later_run_trusts(tmp_path: Path, proj: Path) -> None:
    (proj / "data" / "big.bin").write_bytes(os.urandom(300_000))

    def half(entries: list[Any]) -> None:
        return None

    code, _, kinds = _conversation(tmp_path / "cache", proj, half)
    assert code == 0 and kinds[-1] == b"n"  # the coordinator went away: not the runner's failure
    assert not list((tmp_path / "cache" / "trees").glob("*"))
    assert not list((tmp_path / "cache" / "tmp").iterdir())
    code, stderr, kinds = _conversation(tmp_path / "cache", proj,
                                        lambda entries: b"".join(Path(e.source).read_bytes() for e in entries))
    assert code == 0, stderr
    assert kinds[-1] == b"P"  # "synced"
    assert len(list((tmp_path / "cache" / "trees").glob("*"))) == 1


def test_files_over_the_pull_limit_stay_on_the_host_and_are_named(dispatcher: Any, proj: Path) -> None:
    writer = dispatcher.script("open('small.txt', 'w').write('s')\nopen('big.bin', 'wb').write(b'b' * 5000)\n",
                               "w.py")
    call = dispatcher.run(writer, project=project_call(proj, script=None), pull_limit=1000)
    header = call.outcome.header
    assert [path.name for path in call.outcome.files] == ["small.txt"]
    assert header["over_limit"] == [{"path": "big.bin", "size": 5000}] and header["over_limit_count"] == 1
    kept = Path(header["kept"])
    assert (kept / "big.bin").read_bytes() == b"b" * 5000  # kept, with the whole snapshot, where it says
    (_store(dispatcher) / ".swept").unlink(missing_ok=True)
    sweep_runs(str(_store(dispatcher)))  # its runner has ended: the sweep of dead runners' leaves it
    assert (kept / "big.bin").is_file()


def test_a_snapshot_left_by_a_runner_that_died_is_swept(tmp_path: Path, proj: Path) -> None:
    cache = tmp_path / "cache"
    made = subprocess.run([sys.executable, "-c", "import sys\nfrom remote_exec.runner.rundir import new_run_path\n"
                           "print(new_run_path(sys.argv[1], {'run_id': 'r1'}))", str(cache)],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(made) / ".rx").mkdir(parents=True)
    (Path(made) / "train.py").write_text("x")
    removed = sweep_runs(str(cache))
    assert removed == [Path(made).name] and not Path(made).exists()


def test_stdin_that_comes_while_the_project_travels_reaches_the_task(dispatcher: Any, proj: Path) -> None:
    import io

    (proj / "data" / "big.bin").write_bytes(os.urandom(3 << 20))  # a transfer long enough to overlap
    reader = dispatcher.script("import sys\nprint(sys.stdin.read().upper(), end='')\n", "upper.py")
    call = dispatcher.run(reader, project=project_call(proj, script=None), stdin=io.BytesIO(b"hello\nworld\n"))
    assert call.outcome.synced is not None  # the tree travelled
    assert call.text() == "HELLO\nWORLD\n", call.stderr.decode()
