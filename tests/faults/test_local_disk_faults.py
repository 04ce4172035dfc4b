"""Local disk full while collecting: one clear line, the run recorded as failed to collect, the result kept on
the host, and ``rx attach RUN`` collects it once there is room.

The workspace (where a result's files are spooled, and, in one variant, the temporary directory too) is a
small tmpfs this module mounts (the tests run as root) and removes afterwards; the task leaves an 8 MiB file.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from faultkit import (
    SCENARIOS,
    Rig,
    TrialFactory,
    audit_remote,
    cli_error_lines,
    error_summary,
    has_traceback,
    remote_baseline,
    traceback_message,
)

from testbed import TestbedHost

HOST = "rx-testbed-1"

SCENARIOS.update({
    "local_disk_full": {
        "class": "local disk full",
        "title": "Local disk full while collecting",
        "fault": "the workspace is a 2 MiB tmpfs, where a result's files are spooled and landed (in one variant "
                 "TMPDIR is on it too); the task leaves an 8 MiB file",
        "expect": "exit 3 with one error line saying the local disk is full and 'rx attach RUN'; the run failed "
                  "(collect_failed), nothing of the result in files/; after the disk grows, rx attach collects "
                  "it whole (exit 0, run finished); nothing left on the remote after that",
    },
})

BIG = """\
import hashlib
data = bytes(range(1, 256)) * (8 * 4112)
with open("big.bin", "wb") as stream:
    stream.write(data)
print("sha256", hashlib.sha256(data).hexdigest(), flush=True)
"""


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs, unmounted at the end."""
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True, timeout=30)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, timeout=30)


def _landed(workspace: Path, run_id: str) -> list[Path]:
    files = workspace / "runs" / run_id / "files"
    return sorted(path for path in files.rglob("*") if path.is_file()) if files.is_dir() else []


@pytest.mark.timeout(180)
@pytest.mark.parametrize("spool", ["TMPDIR elsewhere", "TMPDIR on the full disk"])
def test_local_disk_full_is_one_line_and_attach_collects_later(rig: Rig, testbed_host: TestbedHost, small_disk: Path,
                                                               trial: TrialFactory, spool: str) -> None:
    rig.write("big.py", BIG)
    workspace = small_disk / "ws"
    env = {"RX_WORKSPACE": str(workspace)}
    if spool == "TMPDIR on the full disk":
        (small_disk / "tmp").mkdir()
        env["TMPDIR"] = str(small_disk / "tmp")
    baseline = remote_baseline(testbed_host)

    with trial("local_disk_full", variant=spool, bound=30.0) as t:
        done = rig.rx("run", "--remote", HOST, "big.py", timeout=60, env=env)
        t.timed(done.seconds, hang=done.timed_out)
        run_ids = sorted(path.name for path in (workspace / "runs").iterdir() if (path / "state.json").is_file())
        shown = rig.rx("show", run_ids[-1], "--json", env=env)
        info = json.loads(shown.stdout) if shown.returncode == 0 else {}
        landed_at_failure = _landed(workspace, run_ids[-1])
        subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True, timeout=30)
        again = rig.rx("attach", run_ids[-1], timeout=60, env=env)
        digest = next((line.split()[1] for line in done.stdout.splitlines() if line.startswith("sha256 ")), None)
        landed = _landed(workspace, run_ids[-1])
        after = json.loads(rig.rx("show", run_ids[-1], "--json", env=env).stdout)
        t.outcome = (f"exit {done.returncode}: {error_summary(done.stderr)}; then attach exit {again.returncode}, "
                     f"run {after.get('status')}")
        intact = [path for path in landed if hashlib.sha256(path.read_bytes()).hexdigest() == digest]
        t.note(traceback=has_traceback(done.stderr), lost=int(len(intact) != 1),
               landed_at_failure=len(landed_at_failure))
        left = audit_remote(testbed_host, baseline)
        t.audit(left)

        assert done.returncode == 3, done.stderr
        errors = cli_error_lines(done.stderr)
        assert len(errors) == 1 and "local disk is full" in errors[0], done.stderr
        assert f"rx attach {run_ids[-1]}" in errors[0], errors
        assert not has_traceback(done.stderr), traceback_message(done.stderr)
        assert (info.get("status"), info.get("collect_failed")) == ("failed", True), info
        assert landed_at_failure == [], landed_at_failure
        assert again.returncode == 0, again.stderr
        assert [path.name for path in landed] == ["big.bin"] and intact, landed
        assert after["status"] == "finished" and not after.get("collect_failed"), after
        assert left.clean, left.describe()
