"""A writer killed with SIGKILL at random points never leaves a torn state.json or a partial final file."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import remote_exec
from remote_exec.workspace.state import StateFile
from remote_exec.workspace.store import Store

REPO = Path(remote_exec.__file__).resolve().parent.parent
ROUNDS = 30

# Every file it writes can be checked on its own: blobs are named by their sha256, and result.json and
# state.json embed the sha256 of their payload.
_WRITER = textwrap.dedent("""
    import hashlib, json, os, random, sys
    from pathlib import Path
    from remote_exec.workspace.state import StateFile
    from remote_exec.workspace.store import Store

    def sha(data):
        return hashlib.sha256(data).hexdigest()

    root = Path(sys.argv[1])
    store = Store(root)
    state = StateFile(root / "state.json")

    def bump(s):
        payload = os.urandom(random.randint(1, 64 * 1024)).hex()
        s["counter"] = s.get("counter", 0) + 1
        s["payload"], s["payload_sha"] = payload, sha(payload.encode())

    ready = False
    while True:
        state.update(bump)
        data = os.urandom(random.randint(1, 512 * 1024))
        store.write_bytes(f"files/{sha(data)}.bin", data)
        chunks = [os.urandom(64 * 1024) for _ in range(random.randint(1, 8))]
        store.write_stream(f"files/s/{sha(b''.join(chunks))}.bin", chunks)
        body = os.urandom(random.randint(1, 256 * 1024)).hex()
        store.write_bytes("result.json", json.dumps({"body": body, "sha": sha(body.encode())}).encode())
        if not ready:
            print("ready", flush=True)
            ready = True
""")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_final_files(root: Path) -> int:
    """Verify every file under its final name; return how many were checked (and delete the blobs)."""
    checked = 0
    for blob in sorted((root / "files").rglob("*.bin")):
        assert _sha(blob.read_bytes()) == blob.stem, f"partial or damaged file under final name: {blob}"
        blob.unlink()
        checked += 1
    result = root / "result.json"
    if result.exists():
        record = json.loads(result.read_text())
        assert _sha(record["body"].encode()) == record["sha"], "result.json is torn"
        checked += 1
    return checked


@pytest.mark.timeout(240)
def test_sigkill_at_random_points_leaves_only_whole_files(tmp_path: Path) -> None:
    root = tmp_path / "run"
    root.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rng = random.Random(os.environ.get("RX_TEST_SEED", time.time_ns()))
    last_counter = 0
    rounds_with_store_leftovers = rounds_with_state_leftovers = files_checked = 0
    started = time.perf_counter()
    for _ in range(ROUNDS):
        writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(root)], env=env,
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert writer.stdout is not None
            assert writer.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0, 0.2))
        finally:
            writer.send_signal(signal.SIGKILL)
            writer.wait(timeout=30)
            if writer.stdout is not None:
                writer.stdout.close()
        assert writer.returncode == -signal.SIGKILL

        # state.json is always whole, and never goes backwards.
        state = json.loads((root / "state.json").read_text())
        assert _sha(state["payload"].encode()) == state["payload_sha"]
        assert state["counter"] >= last_counter + 1
        last_counter = state["counter"]

        files_checked += _check_final_files(root)

        leftovers = [p for d in ("tmp", "new") for p in (root / ".store" / d).iterdir()]
        rounds_with_store_leftovers += bool(leftovers)
        # The next open sweeps the dead writer's temporaries.
        assert Store(root).temporaries() == []

        state_tmps = list(root.glob(".state.json.*.tmp"))
        rounds_with_state_leftovers += bool(state_tmps)
        StateFile(root / "state.json").update(lambda s: None)
        assert not list(root.glob(".state.json.*.tmp"))
    elapsed = time.perf_counter() - started
    print(f"\n{ROUNDS} SIGKILL rounds in {elapsed:.1f} s: {last_counter} state updates, "
          f"{files_checked} final files verified, store temporaries left in "
          f"{rounds_with_store_leftovers} rounds, state temporaries in {rounds_with_state_leftovers} "
          "rounds (all swept)")
