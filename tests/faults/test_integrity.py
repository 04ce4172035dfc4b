"""Corrupted and malicious results: between the real backend and rx, a Process wrapper flips a byte in a
value (V) or files (F) frame, cuts the stream short, or plays a compromised runner that signs a result
(it holds the per-call key, as any runner does) carrying ``../evil``, an absolute path or a symlink.

rx runs in this process here (``@task`` calls, and ``rx run``'s own ``execute_run``), with
``Coordinator.backend`` wrapped so that the backend it returns is the tampering one.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import secrets
import tarfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

import pytest
from faultkit import Rig, TrialFactory, audit_remote, remote_baseline

from remote_exec import task
from remote_exec.backends.base import Backend, HostSpec, Process
from remote_exec.coordinator import Coordinator
from remote_exec.errors import IntegrityError, RemoteExecError
from remote_exec.protocol import wire
from remote_exec.protocol.bootstrap import AHEAD
from remote_exec.protocol.wire import HEADER, MAX_FRAME, FrameReader, encode
from remote_exec.workspace import Workspace
from testbed import TestbedHost

HOST = "rx-testbed-1"


# --- the tampering wrapper ------------------------------------------------------------------------------


class Mutator:
    """Rewrites the runner's frames; the default passes everything through."""

    key: bytes = b""

    def frame(self, kind: bytes, payload: bytes) -> tuple[bytes, bool]:
        """The bytes to hand rx for this frame, and whether the stream ends after them."""
        return encode(kind, payload), False


class Flip(Mutator):
    """Flip one byte in the middle of the first ``kind`` frame."""

    def __init__(self, kind: bytes) -> None:
        self.kind = kind
        self.done = False

    def frame(self, kind: bytes, payload: bytes) -> tuple[bytes, bool]:
        if kind == self.kind and payload and not self.done:
            self.done = True
            middle = len(payload) // 2
            payload = payload[:middle] + bytes([payload[middle] ^ 0x40]) + payload[middle + 1:]
        return encode(kind, payload), False


class Truncate(Mutator):
    """End the stream in the middle of the first ``kind`` frame."""

    def __init__(self, kind: bytes) -> None:
        self.kind = kind
        self.done = False

    def frame(self, kind: bytes, payload: bytes) -> tuple[bytes, bool]:
        if kind == self.kind and not self.done:
            self.done = True
            return HEADER.pack(kind, len(payload)) + payload[: len(payload) // 2], True
        return encode(kind, payload), False


@dataclass(frozen=True)
class Member:
    """One entry of a forged files archive."""

    name: str
    data: bytes = b""
    symlink_to: str | None = None


class ForgedResult(Mutator):
    """A compromised runner: the real result's frames are dropped and, once, replaced by the frames
    :meth:`forge` builds from the real header, correctly signed with the per-call key."""

    sent = False

    def forge(self, header: dict[str, Any]) -> list[tuple[bytes, bytes]]:
        """The forged R frame (and V, X or F frames) that stand for the result."""
        raise NotImplementedError

    def frame(self, kind: bytes, payload: bytes) -> tuple[bytes, bool]:
        if kind not in (b"R", b"V", b"X", b"F", b"Z"):
            return encode(kind, payload), False
        if kind != b"R" or self.sent:
            return b"", False  # the real result's frames are dropped
        self.sent = True
        assert self.key, "the per-call key was not seen on the way to the runner"
        frames = self.forge(json.loads(payload))
        mac = hmac.new(self.key, digestmod=hashlib.sha256)
        for frame_kind, frame_payload in frames:
            mac.update(frame_kind + len(frame_payload).to_bytes(8, "big") + frame_payload)
        frames.append((b"Z", json.dumps({"hmac": mac.hexdigest()}).encode()))
        return b"".join(encode(k, p) for k, p in frames), False


class Forge(ForgedResult):
    """A forged result carrying the files ``members``."""

    def __init__(self, members: Sequence[Member]) -> None:
        self.members = members

    def forge(self, header: dict[str, Any]) -> list[tuple[bytes, bytes]]:
        buffer = io.BytesIO()
        manifest = []
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
            for member in self.members:
                info = tarfile.TarInfo(member.name)
                if member.symlink_to is not None:
                    info.type = tarfile.SYMTYPE
                    info.linkname = member.symlink_to
                    archive.addfile(info)
                else:
                    info.size = len(member.data)
                    archive.addfile(info, io.BytesIO(member.data))
                manifest.append({"path": member.name, "size": len(member.data),
                                 "sha256": hashlib.sha256(member.data).hexdigest()})
        header.update(files=manifest, value=None, exc_pickle=None)
        data = buffer.getvalue()
        return [(b"R", json.dumps(header).encode()),
                *((b"F", data[start:start + MAX_FRAME]) for start in range(0, len(data), MAX_FRAME))]


def _call_key(data: bytes) -> bytes | None:
    """The per-call HMAC key, if ``data`` starts with the coordinator's G frame (its options), alone or
    followed by the session frames in the same write, or after the line that comes first when the call goes
    right behind the runner's command (bootstrap.AHEAD), or after the archive (its 8-byte length and bytes)
    that goes before it, asked for or ahead."""
    data = data.removeprefix(AHEAD)
    if data[:1] != b"G" and len(data) >= 8 and 8 + int.from_bytes(data[:8], "big") < len(data):
        data = data[8 + int.from_bytes(data[:8], "big"):]
    if data[:1] != b"G" or len(data) < HEADER.size:
        return None
    _, size = HEADER.unpack_from(data)
    if len(data) < HEADER.size + size:
        return None
    payload = data[HEADER.size:HEADER.size + size]
    load = getattr(wire, "load_options", None)
    options = load(payload) if load is not None else json.loads(payload)
    key = options.get("key")
    return bytes.fromhex(key) if isinstance(key, str) and len(key) == 64 else None


class TamperingProcess(Process):
    """Delegates to the real process; the runner's frames pass through a :class:`Mutator`."""

    def __init__(self, inner: Process, mutator: Mutator) -> None:
        self.inner = inner
        self.mutator = mutator
        self.text = b""
        self.framing = False
        self.reader = FrameReader()
        self.pending = b""
        self.ended = False

    def read_stdout(self, size: int = 65536) -> bytes:
        while not self.pending and not self.ended:
            chunk = self.inner.read_stdout(size)
            if not chunk:
                self.ended = True
                self.pending += self.text
                break
            if not self.framing:
                self.text += chunk
                while b"\n" in self.text and not self.framing:
                    line, _, rest = self.text.partition(b"\n")
                    self.pending += line + b"\n"
                    self.text = rest
                    if line.startswith(b"RXBOOT2 ") and line.endswith((b" HAVE", b" OK")):
                        self.framing = True
                if not self.framing:
                    continue
                chunk, self.text = self.text, b""
            for kind, payload in self.reader.feed(chunk):
                data, end = self.mutator.frame(kind, payload)
                self.pending += data
                if end:
                    self.ended = True
                    break
        data, self.pending = self.pending[:size], self.pending[size:]
        if not data:  # the stream ends here: the real one is read to its end, so that its pipe is released
            while self.inner.read_stdout(size):
                pass
        return data

    def read_stderr(self, size: int = 65536) -> bytes:
        return self.inner.read_stderr(size)

    def write_stdin(self, data: bytes) -> None:
        key = _call_key(data)
        if key is not None:
            self.mutator.key = key
        self.inner.write_stdin(data)

    def close_stdin(self) -> None:
        self.inner.close_stdin()

    def wait(self, timeout: float | None = None) -> int | None:
        return self.inner.wait(timeout)

    def kill(self) -> None:
        self.inner.kill()


class TamperingBackend(Backend):
    """The real backend, with every started process wrapped in a :class:`TamperingProcess`."""

    name: ClassVar[str] = "tampering"

    def __init__(self, inner: Backend, mutator: Mutator) -> None:
        super().__init__(inner.spec)
        self.inner = inner
        self.mutator = mutator

    def start(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
              cwd: PurePosixPath | None = None) -> Process:
        return TamperingProcess(self.inner.start(argv, env=env, cwd=cwd), self.mutator)

    def put(self, local: Path, remote: PurePosixPath) -> None:
        self.inner.put(local, remote)

    def get(self, remote: PurePosixPath, local: Path) -> None:
        self.inner.get(remote, local)

    def classify_exit(self, exit_code: int | None, stderr: bytes) -> RemoteExecError | None:
        return self.inner.classify_exit(exit_code, stderr)

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def tamper(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Mutator], None]]:
    """``tamper(mutator)``: rx's next calls in this process go through a tampering backend."""
    real_backend = Coordinator.backend

    def use(mutator: Mutator) -> None:
        def backend(self: Coordinator, spec: HostSpec, name: str) -> Backend:
            return TamperingBackend(real_backend(self, spec, name), mutator)

        monkeypatch.setattr(Coordinator, "backend", backend)

    yield use
    Coordinator.current().close_backends()


# --- checks -----------------------------------------------------------------------------------------------


def outside_files(root: Path, run_dir: Path | None, token: str) -> list[str]:
    """Files named after ``token`` anywhere under ``root`` (but a run's files/ dir) or in /tmp."""
    found = [str(path) for path in root.rglob(f"*{token}*")
             if run_dir is None or not path.is_relative_to(run_dir / "files")]
    found += [str(path) for path in Path("/tmp").glob(f"*{token}*")]
    return found


def run_script(rig: Rig, name: str, source: str) -> tuple[RemoteExecError | None, Path, dict[str, Any]]:
    """``rx run --remote HOST NAME`` in this process; the error it raised, its run dir and its info."""
    from remote_exec.cli.run import execute_run
    from remote_exec.task import Task

    script = rig.write(name, source)
    options: dict[str, Any] = {"backend": rig.backend, "python": None, "timeout": None, "env": {},
                               "secret_env": [], "pull": [], "no_pull": False, "keep": False,
                               "ssh_config": None, "connect_timeout": None, "host_key_policy": None}
    error: RemoteExecError | None = None
    try:
        execute_run(task=Task.from_script(script), args=[], remote=HOST, options=options, workspace=rig.workspace,
                    kind="script", target=name, as_json=False)
    except RemoteExecError as exc:
        error = exc
    run = Workspace.resolve(rig.workspace).runs()[-1]
    return error, run.dir, run.info()


def task_entries(rig: Rig) -> list[dict[str, Any]]:
    """The task entries of the workspace's runs (waiting up to 5 s for them to settle)."""
    deadline = time.monotonic() + 5
    while True:
        entries = [entry for run in Workspace.resolve(rig.workspace).runs() for entry in run.tasks().values()]
        if (entries and all(entry.get("status") in ("done", "failed") for entry in entries)) \
                or time.monotonic() > deadline:
            return entries
        time.sleep(0.1)


WRITES_A_FILE = "open('out.txt', 'w').write('payload ' * 1000)\nprint('wrote')\n"


# --- scenarios ----------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mutation", ["flip V", "truncate V"])
def test_integrity_damaged_value_is_refused(rig: Rig, testbed_host: TestbedHost, trial: TrialFactory,
                                            tamper: Callable[[Mutator], None], mutation: str) -> None:
    mutator = Flip(b"V") if mutation.startswith("flip") else Truncate(b"V")
    tamper(mutator)
    payload = secrets.token_bytes(300_000)
    baseline = remote_baseline(testbed_host)

    with trial("integrity", variant=f"@task value: {mutation}", bound=30.0) as t:
        started = time.monotonic()
        echo = task(remote=HOST)(lambda data: data)
        error: BaseException | None = None
        try:
            value = echo(payload)
        except RemoteExecError as exc:
            error, value = exc, None
        t.timed(time.monotonic() - started)
        entries = task_entries(rig)
        t.note(corrupted=int(value is not None and value != payload), lost=0,
               task_status=[entry.get("status") for entry in entries])
        t.outcome = f"{type(error).__name__}: {error}"[:200] if error else "value accepted"
        t.audit(audit_remote(testbed_host, baseline))

        assert mutator.done, "the mutation never applied"
        assert value is None, "a damaged value was returned"
        if mutation.startswith("flip"):
            assert isinstance(error, IntegrityError), error
        else:  # a stream cut short is incomplete rather than damaged: any clear rx error will do
            assert isinstance(error, RemoteExecError), error
        assert [entry["status"] for entry in entries] == ["failed"], entries
        assert t.facts["orphans"] == 0 and t.facts["leftover_files"] == 0, t.facts


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mutation", ["flip F", "truncate F"])
def test_integrity_damaged_files_are_refused(rig: Rig, testbed_host: TestbedHost, trial: TrialFactory,
                                             tamper: Callable[[Mutator], None], mutation: str) -> None:
    mutator = Flip(b"F") if mutation.startswith("flip") else Truncate(b"F")
    tamper(mutator)
    baseline = remote_baseline(testbed_host)

    with trial("integrity", variant=f"rx run files: {mutation}", bound=30.0) as t:
        started = time.monotonic()
        error, run_dir, info = run_script(rig, "writes.py", WRITES_A_FILE)
        t.timed(time.monotonic() - started)
        landed = sorted(str(p.relative_to(run_dir)) for p in (run_dir / "files").rglob("*") if p.is_file())
        t.note(corrupted=len(landed), run_status=info["status"])
        t.outcome = f"{type(error).__name__}: {error}"[:200] if error else "result accepted"
        t.audit(audit_remote(testbed_host, baseline))

        assert mutator.done, "the mutation never applied"
        if mutation.startswith("flip"):
            assert isinstance(error, IntegrityError), error
        else:
            assert isinstance(error, RemoteExecError), error
        assert not landed, landed
        assert info["status"] == "failed", info
        assert t.facts["orphans"] == 0 and t.facts["leftover_files"] == 0, t.facts


def _malicious(token: str) -> dict[str, list[Member]]:
    return {
        "../evil": [Member(f"../evil-{token}", b"escaped\n")],
        "absolute path": [Member(f"/tmp/rx-evil-{token}", b"escaped\n")],
        "symlink member": [Member(f"link-{token}", symlink_to=f"/tmp/rx-evil-target-{token}"),
                           Member(f"link-{token}/x", b"through the link\n")],
        "good file, then ../evil": [Member(f"good-{token}.txt", b"fine\n"), Member(f"../../evil-{token}", b"x\n")],
        "good file, then a symlink": [Member(f"good-{token}.txt", b"fine\n"),
                                      Member(f"link-{token}", symlink_to=f"/tmp/rx-evil-target-{token}")],
    }


@pytest.mark.timeout(120)
def test_integrity_forged_result_with_a_good_file_lands(rig: Rig, testbed_host: TestbedHost, trial: TrialFactory,
                                                         tamper: Callable[[Mutator], None]) -> None:
    """The control: the forging harness itself works (a signed, harmless forged file is accepted), so the
    refusals below are refusals of the names, not of a broken forgery."""
    token = secrets.token_hex(4)
    forge = Forge([Member(f"good-{token}.txt", b"fine\n")])
    tamper(forge)

    with trial("integrity", variant="forged, signed result with a harmless file (control)", bound=30.0) as t:
        started = time.monotonic()
        error, run_dir, info = run_script(rig, "quiet.py", "print('quiet')\n")
        t.timed(time.monotonic() - started)
        t.outcome = f"{type(error).__name__}: {error}"[:200] if error else f"accepted, run {info['status']}"

        assert forge.sent
        assert error is None, error
        assert (run_dir / "files" / f"good-{token}.txt").read_bytes() == b"fine\n"




@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", list(_malicious("x")))
def test_integrity_malicious_names_are_refused(rig: Rig, testbed_host: TestbedHost, trial: TrialFactory,
                                               tamper: Callable[[Mutator], None], case: str) -> None:
    token = secrets.token_hex(4)
    forge = Forge(_malicious(token)[case])
    tamper(forge)
    baseline = remote_baseline(testbed_host)

    with trial("integrity", variant=f"forged, signed result: {case}", bound=30.0) as t:
        started = time.monotonic()
        error, run_dir, info = run_script(rig, "quiet.py", "print('quiet')\n")
        t.timed(time.monotonic() - started)
        outside = outside_files(rig.root, run_dir, token)
        landed = sorted(str(p.relative_to(run_dir)) for p in (run_dir / "files").rglob("*") if p.exists())
        t.note(outside_files=len(outside), landed_of_rejected=len(landed), run_status=info["status"])
        t.outcome = f"{type(error).__name__}: {error}"[:200] if error else "result accepted"
        t.audit(audit_remote(testbed_host, baseline))

        assert forge.sent
        assert not outside, outside
        assert isinstance(error, IntegrityError), error
        assert info["status"] == "failed", info
        assert not landed, f"files of a rejected result landed: {landed}"
