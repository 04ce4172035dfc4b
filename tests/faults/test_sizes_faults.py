"""Unbounded sizes: what a run produces may be huge; the coordinator's disk and memory must not be.

A 1 GiB sparse file the task leaves travels (as zeros) and lands sparse; a task that prints more than the
log cap leaves a ``stdout.log`` of the cap's size holding the tail, its head's size noted (the terminal
still gets every byte).
"""

from __future__ import annotations

import os

import pytest
from faultkit import SCENARIOS, Rig, TrialFactory, audit_remote, error_summary, has_traceback, remote_baseline

from testbed import TestbedHost

HOST = "rx-testbed-1"

SCENARIOS.update({
    "sizes": {
        "class": "unbounded sizes",
        "title": "Huge outputs",
        "fault": "the task leaves a 1 GiB sparse file; or it prints 12 MiB with [tool.rx] log_cap = '4MiB'",
        "expect": "the file lands whole (1 GiB, its sha256 checked) and sparse (under 1 MiB of disk), no more "
                  "than 1 MiB of spool on disk meanwhile; stdout.log keeps the last 4 MiB after a note of the "
                  "head's size, the terminal gets all 12 MiB; exit 0 and nothing left on the remote",
    },
})

SPARSE = """\
with open("sparse.bin", "wb") as stream:
    stream.truncate(1 << 30)
print("made", flush=True)
"""

CHATTY = """\
import sys
for index in range(12 * 1024):
    sys.stdout.write(f"{index:07d} " + "y" * 1015 + "\\n")
print("done", flush=True)
"""


@pytest.mark.timeout(180)
def test_sizes_a_sparse_gigabyte_lands_sparse(rig: Rig, testbed_host: TestbedHost, trial: TrialFactory) -> None:
    rig.write("sparse.py", SPARSE)
    baseline = remote_baseline(testbed_host)

    with trial("sizes", variant="1 GiB sparse file", bound=120.0) as t:
        done = rig.rx("run", "--remote", HOST, "sparse.py", timeout=150)
        t.timed(done.seconds, hang=done.timed_out)
        landed = rig.workspace / "runs" / rig.run_ids()[-1] / "files" / "sparse.bin"
        stat = landed.stat() if landed.exists() else None
        disk = stat.st_blocks * 512 if stat else None
        t.outcome = f"exit {done.returncode}: {error_summary(done.stderr)}; landed {stat.st_size if stat else None} " \
                    f"bytes using {disk} bytes of disk"
        t.note(traceback=has_traceback(done.stderr), lost=int(stat is None or stat.st_size != 1 << 30),
               disk_bytes=disk)
        left = audit_remote(testbed_host, baseline)
        t.audit(left)

        assert done.returncode == 0, done.stderr
        assert stat is not None and stat.st_size == 1 << 30, stat
        assert disk is not None and disk < (1 << 20), disk
        with open(landed, "rb") as stream:
            assert stream.read(1 << 20) == bytes(1 << 20)
        assert left.clean, left.describe()


@pytest.mark.timeout(120)
def test_sizes_stdout_log_keeps_its_tail(rig: Rig, testbed_host: TestbedHost, trial: TrialFactory) -> None:
    rig.write("chatty.py", CHATTY)
    rig.write("pyproject.toml", '[tool.rx]\nlog_cap = "4MiB"\n')
    baseline = remote_baseline(testbed_host)

    with trial("sizes", variant="12 MiB printed, log_cap 4 MiB", bound=60.0) as t:
        done = rig.rx("run", "--remote", HOST, "chatty.py", timeout=90)
        t.timed(done.seconds, hang=done.timed_out)
        log = (rig.workspace / "runs" / rig.run_ids()[-1] / "stdout.log").read_bytes()
        head, _, tail = log.partition(b"\n")
        t.outcome = f"exit {done.returncode}; terminal {len(done.stdout)} chars, stdout.log {len(log)} bytes: " \
                    f"{head.decode(errors='replace')[:120]}"
        t.note(traceback=has_traceback(done.stderr), log_bytes=len(log))
        left = audit_remote(testbed_host, baseline)
        t.audit(left)
        printed = 12 * 1024 * 1024 + len("done\n")

        assert done.returncode == 0, done.stderr
        assert len(done.stdout) == printed  # the terminal gets every byte
        assert len(tail) == 4 << 20, len(tail)
        assert tail.endswith(b"done\n") and tail.startswith(b"92 yyy"), tail[:40]  # line 0008192, cut
        assert head.startswith(b"[rx: ") and str(printed - (4 << 20)).encode() in head, head
        assert os.path.getsize(rig.workspace / "runs" / rig.run_ids()[-1] / "stdout.log") < (4 << 20) + 200
        assert left.clean, left.describe()
