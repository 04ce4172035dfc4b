"""Faults while a project's tree travels: rx killed mid-transfer (then the same run again), and a remote disk
that fills up. Whatever happens, the host never trusts a tree or blob that did not arrive whole and checked."""

from __future__ import annotations

import hashlib
import os
import signal
import time
from collections.abc import Callable

import pytest
from faultkit import (
    REMOTE_CACHE,
    Rig,
    TrialFactory,
    audit_remote,
    error_summary,
    has_traceback,
    remote_baseline,
    root_sh,
)

from testbed import TestbedHost, exec_root

READ_BIG = """\
import hashlib
print(hashlib.sha256(open("data/big.bin", "rb").read()).hexdigest())
"""


def _store(host: TestbedHost, workdir: str) -> dict[str, list[str]]:
    """The store's trees, blobs (with their sha256 as found) and temporaries."""
    code, output = exec_root(host, f"cd {workdir} 2>/dev/null && for d in trees tmp; do echo @@$d; "
                                   f"ls -A1 $d 2>/dev/null; done; echo @@blobs; "
                                   f"find blobs -type f -exec sha256sum {{}} + 2>/dev/null; true")
    assert code == 0, output
    found: dict[str, list[str]] = {"trees": [], "tmp": [], "blobs": []}
    current = None
    for line in output.splitlines():
        if line.startswith("@@"):
            current = line[2:]
        elif current and line.strip():
            found[current].append(line.strip())
    return found


def _damaged(blobs: list[str]) -> list[str]:
    """Blobs whose content does not hash to their name (``sha256sum`` lines)."""
    return [line for line in blobs if line.split()[0] != line.split()[-1].rsplit("/", 1)[-1]]


@pytest.mark.timeout(180)
def test_rx_killed_mid_transfer_leaves_nothing_trusted_and_the_rerun_works(
        rig: Rig, testbed_host: TestbedHost, trial: TrialFactory) -> None:
    host = testbed_host
    workdir = f"{REMOTE_CACHE}-tree-{os.getpid()}-{rig.backend}"
    rig.write("pyproject.toml", f'[tool.rx.remotes.{host.alias}]\nworkdir = "{workdir}"\n')
    rig.write("read_big.py", READ_BIG)
    (rig.project / "data").mkdir()
    big = os.urandom(200 << 20)
    (rig.project / "data" / "big.bin").write_bytes(big)
    baseline = remote_baseline(host)
    try:
        with trial("tree_interrupted", variant="kill -9 of rx mid-transfer", bound=60.0) as t:
            started = time.monotonic()
            process = rig.spawn(rig.rx_argv("run", "--remote", host.alias, "read_big.py"))
            caught = False
            while process.poll() is None and time.monotonic() - started < 60:
                if _store(host, workdir)["tmp"]:
                    caught = True
                    break
                time.sleep(0.05)
            process.send_signal(signal.SIGKILL)
            process.communicate(timeout=30)
            t.note(caught_mid_transfer=caught)
            t.audit(audit_remote(host, baseline))
            time.sleep(1)
            after_kill = _store(host, workdir)
            rerun = rig.rx("run", "--remote", host.alias, "read_big.py", timeout=90)
            t.timed(rerun.seconds, hang=rerun.timed_out)
            after_rerun = _store(host, workdir)
            t.outcome = f"rerun exit {rerun.returncode}: {error_summary(rerun.stderr) or 'ok'}"
            t.note(trees_after_kill=len(after_kill["trees"]), temporaries_after_kill=len(after_kill["tmp"]),
                   corrupted=len(_damaged(after_kill["blobs"] + after_rerun["blobs"])))

            assert caught, "the transfer ended before rx could be killed in it"
            assert after_kill["trees"] == [], after_kill  # nothing a later run would trust
            assert after_kill["tmp"] == [], after_kill  # the runner removed its half blob
            assert t.facts["corrupted"] == 0
            assert t.facts["orphans"] == 0, t.facts
            assert rerun.returncode == 0, rerun.stderr
            assert rerun.stdout.split() == [hashlib.sha256(big).hexdigest()]
            assert len(after_rerun["trees"]) == 1
    finally:
        root_sh(host, f"rm -rf {workdir}")


@pytest.fixture(scope="module")
def small_disk(module_host: Callable[..., TestbedHost]) -> TestbedHost:
    """A host whose rx cache is a 5 MB tmpfs."""
    return module_host("treedisk", tmpfs={"/home/rx/.cache": "size=5m"})


@pytest.mark.timeout(120)
def test_a_full_disk_while_the_project_travels_is_one_clear_error(rig: Rig, small_disk: TestbedHost,
                                                                   trial: TrialFactory) -> None:
    host = small_disk
    rig.write("pyproject.toml", "")
    rig.write("hello.py", "print(open('data/small.txt').read())\n")
    rig.write("data/small.txt", "small")
    (rig.project / "data" / "big.bin").write_bytes(os.urandom(8 << 20))
    try:  # the host's store is emptied however the test ends (the next backend's run starts clean)
        baseline = remote_baseline(host)
        with trial("tree_disk_full", variant="8 MB project, 5 MB cache", bound=30.0) as t:
            done = rig.rx("run", "--remote", host.alias, "hello.py", timeout=60)
            errors = t.ran(done, host, baseline)
            store = _store(host, REMOTE_CACHE)
            t.note(corrupted=len(_damaged(store["blobs"])), trees=len(store["trees"]), temporaries=len(store["tmp"]))
            (rig.project / "data" / "big.bin").unlink()
            again = rig.rx("run", "--remote", host.alias, "hello.py", timeout=60)

            assert done.returncode == 3, done.stderr
            assert len(errors) == 1 and not has_traceback(done.stderr), done.stderr
            assert errors[0].startswith(f"rx: error: {host.alias}: no space left to store the project"), errors
            assert store["trees"] == [] and store["tmp"] == [] and t.facts["corrupted"] == 0, store
            assert t.facts["orphans"] == 0, t.facts
            assert again.returncode == 0, again.stderr
            assert again.stdout.strip() == "small"
    finally:
        root_sh(host, f"rm -rf {REMOTE_CACHE}/blobs {REMOTE_CACHE}/trees {REMOTE_CACHE}/runs/*")


@pytest.mark.timeout(120)
def test_a_full_disk_while_a_small_project_travels_with_the_call_is_one_clear_error(
        rig: Rig, small_disk: TestbedHost, trial: TrialFactory) -> None:
    """A project small enough to go with the call, unasked (protocol/places.py), to a host whose disk fills up
    while the runner stores it: the same one error, and nothing stored that a later run would trust."""
    host = small_disk
    rig.write("pyproject.toml", "")
    rig.write("hello.py", "print(open('data/small.txt').read())\n")
    rig.write("data/small.txt", "small")
    try:
        first = rig.rx("run", "--remote", host.alias, "hello.py", timeout=60)  # rx installed there, a tree seen
        assert first.returncode == 0, first.stderr
        (rig.project / "data" / "mid.bin").write_bytes(os.urandom(600 << 10))  # under the 1 MiB sent unasked
        root_sh(host, f"avail=$(df --output=avail -k {REMOTE_CACHE} | tail -1); "
                      f"dd if=/dev/zero of={REMOTE_CACHE}/filler bs=1k count=$((avail - 200)) 2>/dev/null; true")
        baseline = remote_baseline(host)
        with trial("tree_disk_full", variant="600 KB sent with the call, 200 KB free", bound=30.0) as t:
            done = rig.rx("run", "--remote", host.alias, "hello.py", timeout=60)
            errors = t.ran(done, host, baseline)
            store = _store(host, REMOTE_CACHE)
            t.note(corrupted=len(_damaged(store["blobs"])), trees=len(store["trees"]), temporaries=len(store["tmp"]))
            root_sh(host, f"rm -f {REMOTE_CACHE}/filler")
            again = rig.rx("run", "--remote", host.alias, "hello.py", timeout=60)

            assert done.returncode == 3, done.stderr
            assert len(errors) == 1 and not has_traceback(done.stderr), done.stderr
            assert errors[0].startswith(f"rx: error: {host.alias}: no space left to store the project"), errors
            assert len(store["trees"]) == 1 and store["tmp"] == [] and t.facts["corrupted"] == 0, store  # the first's
            assert t.facts["orphans"] == 0, t.facts
            assert again.returncode == 0, again.stderr
            assert again.stdout.strip() == "small"
    finally:
        root_sh(host, f"rm -rf {REMOTE_CACHE}/filler {REMOTE_CACHE}/blobs {REMOTE_CACHE}/trees {REMOTE_CACHE}/runs/*")
