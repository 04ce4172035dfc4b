"""``rx env HOST``: a task's environment on a host: the host's probe, the lock resolved for it, whether the
environment exists there and its size; ``--build`` builds it now."""

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import ConfigError, printable
from .application import app
from .run import env_options

__all__ = ["env"]


@app.command()
def env(
    host: Annotated[str, typer.Argument(help="The host (a configured remote or an ssh alias).", show_default=False)],
    deps: Annotated[list[str] | None, typer.Option(
        "--deps", help="A requirement (\"numpy>=2\"); repeatable (default: [tool.rx] deps).", metavar="REQ")] = None,
    requirements: Annotated[list[Path] | None, typer.Option(
        "--requirements", help="A requirements file; repeatable.")] = None,
    find_links: Annotated[list[str] | None, typer.Option(
        "--find-links", help="A local folder of wheels (or URL) to resolve from; repeatable.", metavar="DIR")] = None,
    offline: Annotated[bool, typer.Option("--offline", help="The host has no index: wheels travel from here.")
                       ] = False,
    inherit_site: Annotated[bool, typer.Option(
        "--inherit-site", help="The environment sees the host interpreter's own packages.")] = False,
    build: Annotated[bool, typer.Option("--build", help="Build the environment now if the host lacks it.")] = False,
    backend: Annotated[str | None, typer.Option(help="SSH backend: openssh or paramiko.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show the environment of the declared dependencies on HOST: its interpreter and platform, the lock
    resolved for them, whether the environment is there and its size."""
    from ..config import Configuration
    from ..coordinator import Coordinator

    config = Configuration.load()
    options = env_options(deps, requirements, find_links, offline, inherit_site)
    coordinator = Coordinator.current()
    target = coordinator.host_target(host, config, backend=backend)
    report = coordinator.describe_env(target, config, options, build=build)
    if report is None:
        raise ConfigError("no dependencies declared", hint="--deps, --requirements, or [tool.rx] deps")
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    _print(report)


def _print(report: dict[str, Any]) -> None:
    from ..sync.tree import human_size

    probe = report["probe"]
    uv = f"uv {probe.get('uv_version')}" if probe.get("uv") else "no uv (rx ships its own)"
    index = {True: "reaches the index", False: "reaches no index", None: "index not asked"}[probe.get("index")]
    lines = [
        f"host      {report['host']}: {probe.get('implementation')} {probe.get('python')} "
        f"({probe.get('executable')}), {probe.get('machine')} {probe.get('libc')} {probe.get('libc_version')}, "
        f"{human_size(float(probe.get('free') or 0))} free, {uv}, {index}",
        f"target    {report['target']}{' offline' if report['offline'] else ''}"
        f"{' inherit-site' if report['inherit_site'] else ''}",
        f"key       {report['key']}",
        "env       " + (f"{report['path']} ({human_size(float(report['bytes'] or 0))})" if report["exists"]
                        else "not built yet (rx env --build, or the first run builds it)"),
        "lock",
    ]
    lines += [f"  {line}" for line in report["lock"].splitlines() if line.strip() and not line.startswith(" ")]
    for line in lines:
        typer.echo(printable(line.rstrip(" \\")))
