"""Project-sync rows: a generated 10,000-file / 300 MB project (a git repository) going to a host, rx beside
``rsync -a`` and a ``tar | ssh tar`` pipe over the run's ControlMaster.

One probe measures the whole sequence of a repetition, in this order, so that no contender finds the
project changed by another's step:

1. first copies into empty places: the tar pipe, ``rsync -a``, ``rx sync --remote`` of each backend (the
   host's store emptied first; rx's archive stays);
2. untimed: everyone brought up to date (rsync into its directory, one ``rx run`` per backend);
3. nothing changed: ``rsync -a`` again, ``rx run`` of a no-op script in the project per backend;
4. one file changed: the same;
5. one file deleted: ``rsync -a --delete``, ``rx run``; the file comes back (untimed) for the next round.

rsync and tar ride an open ControlMaster; each ``rx`` command is a whole process of its own (interpreter
start, its own connection, scan, run, results), as a user types it.
"""

from __future__ import annotations

import os
import random
import shlex
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .harness import ProbeError, run_timed
from .report import Row, Target
from .stats import MB

__all__ = ["PROJECT_BYTES", "PROJECT_FILES", "SyncRig", "make_project", "sync_rows", "sync_targets"]

PROJECT_FILES = 10_000
PROJECT_BYTES = 300 * MB
FIRST = "Project sync: the first copy of a 10,000-file / 300 MB project (higher is better)"
LATER = "Project sync: later runs of the same project (lower is better)"
#: The small files that the changed and deleted steps touch.
CHANGED = "src/pkg000/mod0000.py"
DELETED = "src/pkg001/mod0001.py"


def sync_rows(backends: tuple[str, ...]) -> list[Row]:
    rows = [
        Row("sync.tar", "`tar -c | ssh host tar -x` pipe into an empty directory (ControlMaster)", "tar pipe",
            FIRST, None, PROJECT_BYTES),
        Row("sync.rsync_first", "`rsync -a` into an empty directory (ControlMaster)", "rsync first", FIRST, "sync.tar",
            PROJECT_BYTES),
    ]
    rows += [Row(f"rx-{backend}.sync_first", f"`rx sync --remote host` into an empty store ({backend}, whole command)",
                 f"rx sync first ({backend})", FIRST, "sync.tar", PROJECT_BYTES) for backend in backends]
    rows += [
        Row("sync.rsync_unchanged", "`rsync -a`, nothing changed", "rsync unchanged", LATER),
        Row("sync.rsync_changed", "`rsync -a`, one file changed", "rsync one change", LATER),
        Row("sync.rsync_deleted", "`rsync -a --delete`, one file deleted", "rsync one deletion", LATER),
    ]
    for backend in backends:
        rows += [
            Row(f"rx-{backend}.project_unchanged", f"`rx run` of a no-op script in the project, nothing changed "
                                                    f"({backend}, whole command)",
                f"rx run, project unchanged ({backend})", LATER, "sync.rsync_unchanged"),
            Row(f"rx-{backend}.project_changed", f"`rx run`, one file of the project changed ({backend})",
                f"rx run, one change ({backend})", LATER, "sync.rsync_changed"),
            Row(f"rx-{backend}.project_deleted", f"`rx run`, one file of the project deleted ({backend})",
                f"rx run, one deletion ({backend})", LATER, "sync.rsync_deleted"),
            Row(f"rx-{backend}.project_vs_trivial", f"`rx run`, project unchanged, against `rx run` of a trivial "
                                                     f"script in a one-file project ({backend})",
                f"rx run project/trivial ({backend})", LATER, f"rx-{backend}.run"),
            Row(f"rx-{backend}.sync_unchanged", f"rx sync from a warm process, nothing changed ({backend})",
                f"rx sync, unchanged ({backend})", LATER, "sync.rsync_unchanged"),
            Row(f"rx-{backend}.sync_changed", f"rx sync from a warm process, one file changed ({backend})",
                f"rx sync, one change ({backend})", LATER, "sync.rsync_changed"),
            Row(f"rx-{backend}.sync_deleted", f"rx sync from a warm process, one file deleted ({backend})",
                f"rx sync, one deletion ({backend})", LATER, "sync.rsync_deleted"),
            Row(f"rx-{backend}.call_unchanged", f"`@task` call of the project from a warm process, nothing changed "
                                                 f"({backend})", f"rx call, project unchanged ({backend})", LATER,
                "sync.rsync_unchanged"),
            Row(f"rx-{backend}.call_changed", f"`@task` call from a warm process, one file changed ({backend})",
                f"rx call, one change ({backend})", LATER, "sync.rsync_changed"),
            Row(f"rx-{backend}.call_deleted", f"`@task` call from a warm process, one file deleted ({backend})",
                f"rx call, one deletion ({backend})", LATER, "sync.rsync_deleted"),
        ]
    return rows


def sync_targets(backends: tuple[str, ...]) -> list[Target]:
    targets = []
    for backend in backends:
        name = "OpenSSH" if backend == "openssh" else backend
        targets += [
            Target(f"first sync ≥ 0.8x the tar pipe's throughput ({name})", f"rx-{backend}.sync_first", "sync.tar",
                   0.8, at_least=True),
            Target(f"unchanged run faster than rsync's no-change run ({name})", f"rx-{backend}.project_unchanged",
                   "sync.rsync_unchanged", 1.0),
            Target(f"one-change run faster than rsync's one-change run ({name})", f"rx-{backend}.project_changed",
                   "sync.rsync_changed", 1.0),
            Target(f"unchanged sync from a warm process faster than rsync's no-change run ({name})",
                   f"rx-{backend}.sync_unchanged", "sync.rsync_unchanged", 1.0),
            Target(f"one-change sync from a warm process faster than rsync's one-change run ({name})",
                   f"rx-{backend}.sync_changed", "sync.rsync_changed", 1.0),
            Target(f"an unchanged project adds ≤ 10% to a warm `rx run` of a trivial script ({name})",
                   f"rx-{backend}.project_vs_trivial", f"rx-{backend}.run", 1.1),
        ]
    return targets


def make_project(root: Path, *, files: int = PROJECT_FILES, total: int = PROJECT_BYTES) -> None:
    """A git repository of ``files`` files, ``total`` bytes: ten files of 15 MB (weights, data), the rest
    small sources and data files of 1-29 KB in 100 packages; random content (nothing compresses)."""
    chooser = random.Random(13)
    big = 10
    big_size = total // 2 // big
    small = [chooser.randint(1 << 10, 29 << 10) for _ in range(files - big)]
    scale = (total - big * big_size) / sum(small)
    small = [max(1, int(size * scale)) for size in small]
    small[-1] += total - big * big_size - sum(small)
    (root / "data").mkdir(parents=True)
    for index in range(big):
        _write(root / "data" / f"shard{index:02d}.bin", big_size)
    for index, size in enumerate(small):
        folder = root / "src" / f"pkg{index % 100:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        _write(folder / f"mod{index:04d}.py", size)
    (root / "noop.py").write_text("pass\n")
    (root / "bench_task.py").write_text("def noop(i):\n    return i\n")
    (root / ".gitignore").write_text("__pycache__/\n")
    env = {**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "b@b", "GIT_COMMITTER_NAME": "bench",
           "GIT_COMMITTER_EMAIL": "b@b"}
    for argv in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "project"]):
        subprocess.run(["git", "-C", str(root), *argv], check=True, capture_output=True, env=env, timeout=600)


def _write(path: Path, size: int) -> None:
    with path.open("wb") as stream:
        while size:
            chunk = os.urandom(min(size, 1 << 22))
            stream.write(chunk)
            size -= len(chunk)


@dataclass
class SyncRig:
    """The generated project, its config, and the commands of one repetition.

    Attributes:
        root: A directory with the rx configuration (``pyproject.toml``: the remotes ``sync-first``,
            ``sync-later`` and ``sync-warm``, each with its own workdir); the project is ``root/project`` (its
            root: ``.git``).
        host: The host.
        ssh: Builds an ssh argv over the ControlMaster (``ssh(host, command)``).
        ssh_options: The same options for rsync's ``-e``.
        rx: Builds an rx argv.
        env: The environment of rx commands.
        add: Records one sample of a row.
        samples: The samples of a row so far.
    """

    root: Path
    host: str
    ssh: Callable[..., list[str]]
    ssh_options: list[str]
    rx: Callable[..., list[str]]
    env: dict[str, str]
    add: Callable[[str, float], None]
    samples: Callable[[str], list[float]]
    round: int = 0

    @property
    def project(self) -> Path:
        return self.root / "project"

    @classmethod
    def create(cls, root: Path, host: str, **parts: Any) -> SyncRig:
        root.mkdir(parents=True, exist_ok=True)
        make_project(root / "project")
        (root / "pyproject.toml").write_text(
            f'[tool.rx.remotes.sync-first]\nhost = "{host}"\nworkdir = "~/.cache/rxbench-sync-first"\n'
            f'[tool.rx.remotes.sync-later]\nhost = "{host}"\nworkdir = "~/.cache/rxbench-sync-later"\n'
            f'[tool.rx.remotes.sync-warm]\nhost = "{host}"\nworkdir = "~/.cache/rxbench-sync-warm"\n')
        return cls(root=root, host=host, **parts)

    def _remote(self, command: str) -> None:
        done = subprocess.run(self.ssh(self.host, command), capture_output=True, timeout=120, check=False)
        if done.returncode != 0:
            raise ProbeError(f"ssh {command[:40]!r} exited {done.returncode}")

    def _rsync(self, target: str, *extra: str) -> float:
        shell = " ".join(shlex.quote(part) for part in ["ssh", *self.ssh_options])
        return run_timed(["rsync", "-a", *extra, "--exclude=.git", "-e", shell, f"{self.project}/",
                          f"{self.host}:{target}/"], timeout=300)

    def _tar(self, target: str) -> float:
        remote = shlex.join(self.ssh(self.host, f"mkdir -p {target} && tar -C {target} -xf -"))
        pipe = f"tar -C {shlex.quote(str(self.project))} --exclude=./.git -cf - . | {remote}"
        return run_timed(["bash", "-o", "pipefail", "-c", pipe], timeout=300)

    def _rx(self, backend: str, command: str, *args: str) -> float:
        return run_timed(self.rx(command, "--backend", backend, *args), timeout=300, cwd=self.project, env=self.env)

    def firsts(self, backends: tuple[str, ...]) -> None:
        """Step 1: first copies into empty places."""
        self._remote("rm -rf rxbench-tar rxbench-rsync-first")
        self.add("sync.tar", self._tar("rxbench-tar"))
        self.add("sync.rsync_first", self._rsync("rxbench-rsync-first"))
        for backend in backends:
            store = "~/.cache/rxbench-sync-first"
            self._remote(f"rm -rf {store}/blobs {store}/trees {store}/snapshots {store}/tmp {store}/runs")
            self.add(f"rx-{backend}.sync_first", self._rx(backend, "sync", "--remote", "sync-first"))

    def _run(self, backend: str, key: str, call: Callable[[str, str, str], float]) -> None:
        """One ``rx run`` (whole command), one warm sync and one warm call of the project, recorded as
        ``key`` (each finds the same change: they use different stores)."""
        self.add(f"rx-{backend}.project_{key}", self._rx(backend, "run", "--remote", "sync-later", "noop.py"))
        self.add(f"rx-{backend}.sync_{key}", call("sync", backend, str(self.project)))
        self.add(f"rx-{backend}.call_{key}", call("project", backend, str(self.project)))

    def later(self, backends: tuple[str, ...], trivial: Callable[[str], float],
              call: Callable[[str, str, str], float]) -> None:
        """Steps 2 to 5: up to date, then unchanged, one file changed, one file deleted. ``call(op, backend,
        root)`` times a warm process's ``sync`` of the project or ``project`` call (a ``@task`` of it)."""
        self._rsync("rxbench-rsync")
        for backend in backends:
            self._rx(backend, "run", "--remote", "sync-later", "noop.py")
            call("sync", backend, str(self.project))
            call("project", backend, str(self.project))
        self.add("sync.rsync_unchanged", self._rsync("rxbench-rsync"))
        for backend in backends:
            self._run(backend, "unchanged", call)
            self.add(f"rx-{backend}.project_vs_trivial", self.samples(f"rx-{backend}.project_unchanged")[-1])
            self.add(f"rx-{backend}.run", trivial(backend))
        self.round += 1
        (self.project / CHANGED).write_bytes(os.urandom(2000) + str(time.time()).encode())
        self.add("sync.rsync_changed", self._rsync("rxbench-rsync"))
        for backend in backends:
            self._run(backend, "changed", call)
            (self.project / CHANGED).write_bytes(os.urandom(2000) + str(time.time()).encode())  # a change for each
        kept = (self.project / DELETED).read_bytes()
        (self.project / DELETED).unlink()
        try:
            self.add("sync.rsync_deleted", self._rsync("rxbench-rsync", "--delete"))
            for backend in backends:
                self._run(backend, "deleted", call)
        finally:
            (self.project / DELETED).write_bytes(kept)

    def cleanup(self) -> None:
        """Remove what the rows left on the host."""
        self._remote("rm -rf rxbench-tar rxbench-rsync-first rxbench-rsync ~/.cache/rxbench-sync-first "
                     "~/.cache/rxbench-sync-later ~/.cache/rxbench-sync-warm")
