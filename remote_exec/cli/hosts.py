"""``rx hosts`` and ``rx check``: which hosts rx knows, and whether one is ready for work."""

from __future__ import annotations

import json
import shlex
import statistics
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import RunnerError
from .app import app
from .complete import complete_hosts

__all__ = ["check", "hosts"]

# One remote command reports everything `rx check` shows (quoted as a whole, no user input inside).
_PROBE = r"""
import json, os, shutil, sys, subprocess
workdir = os.path.expanduser(sys.argv[1])
probe = workdir
while not os.path.isdir(probe):
    probe = os.path.dirname(probe) or "/"
usage = shutil.disk_usage(probe)
gpus = []
smi = shutil.which("nvidia-smi")
if smi:
    try:
        out = subprocess.run([smi, "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout
        gpus = [line.strip() for line in out.splitlines() if line.strip()]
    except Exception as exc:
        gpus = ["nvidia-smi failed: %s" % exc]
print("\nRXCHECK " + json.dumps({"python": sys.version.split()[0], "executable": sys.executable,
                  "platform": sys.platform, "hostname": os.uname().nodename, "cpus": os.cpu_count(),
                  "workdir": workdir, "free_bytes": usage.free, "gpus": gpus}))
"""
_PROBE_MARKER = b"\nRXCHECK "


def _probe_facts(host: str, stdout: bytes) -> tuple[dict[str, Any], str]:
    """The probe's facts, and what the login shell printed before them (rx skips it, ``rx check`` shows it)."""
    at = stdout.rfind(_PROBE_MARKER)
    try:
        line = stdout[at + len(_PROBE_MARKER):].partition(b"\n")[0]  # a site hook may print after it, at exit
        facts: dict[str, Any] = json.loads(line) if at >= 0 else {}
    except ValueError:
        facts = {}
    if not facts:
        raise RunnerError(f"the probe on {host} printed no report", host=host,
                          hint="the login shell may replace itself or wait for input (see its ~/.bashrc)")
    noise = stdout[:max(at, 0)].decode("utf-8", "replace").strip()
    return facts, "".join(char if char.isprintable() else " " for char in " / ".join(noise.splitlines()))


@app.command()
def hosts(
    ssh_config: Annotated[Path | None, typer.Option(
        help="ssh_config file (default RX_SSH_CONFIG or ~/.ssh/config).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the hosts rx knows: ssh_config aliases and [tool.rx.remotes].

    Each with the host name, user and port it reaches, as the backend resolves them through ssh_config.
    """
    from ..backends.ssh import list_aliases
    from ..config import Configuration, Remote

    config = Configuration.load()
    path = config.effective_ssh_config(ssh_config)
    rows: list[dict[str, Any]] = []
    for name, remote in sorted(config.remotes.items()):
        rows.append({"name": name, "source": "pyproject", **_reached(config, remote, path),
                     "python": remote.python, "backend": remote.backend})
    known = {row["name"] for row in rows}
    for alias in list_aliases(path):
        if alias not in known:
            rows.append({"name": alias, "source": "ssh_config", **_reached(config, Remote(alias, alias), path),
                         "python": None, "backend": None})
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=None, show_edge=False)
    for column in ("name", "source", "host", "user", "port", "python", "backend"):
        table.add_column(column)
    for row in rows:
        table.add_row(*("" if row[c] is None else str(row[c]) for c in
                        ("name", "source", "host", "user", "port", "python", "backend")))
    console = Console()
    if rows:
        console.print(table)
    else:
        console.print(f"no hosts: no aliases in {path or '~/.ssh/config'} and no [tool.rx.remotes]")


def _reached(config: Any, remote: Any, ssh_config: Path | None) -> dict[str, Any]:
    """The host name, user and port ``remote`` reaches, as its backend resolves them (``ssh -G`` for
    openssh, ssh_config parsed for paramiko); what was configured when that fails."""
    import logging

    spec = remote.spec(ssh_config=ssh_config)
    try:
        if config.effective_backend(remote.backend) == "openssh":
            from ..backends.openssh import OpenSSHBackend

            resolved = OpenSSHBackend(spec).resolve()
        else:
            from ..backends.ssh import resolve

            resolved = resolve(spec)
        return {"host": resolved.hostname, "user": resolved.user, "port": resolved.port}
    except Exception:  # a broken entry is listed as configured; rx check HOST says what is wrong
        logging.getLogger(__name__).debug("cannot resolve %s", remote.name, exc_info=True)
        return {"host": remote.host, "user": remote.user, "port": remote.port}


@app.command()
def check(
    host: Annotated[str, typer.Argument(help="ssh_config alias, [tool.rx.remotes] name or [user@]host[:port].",
                                        autocompletion=complete_hosts)],
    backend: Annotated[str | None, typer.Option(help="SSH backend: openssh or paramiko.")] = None,
    python: Annotated[str | None, typer.Option(help="Remote interpreter (default python3).")] = None,
    ssh_config: Annotated[Path | None, typer.Option(
        help="ssh_config file (default RX_SSH_CONFIG or ~/.ssh/config).")] = None,
    connect_timeout: Annotated[float, typer.Option(help="Seconds to connect.")] = 10.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Connect to HOST and report backend, round-trip time, remote Python, free disk, GPUs and what its
    login prints (rx skips it); on a Slurm remote also the Slurm version, partitions and idle nodes, whether
    accounting answers, and whether jobs see the login node's home (a probe job writes a file there)."""
    from ..config import Configuration
    from ..coordinator import Coordinator
    from ..launchers.registry import create_launcher

    config = Configuration.load()
    remote = config.remote(host)
    backend_name = config.check_remote_backend(config.effective_backend(backend or remote.backend))
    spec = remote.spec(ssh_config=config.effective_ssh_config(ssh_config), connect_timeout=connect_timeout,
                       host_key_policy=config.host_key_policy)
    conn = Coordinator.current().backend(spec, backend_name)
    interpreter = python or remote.python
    started = time.monotonic()
    conn.run(["true"], timeout=connect_timeout + 5)
    connect_seconds = time.monotonic() - started
    rtts = []
    for _ in range(5):
        started = time.monotonic()
        conn.run(["true"], timeout=30)
        rtts.append(time.monotonic() - started)
    result = conn.run([interpreter, "-c", _PROBE, remote.workdir], timeout=60)
    if result.exit_code == 127 or (result.failed and "not found" in result.stderr.decode(errors="replace")):
        raise RunnerError(f"{interpreter} not found on {host}", reason="interpreter-missing", host=host,
                          hint="install Python 3 there or pass --python /path/to/python3")
    if result.failed:
        raise RunnerError(f"{shlex.quote(interpreter)} on {host} failed: {result.tail()}", host=host)
    facts, noise = _probe_facts(host, result.stdout)
    report = {"host": host, "backend": backend_name, "connect_seconds": round(connect_seconds, 4),
              "rtt_ms": round(statistics.median(rtts) * 1000, 2), **facts, "login_output": noise}
    launcher = create_launcher(remote.scheduler, remote.launcher_options)
    if launcher.schedules:
        report["scheduler"] = launcher.describe(conn, remote.workdir)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    _print_check(host, backend_name, report)


def _print_check(host: str, backend_name: str, report: dict[str, Any]) -> None:
    """``rx check``'s report for a terminal."""
    from rich.console import Console

    console = Console(highlight=False)
    console.print(f"[bold]{host}[/] ok via {backend_name}")
    console.print(f"  connect     {report['connect_seconds'] * 1000:.0f} ms, round trip {report['rtt_ms']:.1f} ms "
                  "(median of 5)")
    console.print(f"  python      {report['python']} ({report['executable']})")
    console.print(f"  host        {report['hostname']}, {report['cpus']} CPUs, {report['platform']}")
    console.print(f"  free disk   {report['free_bytes'] / 2**30:.1f} GiB in {report['workdir']}")
    console.print(f"  GPUs        {', '.join(report['gpus']) if report['gpus'] else 'none (no nvidia-smi)'}")
    if report["login_output"]:
        console.print("  login       the login shell prints on stdout (rx skips it): ", end="")
        console.print(report["login_output"][:200], markup=False)
    if "scheduler" in report:
        _print_scheduler(console, report["scheduler"])


def _print_scheduler(console: Any, facts: dict[str, Any]) -> None:
    """The scheduler's part of ``rx check``: version, accounting, partitions, whether jobs see the home."""
    console.print(f"  scheduler   {facts['scheduler']} {facts['version']}, accounting "
                  f"{'yes' if facts['accounting'] else 'no (sacct does not answer: scontrol is used)'}")
    for partition in facts["partitions"]:
        console.print(f"  partition   {partition['name']}{' (default)' if partition['default'] else ''}: "
                      f"{partition['available']}, {partition['idle_nodes']} of {partition['nodes']} node(s) idle, "
                      f"time limit {partition['time_limit']}")
    shared = facts["shared_home"]
    if shared.get("shared"):
        console.print(f"  shared home yes (a job on {shared['node']} wrote a file the login node read)")
    else:
        console.print(f"  shared home {'no' if shared.get('shared') is False else 'unknown'}: {shared.get('reason')}",
                      style="yellow")
