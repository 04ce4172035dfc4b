"""Environment rows (``--only envs``, issue 14): a numpy + pandas environment built on a testbed host that has
neither and no index, by rx beside the same install done by hand over ssh with the same wheels.

The wheels (numpy, pandas and their dependencies for the host's CPython 3.11 on manylinux) are fetched once
on the coordinator into ``RX_TEST_WHEELS`` (default ``~/.cache/rx-test-wheels``, the folder the integration
test uses); the testbed host never reaches an index. One probe measures a repetition, in this order:

1. by hand: the wheels to the host (``tar | ssh tar`` over the run's ControlMaster), then ``uv venv`` +
   ``uv pip sync --offline --no-index --find-links --require-hashes`` with an empty uv cache, then the same
   again with uv's cache warm, then ``python3 -m venv --without-pip`` + ``pip install --no-index
   --find-links`` (pip run from its wheel: the testbed host has neither pip nor ensurepip);
2. per backend: ``rx run --deps numpy --deps pandas`` of a script importing both, with the host's
   environments, blobs, trees and uv cache removed first (rx's uv binary and runner stay), then the same command
   again (a cache hit), then ``rx run`` of a script without deps in the same project.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .harness import ProbeError, run_timed
from .report import Row, Target

__all__ = ["WHEELS", "EnvRig", "env_rows", "env_targets"]

SECTION = "Environments: numpy + pandas on a host without them, no index (lower is better)"
WHEELS = Path(os.environ.get("RX_TEST_WHEELS") or Path.home() / ".cache" / "rx-test-wheels")
#: Where the by-hand rows work on the host (removed after the run).
HAND = "rxbench-envs-hand"
SCRIPT = "import numpy as np, pandas as pd\nprint(pd.DataFrame({'a': np.arange(4)})['a'].sum())\n"


def env_rows(backends: Sequence[str]) -> list[Row]:
    rows = [
        Row("envs.ship", "by hand: the wheels (numpy, pandas and their dependencies) to the host, `tar | ssh tar`",
            "wheel transfer", SECTION),
        Row("envs.uv_hand", "by hand over ssh: wheel transfer + `uv venv` + `uv pip sync --offline --no-index "
                            "--find-links --require-hashes`, uv's cache empty", "uv by hand", SECTION),
        Row("envs.uv_hand_warm", "by hand over ssh: `uv venv` + `uv pip sync` again into a new venv, uv's cache "
                                 "warm", "uv by hand, warm cache", SECTION, "envs.uv_hand"),
        Row("envs.pip_hand", "by hand over ssh: wheel transfer + `python3 -m venv --without-pip` + `pip install "
                             "--no-index --find-links` (pip run from its wheel)", "pip by hand", SECTION,
                "envs.uv_hand"),
    ]
    for backend in backends:
        rx = f"rx-{backend}"
        rows += [
            Row(f"{rx}.env_first", f"`rx run --deps numpy --deps pandas` ({backend}, whole command): no environment "
                                   "on the host (wheels shipped, built, run; the lock cached here)",
                f"rx first build ({backend})", SECTION, "envs.uv_hand"),
            Row(f"{rx}.env_build", f"first build minus the cache hit of the same repetition ({backend}): what "
                                   "building adds to the run (wheels shipped, resolution if not cached, install)",
                f"rx build's extra ({backend})", SECTION, "envs.uv_hand"),
            Row(f"{rx}.env_hit", f"the same command again ({backend}): the environment's cache hit",
                f"rx cache hit ({backend})", SECTION, f"{rx}.env_plain"),
            Row(f"{rx}.env_plain", f"`rx run` of a script without deps in the same project ({backend})",
                f"rx run without deps ({backend})", SECTION),
            Row(f"{rx}.env_extra", f"cache hit minus the run without deps of the same repetition ({backend})",
                f"cache hit's extra ({backend})", SECTION),
        ]
    return rows


def env_targets(backends: Sequence[str]) -> list[Target]:
    targets = []
    for backend in backends:
        rx = f"rx-{backend}"
        targets += [
            Target(f"environment cache hit adds ≤ 0.3 s to a run ({backend})", f"{rx}.env_extra", None, 0.3),
            Target(f"first offline build (what it adds to the run) ≤ 1.2x uv by hand plus the wheel transfer "
                   f"({backend})", f"{rx}.env_build", "envs.uv_hand", 1.2),
        ]
    return targets


def fetch_wheels(folder: Path = WHEELS) -> Path:
    """The numpy + pandas wheels for CPython 3.11 on manylinux x86_64, downloaded from PyPI once (here only)."""
    if list(folder.glob("numpy-*-cp311-*.whl")) and list(folder.glob("pandas-*-cp311-*.whl")):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["pip", "download", "--only-binary=:all:", "--platform", "manylinux_2_28_x86_64",
                           "--python-version", "3.11", "-d", str(folder), "numpy", "pandas"],
                          capture_output=True, text=True, timeout=600, check=False)
    if done.returncode:
        raise ProbeError(f"fetching the numpy/pandas wheels failed: {done.stderr.strip()[-300:]}")
    return folder


@dataclass
class EnvRig:
    """The project, lock and tarball of the environment rows, and how to reach the host."""

    root: Path
    host: str
    ssh: Callable[..., list[str]]
    rx: Callable[..., list[str]]
    env: dict[str, str]
    add: Callable[[str, float], None]

    @classmethod
    def create(cls, root: Path, host: str, *, ssh: Callable[..., list[str]], rx: Callable[..., list[str]],
               env: dict[str, str], add: Callable[[str, float], None], backends: Sequence[str]) -> EnvRig:
        wheels = fetch_wheels()
        root.mkdir(parents=True)
        rig = cls(root, host, ssh, rx, env, add)
        uv = _uv()
        lock = subprocess.run([uv, "pip", "compile", "-", "--quiet", "--no-header", "--no-annotate",
                               "--generate-hashes", "--offline", "--no-index", "--find-links", str(wheels),
                               "--python-version", "3.11", "--python-platform", "x86_64-manylinux_2_28"],
                              input="numpy\npandas\n", capture_output=True, text=True, timeout=120, check=False)
        if lock.returncode:
            raise ProbeError(f"uv pip compile of numpy + pandas failed: {lock.stderr.strip()[-300:]}")
        bundle = root / "bundle"
        (bundle / "wheels").mkdir(parents=True)
        for wheel in wheels.glob("*.whl"):
            shutil.copy2(wheel, bundle / "wheels" / wheel.name)
        (bundle / "requirements.txt").write_text(lock.stdout, encoding="utf-8")
        shutil.copy2(_pip_wheel(), bundle / "pip.whl")  # the host has no pip: pip runs from its wheel
        with tarfile.open(root / "bundle.tar", "w") as tar:
            tar.add(bundle, arcname=".")
        # uv on the host for the by-hand rows: this machine's own binary (rx ships the same one)
        rig.remote(f"rm -rf {HAND} && mkdir -p {HAND}/bin")
        with open(uv, "rb") as binary:
            subprocess.run(rig.ssh(host, f"cat > {HAND}/bin/uv && chmod +x {HAND}/bin/uv"), stdin=binary,
                           check=True, timeout=120, capture_output=True)
        project = root / "project"
        project.mkdir()
        remotes = "".join(f'\n[tool.rx.remotes.envs-{backend}]\nhost = "{host}"\nworkdir = "~/rxbench-envs-{backend}"\n'
                          for backend in backends)
        (project / "pyproject.toml").write_text(
            f'[project]\nname = "rxbench-envs"\nversion = "0"\n\n[tool.rx]\nfind_links = ["{wheels}"]\n'
            f"offline = true\n{remotes}", encoding="utf-8")
        (project / "frame.py").write_text(SCRIPT, encoding="utf-8")
        (project / "plain.py").write_text("print(6)\n", encoding="utf-8")
        return rig

    def remote(self, command: str, timeout: float = 300) -> None:
        done = subprocess.run(self.ssh(self.host, command), capture_output=True, text=True, timeout=timeout,
                              check=False)
        if done.returncode:
            raise ProbeError(f"{command[:60]}: {done.stderr.strip()[-300:]}")

    def by_hand(self) -> None:
        """The wheels shipped, then uv (cache empty, then warm) and pip over ssh; one sample each."""
        self.remote(f"cd {HAND} && rm -rf bundle venv* uv-cache")
        with open(self.root / "bundle.tar", "rb") as tar:
            ship = run_timed(self.ssh(self.host, f"mkdir -p {HAND}/bundle && tar -x -C {HAND}/bundle"),
                             stdin=tar, timeout=300)
        self.add("envs.ship", ship)
        uv = (f"cd {HAND} && export UV_CACHE_DIR=$PWD/uv-cache UV_NO_PROGRESS=1 UV_PYTHON_DOWNLOADS=never && "
              "bin/uv venv -q --python /usr/bin/python3 {venv} && VIRTUAL_ENV=$PWD/{venv} bin/uv pip sync -q "
              "--offline --no-index --find-links bundle/wheels --require-hashes bundle/requirements.txt")
        self.add("envs.uv_hand", ship + run_timed(self.ssh(self.host, uv.format(venv="venv-uv")), timeout=300))
        self.add("envs.uv_hand_warm", run_timed(self.ssh(self.host, uv.format(venv="venv-uv2")), timeout=300))
        pip = (f"cd {HAND} && python3 -m venv --without-pip venv-pip && venv-pip/bin/python bundle/pip.whl/pip "
               "install -q --disable-pip-version-check --no-index --find-links bundle/wheels "
               "-r bundle/requirements.txt")
        self.add("envs.pip_hand", ship + run_timed(self.ssh(self.host, pip), timeout=600))

    def with_rx(self, backend: str, argv: Callable[[str, str], list[str]]) -> None:
        """rx's first build (the host's environments, wheels and uv cache removed first), its cache hit and a
        run without deps."""
        rx = f"rx-{backend}"
        workdir = f"rxbench-envs-{backend}"
        self.remote(f"cd {workdir} 2>/dev/null && rm -rf envs blobs trees snapshots uv-cache || true")
        project = self.root / "project"

        def run(script: str, *deps: str) -> float:
            return run_timed([*argv(backend, f"envs-{backend}"), *deps, script], timeout=600, cwd=project,
                             env=self.env)

        first = run("frame.py", "--deps", "numpy", "--deps", "pandas")
        hit = run("frame.py", "--deps", "numpy", "--deps", "pandas")
        self.add(f"{rx}.env_first", first)
        self.add(f"{rx}.env_build", max(first - hit, 0.0))
        plain = run("plain.py")
        self.add(f"{rx}.env_hit", hit)
        self.add(f"{rx}.env_plain", plain)
        self.add(f"{rx}.env_extra", max(hit - plain, 0.0))

    def cleanup(self, backends: Sequence[str]) -> None:
        self.remote(f"rm -rf {HAND} " + " ".join(shlex.quote(f"rxbench-envs-{b}") for b in backends))


def _pip_wheel() -> Path:
    """The pip wheel this interpreter's ensurepip bundles (no download)."""
    import ensurepip

    found = sorted((Path(ensurepip.__file__).parent / "_bundled").glob("pip-*.whl"))
    if not found:
        raise ProbeError("no pip wheel bundled with this Python's ensurepip")
    return found[-1]


def _uv() -> str:
    import uv  # type: ignore[import-not-found,unused-ignore]

    return str(uv.find_uv_bin())
