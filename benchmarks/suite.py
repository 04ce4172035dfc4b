"""The benchmark run: testbed up, every contender measured round-robin, the table printed, RESULTS.md written.

Each *probe* takes one sample (or a few) of one contender. A repetition runs every probe once, starting
one further along each time (round-robin), so a drift in the machine's load touches every contender alike.
Heavy probes (10 MB and 100 MB round trips, bandsaw) run every k-th repetition, spread over the run.
A probe that fails three times in a row is given up, and its rows say why.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from .envs import SECTION as ENVS
from .envs import EnvRig, env_rows, env_targets
from .harness import Agent, ProbeError, Unsupported, one_shot, run_timed
from .projectsync import FIRST, LATER, SyncRig, sync_rows, sync_targets
from .report import (
    PhaseRecord,
    Results,
    Row,
    Target,
    phase_records,
    render_phases,
    render_tables,
    render_targets,
)
from .slurm import ROWS as SLURM_ROWS
from .slurm import TARGETS as SLURM_TARGETS
from .slurm import measure as measure_slurm
from .stats import MB, format_seconds

__all__ = ["ROWS", "TARGETS", "main"]

logger = logging.getLogger("benchmarks")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PAYLOAD_DIR = HERE / "payload"
WORK = HERE / ".work"
BACKENDS = ("openssh", "paramiko")
SIZES = (1 * MB, 10 * MB, 100 * MB)
TRIVIAL = "python3 -c pass"
REMOTE_BLOB = "rxbench-100mb"
#: Trivial calls per fan-out sample.
FANOUT_CALLS = 1000
#: Files the result-tree rows' script writes (one small file each, in one folder).
TREE_FILES = 5000
TREE_SCRIPT = ("import os, sys\nos.makedirs('many', exist_ok=True)\nfor i in range(int(sys.argv[1])):\n"
               "    with open(os.path.join('many', str(i)), 'w') as f:\n        f.write(str(i))\n")


def _size_name(size: int) -> str:
    return f"{size // MB} MB"


def _rows() -> list[Row]:
    lat = "Latency: one trivial call (lower is better)"
    thr = "Throughput: bytes argument returned as result (higher is better)"
    start = "Start-up on the coordinator"
    rows = [
        Row("ssh.cold", f"raw `ssh host {TRIVIAL}`, cold (new connection)", "cold ssh", lat),
        Row("ssh.mux", f"raw `ssh host {TRIVIAL}`, multiplexed (ControlMaster)", "multiplexed ssh", lat),
        Row("ssh.mux_hosts", f"raw `ssh host {TRIVIAL}`, multiplexed, on 4 hosts at once (threads), wall",
            "multiplexed ssh, 4 hosts", lat, "ssh.mux"),
        Row("paramiko.exec", f"paramiko exec `{TRIVIAL}` on an open transport, TCP_NODELAY", "paramiko exec", lat,
            "ssh.mux"),
        Row("paramiko.exec_delay", f"paramiko exec `{TRIVIAL}` on an open transport, without TCP_NODELAY",
            "paramiko exec (Nagle)", lat, "ssh.mux"),
        Row("bandsaw.task", "bandsaw 0.3 `@task` with its SSH advice, per task", "bandsaw", lat, "ssh.cold"),
        Row("execnet.cold", "execnet: gateway start + first call", "execnet start", lat, "ssh.cold"),
        Row("execnet.warm", "execnet: warm call (`remote_exec` on an open gateway)", "execnet warm", lat, "ssh.mux"),
        Row("mitogen.cold", "mitogen: context start + first call", "mitogen start", lat, "ssh.cold"),
        Row("mitogen.warm", "mitogen: warm call (`context.call`)", "mitogen warm", lat, "ssh.mux"),
    ]
    for backend in BACKENDS:
        rx = f"rx-{backend}"
        rows += [
            Row(f"{rx}.first", f"rx ({backend}): first call to a fresh host (from a running process; "
                               "connect, upload the archive, run, result back)",
                f"rx first call ({backend})", lat, "ssh.cold"),
            Row(f"{rx}.first_process", f"rx ({backend}): first call of a new process (also its imports on "
                                       "first use and the archive build)",
                f"rx first call, new process ({backend})", lat, "ssh.cold"),
            Row(f"{rx}.warm", f"rx ({backend}): warm call, unchanged code, process per call",
                f"rx warm ({backend})", lat, "ssh.mux"),
            Row(f"{rx}.warm_value", f"rx ({backend}): warm call of a `__main__` function (sent by value), process "
                                    "per call, in the warm call's one-file project",
                f"rx warm, by value ({backend})", lat, "ssh.mux"),
            Row(f"{rx}.warm_value_repo", f"rx ({backend}): the same, in a project of some 300 files (this repository): "
                                         "each call stats them on both sides",
                f"rx warm, by value, repository project ({backend})", lat, "ssh.mux"),
            Row(f"{rx}.edited_value", f"rx ({backend}): the same, each call after an edit of a file of its "
                                      "project (a tree the host has not seen: the edit-run cycle)",
                f"rx warm, by value, after an edit ({backend})", lat, "ssh.mux"),
            Row(f"{rx}.first_value", f"rx ({backend}): first call of a new `python -c` process, a `__main__` "
                                     "function (by value), no connection open before (the master the last "
                                     "one left has ended, as after its idle ControlPersist), no project",
                f"rx first call, by value ({backend})",
                lat, "ssh.cold"),
            Row(f"{rx}.first_value_fresh", f"rx ({backend}): the same in a runtime directory rx never used (no "
                                           "memo of its master: as on a new machine)",
                f"rx first call, by value, new machine ({backend})", lat, "ssh.cold"),
            Row(f"{rx}.keep_warm", f"rx ({backend}): warm call with `keep_warm=True`",
                f"rx keep_warm ({backend})", lat, "mitogen.warm"),
            Row(f"{rx}.run", f"`rx run` of a trivial script, whole command, no connection open before: the "
                             f"master the last one left has ended, as after its idle ControlPersist ({backend}, "
                             "wall)", f"rx run ({backend})", lat, "ssh.cold"),
            Row(f"{rx}.run_fresh", f"`rx run` of a trivial script, whole command, no connection open before, "
                                   f"in a runtime directory rx never used (no memo of its master: as on a new "
                                   f"machine) ({backend}, wall)", f"rx run, new machine ({backend})", lat,
                "ssh.cold"),
            Row(f"{rx}.run_second", f"`rx run` of a trivial script, whole command, after another one (through the "
                                    f"rx server the first left; {backend}, wall; OpenSSH: over the master the first "
                                    f"left)",
                f"second rx run ({backend})", lat, "ssh.cold"),
            Row(f"{rx}.hosts_parallel", f"rx ({backend}): the warm call on 4 hosts at once (threads), wall",
                f"4 hosts at once ({backend})", lat, f"{rx}.warm"),
            Row(f"{rx}.hosts_serial", f"rx ({backend}): the warm call on 4 hosts one after another, wall",
                f"4 hosts in turn ({backend})", lat, f"{rx}.warm"),
            Row(f"{rx}.hosts_parallel_kw", f"rx ({backend}): the `keep_warm=True` call on 4 hosts at once "
                                           "(threads), wall",
                f"4 hosts at once, keep_warm ({backend})", lat, f"{rx}.keep_warm"),
        ]
    rows += [
        Row("ssh.cat", "raw `ssh host cat` pipe: 100 MB up (`cat > /dev/null`) + 100 MB down (`cat file`)",
            "ssh cat pipe", thr, None, 2 * 100 * MB),
        Row("paramiko.sftp", "paramiko SFTP: put 100 MB + get 100 MB", "paramiko SFTP", thr, "ssh.cat", 2 * 100 * MB),
    ]
    for size in SIZES:
        name = _size_name(size)
        for backend in BACKENDS:
            reference = "ssh.cat" if backend == "openssh" else "paramiko.sftp"
            rows.append(Row(f"rx-{backend}.echo{size // MB}", f"rx ({backend}): {name} argument + {name} result",
                            f"rx {name} ({backend})", thr, reference, 2 * size))
        for peer in ("execnet", "mitogen"):
            rows.append(Row(f"{peer}.echo{size // MB}", f"{peer}: {name} argument + {name} result",
                            f"{peer} {name}", thr, "ssh.cat", 2 * size))
    tree = f"Result tree: a script writes {TREE_FILES:,} small files, brought back, whole command (lower is better)"
    rows.append(Row("ssh.tree", "raw: cold `ssh host` runs the script in a new folder, then `tar c` of its files piped "
                                "into a local `tar x` (nothing checked, nothing synced)", "ssh + tar", tree))
    rows += [Row(f"rx-{backend}.tree", f"`rx run` of the script, whole command, no connection open before: its files "
                                       f"checked and landed in the workspace ({backend}, wall)",
                 f"rx run, result tree ({backend})", tree, "ssh.tree") for backend in BACKENDS]
    fan = f"Fan-out: {FANOUT_CALLS:,} trivial calls over 4 hosts, wall (lower is better)"
    rows += [
        Row("execnet.fanout", f"execnet: {FANOUT_CALLS:,} calls round-robin over a Group of 4 gateways (a thread, "
                              "one call in flight, per host)", "execnet Group", fan),
        Row("mitogen.fanout", f"mitogen: {FANOUT_CALLS:,} `context.call` round-robin over 4 contexts (a thread, one "
                              "call in flight, per host)", "mitogen contexts", fan, "execnet.fanout"),
    ]
    for backend in BACKENDS:
        rx = f"rx-{backend}"
        rows += [
            Row(f"{rx}.pool_map", f"rx ({backend}): `Executor(4 hosts).map` of {FANOUT_CALLS:,} calls (a slot per "
                                  "host)", f"Executor.map ({backend})", fan, "mitogen.fanout"),
            Row(f"{rx}.threads_map", f"rx ({backend}): {FANOUT_CALLS:,} process-per-call `@task` calls, round-robin "
                                     "from 4 threads", f"4 threads of rx calls ({backend})", fan, f"{rx}.pool_map"),
            Row(f"{rx}.pool_naps", f"rx ({backend}): `Executor(4 hosts, per_host=2).map` of 40 one-second calls "
                                   "(ideal: 5 s)", f"40 x 1 s on 8 slots ({backend})", fan),
        ]
    rows += [
        Row("startup.python", "`python -c pass` (local interpreter start, rx's venv)", "python -c pass", start),
        Row("startup.importtime", "`python -X importtime -c \"import remote_exec.cli\"`: total import time",
            "import remote_exec.cli", start),
        Row("startup.importtime_help", "`python -X importtime -m remote_exec --help`: total import time",
            "rx --help imports", start),
        Row("startup.help", "`rx --help`, wall, without an rx server (`RX_SERVER=0`: the imports of every command)",
            "rx --help", start, "startup.python"),
    ]
    return rows


ROWS = _rows() + sync_rows(BACKENDS) + SLURM_ROWS + env_rows(BACKENDS)
#: The keys' ends of the pool's rows (``--only pool``).
POOL_ROWS = (".fanout", ".pool_map", ".threads_map", ".pool_naps")

TARGETS = [
    Target("first call ≤ 1.1x cold ssh (OpenSSH)", "rx-openssh.first", "ssh.cold", 1.1),
    Target("first call ≤ 0.7x cold ssh (paramiko)", "rx-paramiko.first", "ssh.cold", 0.7),
    Target("warm call, process per call ≤ 1.5x multiplexed ssh (OpenSSH)", "rx-openssh.warm", "ssh.mux", 1.5),
    Target("warm call, process per call ≤ 1.5x multiplexed ssh (paramiko)", "rx-paramiko.warm", "ssh.mux", 1.5),
    Target("first `rx run` ≤ 1.3x cold ssh (OpenSSH)", "rx-openssh.run", "ssh.cold", 1.3),
    Target("second `rx run` within the persist window ≤ 0.6x cold ssh (OpenSSH)", "rx-openssh.run_second",
           "ssh.cold", 0.6),
    Target("warm call by value, process per call ≤ 1.5x multiplexed ssh (OpenSSH)", "rx-openssh.warm_value",
           "ssh.mux", 1.5),
    Target("warm call by value, process per call ≤ 1.5x multiplexed ssh (paramiko)", "rx-paramiko.warm_value",
           "ssh.mux", 1.5),
    Target("first call by value of a new process ≤ 1.1x cold ssh (OpenSSH)", "rx-openssh.first_value", "ssh.cold",
           1.1),
    Target("first call by value of a new process ≤ 0.8x cold ssh (paramiko)", "rx-paramiko.first_value",
           "ssh.cold", 0.8),
    Target("keep_warm warm call ≤ 1 ms median (OpenSSH)", "rx-openssh.keep_warm", None, 0.001),
    Target("keep_warm warm call ≤ 1 ms median (paramiko)", "rx-paramiko.keep_warm", None, 0.001),
    Target("keep_warm warm call no slower than mitogen's warm call (OpenSSH)", "rx-openssh.keep_warm",
           "mitogen.warm", 1.0),
    Target("keep_warm warm call no slower than mitogen's warm call (paramiko)", "rx-paramiko.keep_warm",
           "mitogen.warm", 1.0),
    Target("100 MB argument + 100 MB result ≥ 50% of the ssh cat pipe (OpenSSH)", "rx-openssh.echo100", "ssh.cat",
           0.5, at_least=True),
    Target("100 MB argument + 100 MB result ≥ 80% of paramiko's own SFTP put + get (paramiko)",
           "rx-paramiko.echo100", "paramiko.sftp", 0.8, at_least=True),
    Target("4 hosts at once, wall ≤ 1.5x one host (OpenSSH)", "rx-openssh.hosts_parallel", "rx-openssh.warm", 1.5),
    Target("4 hosts at once, wall ≤ 1.5x one host (paramiko)", "rx-paramiko.hosts_parallel", "rx-paramiko.warm",
           1.5),
    Target("bandsaw per task / rx warm call ≥ 50 (OpenSSH)", "bandsaw.task", "rx-openssh.warm", 50, at_least=True),
    Target("bandsaw per task / rx warm call ≥ 50 (paramiko)", "bandsaw.task", "rx-paramiko.warm", 50, at_least=True),
    *sync_targets(BACKENDS),
    *(Target(f"Executor.map of {FANOUT_CALLS:,} calls over 4 hosts no slower than {peer}'s ({backend})",
             f"rx-{backend}.pool_map", f"{peer}.fanout", 1.0)
      for backend in BACKENDS for peer in ("execnet", "mitogen")),
    *(Target(f"40 one-second calls over 4 hosts x 2 slots ≤ 1.15 x the ideal 5 s ({backend})",
             f"rx-{backend}.pool_naps", None, 5.75) for backend in BACKENDS),
    *SLURM_TARGETS,
    *env_targets(BACKENDS),
]


@dataclass(frozen=True)
class Settings:
    """How much to measure.

    Attributes:
        reps: Repetitions (rounds over every probe).
        quick: The smoke run.
        warm_calls: Timed calls per warm-call request (each is a sample).
        medium_every: 10 MB round trips and bandsaw run every this many repetitions.
        heavy_every: 100 MB transfers run every this many repetitions.
        hosts: Testbed hosts (the multi-host rows use all of them).
        out: Where RESULTS.md goes.
        only: ``sync``: only the project-sync rows (and the trivial ``rx run`` they are compared with);
            ``pool``: only the fan-out rows; ``envs``: only the environment rows (issue 14).
        rtt: Milliseconds of round trip added to every connection to the hosts (:mod:`testbed.delay`);
            0: none (the hosts are on this machine).
    """

    reps: int
    quick: bool
    warm_calls: int
    medium_every: int
    heavy_every: int
    hosts: int
    out: Path
    only: str | None = None
    rtt: float = 0.0


@dataclass
class Probe:
    """One measurement step: ``run()`` records its samples into the results.

    Attributes:
        name: For progress and failure lines.
        rows: The rows it fills (a failure is recorded against them).
        run: Takes the sample(s).
        every: Runs on every ``every``-th repetition.
        failures_in_row: Consecutive failures; at three the probe is given up.
        enabled: False once given up or found unsupported.
        gave_up: Given up after failures (enabled again if the testbed is brought back).
        seconds: Wall time spent in it so far (to size the run).
    """

    name: str
    rows: tuple[str, ...]
    run: Callable[[], None]
    every: int = 1
    failures_in_row: int = 0
    enabled: bool = True
    gave_up: bool = False
    seconds: float = 0.0


@dataclass
class Bench:
    """Everything one run holds: paths, the testbed, agents, and what was measured."""

    settings: Settings
    run_dir: Path
    state_dir: Path
    ssh_config: Path
    hosts: list[str]
    control_dir: Path
    blob: Path
    env: dict[str, str]
    rx_command: list[str]
    rx_python: Path  # the interpreter of rx_command's environment (see _rx_env)
    results: Results = field(default_factory=Results)
    phases: dict[str, list[PhaseRecord]] = field(default_factory=dict)
    agents: list[Agent] = field(default_factory=list)
    import_baseline: set[str] = field(default_factory=set)
    info: dict[str, str] = field(default_factory=dict)
    recoveries: list[str] = field(default_factory=list)
    sync: SyncRig | None = None
    envs: EnvRig | None = None
    rx_agents: dict[str, Agent] = field(default_factory=dict)

    # -- helpers ---------------------------------------------------------------------------------------

    def ssh(self, *args: str, mux: bool = True) -> list[str]:
        control = f"ControlPath={self.control_dir}/%n" if mux else "ControlPath=none"
        options = ["-o", "ControlMaster=no", "-o", control]
        return ["ssh", "-F", str(self.ssh_config), *options, *args]

    def agent(self, kind: str, *, name: str | None = None, **config: Any) -> Agent:
        name = name or kind + (f"-{config['backend']}" if "backend" in config else "")
        env = dict(self.env, RX_WORKSPACE=str(self.run_dir / "workspaces" / name))
        agent = Agent(kind, {"ssh_config": str(self.ssh_config), "hosts": self.hosts, **config}, env=env,
                      cwd=self.run_dir / "agents" / name, log=self.run_dir / "logs" / f"{name}.log")
        self.agents.append(agent)
        return agent

    def rx_agent(self, backend: str) -> Agent:
        """The rx agent of ``backend`` (one per run, shared by the probes)."""
        if backend not in self.rx_agents:
            self.rx_agents[backend] = self.agent("rx", backend=backend)
        return self.rx_agents[backend]

    def record_calls(self, group: str, reply: dict[str, Any]) -> None:
        self.phases.setdefault(group, []).extend(phase_records(reply.get("calls") or []))


def _parse_importtime(stderr: str) -> dict[str, int]:
    """Top-level modules and their cumulative import microseconds from ``-X importtime`` output."""
    found: dict[str, int] = {}
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        parts = line.split("|")
        if len(parts) < 3 or not parts[1].strip().isdigit():
            continue
        name = parts[2]
        depth = (len(name) - len(name.lstrip(" ")) - 1) // 2
        if depth == 0:
            found[name.strip()] = found.get(name.strip(), 0) + int(parts[1])
    return found


# -- probes ------------------------------------------------------------------------------------------------


def _ssh_cold(bench: Bench) -> None:
    bench.results.add("ssh.cold", run_timed(bench.ssh(bench.hosts[0], TRIVIAL, mux=False), timeout=30))


def _ssh_mux(bench: Bench) -> None:
    for _ in range(bench.settings.warm_calls):
        bench.results.add("ssh.mux", run_timed(bench.ssh(bench.hosts[0], TRIVIAL), timeout=30))


def _ssh_hosts(bench: Bench) -> None:
    """The multiplexed trivial command on every host from one thread each, wall time."""
    errors: list[str] = []

    def one(host: str) -> None:
        try:
            run_timed(bench.ssh(host, TRIVIAL), timeout=30)
        except ProbeError as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=one, args=(host,)) for host in bench.hosts]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    if errors:
        raise ProbeError(errors[0])
    bench.results.add("ssh.mux_hosts", seconds)


def _ssh_cat(bench: Bench) -> None:
    with bench.blob.open("rb") as stdin:
        up = run_timed(bench.ssh(bench.hosts[0], "cat > /dev/null"), timeout=120, stdin=stdin)
    down = run_timed(bench.ssh(bench.hosts[0], f"cat {REMOTE_BLOB}"), timeout=120)
    bench.results.add("ssh.cat", up + down)


def _paramiko_exec(bench: Bench, agent: Agent) -> None:
    for nodelay, key in ((True, "paramiko.exec"), (False, "paramiko.exec_delay")):
        reply = agent.request("exec", nodelay=nodelay, count=bench.settings.warm_calls, timeout=60)
        for seconds in reply["samples"]:
            bench.results.add(key, seconds)


def _paramiko_sftp(bench: Bench, agent: Agent) -> None:
    reply = agent.request("sftp", local=str(bench.blob), remote="rxbench-sftp", size=100 * MB, timeout=180)
    bench.results.add("paramiko.sftp", reply["samples"][0])


def _samples(bench: Bench, agent: Agent, key: str, op: str, *, timeout: float, group: str | None = None,
             **params: Any) -> None:
    """One agent request; every sample it returns goes to ``key`` (and its calls' phases to ``group``)."""
    reply = agent.request(op, timeout=timeout, **params)
    if reply.get("unsupported"):
        raise Unsupported(str(reply["unsupported"]))
    for seconds in reply["samples"]:
        bench.results.add(key, seconds)
    if group is not None:
        bench.record_calls(group, reply)


@contextlib.contextmanager
def _no_master(bench: Bench) -> Iterator[dict[str, str]]:
    """An environment whose rx finds no shared ssh master (a fresh XDG_RUNTIME_DIR); what it opened is
    ended afterwards (untimed), so a "first" row always pays its connection."""
    runtime = Path(tempfile.mkdtemp(prefix="x", dir=bench.control_dir))
    try:
        yield dict(bench.env, XDG_RUNTIME_DIR=str(runtime))
    finally:
        _end_shared_masters(runtime)


def _end_shared_masters(runtime: Path, *, remove: bool = True) -> None:
    """End the shared ssh masters and the rx servers (:mod:`remote_exec.cli.server`) of the runtime
    directory ``runtime``, as their idle time would have (and remove it, unless not ``remove``)."""
    from remote_exec.cli.server import stop_all

    stop_all(str(runtime / "rx-ssh"))
    for socket_path in (runtime / "rx-ssh").glob("m-*"):
        if not socket_path.name.endswith(".lock"):
            subprocess.run(["ssh", "-S", str(socket_path), "-O", "exit", "x"], stdin=subprocess.DEVNULL,
                           capture_output=True, timeout=30, check=False)
    if remove:
        shutil.rmtree(runtime, ignore_errors=True)


#: The first call of a new process of a function defined in a `python -c` script (sent by value, no project
#: around it), timed around the call: argv host, backend, workdir; prints the seconds.
FIRST_VALUE_SCRIPT = """
import sys, time
from remote_exec import task

def noop(i):
    return i

call = task(remote=sys.argv[1], backend=sys.argv[2], workdir=sys.argv[3])(noop)
started = time.perf_counter()
value = call(7)
seconds = time.perf_counter() - started
assert value == 7, value
print(seconds)
"""


def _rx_first_value(bench: Bench, backend: str, *, fresh: bool = False) -> None:
    """The first call of a new `python -c` process whose task is a `__main__` function, to a fresh workdir,
    no shared master open (run outside any project, as the issue measured it): in a runtime directory that
    stays (the master the last run left ended), or with ``fresh`` in a new one."""
    workdir = f"~/.cache/rxbench-first/{uuid.uuid4().hex}"
    with _no_master(bench) if fresh else _master_ended(bench, f"first-value-{backend}") as env:
        env["RX_WORKSPACE"] = str(bench.run_dir / "workspaces" / f"rx-first-value-{backend}")
        done = subprocess.run([str(bench.rx_python), "-c", FIRST_VALUE_SCRIPT, bench.hosts[0], backend, workdir],
                              cwd=bench.control_dir, env=env, capture_output=True, text=True, timeout=90,
                              check=False)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        raise ProbeError(f"first call by value: {lines[-1] if lines else done.returncode}")
    key = f"rx-{backend}.first_value_fresh" if fresh else f"rx-{backend}.first_value"
    bench.results.add(key, float(done.stdout.strip().splitlines()[-1]))


def _rx_first(bench: Bench, backend: str) -> None:
    name = f"rx-first-{backend}"
    config = {"ssh_config": str(bench.ssh_config), "hosts": bench.hosts, "backend": backend,
              "workdir": f"~/.cache/rxbench-first/{uuid.uuid4().hex}"}
    with _no_master(bench) as env:
        env["RX_WORKSPACE"] = str(bench.run_dir / "workspaces" / name)
        reply = one_shot("rx-first", config, env=env, cwd=bench.run_dir / "agents" / name,
                         log=bench.run_dir / "logs" / f"{name}.log", timeout=90)
    bench.results.add(f"rx-{backend}.first", reply["samples"][0])
    bench.results.add(f"rx-{backend}.first_process", reply["samples"][1])
    bench.record_calls(f"first call ({backend})", {"calls": reply["calls"][:1]})
    bench.record_calls(f"first call, new process ({backend})", {"calls": reply["calls"][1:]})


@contextlib.contextmanager
def _master_ended(bench: Bench, name: str) -> Iterator[dict[str, str]]:
    """An environment whose rx finds the shared ssh master of its last run ended (a runtime directory that
    stays, as a user's does, with its masters ended before and after, untimed)."""
    runtime = bench.control_dir / name
    runtime.mkdir(exist_ok=True)
    _end_shared_masters(runtime, remove=False)
    try:
        yield dict(bench.env, XDG_RUNTIME_DIR=str(runtime))
    finally:
        _end_shared_masters(runtime, remove=False)


def _rx_run(bench: Bench, backend: str) -> None:
    with _master_ended(bench, f"run-{backend}") as env:
        seconds = run_timed(_rx_run_argv(bench, backend), timeout=60, cwd=bench.run_dir / "rxrun", env=env)
    bench.results.add(f"rx-{backend}.run", seconds)
    _record_run_phases(bench, backend, seconds, f"rx run, whole command ({backend})")


def _rx_run_fresh(bench: Bench, backend: str) -> None:
    with _no_master(bench) as env:
        seconds = run_timed(_rx_run_argv(bench, backend), timeout=60, cwd=bench.run_dir / "rxrun", env=env)
    bench.results.add(f"rx-{backend}.run_fresh", seconds)


def _rx_run_second(bench: Bench, backend: str) -> None:
    """An untimed ``rx run``, then the timed one once the rx server the first started listens (as a user's next
    command a moment later: within the persist window of that server and of the OpenSSH master)."""
    with _no_master(bench) as env:
        run_timed(_rx_run_argv(bench, backend), timeout=60, cwd=bench.run_dir / "rxrun", env=env)
        _wait_for_server(Path(env["XDG_RUNTIME_DIR"]) / "rx-ssh")
        seconds = run_timed(_rx_run_argv(bench, backend), timeout=60, cwd=bench.run_dir / "rxrun", env=env)
    bench.results.add(f"rx-{backend}.run_second", seconds)
    _record_run_phases(bench, backend, seconds, f"second rx run, whole command ({backend})")


def _wait_for_server(folder: Path, timeout: float = 20) -> None:
    """Until an rx server listens in ``folder`` (the one the last rx command started)."""
    from remote_exec.cli.server import servers

    until = time.monotonic() + timeout
    while time.monotonic() < until:
        if any(Path(socket).exists() for _, socket in servers(str(folder))):
            return
        time.sleep(0.05)
    raise ProbeError(f"no rx server listened in {folder} within {timeout:.0f} s of an rx command")


def _ssh_tree(bench: Bench) -> None:
    local = bench.run_dir / "tree-ssh"
    shutil.rmtree(local, ignore_errors=True)
    local.mkdir()
    remote = (f"rm -rf rxbench-tree && mkdir rxbench-tree && cd rxbench-tree && python3 -c {shlex.quote(TREE_SCRIPT)} "
              f"{TREE_FILES} && tar c many")
    pipeline = f"{shlex.join(bench.ssh(bench.hosts[0], remote, mux=False))} | tar x -C {shlex.quote(str(local))}"
    seconds = run_timed(["bash", "-c", "set -o pipefail; " + pipeline], timeout=120)
    _check_tree(local / "many")
    bench.results.add("ssh.tree", seconds)


def _rx_tree(bench: Bench, backend: str) -> None:
    workspace = bench.run_dir / "workspaces" / f"rx-tree-{backend}"
    shutil.rmtree(workspace, ignore_errors=True)  # the last sample's files (untimed)
    argv = [*bench.rx_command, "run", "--remote", bench.hosts[0], "--backend", backend, "--ssh-config",
            str(bench.ssh_config), "--workspace", str(workspace), "tree.py", str(TREE_FILES)]
    with _master_ended(bench, f"tree-{backend}") as env:
        seconds = run_timed(argv, timeout=120, cwd=bench.run_dir / "rxtree", env=env)
    _check_tree(next((workspace / "runs").iterdir()) / "files" / "many")
    bench.results.add(f"rx-{backend}.tree", seconds)


def _check_tree(folder: Path) -> None:
    found = len(os.listdir(folder)) if folder.is_dir() else 0
    if found != TREE_FILES:
        raise ProbeError(f"{found} of {TREE_FILES} files came back")


def _record_run_phases(bench: Bench, backend: str, seconds: float, group: str) -> None:
    from remote_exec.workspace import Workspace
    from remote_exec.workspace.state import duration

    run = Workspace.resolve(bench.run_dir / "workspaces" / f"rx-run-{backend}").latest()
    if run is not None:
        phases: dict[str, float] = {}
        for action in run.actions():
            took = duration(action.get("started"), action.get("finished"))
            if took is not None:
                phases[str(action["name"])] = phases.get(str(action["name"]), 0.0) + took
        bench.phases.setdefault(group, []).append(PhaseRecord(seconds, phases))


def _rx_hosts(bench: Bench, agent: Agent, backend: str) -> None:
    reply = agent.request("hosts", timeout=120)
    bench.results.add(f"rx-{backend}.hosts_parallel", reply["parallel"])
    bench.results.add(f"rx-{backend}.hosts_serial", reply["sequential"])
    reply = agent.request("hosts", timeout=120, keep_warm=True)
    bench.results.add(f"rx-{backend}.hosts_parallel_kw", reply["parallel"])


def _python_start(bench: Bench) -> None:
    bench.results.add("startup.python", run_timed([str(bench.rx_python), "-c", "pass"], timeout=30, env=bench.env))


def _importtime(bench: Bench, key: str, args: tuple[str, ...]) -> None:
    """Total import time of the modules ``python -X importtime ARGS`` loads beyond a bare interpreter."""
    process = subprocess.run([str(bench.rx_python), "-X", "importtime", *args], capture_output=True, text=True,
                             timeout=60, env=bench.env, check=False)
    if process.returncode != 0:
        lines = process.stderr.strip().splitlines()
        raise ProbeError(f"python {' '.join(args)} failed: {lines[-1] if lines else process.returncode}")
    modules = _parse_importtime(process.stderr)
    total = sum(us for name, us in modules.items() if name not in bench.import_baseline)
    bench.results.add(key, total / 1e6)


def _rx_help(bench: Bench) -> None:
    bench.results.add("startup.help", run_timed([*bench.rx_command, "--help"], timeout=30,
                                                env=dict(bench.env, RX_SERVER="0")))


def _project_sync(bench: Bench) -> None:
    """The project-sync sequence of one repetition (see :mod:`benchmarks.projectsync`)."""
    assert bench.sync is not None
    bench.sync.firsts(BACKENDS)

    def trivial(backend: str) -> float:
        return run_timed(_rx_run_argv(bench, backend), timeout=60, cwd=bench.run_dir / "rxrun", env=bench.env)

    def call(op: str, backend: str, root: str) -> float:
        reply = bench.rx_agent(backend).request(op, root=root, timeout=300)
        if not reply.get("ok", True) or not reply.get("samples"):
            raise ProbeError(f"rx {op}: {reply.get('error') or 'no sample'}")
        return float(reply["samples"][0])

    bench.sync.later(BACKENDS, trivial, call)


def _probes(bench: Bench) -> list[Probe]:
    """Every probe, in the order of the table (each repetition starts one further along)."""
    settings = bench.settings
    probes: list[Probe] = []

    def add(name: str, rows: tuple[str, ...], run: Callable[[], None], every: int = 1) -> None:
        probes.append(Probe(name, rows, run, every))

    if settings.only == "speed":
        _speed_probes(bench, add)
        return probes
    if settings.only == "pool":
        _fanout_probes(bench, add)
        return probes
    if settings.only == "envs":
        _env_probes(bench, add)
        return probes
    if settings.only == "tree":
        _tree_probes(bench, add, 1)
        return probes
    sync_keys = tuple(row.key for row in ROWS if row.section in (FIRST, LATER))
    add("project sync", sync_keys, partial(_project_sync, bench),
        1 if settings.only == "sync" else settings.heavy_every)
    if settings.only == "sync":
        return probes

    add("ssh cold", ("ssh.cold",), partial(_ssh_cold, bench))
    add("ssh multiplexed", ("ssh.mux",), partial(_ssh_mux, bench))
    add("ssh multiplexed, 4 hosts", ("ssh.mux_hosts",), partial(_ssh_hosts, bench))
    add("ssh cat pipe", ("ssh.cat",), partial(_ssh_cat, bench), settings.heavy_every)
    paramiko_agent = bench.agent("paramiko")
    add("paramiko exec", ("paramiko.exec", "paramiko.exec_delay"), partial(_paramiko_exec, bench, paramiko_agent))
    add("paramiko sftp", ("paramiko.sftp",), partial(_paramiko_sftp, bench, paramiko_agent), settings.heavy_every)
    bandsaw_agent = bench.agent("bandsaw")
    add("bandsaw task", ("bandsaw.task",),
        partial(_samples, bench, bandsaw_agent, "bandsaw.task", "task", timeout=120), settings.medium_every)
    for peer in ("execnet", "mitogen"):
        agent = bench.agent(peer)
        add(f"{peer} cold", (f"{peer}.cold",), partial(_samples, bench, agent, f"{peer}.cold", "cold", timeout=90))
        add(f"{peer} warm", (f"{peer}.warm",),
            partial(_samples, bench, agent, f"{peer}.warm", "warm", timeout=90, count=settings.warm_calls))
        for size in SIZES:
            key = f"{peer}.echo{size // MB}"
            every = 1 if size < 10 * MB else settings.heavy_every if size < 100 * MB else settings.reps
            if size >= 100 * MB and settings.quick:
                bench.results.notes[key] = "not run with --quick (one round trip takes up to a minute)"
                continue
            add(f"{peer} {_size_name(size)}", (key,),
                partial(_samples, bench, agent, key, "echo", timeout=60 + size / MB * 2, size=size), every)
    for backend in BACKENDS:
        rx = f"rx-{backend}"
        agent = bench.rx_agent(backend)
        _call_probes(bench, add, backend)
        add(f"rx keep_warm ({backend})", (f"{rx}.keep_warm",),
            partial(_samples, bench, agent, f"{rx}.keep_warm", "keep_warm", timeout=90,
                    group=f"keep_warm call ({backend})", count=settings.warm_calls))
        _command_probes(bench, add, backend)
        add(f"rx 4 hosts ({backend})", (f"{rx}.hosts_parallel", f"{rx}.hosts_serial", f"{rx}.hosts_parallel_kw"),
            partial(_rx_hosts, bench, agent, backend))
        for size in SIZES:
            key = f"{rx}.echo{size // MB}"
            add(f"rx {_size_name(size)} ({backend})", (key,),
                partial(_samples, bench, agent, key, "echo", timeout=60 + size / MB * 2,
                        group=f"{_size_name(size)} argument + result ({backend})", size=size),
                _every(settings, size))
    _fanout_probes(bench, add)
    _tree_probes(bench, add, settings.medium_every)
    add("python -c pass", ("startup.python",), partial(_python_start, bench))
    add("importtime cli", ("startup.importtime",),
        partial(_importtime, bench, "startup.importtime", ("-c", "import remote_exec.cli")))
    add("importtime help", ("startup.importtime_help",),
        partial(_importtime, bench, "startup.importtime_help", ("-m", "remote_exec", "--help")))
    add("rx --help", ("startup.help",), partial(_rx_help, bench))
    return probes


def _call_probes(bench: Bench, add: Callable[..., None], backend: str) -> None:
    """rx's first call (to a fresh host; of a new process) and its warm call, process per call."""
    rx = f"rx-{backend}"
    add(f"rx first call ({backend})", (f"{rx}.first", f"{rx}.first_process"), partial(_rx_first, bench, backend))
    add(f"rx warm ({backend})", (f"{rx}.warm",),
        partial(_samples, bench, bench.rx_agent(backend), f"{rx}.warm", "warm", timeout=90,
                group=f"warm call ({backend})", count=bench.settings.warm_calls))


def _command_probes(bench: Bench, add: Callable[..., None], backend: str) -> None:
    """The whole-command and by-value rows of issue 12 (17, 18): `rx run` first and second, a `__main__`
    function's warm call and first call of a new process."""
    rx = f"rx-{backend}"
    agent = bench.rx_agent(backend)
    add(f"rx run ({backend})", (f"{rx}.run",), partial(_rx_run, bench, backend))
    add(f"rx run, new machine ({backend})", (f"{rx}.run_fresh",), partial(_rx_run_fresh, bench, backend))
    add(f"second rx run ({backend})", (f"{rx}.run_second",), partial(_rx_run_second, bench, backend))
    add(f"rx warm by value ({backend})", (f"{rx}.warm_value",),
        partial(_samples, bench, agent, f"{rx}.warm_value", "warm_value", timeout=90,
                group=f"warm call by value ({backend})", count=bench.settings.warm_calls))
    add(f"rx warm by value, repository ({backend})", (f"{rx}.warm_value_repo",),
        partial(_samples, bench, agent, f"{rx}.warm_value_repo", "warm_value", timeout=90,
                group=f"warm call by value, repository project ({backend})", count=bench.settings.warm_calls,
                project="repository"))
    add(f"rx by value after an edit ({backend})", (f"{rx}.edited_value",),
        partial(_samples, bench, agent, f"{rx}.edited_value", "edited_value", timeout=90,
                group=f"call by value after an edit ({backend})", count=bench.settings.warm_calls))
    add(f"rx first call by value ({backend})", (f"{rx}.first_value",), partial(_rx_first_value, bench, backend))
    add(f"rx first call by value, new machine ({backend})", (f"{rx}.first_value_fresh",),
        partial(_rx_first_value, bench, backend, fresh=True))


def _env_probes(bench: Bench, add: Callable[..., None]) -> None:
    """``--only envs``: numpy + pandas by hand over ssh, then by rx per backend (see :mod:`benchmarks.envs`)."""
    rig = bench.envs
    assert rig is not None
    add("envs by hand", ("envs.ship", "envs.uv_hand", "envs.uv_hand_warm", "envs.pip_hand"), rig.by_hand)

    def argv(backend: str, remote: str) -> list[str]:
        return [*bench.rx_command, "run", "--remote", remote, "--backend", backend, "--ssh-config",
                str(bench.ssh_config), "--workspace", str(bench.run_dir / "workspaces" / f"rx-envs-{backend}")]

    for backend in BACKENDS:
        rx = f"rx-{backend}"
        add(f"rx envs ({backend})", (f"{rx}.env_first", f"{rx}.env_build", f"{rx}.env_hit", f"{rx}.env_plain",
                                     f"{rx}.env_extra"),
            partial(rig.with_rx, backend, argv))


def _speed_probes(bench: Bench, add: Callable[..., None]) -> None:
    """``--only speed``: the references and rx's latency rows that issue 12 (17, 18) is about."""
    add("ssh cold", ("ssh.cold",), partial(_ssh_cold, bench))
    add("ssh multiplexed", ("ssh.mux",), partial(_ssh_mux, bench))
    for backend in BACKENDS:
        _call_probes(bench, add, backend)
        _command_probes(bench, add, backend)
    add("python -c pass", ("startup.python",), partial(_python_start, bench))
    add("rx --help", ("startup.help",), partial(_rx_help, bench))


def _tree_probes(bench: Bench, add: Callable[..., None], every: int) -> None:
    """The result-tree rows: the script's files brought back by ssh and tar, then by ``rx run``."""
    add("ssh + tar, result tree", ("ssh.tree",), partial(_ssh_tree, bench), every)
    for backend in BACKENDS:
        add(f"rx run, result tree ({backend})", (f"rx-{backend}.tree",), partial(_rx_tree, bench, backend), every)


def _fanout_probes(bench: Bench, add: Callable[..., None]) -> None:
    """The pool's rows: 1,000 trivial calls over 4 hosts (rx's Executor.map, execnet's Group, mitogen's
    contexts, 4 threads of process-per-call rx) and 40 one-second calls over 4 hosts x 2 slots."""
    settings = bench.settings
    for peer in ("execnet", "mitogen"):
        agent = bench.agent(peer, name=f"{peer}-fanout")
        add(f"{peer} fan-out", (f"{peer}.fanout",),
            partial(_samples, bench, agent, f"{peer}.fanout", "fanout", timeout=180, count=FANOUT_CALLS))
    for backend in BACKENDS:
        rx = f"rx-{backend}"
        agent = bench.agent("rx-pool", backend=backend)
        add(f"rx Executor.map ({backend})", (f"{rx}.pool_map",),
            partial(_samples, bench, agent, f"{rx}.pool_map", "pool_map", timeout=180, count=FANOUT_CALLS))
        add(f"rx 40 naps ({backend})", (f"{rx}.pool_naps",),
            partial(_samples, bench, agent, f"{rx}.pool_naps", "pool_naps", timeout=120, count=40, seconds=1.0,
                    per_host=2), settings.medium_every)
        add(f"rx 4 threads ({backend})", (f"{rx}.threads_map",),
            partial(_samples, bench, agent, f"{rx}.threads_map", "threads_map", timeout=300, count=FANOUT_CALLS),
            settings.heavy_every)


def _every(settings: Settings, size: int) -> int:
    if size >= 100 * MB:
        return settings.heavy_every
    if size >= 10 * MB:
        return settings.medium_every
    return 1


def _rx_argv(bench: Bench, *args: str) -> list[str]:
    return [*bench.rx_command, *args]


def _rx_run_argv(bench: Bench, backend: str) -> list[str]:
    return [*bench.rx_command, "run", "--remote", bench.hosts[0], "--backend", backend, "--ssh-config",
            str(bench.ssh_config), "--workspace", str(bench.run_dir / "workspaces" / f"rx-run-{backend}"),
            "trivial.py"]


# -- setup and teardown ------------------------------------------------------------------------------------


#: The console script pip writes for ``rx`` (``[project.scripts]``), for the run's own environment.
_RX_SCRIPT = """#!{python}
import sys
from remote_exec.cli import main
if __name__ == "__main__":
    sys.exit(main())
"""


def _rx_env(run_dir: Path) -> tuple[Path, list[str]]:
    """An environment for ``rx`` as a user installs it (``pipx install``, or ``pip install`` in a venv): a
    venv of its own, with its console script, and none of the start-up hooks (``.pth`` files: an editable
    install's finder, this machine's own) that the environment running the benchmarks may load at every
    interpreter start. rx and its dependencies come from ``PYTHONPATH`` (the copy, then this interpreter's
    site-packages, whose ``.pth`` files are not run from there). Returns (its python, the rx command)."""
    venv = run_dir / "rx-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120,
                   stdout=subprocess.DEVNULL)
    python = venv / "bin" / "python"
    script = venv / "bin" / "rx"
    script.write_text(_RX_SCRIPT.format(python=python), encoding="utf-8")
    script.chmod(0o755)
    return python, [str(script)]


def _site_packages() -> list[str]:
    paths = sysconfig.get_paths()
    return list(dict.fromkeys(path for path in (paths["purelib"], paths["platlib"]) if path))


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        if distribution == "remote_exec":
            import remote_exec

            return str(remote_exec.__version__)
        return "not installed"


def _output(argv: list[str], timeout: float = 30) -> str:
    try:
        process = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"({exc})"
    return (process.stdout + process.stderr).strip()


def _machine_info(bench: Bench) -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = _output(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = _output(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no", "--", "remote_exec"])
    return {
        "CPU": f"{cpu}, nproc {os.cpu_count()}",
        "OS": platform.platform(),
        "Python (coordinator)": platform.python_version(),
        "Python (testbed hosts)": _output(bench.ssh(bench.hosts[0], "python3 -V")),
        "OpenSSH client": _output(["ssh", "-V"]).splitlines()[0] if _output(["ssh", "-V"]) else "?",
        "remote_exec": f"{_version('remote_exec')} at {commit}"
                       + (" with uncommitted changes in remote_exec/" if dirty else "")
                       + " (copied at the start of the run)",
        "paramiko": _version("paramiko"),
        "bandsaw": _version("bandsaw"),
        "execnet": _version("execnet"),
        "mitogen": _version("mitogen"),
        "rx command": " ".join(Path(part).name if i == 0 else part for i, part in enumerate(bench.rx_command))
                      + " (its console script in a venv of its own, as pipx gives it: no start-up hooks of the"
                        " environment running the benchmarks)",
    }


def _write_blob(path: Path, size: int) -> None:
    with path.open("wb") as stream:
        left = size
        while left:
            chunk = os.urandom(min(left, 1 << 24))
            stream.write(chunk)
            left -= len(chunk)


@contextlib.contextmanager
def _testbed(settings: Settings) -> Iterator[Bench]:
    import testbed

    why = testbed.docker_available()
    if why is not None:
        raise SystemExit(f"benchmarks: the testbed hosts need Docker: {why}")
    run_dir = WORK / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    run_dir.mkdir(parents=True)
    state_dir = run_dir / "testbed"
    control_dir = Path(tempfile.mkdtemp(prefix="rxb-", dir="/tmp"))
    bench: Bench | None = None
    relays: list[subprocess.Popen[str]] = []
    try:
        print(f"benchmarks: starting {settings.hosts} testbed host(s) in {state_dir}", file=sys.stderr)
        bed = testbed.up(settings.hosts, state_dir=state_dir)
        hosts = [host.alias for host in bed.hosts]
        ssh_config = bed.ssh_config
        if settings.rtt:
            ssh_config = _slow_link(bed, settings.rtt, run_dir, relays)
        # rx as it is now, copied: edits to the tree while the run goes on do not mix versions into it.
        source = run_dir / "src"
        shutil.copytree(REPO / "remote_exec", source / "remote_exec", ignore=shutil.ignore_patterns("__pycache__"))
        # compiled as an installation is (pip writes the .pyc files): start-up is not measured compiling
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(source / "remote_exec")],
                       stdout=subprocess.DEVNULL, check=False, timeout=300)
        sys.path.insert(0, str(source))
        pythonpath = os.pathsep.join(filter(None, [str(source), str(REPO), str(PAYLOAD_DIR),
                                                   os.environ.get("PYTHONPATH"), *_site_packages()]))
        rx_python, rx_command = _rx_env(run_dir)
        # XDG_RUNTIME_DIR: the run's own shared ssh masters (the "first" rows each get a fresh one)
        env = dict(os.environ, PYTHONPATH=pythonpath, RX_SSH_CONFIG=str(ssh_config),
                   RX_CACHE_DIR=str(run_dir / "cache"), RX_WORKSPACE=str(run_dir / "workspaces" / "default"),
                   XDG_RUNTIME_DIR=str(control_dir), RX_SERVER=str(300))  # (rx as shipped, whatever this shell says)
        env.pop("RX_BACKEND", None)
        bench = Bench(settings=settings, run_dir=run_dir, state_dir=state_dir, ssh_config=ssh_config, hosts=hosts,
                      control_dir=control_dir, blob=run_dir / "blob-100mb", env=env, rx_command=rx_command,
                      rx_python=rx_python)
        (run_dir / "logs").mkdir()
        _open_masters(bench)
        _write_blob(bench.blob, 100 * MB)
        _remote_blob(bench)
        rxrun = run_dir / "rxrun"
        rxrun.mkdir()
        (rxrun / "trivial.py").write_text("x = 1\n", encoding="utf-8")
        (rxrun / "pyproject.toml").write_text("", encoding="utf-8")  # a project of its own, not the repository
        rxtree = run_dir / "rxtree"
        rxtree.mkdir()
        (rxtree / "tree.py").write_text(TREE_SCRIPT, encoding="utf-8")
        (rxtree / "pyproject.toml").write_text("", encoding="utf-8")
        if settings.only == "envs":
            bench.envs = EnvRig.create(run_dir / "envs", hosts[0], ssh=bench.ssh, rx=partial(_rx_argv, bench),
                                       env=env, add=bench.results.add, backends=BACKENDS)
        elif settings.only not in ("speed", "pool", "tree"):
            print("benchmarks: generating the 10,000-file / 300 MB project", file=sys.stderr)
            bench.sync = SyncRig.create(run_dir / "sync", hosts[0], ssh=bench.ssh,
                                        ssh_options=bench.ssh()[1:], rx=partial(_rx_argv, bench), env=env,
                                        add=bench.results.add,
                                        samples=lambda key: bench.results.samples.get(key, []))
        baseline = subprocess.run([str(rx_python), "-X", "importtime", "-c", "pass"], capture_output=True, text=True,
                                  timeout=60, env=env, check=False)
        bench.import_baseline = set(_parse_importtime(baseline.stderr))
        bench.info = _machine_info(bench)
        yield bench
    finally:
        if bench is not None:
            for agent in bench.agents:
                agent.stop()
        if bench is not None:
            if bench.sync is not None:
                with contextlib.suppress(Exception):
                    bench.sync.cleanup()
            if bench.envs is not None:
                with contextlib.suppress(Exception):
                    bench.envs.cleanup(BACKENDS)
            _close_masters(bench)
        _end_shared_masters(control_dir)
        shutil.rmtree(control_dir, ignore_errors=True)
        for relay in relays:
            relay.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                relay.wait(10)
        with contextlib.suppress(Exception):
            testbed.down(state_dir=state_dir)
        logs = run_dir / "logs"
        if logs.is_dir():
            kept = WORK / "last-logs"
            shutil.rmtree(kept, ignore_errors=True)
            shutil.copytree(logs, kept)
        shutil.rmtree(run_dir, ignore_errors=True)


def _slow_link(bed: Any, rtt: float, run_dir: Path, relays: list[subprocess.Popen[str]]) -> Path:
    """An ssh_config reaching ``bed``'s hosts through :mod:`testbed.delay` relays adding ``rtt`` ms of round
    trip (each host's key looked up under its own address, as without the relay); the relays go into
    ``relays`` (the caller ends them)."""
    text = bed.ssh_config.read_text(encoding="utf-8")
    for host in bed.hosts:
        relay = subprocess.Popen([sys.executable, "-m", "testbed.delay", "--rtt", f"{rtt:g}", "--to",
                                  f"{host.hostname}:{host.port}"], cwd=REPO, stdout=subprocess.PIPE, text=True)
        relays.append(relay)
        assert relay.stdout is not None
        line = relay.stdout.readline().split()
        relay.stdout.close()  # (it says nothing more)
        if line[:1] != ["listening"]:
            raise SystemExit(f"benchmarks: the delay relay for {host.alias} did not start")
        text = text.replace(f"    HostName {host.hostname}\n    Port {host.port}\n",
                            f"    HostName 127.0.0.1\n    Port {line[1]}\n"
                            f"    HostKeyAlias [{host.hostname}]:{host.port}\n", 1)
    path = run_dir / "ssh_config-rtt"
    path.write_text(text, encoding="utf-8")
    return path


def _open_masters(bench: Bench) -> None:
    """The raw multiplexed rows' ControlMasters, one per host."""
    for host in bench.hosts:
        subprocess.run(["ssh", "-F", str(bench.ssh_config), "-o", "ControlMaster=yes", "-o",
                        f"ControlPath={bench.control_dir}/%n", "-o", "ControlPersist=1800", "-f", "-N", host],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60,
                       check=True)


def _close_masters(bench: Bench) -> None:
    for host in bench.hosts:
        subprocess.run(["ssh", "-F", str(bench.ssh_config), "-o", f"ControlPath={bench.control_dir}/%n", "-O", "exit",
                        host], stdin=subprocess.DEVNULL, capture_output=True, timeout=30, check=False)


def _remote_blob(bench: Bench) -> None:
    """The 100 MB file that ``ssh host cat file`` reads back."""
    size = _output(bench.ssh(bench.hosts[0], f"head -c {100 * MB} /dev/urandom > {REMOTE_BLOB} && "
                                             f"stat -c %s {REMOTE_BLOB}"), timeout=120)
    if size.strip() != str(100 * MB):
        raise SystemExit(f"benchmarks: could not write the 100 MB file on {bench.hosts[0]}: {size}")


class RunAborted(Exception):
    """The testbed is gone and could not be brought back: the run stops with what it has."""


def _hosts_alive(bench: Bench) -> bool:
    """Whether every testbed container of this run is still running (a Docker restart stops them all)."""
    import testbed

    try:
        bed = testbed.status(state_dir=bench.state_dir)
    except Exception:  # Docker itself is down or restarting
        return False
    return bed is not None and {host.alias for host in bed.hosts} >= set(bench.hosts)


def _recover(bench: Bench, probes: list[Probe]) -> None:
    """Bring lost testbed hosts back (new containers, new ports, same aliases) and start every contender anew.

    Probes given up because of the outage are enabled again; what failed during it stays recorded.

    Raises:
        RunAborted: Docker did not come back within three minutes, or the hosts did not start.
    """
    import testbed

    print("benchmarks: the testbed hosts are gone (Docker restarted?); bringing them back", file=sys.stderr)
    deadline = time.monotonic() + 180
    while testbed.docker_available() is not None:
        if time.monotonic() > deadline:
            raise RunAborted("Docker did not come back within 3 minutes after the testbed hosts were lost")
        time.sleep(5)
    for agent in bench.agents:
        agent.stop(polite=False)
    _close_masters(bench)
    try:
        testbed.up(bench.settings.hosts, state_dir=bench.state_dir)
        _open_masters(bench)
        _remote_blob(bench)
    except (Exception, SystemExit) as exc:
        raise RunAborted(f"the testbed hosts could not be brought back: {exc}") from exc
    _warm_up(bench)
    for probe in probes:
        if probe.gave_up:
            probe.enabled, probe.gave_up = True, False
            for key in probe.rows:
                bench.results.notes.pop(key, None)
        probe.failures_in_row = 0
    bench.recoveries.append(time.strftime("%H:%M:%S"))


def _warm_up(bench: Bench) -> None:
    """Untimed: one ``rx run`` per backend, so the timed ones find the archive on the host."""
    for backend in BACKENDS:
        try:
            run_timed(_rx_run_argv(bench, backend), timeout=120, cwd=bench.run_dir / "rxrun", env=bench.env)
        except ProbeError as exc:
            logger.warning("rx run warm-up (%s) failed: %s", backend, exc)


def _measure(bench: Bench, probes: list[Probe]) -> None:
    settings = bench.settings
    started = time.monotonic()
    for rep in range(settings.reps):
        if not _hosts_alive(bench):
            _recover(bench, probes)
        shift = rep % len(probes)
        for probe in probes[shift:] + probes[:shift]:
            if not probe.enabled or rep % probe.every:
                continue
            began = time.monotonic()
            try:
                probe.run()
                probe.failures_in_row = 0
            except Unsupported as exc:
                probe.enabled = False
                for key in probe.rows:
                    bench.results.notes[key] = str(exc)
            except (ProbeError, OSError, subprocess.SubprocessError, KeyError, ValueError) as exc:
                message = str(exc).strip() or type(exc).__name__
                lost = not _hosts_alive(bench)
                for key in probe.rows:
                    bench.results.fail(key, message + (" (the testbed hosts were lost)" if lost else ""))
                print(f"  {probe.name}: failed: {message}", file=sys.stderr)
                if lost:
                    _recover(bench, probes)
                    continue
                probe.failures_in_row += 1
                if probe.failures_in_row >= 3:
                    probe.enabled, probe.gave_up = False, True
                    for key in probe.rows:
                        bench.results.notes.setdefault(key, f"gave up after 3 failures in a row: {message}")
            finally:
                probe.seconds += time.monotonic() - began
        print(f"benchmarks: repetition {rep + 1}/{settings.reps} done ({time.monotonic() - started:.0f} s)",
              file=sys.stderr)
    costly = sorted(probes, key=lambda probe: -probe.seconds)[:8]
    print("benchmarks: time spent per probe: " + ", ".join(f"{probe.name} {probe.seconds:.0f} s" for probe in costly),
          file=sys.stderr)


def _measure_slurm(bench: Bench) -> None:
    """The Slurm rows, on a Slurm testbed of their own (after the sshd rows: it needs the machine's cores)."""
    print("benchmarks: the Slurm rows", file=sys.stderr)
    try:
        bench.info.update(measure_slurm(bench.results, reps=4 if bench.settings.quick else 10,
                                        maps=1 if bench.settings.quick else 2, work=bench.run_dir, env=bench.env))
    except Exception as exc:  # the Slurm testbed could not run here: its rows say why
        for row in SLURM_ROWS:
            bench.results.notes[row.key] = f"the Slurm testbed did not run: {exc}"


def _phase_groups(bench: Bench) -> dict[str, list[PhaseRecord]]:
    order = []
    for backend in BACKENDS:
        order += [f"first call ({backend})", f"first call, new process ({backend})", f"warm call ({backend})",
                  f"warm call by value ({backend})", f"warm call by value, repository project ({backend})",
                  f"call by value after an edit ({backend})", f"keep_warm call ({backend})",
                  f"rx run, whole command ({backend})", f"second rx run, whole command ({backend})"]
        order += [f"{_size_name(size)} argument + result ({backend})" for size in SIZES]
    return {name: bench.phases[name] for name in order if bench.phases.get(name)}


def _startup_text(results: Results) -> str:
    lines = []
    for key, what in (("startup.importtime", "`python -X importtime -c \"import remote_exec.cli\"`, total of "
                                             "the modules it adds (median)"),
                      ("startup.importtime_help", "`python -X importtime -m remote_exec --help` (what `rx --help` "
                                                  "imports, command modules included), total (median)"),
                      ("startup.help", "`rx --help`, wall time of the process (median)"),
                      ("startup.python", "for scale: `python -c pass`, wall (median)")):
        summary = results.summary(key)
        lines.append(f"- {what}: " + (format_seconds(summary.median) if summary else results.why_missing(key)))
    return "\n".join(lines) + "\n"


_SPEED_ROWS = {"ssh.cold", "ssh.mux", "startup.python", "startup.help",
               *(f"rx-{backend}.{kind}" for backend in BACKENDS
                 for kind in ("first", "first_process", "warm", "run", "run_fresh", "run_second", "warm_value",
                              "warm_value_repo", "edited_value", "first_value", "first_value_fresh"))}


def render(bench: Bench, *, duration: float, load: tuple[tuple[float, ...], tuple[float, ...]]) -> str:
    """RESULTS.md: when and where, the tables, the targets, rx's phases, start-up, failures."""
    settings = bench.settings
    results = bench.results
    rows = [row for row in ROWS if row.section != ENVS]
    targets = [target for target in TARGETS if target.row in {row.key for row in rows}]
    if settings.only == "envs":
        rows = [row for row in ROWS if row.section == ENVS]
        targets = env_targets(BACKENDS)
    elif settings.only == "sync":
        rows = [row for row in ROWS if row.section in (FIRST, LATER) or row.key.endswith(".run")]
        targets = sync_targets(BACKENDS)
    elif settings.only == "speed":
        rows = [row for row in ROWS if row.key in _SPEED_ROWS]
        targets = [target for target in TARGETS if target.row in _SPEED_ROWS]
    elif settings.only == "pool":
        rows = [row for row in ROWS if row.key.endswith(POOL_ROWS)]
        targets = [target for target in TARGETS if target.row.endswith(POOL_ROWS)]
    elif settings.only == "tree":
        rows = [row for row in ROWS if row.key.endswith(".tree")]
        targets = []
    out = ["# Benchmark results\n",
           "Generated by `nox -s bench` (`python -m benchmarks`); see `benchmarks/README.md` for what each row "
           "measures.\n",
           f"- Date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
           f"- Run: {'quick (smoke)' if settings.quick else f'--only {settings.only}' if settings.only else 'full'}"
           f" run, {settings.reps} repetitions "
           f"(round-robin), {settings.warm_calls} calls per warm-call request; bandsaw and rx's 10 MB rows every "
           f"{settings.medium_every}, the other 100 MB rows and the peers' 10 MB rows every {settings.heavy_every} "
           f"repetitions, the peers' 100 MB rows once; {duration / 60:.1f} min",
           f"- Load average (1, 5, 15 min) at start: {', '.join(f'{v:.2f}' for v in load[0])}; at end: "
           f"{', '.join(f'{v:.2f}' for v in load[1])}",
           f"- Testbed: {settings.hosts} Docker sshd hosts on 127.0.0.1 (benchmarks/.work, removed after the run)"
           + (f"; every connection through a relay adding {settings.rtt:g} ms of round trip (testbed.delay: "
              "latency only, no bandwidth limit), as over a slow link" if settings.rtt else "")
           + (f"; lost and brought back at {', '.join(bench.recoveries)} (Docker restarted under the run; the "
              "repetitions that failed then are listed at the end)" if bench.recoveries else "")]
    out += [f"- {name}: {value}" for name, value in bench.info.items()]
    out += ["", "## Results\n", "Ratio: this row's median over the compared row's (times), or its MB/s over the "
            "compared row's MB/s (throughputs).\n", render_tables(rows, results),
            "## Targets\n", render_targets(targets, ROWS, results),
            "## Where rx's time goes\n",
            "Median seconds per phase as `dispatch()` records them (`Outcome.phases`, stored in the workspace "
            "run's task entry; for `rx run`, the run's recorded actions, to the millisecond). *other* is the "
            "call minus its phases: packing (for a task), serializing, the workspace records, imports on first "
            "use, and for `rx run` the interpreter's start and exit.\n"]
    groups = _phase_groups(bench)
    out.append(render_phases(groups) if groups else "No rx call recorded phases.\n")
    out += ["## Start-up\n", _startup_text(results)]
    failed = {key: errors for key, errors in results.failures.items() if errors}
    if failed:
        out.append("## Failed repetitions\n")
        for key, errors in failed.items():
            out.append(f"- {key}: {len(errors)} failed; last: {errors[-1]}")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a ~2 minute smoke run (few repetitions)")
    parser.add_argument("--reps", type=int, help="repetitions (default 20; --quick: 2)")
    parser.add_argument("--out", type=Path, help="where to write the results (default benchmarks/RESULTS.md; "
                                                 "quick or --only: benchmarks/.work/RESULTS-<what>.md)")
    parser.add_argument("--only", choices=["sync", "speed", "pool", "envs", "tree"],
                        help="only these rows (default 5 reps): sync = the project-sync rows and the trivial rx run "
                             "they are compared with; speed = cold and multiplexed ssh, rx's first, warm and "
                             "by-value calls and whole `rx run` commands; pool = the fan-out rows (Executor.map, "
                             "the peers, 4 hosts); envs = a numpy + pandas environment "
                             "by rx and by hand (uv, pip) over ssh, offline; tree = a script's 5,000 small files "
                             "brought back by ssh + tar and by `rx run`")
    parser.add_argument("--no-slurm", action="store_true", help="leave out the Slurm rows (their Docker cluster)")
    parser.add_argument("--rtt", type=float, default=0.0, metavar="MS",
                        help="add MS milliseconds of round trip to every connection to the hosts (a relay, "
                             "testbed.delay): the rows as over a slow link (default 0)")
    args = parser.parse_args(argv)
    if args.rtt < 0:
        parser.error("--rtt must be 0 or more")
    logging.basicConfig(level=logging.WARNING, format="benchmarks: %(message)s")
    quick = bool(args.quick)
    only = args.only
    default_out = WORK / f"RESULTS-{only}.md" if only else WORK / "RESULTS-quick.md" if quick else HERE / "RESULTS.md"
    if args.rtt:
        default_out = default_out.with_name(f"{default_out.stem}-rtt{args.rtt:g}.md")
    settings = Settings(
        reps=args.reps or (2 if quick else 5 if only else 20),
        quick=quick,
        warm_calls=3 if quick else 5,
        medium_every=2,
        heavy_every=2 if quick else 4,
        # speed: a second, fresh host for the first call
        hosts=1 if only in ("sync", "envs", "tree") else 2 if only == "speed" else 4,
        out=args.out or default_out,
        only=only,
        rtt=args.rtt,
    )
    if settings.reps < 1:
        parser.error("--reps must be at least 1")
    started = time.monotonic()
    load_start = os.getloadavg()
    with _testbed(settings) as bench:
        _warm_up(bench)
        try:
            _measure(bench, _probes(bench))
        except RunAborted as exc:
            print(f"benchmarks: stopped early: {exc}", file=sys.stderr)
            bench.info["Stopped early"] = str(exc)
        if not args.no_slurm:
            _measure_slurm(bench)
        load_end = os.getloadavg()
        text = render(bench, duration=time.monotonic() - started, load=(load_start, load_end))
    print(text)
    settings.out.parent.mkdir(parents=True, exist_ok=True)
    settings.out.write_text(text, encoding="utf-8")
    print(f"benchmarks: wrote {settings.out}", file=sys.stderr)
    return 0

