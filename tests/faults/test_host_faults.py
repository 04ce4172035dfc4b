"""Faults of the remote host itself: no python3, a fake python3, too little memory, a full disk.

One dedicated host serves the module: a 128 MB memory limit and a 5 MB tmpfs as the rx cache
(``/home/rx/.cache``), so it can run out of either.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator

import pytest
from faultkit import (
    REMOTE_CACHE,
    Rig,
    TrialFactory,
    audit_remote,
    cli_error_lines,
    error_summary,
    has_traceback,
    quote,
    remote_baseline,
    root_sh,
    traceback_message,
    workspace_files,
)

from testbed import TestbedHost

ALLOCATE = """\
print("allocating", flush=True)
block = bytearray(512 << 20)
for index in range(0, len(block), 4096):
    block[index] = 1
print("survived")
"""

FILL = """\
with open("fill.bin", "wb") as stream:
    for index in range(10):
        stream.write(bytes([index]) * (1 << 20))
        stream.flush()
print("wrote 10 MB")
"""
#: What FILL (and the driver's fill task) writes, in full; a landed file may only ever be a prefix of it.
FILL_CONTENT = b"".join(bytes([index % 256]) * (1 << 20) for index in range(10))


@pytest.fixture(scope="module")
def small_host(module_host: Callable[..., TestbedHost]) -> TestbedHost:
    """A host with 128 MB of memory and a 5 MB rx cache."""
    return module_host("small", mem_limit="128m", tmpfs={"/home/rx/.cache": "size=5m"})


@pytest.fixture
def emptied_cache(small_host: TestbedHost) -> Iterator[TestbedHost]:
    """The small host, with whatever a test left in its rx runs dir removed afterwards (once recorded), so
    one full disk does not fail the next test."""
    yield small_host
    root_sh(small_host, f"rm -rf {REMOTE_CACHE}/runs/* {REMOTE_CACHE}/runs/.[!.]* /tmp/rx-fakepy-*")


@pytest.mark.timeout(90)
def test_python_missing_nonexistent_path(rig: Rig, testbed_host: TestbedHost, trial: TrialFactory) -> None:
    rig.write("hello.py", "print('hello')\n")
    baseline = remote_baseline(testbed_host)

    with trial("python_missing", variant="--python /nonexistent/python3", bound=20.0) as t:
        done = rig.rx("run", "--remote", testbed_host.alias, "--python", "/nonexistent/python3", "hello.py",
                      timeout=25)
        errors = t.ran(done, testbed_host, baseline)
        shown = rig.show()

        assert done.returncode == 3, done.stderr
        assert len(errors) == 1 and not has_traceback(done.stderr), traceback_message(done.stderr)
        assert f"python3 not found on {testbed_host.alias}" in errors[0], errors
        assert t.facts["orphans"] == 0 and t.facts["leftover_files"] == 0, t.facts
        assert shown["status"] == "failed", shown


@pytest.mark.timeout(90)
def test_python_missing_moved_away_on_the_host(rig: Rig, emptied_cache: TestbedHost, trial: TrialFactory) -> None:
    host = emptied_cache
    rig.write("hello.py", "print('hello')\n")
    baseline = remote_baseline(host)
    root_sh(host, "mv /usr/bin/python3 /usr/bin/python3.off")
    try:
        with trial("python_missing", variant="/usr/bin/python3 moved away", bound=20.0) as t:
            done = rig.rx("run", "--remote", host.alias, "hello.py", timeout=25)
            errors = t.ran(done, host, baseline)
            shown = rig.show()

            assert done.returncode == 3, done.stderr
            assert len(errors) == 1 and not has_traceback(done.stderr), traceback_message(done.stderr)
            assert f"python3 not found on {host.alias}" in errors[0], errors
            assert t.facts["orphans"] == 0 and t.facts["leftover_files"] == 0, t.facts
            assert shown["status"] == "failed", shown
    finally:
        root_sh(host, "mv /usr/bin/python3.off /usr/bin/python3")


FAKE_PYTHONS = {
    "exits 0 without output": "#!/bin/sh\nexit 0\n",
    "prints a line that is no handshake": "#!/bin/sh\necho 'Python 3.11.2'\nexit 0\n",
    "reads stdin, never answers": "#!/bin/sh\ncat > /dev/null\nexit 0\n",
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("variant", list(FAKE_PYTHONS))
def test_fake_python_is_a_clear_error_never_success(rig: Rig, emptied_cache: TestbedHost, trial: TrialFactory,
                                                    variant: str) -> None:
    host = emptied_cache
    rig.write("hello.py", "print('hello')\n")
    fake = f"/tmp/rx-fakepy-{secrets.token_hex(4)}"
    root_sh(host, f"printf %s {quote(FAKE_PYTHONS[variant])} > {fake} && chmod 755 {fake}")
    baseline = remote_baseline(host)

    # The handshake should fail within the connect timeout (5 s here), as a refused connection does.
    with trial("fake_python", variant=variant, bound=10.0) as t:
        done = rig.rx("run", "--remote", host.alias, "--connect-timeout", "5", "--python", fake, "hello.py",
                      timeout=15)
        t.timed(done.seconds, hang=done.timed_out)
        errors = cli_error_lines(done.stderr)
        t.outcome = "hung (killed after 15 s)" if done.timed_out else (
            f"exit {done.returncode}: {error_summary(done.stderr)}")
        t.note(traceback=has_traceback(done.stderr))
        t.audit(audit_remote(host, baseline))
        shown = rig.show()

        assert not done.timed_out, "rx run hung"
        assert done.returncode == 3, done.stdout + done.stderr
        assert "hello" not in done.stdout
        assert len(errors) == 1 and not has_traceback(done.stderr), traceback_message(done.stderr)
        assert fake in errors[0] or host.alias in errors[0], errors
        assert shown["status"] == "failed", shown


@pytest.mark.timeout(90)
def test_oom_task_is_reported_out_of_memory(rig: Rig, emptied_cache: TestbedHost, trial: TrialFactory) -> None:
    host = emptied_cache
    rig.write("allocate.py", ALLOCATE)
    baseline = remote_baseline(host)

    with trial("oom", variant="128 MB host, 512 MB touched", bound=30.0) as t:
        done = rig.rx("run", "--remote", host.alias, "allocate.py", timeout=35)
        t.timed(done.seconds, hang=done.timed_out)
        shown = rig.show()
        result = shown.get("result") or {}
        t.outcome = f"exit {done.returncode}, result status {result.get('status')}: {result.get('detail')}"
        t.note(traceback=has_traceback(done.stderr), run_status=shown["status"])
        t.audit(audit_remote(host, baseline))

        assert done.returncode == 137, done.stderr
        assert "survived" not in done.stdout
        assert not has_traceback(done.stderr), traceback_message(done.stderr)
        assert shown["status"] == "failed"
        detail = str(result.get("detail"))
        assert result.get("status") == "oom" or (result.get("status") == "signal" and "memory" in detail), result
        assert "out-of-memory" in done.stderr or "memory" in done.stderr, done.stderr
        assert t.facts["orphans"] == 0 and t.facts["leftover_files"] == 0, t.facts


def _check_landed(rig: Rig) -> tuple[int, list[str]]:
    """Corrupt landed copies of fill.bin (not a prefix of what the task wrote) and temporary files left."""
    corrupt = 0
    temporaries = []
    for path in workspace_files(rig.workspace):
        if path.name == "fill.bin" and not FILL_CONTENT.startswith(path.read_bytes()):
            corrupt += 1
        if ".tmp" in path.name or path.name.startswith("tmp"):
            temporaries.append(str(path))
    return corrupt, temporaries


def _cache_usage(host: TestbedHost) -> int:
    return int(root_sh(host, "df -k --output=used /home/rx/.cache | tail -1").strip())


@pytest.mark.timeout(90)
def test_disk_full_script_gets_enospc_and_nothing_corrupt_lands(rig: Rig, emptied_cache: TestbedHost,
                                                                trial: TrialFactory) -> None:
    host = emptied_cache
    rig.write("fill.py", FILL)
    rig.write("hello.py", "print('hello')\n")
    warm = rig.rx("run", "--remote", host.alias, "hello.py", timeout=30)  # the archive is installed before
    assert warm.returncode == 0, warm.stderr  # the cache is measured (as after the tests before this one)
    baseline = remote_baseline(host)
    used_before = _cache_usage(host)

    with trial("disk_full", variant="rx run, script writes 10 MB into 5 MB", bound=30.0) as t:
        done = rig.rx("run", "--remote", host.alias, "fill.py", timeout=35)
        t.timed(done.seconds, hang=done.timed_out)
        errors = cli_error_lines(done.stderr)
        corrupt, temporaries = _check_landed(rig)
        left = audit_remote(host, baseline)
        t.audit(left)
        used_after = _cache_usage(host)
        t.note(corrupted=corrupt, traceback_count=done.stderr.count("Traceback (most recent call last)"),
               cache_kb_before=used_before, cache_kb_after=used_after)
        t.outcome = f"exit {done.returncode}: {error_summary(done.stderr)}"
        shown = rig.show()

        assert not done.timed_out
        assert "No space left on device" in done.stderr, done.stderr
        assert "wrote 10 MB" not in done.stdout
        assert corrupt == 0 and not temporaries, temporaries
        assert shown["status"] == "failed", shown
        # The task's own traceback is its output; rx adds at most one line of its own, never a traceback.
        assert done.stderr.count("Traceback (most recent call last)") <= 1, done.stderr
        assert "During handling of the above exception" not in done.stderr, done.stderr
        assert done.returncode == 1 or (done.returncode == 3 and len(errors) == 1), done.stderr
        assert left.clean, left.describe()
        assert used_after <= used_before + 64, (used_before, used_after)


@pytest.mark.timeout(90)
def test_disk_full_task_raises_enospc(rig: Rig, emptied_cache: TestbedHost, trial: TrialFactory) -> None:
    host = emptied_cache
    baseline = remote_baseline(host)

    with trial("disk_full", variant="@task writes 10 MB into 5 MB", bound=30.0) as t:
        done = rig.driver("fill", host.alias, "10", timeout=35)
        t.timed(done.seconds, hang=done.timed_out)
        result = done.result_line()
        corrupt, temporaries = _check_landed(rig)
        left = audit_remote(host, baseline)
        t.audit(left)
        t.note(corrupted=corrupt)
        t.outcome = f"{result.get('type')} errno {result.get('errno')}: {str(result.get('message'))[:100]}"

        assert result, done.stdout + done.stderr
        assert result["ok"] is False
        enospc = result["type"] in ("builtins.OSError", "OSError") and result["errno"] == 28
        clear = result["type"].startswith("remote_exec.errors.") and "no space left" in result["message"].lower()
        assert enospc or clear, result
        assert corrupt == 0 and not temporaries, temporaries
        assert left.clean, left.describe()
