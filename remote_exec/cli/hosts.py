"""``rx hosts``, ``rx top`` and ``rx check``: which hosts rx knows, what each is doing (slots, GPUs, memory),
and whether one is ready for work."""

import json
import shlex
import statistics
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import RunnerError, printable
from .application import app
from .complete import complete_hosts

__all__ = ["check", "host_status", "hosts", "top"]

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
# shape: one branch per mode of rx hosts (the list, --status, --disconnect) over typer's option list
def hosts(
    names: Annotated[list[str] | None, typer.Argument(
        metavar="HOST", show_default=False, help="With --status: the hosts to look at (default: all).",
        autocompletion=complete_hosts)] = None,
    status: Annotated[bool, typer.Option(
        "--status", help="Connect to each host and show its slots and GPUs, what runs there from this "
                         "workspace, free memory and load.")] = False,
    ssh_config: Annotated[Path | None, typer.Option(
        help="ssh_config file (default RX_SSH_CONFIG or ~/.ssh/config).")] = None,
    backend: Annotated[str | None, typer.Option(help="SSH backend for --status: openssh or paramiko.")] = None,
    workspace: Annotated[Path | None, typer.Option(help="Workspace dir (default RX_WORKSPACE or ./.rx).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    disconnect: Annotated[bool, typer.Option(
        "--disconnect", help="End rx's shared OpenSSH connections now (of the HOST names, or all): the masters "
                             "kept for the next rx, which end by themselves RX_SSH_PERSIST seconds (default "
                             "300) after their last use.")] = False,
) -> None:
    """List the hosts rx knows: ssh_config aliases and [tool.rx.remotes].

    Each with the host name, user and port it reaches, as the backend resolves them through ssh_config. With
    --status (or HOST names): what each host is doing, its slots and GPUs, free memory and load.
    """
    if disconnect:
        _disconnect(names or [])
        return
    from ..config import Configuration

    config = Configuration.load()
    if status or names:
        _status(config, names or [name for name, _ in _known(config, ssh_config)],
                {"ssh_config": ssh_config, "backend": backend}, workspace, as_json)
        return
    path = config.effective_ssh_config(ssh_config)
    rows = [{"name": name, "source": "pyproject" if name in config.remotes else "ssh_config",
             **_reached(config, remote, path), "python": remote.python if name in config.remotes else None,
             "backend": remote.backend} for name, remote in _known(config, ssh_config)]
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
        path = config.effective_ssh_config(ssh_config)
        console.print(f"no hosts: no aliases in {path or '~/.ssh/config'} and no [tool.rx.remotes]")


def _disconnect(names: list[str]) -> None:
    """``rx hosts --disconnect``: end the shared masters (of ``names``, or all); one line each."""
    from ..backends.controlpath import end_master, shared_masters

    masters = [master for master in shared_masters() if not names or master.host in names]
    for master in masters:
        ended = end_master(master)
        typer.echo(f"{master.host} ({master.destination}): {'disconnected' if ended else 'could not disconnect'}")
    if not masters:
        typer.echo("no shared connection is open" + (f" to {', '.join(names)}" if names else ""))


def _known(config: Any, ssh_config: Path | None) -> list[tuple[str, Any]]:
    """The hosts rx knows, as (name, Remote): [tool.rx.remotes] first, then ssh_config's aliases."""
    from ..backends.ssh import list_aliases
    from ..config import Remote

    known = sorted(config.remotes.items())
    names = {name for name, _ in known}
    return known + [(alias, Remote(alias, alias)) for alias in list_aliases(config.effective_ssh_config(ssh_config))
                    if alias not in names]


def _status(config: Any, names: list[str], options: dict[str, Any], workspace: Path | None, as_json: bool) -> None:
    """``rx hosts --status``: every host probed at once, as JSON or one block per host."""
    from rich.console import Console

    from ..coordinator import Coordinator
    from ..pool.status import probe_hosts
    from ..workspace import Workspace

    if options.get("backend") is not None:
        config.check_remote_backend(options["backend"])
    root = str(Workspace.resolve(workspace or config.workspace).root)
    facts = probe_hosts(Coordinator.current(), config, names, {k: v for k, v in options.items() if v is not None},
                        root)
    if as_json:
        typer.echo(json.dumps(facts, indent=2))
        return
    console = Console(highlight=False)
    for index, host in enumerate(facts):
        if index:
            console.print()
        for renderable in host_status(host):
            console.print(renderable)
    if not facts:
        console.print("no hosts: name some, or add aliases to ssh_config or [tool.rx.remotes]")


def host_status(facts: dict[str, Any]) -> list[Any]:
    """One host's block of ``rx hosts --status`` (and ``rx top``): its facts, its GPUs, its slots."""
    from rich.text import Text

    from ..pool.progress import clean

    name = clean(facts.get("host"))
    if not facts.get("ok"):
        return [Text.assemble((name, "bold"), "  ", ("unreachable", "red"), f": {clean(facts.get('error'))}")]
    memory = facts.get("memory") or {}
    load = facts.get("load") or []
    free = (f", memory {memory['available'] / 2**30:.1f} of {memory['total'] / 2**30:.1f} GiB free"
            if memory.get("total") and "available" in memory else "")
    line = Text.assemble((name, "bold"), f" ({clean(facts.get('hostname'))})  ", ("up", "green"),
                         f"  python {clean(facts.get('python'))}, {facts.get('cpus')} CPUs"
                         + (f", load {load[0]:.2f}" if load else "") + free)
    return [line, *_gpu_lines(facts), *_slot_lines(facts)]


def _gpu_lines(facts: dict[str, Any]) -> list[Any]:
    from rich.table import Table
    from rich.text import Text

    from ..pool.status import gpu_rows

    if facts.get("gpus") is None:
        return [Text("  no GPUs (no nvidia-smi)", style="dim")]
    gpus = gpu_rows(facts)
    if not gpus:
        return []
    table = Table(box=None, header_style="bold", pad_edge=False, padding=(0, 2, 0, 2))
    for column in ("GPU", "memory used", "util", "used by"):
        table.add_column(column)
    for gpu in gpus:
        table.add_row(str(gpu.get("index")), f"{gpu.get('memory_used')} / {gpu.get('memory_total')} MiB",
                      f"{gpu.get('utilization')}%", _user_text(gpu["user"]))
    return [table]


def _slot_lines(facts: dict[str, Any]) -> list[Any]:
    from rich.text import Text

    from ..pool.progress import clean

    workers = [lock for lock in facts.get("locks") or [] if lock.get("kind") == "worker"]
    if not workers:
        return [Text("  no slots held by rx", style="dim")]
    mine = [lock for lock in workers if lock.get("mine")]
    runs = sorted({str((lock.get("owner") or {}).get("run_id")) for lock in mine})
    head = Text(f"  slots held by rx: {len(workers)} ({len(mine)} of this workspace"
                + (f": run {', '.join(clean(r) for r in runs)}" if runs else "") + ")")
    return [head, *(_slot_line(lock) for lock in mine)]


def _slot_line(lock: dict[str, Any]) -> Any:
    """A slot of this workspace: its name, its worker's pid, its GPUs, its run."""
    from rich.text import Text

    from ..pool.progress import clean

    owner = lock.get("owner") or {}
    held = ",".join(str(g) for g in lock.get("gpus") or []) or "-"
    return Text(f"    {clean(owner.get('slot'))}  pid {lock.get('pid')}  GPUs {held}  run {clean(owner.get('run_id'))}",
                style="cyan")


def _user_text(user: dict[str, Any]) -> Any:
    from rich.text import Text

    from ..pool.progress import clean

    if user["kind"] == "free":
        return Text("free", style="green")
    if user["kind"] == "foreign":
        return Text("processes rx did not start: pid " + ", ".join(str(p) for p in user.get("pids") or []),
                    style="yellow")
    who = "this workspace" if user.get("mine") else f"rx from {clean(user.get('coordinator'))}"
    return Text(f"{who} ({clean(user.get('slot'))}, run {clean(user.get('run_id'))})",
                style="cyan" if user.get("mine") else "magenta")


@app.command()
def top(
    names: Annotated[list[str] | None, typer.Argument(
        metavar="HOST", show_default=False, help="The hosts to watch (default: all rx knows).",
        autocompletion=complete_hosts)] = None,
    interval: Annotated[float, typer.Option(help="Seconds between two looks.", min=0.5)] = 5.0,
    ssh_config: Annotated[Path | None, typer.Option(
        help="ssh_config file (default RX_SSH_CONFIG or ~/.ssh/config).")] = None,
    backend: Annotated[str | None, typer.Option(help="SSH backend: openssh or paramiko.")] = None,
    workspace: Annotated[Path | None, typer.Option(help="Workspace dir (default RX_WORKSPACE or ./.rx).")] = None,
) -> None:
    """rx hosts --status, looked at again every few seconds until Ctrl-C."""
    from rich.console import Console, Group
    from rich.live import Live

    from ..config import Configuration
    from ..coordinator import Coordinator
    from ..pool.status import probe_hosts
    from ..workspace import Workspace

    config = Configuration.load()
    hosts_list = names or [name for name, _ in _known(config, ssh_config)]
    options = {k: v for k, v in {"ssh_config": ssh_config, "backend": backend}.items() if v is not None}
    root = str(Workspace.resolve(workspace or config.workspace).root)
    console = Console(highlight=False)
    try:
        with Live(console=console, auto_refresh=False) as live:
            while True:
                facts = probe_hosts(Coordinator.current(), config, hosts_list, options, root)
                live.update(Group(*(part for host in facts for part in host_status(host))), refresh=True)
                time.sleep(interval)
    except KeyboardInterrupt:
        raise typer.Exit(0) from None
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
    console.print(f"[bold]{_shown(host)}[/] ok via {backend_name}")
    console.print(f"  connect     {report['connect_seconds'] * 1000:.0f} ms, round trip {report['rtt_ms']:.1f} ms "
                  "(median of 5)")
    console.print(f"  python      {_shown(report['python'])} ({_shown(report['executable'])})")
    console.print(f"  host        {_shown(report['hostname'])}, {_shown(report['cpus'])} CPUs, "
                  f"{_shown(report['platform'])}")
    console.print(f"  free disk   {report['free_bytes'] / 2**30:.1f} GiB in {_shown(report['workdir'])}")
    console.print(f"  GPUs        {_shown(', '.join(report['gpus'])) if report['gpus'] else 'none (no nvidia-smi)'}")
    if report["login_output"]:
        console.print("  login       the login shell prints on stdout (rx skips it): ", end="")
        console.print(printable(report["login_output"][:200]), markup=False)
    if "scheduler" in report:
        _print_scheduler(console, report["scheduler"])


def _print_scheduler(console: Any, facts: dict[str, Any]) -> None:
    """The scheduler's part of ``rx check``: version, accounting, partitions, whether jobs see the home
    (what the cluster said: no markup, no control characters)."""
    console.print(f"  scheduler   {_shown(facts['scheduler'])} {_shown(facts['version'])}, accounting "
                  f"{'yes' if facts['accounting'] else 'no (sacct does not answer: scontrol is used)'}")
    for partition in facts["partitions"]:
        console.print(f"  partition   {_shown(partition['name'])}{' (default)' if partition['default'] else ''}: "
                      f"{_shown(partition['available'])}, {_shown(partition['idle_nodes'])} of "
                      f"{_shown(partition['nodes'])} node(s) idle, time limit {_shown(partition['time_limit'])}")
    shared = facts["shared_home"]
    if shared.get("shared"):
        console.print(f"  shared home yes (a job on {_shown(shared['node'])} wrote a file the login node read)")
    else:
        console.print(f"  shared home {'no' if shared.get('shared') is False else 'unknown'}: "
                      f"{_shown(shared.get('reason'))}", style="yellow")


def _shown(value: object) -> str:
    """What a host or cluster reported, for rich: no markup, no control characters."""
    from rich.markup import escape

    return escape(printable(value))
