"""The host's garbage collector and the local cache's pruning: least recently used first above the limit,
anything unused for the days limit, never what a running run uses, at most once a day, under a lock."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from remote_exec.packing import prune_cache
from remote_exec.protocol import wire
from remote_exec.runner.gc import DAY, collect, maybe_collect
from remote_exec.runner.rundir import keep_for_pull_limit

NOW = time.time()


def _age(path: Path, days: float) -> None:
    stamp = NOW - days * DAY
    os.utime(path, (stamp, stamp))


def _blob(cache: Path, data: bytes, days: float = 0) -> bytes:
    digest = hashlib.sha256(data).digest()
    path = cache / "blobs" / digest.hex()[:2] / digest.hex()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    _age(path, days)
    return digest


def _tree(cache: Path, files: dict[str, bytes], used_days_ago: float) -> str:
    entries = [(name, 0o100644, len(data), _blob(cache, data, used_days_ago), "")
               for name, data in sorted(files.items())]
    tree_id = wire.tree_id(entries)
    path = cache / "trees" / tree_id
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(wire.dump_manifest(entries))
    _age(path, used_days_ago)
    return tree_id


def _left(cache: Path, folder: str) -> set[str]:
    return {path.name for path in (cache / folder).iterdir()} if (cache / folder).is_dir() else set()


def test_least_recently_used_trees_go_first_above_the_limit_shared_blobs_stay(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    shared = b"s" * 1000
    old = _tree(cache, {"a": b"a" * 4000, "shared": shared}, used_days_ago=3)
    middle = _tree(cache, {"b": b"b" * 4000}, used_days_ago=2)
    new = _tree(cache, {"c": b"c" * 4000, "shared": shared}, used_days_ago=1)
    report = collect(str(cache), limit=6000, days=30)
    assert _left(cache, "trees") == {new}
    assert {entry["name"].split("/")[-1] for entry in report["removed"] if entry["kind"] == "tree"} == {old, middle}
    kept_blobs = {path.name for path in (cache / "blobs").rglob("*") if path.is_file()}
    assert kept_blobs == {hashlib.sha256(b"c" * 4000).hexdigest(), hashlib.sha256(shared).hexdigest()}
    assert report["freed_bytes"] == 8000


def test_unused_for_days_goes_anyway_and_a_tree_used_this_hour_never(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    stale = _tree(cache, {"a": b"a"}, used_days_ago=40)
    fresh = _tree(cache, {"b": b"b" * 5000}, used_days_ago=0)  # over the limit, but in use right now
    collect(str(cache), limit=10, days=30)
    assert _left(cache, "trees") == {fresh}
    assert stale not in _left(cache, "trees")


def test_a_tree_a_queued_or_running_job_will_run_in_is_kept_however_old(tmp_path: Path) -> None:
    # A Slurm job may wait in the queue for days: its run directory names the tree its runner makes the
    # snapshot of when the job starts; the collector must leave that tree (and its blobs) alone.
    cache = tmp_path / "cache"
    queued = _tree(cache, {"a": b"a" * 4000}, used_days_ago=40)
    running = _tree(cache, {"b": b"b" * 4000}, used_days_ago=40)
    ended = _tree(cache, {"c": b"c" * 4000}, used_days_ago=40)
    for name, tree, state in (("q", queued, "queued"), ("r", running, "running"), ("d", ended, "done")):
        private = cache / "runs" / name / ".rx"
        private.mkdir(parents=True)
        (private / "status.json").write_text(json.dumps({"state": state, "tree": tree}))
    collect(str(cache), limit=10, days=30)
    assert _left(cache, "trees") == {queued, running}
    kept_blobs = {path.name for path in (cache / "blobs").rglob("*") if path.is_file()}
    assert kept_blobs == {hashlib.sha256(b"a" * 4000).hexdigest(), hashlib.sha256(b"b" * 4000).hexdigest()}


def test_dry_run_removes_nothing_and_says_what_would_go(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    stale = _tree(cache, {"a": b"a"}, used_days_ago=40)
    report = collect(str(cache), limit=10, days=30, dry_run=True)
    assert report["dry_run"] and [entry["kind"] for entry in report["removed"]] == ["tree", "blob"]
    assert _left(cache, "trees") == {stale}


def test_an_archive_a_live_process_uses_is_kept_however_old(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    used, unused = "a" * 64, "b" * 64
    for name in (used, unused):
        (cache / "archives" / name / "remote_exec").mkdir(parents=True)
        (cache / "archives" / name / "remote_exec" / "x.py").write_text("x" * 100)
        _age(cache / "archives" / name, 40)
    # As the bootstrap starts a runner: python -c BOOTSTRAP <archive sha256> <workdir> <mode>.
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", used, str(cache), "serve"])
    try:
        deadline = time.monotonic() + 10
        while used.encode() not in Path(f"/proc/{live.pid}/cmdline").read_bytes() and time.monotonic() < deadline:
            time.sleep(0.01)  # until the child has exec'd (before, its command line is ours)
        collect(str(cache), limit=10, days=30)
    finally:
        live.kill()
        live.wait()
    assert _left(cache, "archives") == {used}


def test_a_run_directory_kept_by_the_pull_limit_goes_after_days_unless_held(tmp_path: Path) -> None:
    """Files over the pull limit stay on the host in their run directory (the sweep of dead runners'
    directories leaves it alone); the collector removes it once unused for ``days``, never while held.
    Other run directories are the sweep's, not the collector's."""
    cache = tmp_path / "cache"
    for name in ("held", "abandoned", "young", "other"):
        (cache / "runs" / name / ".rx").mkdir(parents=True)
        (cache / "runs" / name / ".rx" / "lock").write_text("")
        if name != "other":
            keep_for_pull_limit(str(cache / "runs" / name))
    lock = os.open(cache / "runs" / "held" / ".rx" / "lock", os.O_RDONLY)
    fcntl.flock(lock, fcntl.LOCK_SH)
    try:
        for name in ("held", "abandoned", "other"):
            _age(cache / "runs" / name / ".rx", 40)
        collect(str(cache), limit=1 << 30, days=30)
    finally:
        os.close(lock)
    assert _left(cache, "runs") == {"held", "young", "other"}


def test_a_job_or_detached_run_nobody_collected_goes_after_days_and_frees_its_tree(tmp_path: Path) -> None:
    """A job's run directory (or a detached run's) that nobody collects (its coordinator gone, no rx attach)
    stayed for ever, and kept the tree its job was to run in; once untouched for ``days`` it goes, never
    while it runs or is held (seen failing: both stayed)."""
    cache = tmp_path / "cache"
    tree = _tree(cache, {"a": b"a" * 100}, used_days_ago=40)
    runs = {"queued-old": {"state": "queued", "queued": 1.0, "tree": tree},
            "done-old": {"state": "done", "detached": True},
            "done-young": {"state": "done", "queued": 1.0},
            "running-old": {"state": "running", "queued": 1.0, "tree": tree},
            "attached-old": {"state": "done"}}  # a plain call's: the sweep's, not the collector's
    for name, status in runs.items():
        private = cache / "runs" / name / ".rx"
        private.mkdir(parents=True)
        (private / "status.json").write_text(json.dumps(status))
        if name.endswith("-old"):
            _age(private / "status.json", 40)
            _age(private, 40)
    collect(str(cache), limit=1 << 30, days=30)
    assert _left(cache, "runs") == {"done-young", "running-old", "attached-old"}
    assert _left(cache, "trees") == {tree}  # the running job still names it
    (cache / "runs" / "running-old" / ".rx" / "status.json").write_text(json.dumps({"state": "done", "queued": 1.0}))
    _age(cache / "runs" / "running-old" / ".rx" / "status.json", 40)
    _age(cache / "runs" / "running-old" / ".rx", 40)
    collect(str(cache), limit=1 << 30, days=30)
    assert _left(cache, "runs") == {"done-young", "attached-old"} and _left(cache, "trees") == set()


def test_leftovers_of_interrupted_transfers_go_after_a_day(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    (cache / "tmp").mkdir(parents=True)
    (cache / "tmp" / "old.part").write_bytes(b"x")
    _age(cache / "tmp" / "old.part", 2)
    (cache / "tmp" / "new.part").write_bytes(b"x")  # a transfer may be going on
    orphan = _blob(cache, b"named by no tree", days=2)
    recent = _blob(cache, b"not named yet", days=0)
    collect(str(cache), limit=1 << 30, days=30)
    assert _left(cache, "tmp") == {"new.part"}
    blobs = {path.name for path in (cache / "blobs").rglob("*") if path.is_file()}
    assert blobs == {recent.hex()} and orphan.hex() not in blobs


def test_a_second_collector_finds_the_lock_taken(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    lock = os.open(cache / "gc.lock", os.O_WRONLY | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        assert collect(str(cache), limit=0, days=0)["busy"] is True
    finally:
        os.close(lock)


def test_collection_starts_in_the_background_at_most_once_a_day(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    stale = _tree(cache, {"a": b"a"}, used_days_ago=40)
    options = {"gc": [10 << 30, 30.0]}
    maybe_collect(str(cache), options)  # a new cache: the clock starts
    assert (cache / "gc.stamp").exists() and _left(cache, "trees") == {stale}
    maybe_collect(str(cache), options)  # not a day yet
    assert _left(cache, "trees") == {stale}
    _age(cache / "gc.stamp", 2)
    maybe_collect(str(cache), options)
    deadline = time.monotonic() + 20
    while stale in _left(cache, "trees") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _left(cache, "trees") == set()
    assert time.time() - (cache / "gc.stamp").stat().st_mtime < 60


@pytest.mark.parametrize("dry_run", [False, True])
def test_the_local_archive_cache_is_pruned_the_same_way(tmp_path: Path, dry_run: bool) -> None:
    archives = tmp_path / "cache" / "archives"
    archives.mkdir(parents=True)
    for name, days in (("old.pyz", 40), ("lru.pyz", 2), ("new.pyz", 0)):
        (archives / name).write_bytes(b"x" * 1000)
        _age(archives / name, days)
    (archives / ".half.123.tmp").write_bytes(b"x")
    _age(archives / ".half.123.tmp", 2)
    report = prune_cache(1500, 30, cache_dir=archives, dry_run=dry_run)
    assert {entry["name"] for entry in report["removed"]} == {"old.pyz", "lru.pyz", ".half.123.tmp"}
    expected = {"old.pyz", "lru.pyz", "new.pyz", ".half.123.tmp"} if dry_run else {"new.pyz"}
    assert {path.name for path in archives.iterdir()} == expected


def test_pooled_snapshots_go_least_recently_used_first(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    for name, days in (("old", 3), ("new", 1)):
        snapshot = cache / "snapshots" / "proj" / name
        (snapshot / "data").mkdir(parents=True)
        (snapshot / "data" / "x.bin").write_bytes(b"x" * 3000)
        _age(snapshot, days)
    report = collect(str(cache), limit=4000, days=30)
    assert _left(cache, "snapshots/proj") == {"new"}
    assert [entry["kind"] for entry in report["removed"]] == ["snapshot"]


def test_rx_gc_without_a_host_prunes_this_machines_cache(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    (cache / "archives").mkdir(parents=True)
    (cache / "archives" / "old.pyz").write_bytes(b"x" * 100)
    _age(cache / "archives" / "old.pyz", 40)
    env = {**os.environ, "RX_CACHE_DIR": str(cache), "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    shown = subprocess.run([sys.executable, "-m", "remote_exec", "gc", "--dry-run"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=60, check=False)
    done = subprocess.run([sys.executable, "-m", "remote_exec", "gc", "--json"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert shown.returncode == 0 and "would free 100 B in 1 item(s)" in shown.stderr, shown.stderr
    assert done.returncode == 0, done.stderr
    assert [entry["name"] for entry in json.loads(done.stdout)[0]["removed"]] == ["old.pyz"]
    assert not (cache / "archives" / "old.pyz").exists()


def _env(cache: Path, key: str, size: int, days: float) -> Path:
    path = cache / "envs" / key
    (path / "bin").mkdir(parents=True)
    (path / "lib.so").write_bytes(b"e" * size)
    (path / ".rx-complete").write_text("{}")
    _age(path / ".rx-complete", days)
    return path


def test_environments_go_least_recently_used_above_the_limit_never_one_in_use(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    old, used, recent = "a" * 64, "b" * 64, "c" * 64
    _env(cache, old, 5000, 3)
    busy = _env(cache, used, 5000, 4)
    _env(cache, recent, 5000, 0.5)
    (cache / "envs" / f"{recent}.tmp-99999").mkdir()
    _age(cache / "envs" / f"{recent}.tmp-99999", 2)
    python = busy / "bin" / "python"
    python.symlink_to(sys.executable)
    # A task runs from the environment: its interpreter's path is on its command line.
    live = subprocess.Popen([str(python), "-c", "import time; time.sleep(30)"])
    try:
        deadline = time.monotonic() + 10
        while b"/envs/" not in Path(f"/proc/{live.pid}/cmdline").read_bytes() and time.monotonic() < deadline:
            time.sleep(0.01)
        report = collect(str(cache), limit=11000, days=30)
    finally:
        live.kill()
        live.wait()
    assert _left(cache, "envs") == {used, recent}
    assert {entry["kind"] for entry in report["removed"]} == {"env", "temporary"}


def test_rx_gc_without_a_host_collects_the_store_of_this_machines_local_runs(tmp_path: Path) -> None:
    # rx run without --remote stores its project trees and snapshots under the cache's local/ workdir;
    # rx gc used to prune only the archives there (seen failing: the 40-day-old tree stayed).
    cache = tmp_path / "cache"
    local = cache / "local"
    stale = _tree(local, {"a": b"a" * 100}, used_days_ago=40)
    fresh = _tree(local, {"b": b"b" * 100}, used_days_ago=0)
    env = {**os.environ, "RX_CACHE_DIR": str(cache), "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    shown = subprocess.run([sys.executable, "-m", "remote_exec", "gc", "--dry-run"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=60, check=False)
    done = subprocess.run([sys.executable, "-m", "remote_exec", "gc", "--json"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert shown.returncode == 0 and "this machine's local runs: would free 100 B in 2 item(s)" in shown.stderr, \
        shown.stderr
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)[1]
    assert report["host"] == "local" and [entry["kind"] for entry in report["removed"]] == ["tree", "blob"]
    assert _left(local, "trees") == {fresh} and stale not in _left(local, "trees")
