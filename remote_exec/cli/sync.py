"""``rx sync`` and ``rx gc``: what of the project travels (and storing it on a host ahead of a run), and the
host's caches; the project summary and the upload's progress bar that ``rx run`` shows too."""

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import ConfigError
from .application import app
from .say import say

__all__ = ["SyncBar", "describe_project", "gc", "print_listing", "sync"]

#: An upload smaller than this shows no progress bar.
_BAR_BYTES = 8 << 20


def _printable(text: str) -> str:
    """``text`` with control characters (a newline in a file name) shown as escapes."""
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def _console() -> Any:
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def describe_project(project: Any, warnings: list[str], *, what: str) -> None:
    """One dim line when there is no project (the old way applies), and a yellow one per warning."""
    if project is None:
        say(f"rx: no project root above {_printable(what)} (no .git, pyproject.toml, setup.py or setup.cfg "
            "below your home): shipping it with the modules it imports; --project DIR names one", "dim")
    for warning in warnings:
        say(f"rx: warning: {_printable(warning)}", "yellow")


def print_listing(project: Any, *, as_json: bool) -> None:
    """What would travel: every path, the total, the ten largest files (``--dry-run``)."""
    from ..sync.tree import human_size

    tree = project.tree
    largest = tree.largest(10)
    if as_json:
        typer.echo(json.dumps({
            "root": str(tree.root), "how": tree.how, "tree": tree.tree_id, "files": tree.files,
            "bytes": tree.total_bytes, "cwd": project.cwd,
            "paths": [{"path": entry.path, "size": entry.size, "mode": oct(entry.mode), "link": entry.link or None}
                      for entry in tree.entries],
            "largest": [{"path": entry.path, "size": entry.size} for entry in largest],
        }, indent=2))
        return
    for entry in tree.entries:
        typer.echo(_printable(entry.path) + (f" -> {_printable(entry.link)}" if entry.link else ""))
    say(f"rx: {tree.files:,} files, {human_size(tree.total_bytes)} from {_printable(str(tree.root))} "
        f"({'git' if tree.how == 'git' else 'a walk'}; tree {tree.tree_id[:12]})")
    if largest:
        say("rx: the largest:")
        for entry in largest:
            say(f"  {human_size(entry.size):>10}  {_printable(entry.path)}")


class SyncBar:
    """A progress bar for the upload of a project's blobs: on a terminal, for a large upload only."""

    def __init__(self) -> None:
        self.progress: Any = None
        self.task: Any = None
        self.enabled = sys.stdout.isatty() and sys.stderr.isatty()

    def __call__(self, report: Any) -> None:
        if not self.enabled:
            return
        if self.progress is None:
            if report.done or report.bytes_total < _BAR_BYTES:
                return
            self._start(report)
        self.progress.update(self.task, completed=report.bytes, files=report.files)
        if report.done:
            self.close()

    def _start(self, report: Any) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.progress = Progress(TextColumn("rx: sending the project"), BarColumn(),
                                 TextColumn("{task.fields[files]}/{task.fields[total_files]} files"),
                                 DownloadColumn(binary_units=True), TransferSpeedColumn(), TimeRemainingColumn(),
                                 console=_console(), transient=False)
        self.task = self.progress.add_task("upload", total=report.bytes_total, files=0,
                                           total_files=report.files_total)
        self.progress.start()

    def close(self) -> None:
        """Stop the bar (once the upload ended, or the call failed)."""
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


@app.command()
def sync(
    directory: Annotated[Path | None, typer.Argument(help="A directory of the project (default: here).",
                                                     show_default=False)] = None,
    remote: Annotated[str | None, typer.Option(
        "--remote", "-r", help="Store the project's tree on this host now (only what it lacks travels).")] = None,
    project: Annotated[Path | None, typer.Option(help="The project root (default: found from DIRECTORY).")] = None,
    include: Annotated[list[str] | None, typer.Option(
        help="Ship ignored paths matching GLOB (gitignore syntax) too; repeatable.")] = None,
    follow_symlinks: Annotated[bool, typer.Option(
        "--follow-symlinks", help="Ship what symlinks leading out of the project point to.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Ship a project over the 2 GiB limit.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would travel.")] = False,
    backend: Annotated[str | None, typer.Option(help="SSH backend: openssh or paramiko.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List what of the project travels (every path, the total, the ten largest files), or with --remote
    store it on HOST ahead of a run."""
    from ..config import Configuration
    from ..coordinator import Coordinator
    from ..sync.plan import plan_directory

    config = Configuration.load()
    plan = plan_directory(directory or Path.cwd(), config, project=project, include=tuple(include or ()),
                          follow_symlinks=follow_symlinks)
    if plan is None:
        raise ConfigError(f"no project root above {directory or Path.cwd()}",
                          hint="no .git, pyproject.toml, setup.py or setup.cfg below your home; --project DIR")
    coordinator = Coordinator.current()
    call, warnings = coordinator.scan(plan, force=force)
    describe_project(call, warnings, what=str(directory or "."))
    if remote is None or dry_run:
        print_listing(call, as_json=as_json)
        return
    target = coordinator.host_target(remote, config, backend=backend)
    bar = SyncBar()
    try:
        report = coordinator.sync(target, call, config, on_progress=bar)
    finally:
        bar.close()
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    from ..sync.tree import human_size

    _console().print(f"rx: tree {call.tree.tree_id[:12]} stored on {remote}: {report['blobs']} file(s), "
                     f"{human_size(report['bytes'])} sent", markup=False)


@app.command()
def gc(
    host: Annotated[str | None, typer.Argument(
        help="The host whose caches to collect (without it: this machine's archive cache and the store of "
             "its local runs).",
        show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what would go.")] = False,
    backend: Annotated[str | None, typer.Option(help="SSH backend: openssh or paramiko.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Free a host's caches (least recently used first above [tool.rx] cache_limit, and anything unused for
    cache_days; never what a running run uses), and this machine's archive cache (without a host: also the
    store of the runs without --remote)."""
    from ..config import Configuration
    from ..coordinator import Coordinator
    from ..packing import prune_cache

    config = Configuration.load()
    reports = [prune_cache(config.cache_limit, config.cache_days, dry_run=dry_run)]
    coordinator = Coordinator.current()
    if host is not None:
        target = coordinator.host_target(host, config, backend=backend)
        reports.append({"host": host, **coordinator.collect_garbage(target, config, dry_run=dry_run)})
    else:
        local = coordinator.local_store_target(config)  # the store of rx run without --remote
        if local is not None:
            reports.append({"host": "local", **coordinator.collect_garbage(local, config, dry_run=dry_run)})
    if as_json:
        typer.echo(json.dumps(reports, indent=2))
        return
    for report in reports:
        _print_gc(report)


def _print_gc(report: dict[str, Any]) -> None:
    from ..sync.tree import human_size

    console = _console()
    where = {None: "this machine", "local": "this machine's local runs"}.get(report.get("host"), report.get("host"))
    if report.get("busy"):
        console.print(f"rx: {where}: another collection is running; nothing done", markup=False)
        return
    verb = "would free" if report.get("dry_run") else "freed"
    for entry in report.get("removed") or []:
        console.print(f"  {human_size(entry['bytes']):>10}  {entry['kind']:<10} {_printable(entry['name'])}  "
                      f"({entry['reason']})", markup=False)
    console.print(f"rx: {where}: {verb} {human_size(report.get('freed_bytes') or 0)} in "
                  f"{len(report.get('removed') or [])} item(s) of {report.get('cache')}; "
                  f"{human_size(report.get('kept_bytes') or 0)} kept", markup=False)
