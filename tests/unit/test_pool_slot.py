"""A pool slot on the host (:mod:`remote_exec.runner.slot`) and the testbed's fake ``nvidia-smi`` it reads.

The fake must print what the real tool prints, field for field (the parsers are tested against samples
of the real tool's output too); a GPU is held by one worker at a time and freed when that worker dies;
a GPU used by a process rx did not start counts as taken.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from remote_exec.runner import slot

REPO = Path(__file__).resolve().parents[2]
FAKE = REPO / "testbed" / "image" / "nvidia-smi"

# What the real nvidia-smi prints (A100 node, driver 550), for the parsers.
REAL_GPUS = """\
0, GPU-4c395b7a-a7e6-d90f-1ced-d96e8dd68288, 0, 81920, 0
1, GPU-f4f5db98-143f-0a8d-47ce-956fab39a736, 58071, 81920, 100
2, GPU-28780eb0-24d5-1f13-59b8-ae5c23617a72, [N/A], 81920, [Not Supported]
"""
REAL_APPS = """\
3858903, GPU-f4f5db98-143f-0a8d-47ce-956fab39a736, 6265, VLLM::EngineCore
44966, GPU-f4f5db98-143f-0a8d-47ce-956fab39a736, 974, /opt/tritonserver/backends/python/stub, with a comma
"""


@pytest.fixture
def gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The fake nvidia-smi on PATH, reading ``gpus.json`` (written by the test)."""
    monkeypatch.setenv("PATH", f"{FAKE.parent}{os.pathsep}{os.environ['PATH']}")
    config = tmp_path / "gpus.json"
    monkeypatch.setenv("RX_FAKE_GPUS", str(config))
    return config


def fake(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(FAKE), *args], capture_output=True, text=True, timeout=30, check=False)


def write(config: Path, count: int, processes: list[dict[str, Any]] | None = None) -> None:
    config.write_text(json.dumps({"gpus": [{} for _ in range(count)], "processes": processes or []}))


def test_the_parsers_read_the_real_tools_output() -> None:
    found = slot.parse_gpus(REAL_GPUS)
    assert [gpu["index"] for gpu in found] == [0, 1, 2]
    assert found[1] == {"index": 1, "uuid": "GPU-f4f5db98-143f-0a8d-47ce-956fab39a736", "memory_used": 58071,
                        "memory_total": 81920, "utilization": 100}
    assert found[2]["memory_used"] is None and found[2]["utilization"] is None
    apps = slot.parse_apps(REAL_APPS)
    assert [app["pid"] for app in apps] == [3858903, 44966]
    assert apps[1]["name"] == "/opt/tritonserver/backends/python/stub, with a comma"
    assert slot.parse_gpus("") == [] and slot.parse_apps("") == []


def test_the_fake_prints_what_the_real_tool_prints(gpus: Path) -> None:
    foreign = subprocess.Popen(["sleep", "30"])
    try:
        gpus.write_text(json.dumps({"gpus": [{}, {"memory_used": 100, "utilization": 37}],
                                    "processes": [{"gpu": 1, "pid": foreign.pid, "used_memory": 2048},
                                                  {"gpu": 0, "pid": 999_999_999, "used_memory": 1}]}))
        with_units = fake("--query-gpu=index,uuid,memory.used,memory.total,utilization.gpu", "--format=csv")
        apps = fake("--query-compute-apps=pid,process_name,used_memory,gpu_uuid", "--format=csv")
        bare = fake(*slot.GPU_QUERY)
        bare_apps = fake(*slot.APP_QUERY)
    finally:
        foreign.kill()
        foreign.wait()
    lines = with_units.stdout.splitlines()
    assert lines[0] == "index, uuid, memory.used [MiB], memory.total [MiB], utilization.gpu [%]"
    assert lines[2].startswith("1, GPU-") and lines[2].endswith(", 2148 MiB, 40960 MiB, 37 %")
    assert apps.stdout.splitlines()[0] == "pid, process_name, used_gpu_memory [MiB], gpu_uuid"
    assert len(apps.stdout.splitlines()) == 2  # a process that ended is not listed
    assert apps.stdout.splitlines()[1].startswith(f"{foreign.pid}, python3, 2048 MiB, GPU-")
    parsed = slot.parse_gpus(bare.stdout)
    assert [(g["index"], g["memory_used"], g["utilization"]) for g in parsed] == [(0, 0, 0), (1, 2148, 37)]
    assert [app["gpu_uuid"] for app in slot.parse_apps(bare_apps.stdout)] == [parsed[1]["uuid"]]
    unknown = fake("--query-gpu=index,bogus", "--format=csv")
    assert unknown.returncode == 2 and 'Field "bogus" is not a valid field to query.' in unknown.stdout
    gpus.unlink()
    no_driver = fake("--query-gpu=index", "--format=csv")
    assert no_driver.returncode == 9 and "couldn't communicate with the NVIDIA driver" in no_driver.stdout


def never(event: dict[str, Any]) -> None:
    raise AssertionError(f"waited: {event}")


def test_two_workers_never_hold_one_gpu(gpus: Path, tmp_path: Path) -> None:
    write(gpus, 2)
    first = slot.take_slot(str(tmp_path), {"gpus": 1, "owner": {"slot": "a#0"}}, never)
    second = slot.take_slot(str(tmp_path), {"gpus": 1, "owner": {"slot": "b#0"}}, never)
    assert {first.visible_devices(), second.visible_devices()} == {"0", "1"}
    events: list[dict[str, Any]] = []

    def give_up(event: dict[str, Any]) -> None:
        events.append(event)
        raise TimeoutError

    with pytest.raises(TimeoutError):
        slot.take_slot(str(tmp_path), {"gpus": 1, "owner": {"slot": "c#0"}}, give_up)
    assert "held by rx (a#0" in events[0]["busy"]["0"] or "held by rx (a#0" in events[0]["busy"]["1"]
    first.release()
    third = slot.take_slot(str(tmp_path), {"gpus": 1, "owner": {"slot": "c#0"}}, never)
    assert third.visible_devices() == first.visible_devices()
    for held in (second, third):
        held.release()


def test_a_gpu_is_free_again_when_its_worker_dies(gpus: Path, tmp_path: Path) -> None:
    write(gpus, 1)
    script = ("import sys, time\nfrom remote_exec.runner import slot\n"
              f"slot.take_slot({str(tmp_path)!r}, {{'gpus': 1, 'owner': {{'slot': 'x#0'}}}}, None)\n"
              "print('held', flush=True)\ntime.sleep(60)\n")
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}) as holder:
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
            probe = slot.probe(str(tmp_path))
            assert [lock["owner"]["slot"] for lock in probe["locks"] if lock["kind"] == "gpu"] == ["x#0"]
            os.kill(holder.pid, signal.SIGKILL)  # no cleanup runs: the kernel drops the flock
            holder.wait()
            held = slot.take_slot(str(tmp_path), {"gpus": 1}, never)
            assert held.visible_devices() == "0"
            held.release()
        finally:
            holder.kill()
    left = slot.probe(str(tmp_path))["locks"]
    assert left == []  # nothing held; the dead worker's own lock file is gone too
    assert not [name for name in os.listdir(tmp_path / "locks") if name.startswith("worker-")]


def test_a_gpu_a_foreign_process_uses_counts_as_taken(gpus: Path, tmp_path: Path) -> None:
    foreign = subprocess.Popen(["sleep", "30"])
    try:
        write(gpus, 2, [{"gpu": 0, "pid": foreign.pid, "used_memory": 1024}])
        held = slot.take_slot(str(tmp_path), {"gpus": 1}, never)
        assert held.visible_devices() == "1"
        events: list[dict[str, Any]] = []

        def wait(event: dict[str, Any]) -> None:
            events.append(event)
            if len(events) == 2:
                foreign.kill()
                foreign.wait()

        other = slot.take_slot(str(tmp_path), {"gpus": 1, "interval": 0.01}, wait)
        assert other.visible_devices() == "0"  # free once the foreign process ended
        assert f"rx did not start (pid {foreign.pid}; 1024 MiB)" in events[0]["busy"]["0"]
        lenient = {"gpus": 1, "foreign_mib": 2048}
        other.release()
        foreign2 = subprocess.Popen(["sleep", "30"])
        write(gpus, 2, [{"gpu": 0, "pid": foreign2.pid, "used_memory": 1024}])
        try:
            assert slot.take_slot(str(tmp_path), lenient, never).visible_devices() == "0"
        finally:
            foreign2.kill()
            foreign2.wait()
        held.release()
    finally:
        foreign.kill()
        foreign.wait()


def test_a_slot_that_can_never_be_had_says_why(gpus: Path, tmp_path: Path) -> None:
    write(gpus, 1)
    with pytest.raises(slot.SlotError, match="has 1 GPU"):
        slot.take_slot(str(tmp_path), {"gpus": 2}, never)
    gpus.unlink()
    with pytest.raises(slot.SlotError, match="nvidia-smi is missing or failed"):
        slot.take_slot(str(tmp_path), {"gpus": 1}, never)
    assert slot.take_slot(str(tmp_path), {"gpus": 0}, never).gpus == []  # a CPU slot needs no GPU


def test_probe_reports_gpus_locks_and_memory(gpus: Path, tmp_path: Path) -> None:
    write(gpus, 2)
    held = slot.take_slot(str(tmp_path), {"gpus": 1, "owner": {"slot": "s#0", "workspace": "/w"}}, never)
    try:
        facts = slot.probe(str(tmp_path))
    finally:
        held.release()
    assert len(facts["gpus"]) == 2 and facts["memory"]["total"] > 0
    kinds = sorted(lock["kind"] for lock in facts["locks"])
    assert kinds == ["gpu", "worker"]
    worker = next(lock for lock in facts["locks"] if lock["kind"] == "worker")
    assert worker["owner"] == {"slot": "s#0", "workspace": "/w"} and worker["gpus"] == [held.gpus[0]["index"]]


def test_a_dead_workers_run_directory_is_swept_by_the_next_worker(gpus: Path, tmp_path: Path) -> None:
    write(gpus, 0)
    run_dir = tmp_path / "runs" / "run-1234abcd"
    run_dir.mkdir(parents=True)
    (run_dir / "half-written.bin").write_bytes(b"x")
    script = ("import time\nfrom remote_exec.runner import slot\n"
              f"held = slot.take_slot({str(tmp_path)!r}, {{'gpus': 0}}, None)\n"
              f"held.note_run_dir({str(run_dir)!r})\nprint('held', flush=True)\ntime.sleep(60)\n")
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}) as worker:
        try:
            assert worker.stdout is not None and worker.stdout.readline().strip() == "held"
            assert slot.sweep_dead_workers(str(tmp_path)) == 0 and run_dir.exists()  # alive: left alone
            os.kill(worker.pid, signal.SIGKILL)  # it cleans nothing up
            worker.wait()
        finally:
            worker.kill()
    assert run_dir.exists()
    held = slot.take_slot(str(tmp_path), {"gpus": 0}, never)  # the next worker of the account
    held.release()
    assert not run_dir.exists()
    assert [name for name in os.listdir(tmp_path / "locks") if name.startswith("worker-")] == []
