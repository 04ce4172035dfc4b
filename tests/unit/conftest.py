"""Fixtures for the core-pipeline unit tests: an isolated environment, throwaway modules, subprocess helpers.

Tests that run the pipeline use :func:`isolated`, which points RX_WORKSPACE, RX_CACHE_DIR, HOME and
XDG_CACHE_HOME at temporary directories so that nothing lands in the repository or in ``~/.cache``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """rx's own archive (no user code), built once per test module."""
    from remote_exec.packing import DistributionArchive

    return DistributionArchive.build(cache_dir=tmp_path_factory.mktemp("archive"))


def install_archive(archive: Any, workdir: Path) -> Path:
    """Install ``archive`` under ``workdir`` through the bootstrap (a ``probe`` run), as a host's first call
    does; the installed folder."""
    from remote_exec.protocol.bootstrap import BOOTSTRAP

    data = archive.path.read_bytes()
    done = subprocess.run([sys.executable, "-S", "-c", BOOTSTRAP, "t", archive.sha256, str(workdir), "probe"],
                          input=len(data).to_bytes(8, "big") + data, capture_output=True, timeout=60,
                          env={"PATH": os.environ.get("PATH", ""), "HOME": str(workdir.parent)}, check=False)
    assert done.returncode == 0, done.stderr.decode()
    installed: Path = workdir / "archives" / archive.sha256
    assert (installed / ".rx-sizes").is_file()
    return installed


@dataclass(frozen=True)
class Isolated:
    """The temporary directories a test runs in."""

    root: Path
    workspace: Path
    cache: Path
    home: Path

    def env(self, **extra: str) -> dict[str, str]:
        """The environment for a subprocess (rx or a script) of this test."""
        env = dict(os.environ)
        env.update(extra)
        return env


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Isolated:
    """Workspace, caches and HOME in ``tmp_path``; the repository importable by subprocesses."""
    paths = Isolated(root=tmp_path, workspace=tmp_path / "ws", cache=tmp_path / "cache", home=tmp_path / "home")
    paths.home.mkdir()
    (tmp_path / "ssh_config").write_text("")
    monkeypatch.setenv("RX_WORKSPACE", str(paths.workspace))
    monkeypatch.setenv("RX_CACHE_DIR", str(paths.cache))
    monkeypatch.setenv("HOME", str(paths.home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setenv("RX_SSH_CONFIG", str(tmp_path / "ssh_config"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(REPO_ROOT), *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])]))
    for name in ("RX_BACKEND", "RX_DEBUG", "RX_INSIDE_RUNNER"):
        monkeypatch.delenv(name, raising=False)
    return paths


ModuleFactory = Callable[[str, str], types.ModuleType]


@pytest.fixture
def make_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleFactory]:
    """``make_module(name, source)``: write ``name.py`` in a folder on sys.path and import it (again)."""
    folder = tmp_path / "modules"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    names: list[str] = []

    def make(name: str, source: str) -> types.ModuleType:
        path = folder / f"{name}.py"
        path.write_text(textwrap.dedent(source), encoding="utf-8")
        importlib.invalidate_caches()
        if name in sys.modules:
            return importlib.reload(sys.modules[name])
        names.append(name)
        return importlib.import_module(name)

    yield make
    for name in names:
        sys.modules.pop(name, None)


def run_python(args: list[str], *, cwd: Path, env: dict[str, str] | None = None, stdin: bytes | None = None,
               timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    """Run this interpreter with ``args`` and return what it did (bytes)."""
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, input=stdin, capture_output=True,
                          timeout=timeout, check=False)


@pytest.fixture
def python() -> Callable[..., subprocess.CompletedProcess[bytes]]:
    """:func:`run_python` as a fixture."""
    return run_python


# -- speaking the runner protocol by hand ---------------------------------------------------------------

def call_frames(session_bytes: bytes, key: bytes, **options: object) -> bytes:
    """What a coordinator writes to the runner's stdin for one call: G, S and s frames."""
    from remote_exec.protocol import wire

    call = {"key": key.hex(), "run_id": "unit", "heartbeat": 5.0, "no_pull": True, **options}
    return (wire.encode(b"G", json.dumps(call).encode()) + wire.encode(b"S", session_bytes)
            + wire.encode(b"s", json.dumps({"sha256": hashlib.sha256(session_bytes).hexdigest()}).encode()))


def read_frames(data: bytes) -> list[tuple[bytes, bytes]]:
    """Every whole frame in ``data`` (the runner's stdout); fails on trailing garbage."""
    from remote_exec.protocol import wire

    reader = wire.FrameReader()
    frames = reader.feed(data)
    assert reader.pending == 0, f"{reader.pending} stray bytes after the frames"
    return frames


@dataclass
class Served:
    """What a runner process sent back for one call."""

    frames: list[tuple[bytes, bytes]]
    returncode: int
    stderr: bytes

    def kinds(self) -> list[bytes]:
        return [kind for kind, _ in self.frames]

    def payload(self, kind: bytes) -> bytes:
        return b"".join(payload for frame_kind, payload in self.frames if frame_kind == kind)

    def header(self) -> dict[str, object]:
        header: dict[str, object] = json.loads(self.payload(b"R"))
        return header


def serve(argv: list[str], session_bytes: bytes, *, key: bytes = b"k" * 32, cwd: Path | None = None,
          env: dict[str, str] | None = None, timeout: float = 60, **options: object) -> Served:
    """Start a runner (``argv``), send it one call, read frames until the end of the result (Z), then close
    its stdin (a runner takes a closed stdin for a coordinator that went away) and wait for its exit."""
    from remote_exec.protocol import wire

    process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               cwd=cwd, env=env)
    assert process.stdin is not None and process.stdout is not None
    timer = threading.Timer(timeout, process.kill)
    timer.start()
    try:
        process.stdin.write(call_frames(session_bytes, key, **options))
        process.stdin.flush()
        reader = wire.FrameReader()
        received: list[tuple[bytes, bytes]] = []
        while not received or received[-1][0] != b"Z":
            data = os.read(process.stdout.fileno(), 1 << 16)
            if not data:
                break
            received += reader.feed(data)
        process.stdin.close()
        assert process.stderr is not None
        stderr = process.stderr.read()
        process.wait()
        process.stdout.close()
        process.stderr.close()
    finally:
        timer.cancel()
    return Served(frames=received, returncode=process.returncode, stderr=stderr)


@pytest.fixture
def frames() -> types.SimpleNamespace:
    """``frames.call(session_bytes, key, **options)``, ``frames.read(stdout)`` and ``frames.serve(argv, ...)``."""
    return types.SimpleNamespace(call=call_frames, read=read_frames, serve=serve)


# -- one call through dispatch over the LocalBackend ---------------------------------------------------


@dataclass
class Call:
    """What a :class:`Dispatcher` call produced, besides the outcome."""

    outcome: Any
    stdout: list[tuple[float, bytes]]
    stderr: bytes
    landed: Path
    started: float
    ended: float

    @property
    def result(self) -> Any:
        return self.outcome.result

    def text(self) -> str:
        return b"".join(chunk for _, chunk in self.stdout).decode()


class Dispatcher:
    """Runs tasks through :func:`remote_exec.protocol.call.dispatch` and a real runner in a local subprocess.

    Attributes:
        workers: The persistent workers of its ``keep_warm`` calls (closed after the test).
    """

    def __init__(self, root: Path) -> None:
        from remote_exec.packing import DistributionArchive
        from remote_exec.protocol.workers import WorkerPool

        self.root = root
        self.workdir = root / "remote"
        self.archive = DistributionArchive.build(cache_dir=root / "archives")
        self.workers = WorkerPool()

    @staticmethod
    def gone(pid: int) -> bool:
        """True when ``pid`` no longer runs (absent, or a zombie waiting for its parent)."""
        try:
            with open(f"/proc/{pid}/stat") as stream:
                return stream.read().rpartition(")")[2].split()[0] == "Z"
        except FileNotFoundError:
            return True

    def script(self, source: str, name: str = "task.py") -> Any:
        from remote_exec.task import Task

        path = self.root / name
        path.write_text(textwrap.dedent(source), encoding="utf-8")
        return Task.from_script(path)

    def run(self, task: Any, args: tuple[Any, ...] = (), *, backend: Any = None, land: bool = True,
            project: Any = None, on_progress: Any = None, stdin: Any = None, launcher: Any = None,
            ahead: Any = None, **options: Any) -> Call:
        from remote_exec.backends.local import LocalBackend
        from remote_exec.launchers import create_launcher
        from remote_exec.protocol.call import dispatch
        from remote_exec.protocol.options import CallOptions
        from remote_exec.session import Session
        from remote_exec.task import Execution

        if isinstance(task, str):
            task = self.script(task)
        session = Session(task=task, execution=Execution.create(task, args), run_id="unit")
        root, landed = self.root, self.root / "landed"
        stdout: list[tuple[float, bytes]] = []
        stderr = bytearray()

        class Lander:
            def stage(self) -> Path:
                return Path(tempfile.mkdtemp(dir=root))

            def land(self, staged: Path, files: Any) -> list[Path]:
                targets = []
                for relative in files:
                    target = landed / str(relative)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(staged / str(relative), target)
                    targets.append(target)
                shutil.rmtree(staged)
                return targets

        options.setdefault("python", sys.executable)
        options.setdefault("workdir", str(self.workdir))
        started = time.monotonic()
        outcome = dispatch(session, backend or LocalBackend(), self.archive, CallOptions(**options),
                           launcher=launcher or create_launcher("direct"), workers=self.workers,
                           on_stdout=lambda data: stdout.append((time.monotonic(), data)),
                           on_stderr=stderr.extend, land_file=Lander() if land else None, project=project,
                           on_progress=on_progress, stdin=stdin, ahead=ahead)
        return Call(outcome=outcome, stdout=stdout, stderr=bytes(stderr), landed=landed, started=started,
                    ended=time.monotonic())


@pytest.fixture
def dispatcher(isolated: Isolated) -> Iterator[Dispatcher]:
    """A :class:`Dispatcher` working in the test's temporary directory."""
    dispatcher = Dispatcher(isolated.root)
    yield dispatcher
    dispatcher.workers.close()

