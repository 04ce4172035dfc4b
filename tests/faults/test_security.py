"""Hostile input and secrets: ~200 generated strings must arrive byte for byte as script arguments, environment
values and @task arguments without anything else running; a --secret-env value must reach the task and
nowhere else."""

from __future__ import annotations

import hashlib
import io
import json
import random
import secrets
import zipfile
from pathlib import Path

import pytest
from faultkit import (
    Rig,
    TrialFactory,
    audit_remote,
    error_summary,
    has_traceback,
    quote,
    remote_baseline,
    root_sh,
    traceback_message,
    workspace_files,
)

from testbed import TestbedHost

HOST = "rx-testbed-1"
FUZZ_COUNT = 200

ECHO_HEX = """\
import json, os, sys
print(json.dumps({
    "args": [arg.encode("utf-8", "surrogateescape").hex() for arg in sys.argv[1:]],
    "env": {name: os.environ[name].encode("utf-8", "surrogateescape").hex()
            for name in sorted(os.environ) if name.startswith("FUZZ_")},
}))
"""


def hostile_strings(canary: str, seed: int, count: int = FUZZ_COUNT) -> list[str]:
    """``count`` strings built from shell metacharacters, command substitutions that would create ``canary``,
    control characters, non-ASCII text and option look-alikes (deterministic for ``seed``)."""
    touch = f"touch {canary}"
    atoms = [
        "a b", "'", '"', "\\", f"$({touch})", f"`{touch}`", f"; {touch}", f"| {touch}", f"&& {touch}",
        f"|| {touch}", f"\n{touch}\n", f"'; {touch}; '", f'"; {touch}; "', f"$({touch})$(id)", f"\\$({touch})",
        "$HOME", "${PATH}", "$((6*7))", "{a,b}", "*", "?", "[a-z]", "~", "~root", "#", "!", "!!", "%s%n", "%(x)s",
        "\x01", "\x1b[31m", "\x7f", "\t", "\r\n", " ", "", "é", "€", "😀", "日本語", "\u202e", "\ufeff",
        "-", "--", "-v", "-m", "--help", "--remote", "--env=X=1", "-rf", ">out", "<in", "2>&1", "&", "()", "{}",
        "$IFS", "${IFS}", "%00", "\\x00", "\\n", "''", '""', "'\"'\"'", "a=b", "=", "$", "\\$", "`", "``",
    ]
    chooser = random.Random(seed)
    strings = list(atoms)
    while len(strings) < count:
        pieces = [chooser.choice(atoms) for _ in range(chooser.randint(2, 5))]
        text = chooser.choice(["", " ", "-", "--", "x"]).join(pieces)
        if chooser.random() < 0.2:
            text = "-" + text
        strings.append(text)
    return strings[:count]


def canary_hits(host: TestbedHost, canary: str) -> list[str]:
    """Where the canary file exists: on the remote, and here."""
    hits = [f"remote:{line}" for line in root_sh(host, f"ls -1d {quote(canary)}* 2>/dev/null; true").split()]
    hits += [f"local:{path}" for path in Path(canary).parent.glob(Path(canary).name + "*")]
    return hits


def decoded(hexes: list[str]) -> list[bytes]:
    return [bytes.fromhex(value) for value in hexes]


@pytest.mark.timeout(120)
def test_injection_fuzz_arrives_byte_for_byte(rig: Rig, testbed_host: TestbedHost, trial: TrialFactory,
                                              fault_seed: int) -> None:
    canary = f"/tmp/rx-canary-{secrets.token_hex(6)}"
    seed = fault_seed
    strings = hostile_strings(canary, seed)
    expected = [text.encode() for text in strings]
    rig.write("echo_hex.py", ECHO_HEX)
    baseline = remote_baseline(testbed_host)
    env_options = [word for index, text in enumerate(strings) for word in ("--env", f"FUZZ_{index:03d}={text}")]

    done = rig.rx("run", "--remote", HOST, *env_options, "echo_hex.py", *strings, timeout=60)
    echoed = json.loads(done.stdout.splitlines()[0]) if done.returncode == 0 and done.stdout else {}
    got_args = decoded(echoed.get("args", []))
    got_env = {int(name[5:]): value for name, value in zip(echoed.get("env", {}), decoded(
        list(echoed.get("env", {}).values())), strict=True)}
    hits = canary_hits(testbed_host, canary)
    for variant, got in (("script args", got_args), ("env values", [got_env.get(i) for i in range(len(strings))])):
        with trial("injection", variant=f"{variant}: {len(strings)} strings (seed {seed})", bound=30.0) as t:
            t.timed(done.seconds, hang=done.timed_out)
            wrong = sum(1 for index, value in enumerate(expected) if index >= len(got) or got[index] != value)
            t.note(corrupted=wrong, injections=len(hits), traceback=has_traceback(done.stderr))
            t.outcome = f"{len(strings) - wrong}/{len(strings)} byte for byte, {len(hits)} canary file(s)"

            assert done.returncode == 0, error_summary(done.stderr)
            assert not hits, hits
            assert got == expected, [(strings[i], got[i] if i < len(got) else None)
                                     for i in range(len(strings)) if i >= len(got) or got[i] != expected[i]][:5]

    with trial("injection", variant=f"@task args: {len(strings)} strings (seed {seed})", bound=30.0) as t:
        source = rig.root / "strings.json"
        source.write_text(json.dumps(strings), encoding="utf-8")
        ran = rig.driver("echo", HOST, str(source), timeout=60)
        t.timed(ran.seconds, hang=ran.timed_out)
        result = ran.result_line()
        got = decoded(result.get("value") or [])
        hits = canary_hits(testbed_host, canary)
        wrong = sum(1 for index, value in enumerate(expected) if index >= len(got) or got[index] != value)
        t.note(corrupted=wrong, injections=len(hits))
        t.outcome = f"{len(strings) - wrong}/{len(strings)} byte for byte, {len(hits)} canary file(s)"
        t.audit(audit_remote(testbed_host, baseline))

        assert result.get("ok") is True, result or ran.stderr
        assert not hits, hits
        assert got == expected
        assert t.facts["orphans"] == 0 and t.facts["leftover_files"] == 0, t.facts


@pytest.mark.timeout(60)
def test_injection_non_utf8_argument(rig: Rig, testbed_host: TestbedHost, trial: TrialFactory) -> None:
    rig.write("echo_hex.py", ECHO_HEX)
    raw = [b"\xff\xfe", b"caf\xe9", b"ok \x80 ok"]
    strings = [value.decode("utf-8", "surrogateescape") for value in raw]

    with trial("injection", variant="non-UTF-8 script args", bound=30.0) as t:
        done = rig.rx("run", "--remote", HOST, "echo_hex.py", *strings, timeout=40)
        t.timed(done.seconds, hang=done.timed_out)
        echoed = json.loads(done.stdout.splitlines()[0]) if done.returncode == 0 and done.stdout else {}
        got = decoded(echoed.get("args", []))
        t.note(traceback=has_traceback(done.stderr), corrupted=int(done.returncode == 0 and got != raw))
        t.outcome = "byte for byte" if got == raw else f"exit {done.returncode}: {error_summary(done.stderr)}"

        assert not has_traceback(done.stderr), traceback_message(done.stderr)
        assert done.returncode == 0, done.stderr
        assert got == raw


SECRET_TASK = """\
import hashlib, os, time
value = os.environ.get("RX_CANARY", "")
print("digest", hashlib.sha256(value.encode()).hexdigest(), flush=True)
with open("proof.txt", "w") as stream:
    stream.write(hashlib.sha256(value.encode()).hexdigest())
print("task started", flush=True)
time.sleep(4)
print("task finished", flush=True)
"""


def _local_cmdlines(needle: bytes) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "cmdline").read_bytes():
                    found.append(entry.name)
            except OSError:
                continue
    return found


def _files_holding(paths: list[Path], needle: bytes) -> list[str]:
    """Files holding ``needle``, also inside zip members (session.zip is compressed)."""
    found = []
    for path in paths:
        data = path.read_bytes()
        if needle in data:
            found.append(str(path))
        elif data[:4] == b"PK\x03\x04":
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                found += [f"{path}!{name}" for name in archive.namelist() if needle in archive.read(name)]
    return found


@pytest.mark.timeout(90)
def test_secret_canary_reaches_the_task_and_nowhere_else(rig: Rig, testbed_host: TestbedHost,
                                                         trial: TrialFactory) -> None:
    value = "rxcanary" + secrets.token_hex(16)
    needle = value.encode()
    rig.write("secret_task.py", SECRET_TASK)
    baseline = remote_baseline(testbed_host)
    grep = f"grep -rlF {quote(value)} /home/rx /tmp /var/tmp /var/log 2>/dev/null; true"

    with trial("secret_canary", variant="--secret-env RX_CANARY with rx -vv", bound=30.0) as t:
        watched = rig.watch(rig.rx_argv("-vv", "run", "--remote", HOST, "--secret-env", "RX_CANARY",
                                        "secret_task.py"), env={"RX_CANARY": value})
        started_at = watched.wait_for("task started", timeout=45)
        during_ps = [line for line in root_sh(testbed_host, "ps -ww -eo pid=,args=").splitlines()
                     if value in line]
        during_files = root_sh(testbed_host, grep).split()
        during_local = _local_cmdlines(needle)
        done = watched.wait(timeout=30)
        t.timed(done.seconds, hang=done.timed_out)
        after_files = root_sh(testbed_host, grep).split()
        local_files = _files_holding(workspace_files(rig.workspace) + workspace_files(rig.cache), needle)
        in_output = [name for name, text in (("stdout", done.stdout), ("stderr", done.stderr)) if value in text]
        leaks = {"remote ps": during_ps, "remote files during": during_files, "remote files after": after_files,
                 "local process list": during_local, "workspace/cache": local_files, "rx output": in_output}
        t.note(canary_leaks=sum(len(found) for found in leaks.values()),
               leaks={where: found for where, found in leaks.items() if found})
        digest = hashlib.sha256(needle).hexdigest()
        seen = f"digest {digest}" in done.stdout
        t.note(task_saw_it=seen)
        t.outcome = f"task saw it: {seen}; leaks: {t.facts['canary_leaks']}"
        t.audit(audit_remote(testbed_host, baseline))

        assert started_at is not None, done.stderr
        assert done.returncode == 0, done.stderr
        assert seen, done.stdout
        assert "rx: DEBUG" in done.stderr or "rx: INFO" in done.stderr, "-vv logged nothing: the check is void"
        assert (rig.workspace / "runs" / rig.run_ids()[-1] / "files" / "proof.txt").read_text() == digest
        assert not any(leaks.values()), leaks
        assert t.facts["orphans"] == 0 and t.facts["leftover_files"] == 0, t.facts
