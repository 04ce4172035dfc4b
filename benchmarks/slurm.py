"""Slurm rows: a trivial task's submit-to-result through rx against the raw floor, and a 100-element map as
one job array against 100 single submissions, on the Docker Slurm cluster (testbed/_slurm.py).

The raw floor is what a hand-written script does at best: ``ssh login sbatch --wrap true`` through an open
ControlMaster, then ``squeue`` through it until the job is done, polled on rx's own schedule (at once, then
after 1 s, the interval doubling while nothing changes). rx's row is one ``@task`` call from a warm process
(its connection open, its archive on the cluster): it stores the call, submits it, follows its output
from the shared files and collects its result and the job's accounting.

Run alone (``python -m benchmarks.slurm --reps 10``) or as part of ``python -m benchmarks``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from .report import Results, Row, Target

__all__ = ["ROWS", "TARGETS", "measure"]

HERE = Path(__file__).resolve().parent
SECTION = "Slurm through its login node (Docker cluster: Slurm 22.05, 2 compute nodes)"
ROWS = [
    Row("slurm.floor", "raw floor: `ssh login sbatch --wrap true` + `squeue` polled on rx's schedule until done "
                       "(open ControlMaster)", "raw sbatch + squeue", SECTION),
    Row("slurm.task", "rx: a trivial `@task` call on the Slurm remote, submit to result (warm process)",
        "rx task on Slurm", SECTION, "slurm.floor"),
    Row("slurm.single100", "rx: 100 calls as 100 single submissions (10 at a time, threads), wall",
        "100 single jobs", SECTION),
    Row("slurm.array100", "rx: 100 calls as one job array (`Coordinator.map_array`, `--array=0-99`), wall",
        "100 calls, one array", SECTION, "slurm.single100"),
]
TARGETS = [
    Target("Slurm: a trivial task's submit-to-result ≤ 1.2x the raw sbatch + squeue floor", "slurm.task",
           "slurm.floor", 1.2),
    Target("Slurm: 100 calls as one array faster than 100 single submissions", "slurm.array100",
           "slurm.single100", 1.0),
]

# Runs in its own process (a warm coordinator): prints one JSON line per sample.
_DRIVER = textwrap.dedent('''\
    import json, subprocess, sys, time
    from concurrent.futures import ThreadPoolExecutor
    from remote_exec import task
    from remote_exec.coordinator import Coordinator

    ssh = json.loads(sys.argv[1])
    reps, maps = int(sys.argv[2]), int(sys.argv[3])

    @task(remote="cluster")
    def trivial(index=0):
        return index

    def say(key, seconds):
        print(json.dumps({"key": key, "seconds": seconds}), flush=True)

    def floor():
        started = time.perf_counter()
        job = subprocess.run(ssh + ["sbatch --parsable --output=/dev/null --wrap true"], capture_output=True,
                             text=True, check=True).stdout.strip()
        interval, last = 1.0, None
        while True:
            state = subprocess.run(ssh + [f"squeue -h -t all -j {job} -o %T"], capture_output=True,
                                   text=True).stdout.strip()
            if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", ""):
                return time.perf_counter() - started
            interval = 1.0 if state != last else min(interval * 2, 30.0)
            last = state
            time.sleep(interval)

    trivial()  # warm: the connection, the archive on the cluster, the imports
    floor()
    for rep in range(reps):
        for key in (("slurm.floor", "slurm.task") if rep % 2 == 0 else ("slurm.task", "slurm.floor")):
            if key == "slurm.floor":
                say(key, floor())
            else:
                started = time.perf_counter()
                assert trivial(rep) == rep
                say(key, time.perf_counter() - started)
    for rep in range(maps):
        started = time.perf_counter()
        results = Coordinator.current().map_array(trivial, range(100))
        assert [result.unwrap() for result in results] == list(range(100))
        say("slurm.array100", time.perf_counter() - started)
        started = time.perf_counter()
        with ThreadPoolExecutor(10) as pool:
            assert list(pool.map(trivial, range(100))) == list(range(100))
        say("slurm.single100", time.perf_counter() - started)
''')


def measure(results: Results, *, reps: int, maps: int, work: Path, env: dict[str, str]) -> dict[str, str]:
    """Start the Slurm testbed in ``work``, take the samples into ``results``, remove the testbed; return
    lines for the run's description."""
    sys.path.insert(0, str(HERE.parent))
    from testbed import slurm_down, slurm_up

    state = work / "slurm-testbed"
    cluster = slurm_up(state)
    try:
        project = work / "slurm-project"
        project.mkdir(parents=True, exist_ok=True)
        (project / "pyproject.toml").write_text(
            f'[tool.rx]\nssh_config = "{cluster.ssh_config}"\n\n[tool.rx.remotes.cluster]\n'
            f'host = "{cluster.alias}"\nscheduler = "slurm"\n')
        (project / "driver.py").write_text(_DRIVER)
        control = Path(tempfile.mkdtemp(prefix="rxb-", dir="/tmp"))
        ssh = ["ssh", "-F", str(cluster.ssh_config), "-o", f"ControlPath={control}/%C", "-o", "ControlMaster=auto",
               "-o", "ControlPersist=120", cluster.alias]
        subprocess.run([*ssh, "true"], check=True, capture_output=True, timeout=60)
        try:
            _drive(results, project, ssh, reps, maps, env)
        finally:
            subprocess.run([*ssh[:-1], "-O", "exit", cluster.alias], capture_output=True, timeout=30, check=False)
        _, version = cluster.exec("head", "sinfo --version")
        return {"Slurm testbed": f"{version.strip()} in Docker (login node + 2 compute nodes, "
                                 "sched_interval=2), rx's default poll schedule (1 s, doubling to 30 s)"}
    finally:
        slurm_down(state)


def _drive(results: Results, project: Path, ssh: list[str], reps: int, maps: int, env: dict[str, str]) -> None:
    environment = {**os.environ, **env, "RX_WORKSPACE": str(project / ".rx"), "PYTHONUNBUFFERED": "1"}
    environment.pop("RX_SSH_CONFIG", None)
    done = subprocess.run([sys.executable, "driver.py", json.dumps(ssh), str(reps), str(maps)], cwd=project,
                          env=environment, capture_output=True, text=True, timeout=600 + 60 * reps, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            sample: dict[str, Any] = json.loads(line)
            results.add(sample["key"], float(sample["seconds"]))
    if done.returncode != 0:
        for row in ROWS:
            results.fail(row.key, (done.stderr.strip().splitlines() or ["the driver failed"])[-1])


def main(argv: list[str] | None = None) -> int:
    from .report import render_tables, render_targets

    parser = argparse.ArgumentParser(prog="python -m benchmarks.slurm", description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=10, help="samples of the task and floor rows (default 10)")
    parser.add_argument("--maps", type=int, default=1, help="samples of the 100-call rows (default 1)")
    args = parser.parse_args(argv)
    results = Results()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="rx-slurm-bench-") as work:
        info = measure(results, reps=args.reps, maps=args.maps, work=Path(work),
                       env={"PYTHONPATH": str(HERE.parent)})
    print("\n".join(f"- {name}: {value}" for name, value in info.items()))
    print(f"- {time.monotonic() - started:.0f} s\n")
    print(render_tables(ROWS, results))
    print(render_targets(TARGETS, ROWS, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
