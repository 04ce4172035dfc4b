"""``rx runs``, ``rx show``, ``rx logs``, ``rx export`` and ``rx clean``: reading the run ledger.

Every command takes ``--workspace DIR`` (else ``RX_WORKSPACE``, else ``./.rx``) and names runs by id,
unique prefix or ``latest``. The work is done by :mod:`remote_exec.workspace`; this module parses the
options and renders the answers with rich.
"""

import contextlib
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ..errors import ConfigError, WorkspaceError, printable
from ..workspace.export import EXPORT_FORMATS, export, format_duration, format_size, run_facts, shown
from ..workspace.manager import Run, Workspace
from ..workspace.output import log_origin
from ..workspace.state import ACTIVE_RUN_STATUSES, duration, parse_time
from .application import app, state
from .complete import complete_runs

__all__ = ["clean_command", "export_command", "logs_command", "runs_command", "show_command"]

#: Seconds between two looks at a log being followed.
FOLLOW_INTERVAL = 0.2

_STYLES = {
    "finished": "green", "done": "green", "failed": "bold red", "lost": "magenta",
    "running": "cyan", "started": "cyan", "pending": "dim", "waiting": "dim",
    "cancelled": "yellow", "skipped": "yellow",
}

#: The choices of ``--status`` (the same as :data:`~remote_exec.workspace.state.RUN_STATUSES`).
StatusName = Literal["pending", "running", "finished", "failed", "cancelled", "lost"]
#: The choices of ``--format`` (the same as :data:`~remote_exec.workspace.export.EXPORT_FORMATS`).
FormatName = Literal["json", "html", "junit", "text"]

_SUFFIX_FORMATS: dict[str, FormatName] = {
    ".html": "html", ".htm": "html", ".xml": "junit", ".json": "json", ".txt": "text"}

WorkspaceOption = Annotated[
    Path | None,
    typer.Option("--workspace", metavar="DIR", show_default=False,
                 help="Workspace directory (default: $RX_WORKSPACE, else ./.rx).")]
RunArgument = Annotated[str, typer.Argument(metavar="RUN", show_default=False, autocompletion=complete_runs,
                                            help="Run id, unique prefix of one, or 'latest'.")]
JsonOption = Annotated[bool, typer.Option("--json",
                                          help="Print JSON (the state.json fields) instead of text.")]


def _console(stderr: bool = False) -> Console:
    return Console(stderr=stderr, highlight=False, soft_wrap=False, emoji=False)


def _status_text(status: Any) -> Text:
    return Text(str(status), style=_STYLES.get(str(status), ""))


def _local_time(value: Any, *, short: bool = False) -> str:
    """A stored UTC time in the local zone: ``2024-05-01 14:03:07``, or ``05-01 14:03`` when short."""
    parsed = parse_time(value)
    if parsed is None:
        return ""
    return parsed.astimezone().strftime("%m-%d %H:%M" if short else "%Y-%m-%d %H:%M:%S")


def _short_target(target: Any) -> str:
    """A script path relative to the current directory when it lies below it; anything else as is."""
    text = str(target or "")
    if os.path.isabs(text):
        with contextlib.suppress(ValueError):
            relative = os.path.relpath(text)
            if not relative.startswith(".."):
                return relative
    return text


def _elapsed(info: dict[str, Any]) -> str:
    if info.get("duration") is not None:
        return format_duration(info["duration"])
    started = parse_time(info.get("started"))
    if started is not None and info.get("status") == "running":
        return format_duration((datetime.now(timezone.utc) - started).total_seconds()) + "…"
    return ""


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, ensure_ascii=False))


@app.command("runs")
def runs_command(
    status: Annotated[StatusName | None, typer.Option(
        "--status", show_default=False, help="Only runs with this status.")] = None,
    every: Annotated[bool, typer.Option(
        "--all", help="Also list each run of a sweep (by default a sweep is its parent's one line).")] = False,
    last: Annotated[int | None, typer.Option(
        "--last", metavar="N", min=1, show_default=False, help="Only the N newest runs (of that status).")] = None,
    as_json: JsonOption = False,
    workspace: WorkspaceOption = None,
) -> None:
    """List the runs of the workspace, oldest first (a sweep of rx map as one line)."""
    ws = Workspace.resolve(workspace)
    infos = _listed_infos(ws, status, every=every, last=last)
    if as_json:
        _print_json(infos)
        return
    console = _console()
    if not infos:
        console.print(f"[dim]no {escape(status) + ' ' if status else ''}runs in {escape(str(ws.root))}[/]")
        return
    console.print(_runs_table([_runs_row(info) for info in infos], console.width))


#: The columns of ``rx runs`` (``calls`` only when a @task run is listed).
_RUNS_HEADERS = ("id", "target", "host", "status", "calls", "started", "duration", "exit")
#: Spaces between two columns of ``rx runs``.
_GAP = 2
#: Columns left out, in this order, when the terminal is too narrow for the rest.
_OPTIONAL = ("started", "duration", "calls")
#: What target and host keep at least before an optional column goes.
_HOST_MIN, _TARGET_MIN = 14, 8


def _runs_table(rows: list[tuple[str, ...]], console_width: int) -> Table:
    """The table of ``rx runs``: ids, statuses and exit codes whole, host names readable, the target
    shortened from its start (its file name stays); when even that does not fit, no start time, duration
    or call count."""
    widths = _runs_widths(rows, console_width)
    table = Table(box=None, header_style="bold", pad_edge=False, padding=(0, _GAP, 0, 0), collapse_padding=True)
    shown = [index for index, header in enumerate(_RUNS_HEADERS) if header in widths]
    for index in shown:
        header = _RUNS_HEADERS[index]
        table.add_column(header, width=widths[header], no_wrap=True, overflow="ellipsis",
                         justify="right" if header == "exit" else "left")
    for row in rows:
        cells: list[str | Text] = []
        for index in shown:
            header, cell = _RUNS_HEADERS[index], row[index]
            if header == "target" and len(cell) > widths[header]:
                cell = "…" + cell[len(cell) - widths[header] + 1:]
            cells.append(_status_text(cell) if header == "status" else cell)
        table.add_row(*cells)
    return table


def _listed_infos(ws: Workspace, status: str | None, *, every: bool, last: int | None) -> list[dict[str, Any]]:
    """The state of each run ``rx runs`` lists, oldest first: with ``status``, those that have it; unless
    ``every``, not the runs of a sweep (its parent stands for them); with ``last``, the newest ``last`` of
    those, read from the newest back (``--last 5`` of 10,000 runs reads a handful of states). A damaged run is
    skipped with a warning on stderr, so that it does not hide the others."""
    ids = ws.ids()
    infos: list[dict[str, Any]] = []
    for run_id in reversed(ids) if last is not None else ids:
        try:
            info = Run(ws, run_id).info()
        except WorkspaceError as exc:
            _console(stderr=True).print(f"[yellow]rx: warning:[/] skipping run {escape(run_id)}: "
                                        f"{escape(str(exc))}")
            continue
        if (status is not None and info.get("status") != status) or (
                not every and (info.get("sweep") or {}).get("parent")):
            continue
        infos.append(info)
        if last is not None and len(infos) == last:
            break
    return infos[::-1] if last is not None else infos


def _runs_row(info: dict[str, Any]) -> tuple[str, ...]:
    """One line of ``rx runs``, a cell per :data:`_RUNS_HEADERS`."""
    target = _short_target(info.get("target"))
    if info.get("kind") == "sweep":
        target += " (sweep)"
    return tuple(printable(cell) for cell in (
        info.get("run_id"), target, info.get("remote") or "local", info.get("status"),
        _calls(info), _local_time(info.get("started") or info.get("created"), short=True), _elapsed(info),
        "" if info.get("exit_code") is None else info.get("exit_code")))


def _calls(info: dict[str, Any]) -> str:
    """A @task run's calls (a sweep's runs): ``6``, or ``3/6 failed`` (counted apart from the run's own exit
    status)."""
    if info.get("kind") not in ("task", "sweep"):
        return ""
    tasks = info.get("tasks") or {}
    failed = sum(1 for entry in tasks.values() if entry.get("status") not in ("done", "running", "pending"))
    return f"{failed}/{len(tasks)} failed" if failed else str(len(tasks))


def _runs_widths(rows: list[tuple[str, ...]], console_width: int) -> dict[str, int]:
    """The width of each column shown, by header: id, status and exit code keep theirs; target and host
    share the rest, the host keeping up to :data:`_HOST_MIN` characters (more when there is room), the
    target at least :data:`_TARGET_MIN`; the :data:`_OPTIONAL` columns are left out, in order, when they
    would not fit otherwise."""
    natural = {header: max(len(header), *(len(row[i]) for row in rows)) for i, header in enumerate(_RUNS_HEADERS)}
    host_min, target_min = min(natural["host"], _HOST_MIN), min(natural["target"], _TARGET_MIN)
    widths = dict(natural)
    if not any(row[_RUNS_HEADERS.index("calls")] for row in rows):
        del widths["calls"]
    for optional in (None, *_OPTIONAL):
        if optional is not None:
            widths.pop(optional, None)
        room = console_width - sum(widths.values()) + widths["target"] + widths["host"] - _GAP * (len(widths) - 1)
        if room >= host_min + target_min:
            break
    room = max(room, host_min + target_min)
    widths["host"] = min(natural["host"], max(host_min, room - natural["target"]))
    widths["target"] = min(natural["target"], room - widths["host"])
    return widths


@app.command("show")
def show_command(run_ref: RunArgument, as_json: JsonOption = False,
                 workspace: WorkspaceOption = None) -> None:
    """Show one run: its record, actions, tasks, exception and files.

    --json prints state.json with the result record (result.json, or null) under "result".
    """
    run = Workspace.resolve(workspace).run(run_ref)
    info = run.info()
    result = run.result()
    if as_json:
        _print_json({**info, "result": result})
        return
    console = _console()
    console.print(_facts_grid(run, info))
    tasks = _sweep_table(info) if info.get("kind") == "sweep" else _tasks_table(info)
    for table in (_actions_table(info), tasks):
        if table is not None:
            console.print()
            console.print(table)
    _print_outcome(console, result)
    _print_files_and_logs(console, run)


def _facts_grid(run: Run, info: dict[str, Any]) -> Table:
    """The run's facts (the exports' :func:`~remote_exec.workspace.export.run_facts`, in local time),
    between its id and status and its directory."""
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="dim", no_wrap=True)
    facts.add_column()
    rows = {"run": Text(str(info.get("run_id")), style="bold"), "status": _status_text(info.get("status")),
            **run_facts(info, exit_code=info.get("exit_code"), duration=_elapsed(info), clock=_local_time),
            "directory": str(run.dir)}
    for label, value in rows.items():
        if shown(value):
            facts.add_row(label, value if isinstance(value, Text) else Text(printable(value)))
    return facts


def _listing(title: str, columns: tuple[str, ...], rows: list[tuple[str | Text, ...]]) -> Table | None:
    """A titled table of ``rows``, or ``None`` when there are none."""
    if not rows:
        return None
    table = Table(title=title, title_justify="left", box=None, header_style="bold", pad_edge=False)
    for column in columns:
        table.add_column(column)
    for row in rows:  # what a run recorded may quote a host: no control characters reach the terminal
        table.add_row(*(cell if isinstance(cell, Text) else printable(cell) for cell in row))
    return table


def _actions_table(info: dict[str, Any]) -> Table | None:
    return _listing("actions", ("action", "host", "status", "duration", "error"), [
        (str(a.get("name")), str(a.get("host") or ""), _status_text(a.get("status")),
         format_duration(duration(a.get("started"), a.get("finished"))), Text(printable(a.get("error") or "")))
        for a in info.get("actions") or []])


def _tasks_table(info: dict[str, Any]) -> Table | None:
    tasks: dict[str, dict[str, Any]] = info.get("tasks") or {}
    return _listing("tasks", ("key", "name", "host", "status", "duration", "error"), [
        (str(key), str(t.get("name") or ""), str(t.get("host") or ""), _status_text(t.get("status")),
         format_duration(t.get("duration")), Text(printable(t.get("error") or "")))
        for key, t in tasks.items()])


def _sweep_table(info: dict[str, Any]) -> Table | None:
    """A sweep's combinations: a line each, with where it ran and its own run."""
    tasks: dict[str, dict[str, Any]] = info.get("tasks") or {}
    return _listing("combinations", ("#", "combination", "host", "GPUs", "status", "exit", "duration", "tries",
                                     "run"), [
        (str(int(key)) if key.isdigit() else key, Text(str(t.get("name") or "")), str(t.get("host") or ""),
         ",".join(str(g) for g in t.get("gpus") or []), _status_text(t.get("status")),
         "" if t.get("exit_code") is None else str(t.get("exit_code")), format_duration(t.get("duration")),
         str(len(t.get("attempts") or [])), str(t.get("run") or "") + (" (merged)" if t.get("merged_from") else ""))
        for key, t in sorted(tasks.items())])


def _print_outcome(console: Console, result: dict[str, Any] | None) -> None:
    """The exception with its traceback, else the value."""
    exc = (result or {}).get("exception")
    if isinstance(exc, dict):
        console.print()
        console.print(Text(printable(f"{exc.get('type')}: {exc.get('message')}"), style="bold red"))
        if state.verbose and exc.get("remote_traceback"):  # rx -v show: every frame, as the host printed it
            exc = {**exc, "traceback": exc["remote_traceback"]}
        if exc.get("traceback"):
            console.print(Text(printable(str(exc["traceback"]).rstrip(), lines=True)))
    elif result is not None and result.get("value_repr") is not None:
        console.print()
        console.print(Text("value: ", style="dim") + Text(printable(result["value_repr"], lines=True)))


def _print_files_and_logs(console: Console, run: Run) -> None:
    """How much the run pulled and logged, and where to read it."""
    files = run.files()
    logs = [(name, path.stat().st_size)
            for name, path in (("stdout", run.stdout_log), ("stderr", run.stderr_log)) if path.is_file()]
    if files or logs:
        console.print()
    if files:
        total = sum(size for _, size in files)
        console.print(f"[dim]files:[/] {len(files)} ({format_size(total)}) in {escape(str(run.files_dir))}")
    for name, size in logs:
        console.print(f"[dim]{name}:[/] {format_size(size)}  (rx logs {escape(run.id)}"
                      f"{' --stderr' if name == 'stderr' else ''})")


@app.command("logs")
def logs_command(
    run_ref: RunArgument,
    stderr: Annotated[bool, typer.Option("--stderr", help="Print stderr.log instead of stdout.log.")] = False,
    follow: Annotated[bool, typer.Option(
        "--follow", "-f",
        help="Keep printing new output until the run is no longer pending or running.")] = False,
    workspace: WorkspaceOption = None,
) -> None:
    """Print the output a run recorded (its stdout.log, or stderr.log)."""
    run = Workspace.resolve(workspace).run(run_ref)
    path = run.stderr_log if stderr else run.stdout_log
    out = sys.stdout.buffer
    offset = 0

    def pump() -> None:
        nonlocal offset
        try:
            with open(path, "rb") as fh:
                if fh.seek(0, os.SEEK_END) < offset:
                    offset = 0  # the log was replaced: start over
                fh.seek(offset)
                while chunk := fh.read(64 * 1024):
                    out.write(chunk)
                    offset += len(chunk)
        except FileNotFoundError:
            return
        out.flush()

    info = run.info()
    if info.get("detached") and info.get("status") in ACTIVE_RUN_STATUSES and info.get("coordinator") is None:
        pump()  # what was collected before, then the rest from the host (so far, or live with -f)
        dropped, note = log_origin(path)  # a capped log: the host counts the bytes it dropped
        _follow_detached(run_ref, workspace, stderr=stderr, offset=offset - note + dropped, once=not follow)
        return
    if not follow:
        pump()
        return
    while True:
        active = run.status() in ACTIVE_RUN_STATUSES  # look before reading, so the last read is complete
        pump()
        if not active:
            return
        time.sleep(FOLLOW_INTERVAL)


def _follow_detached(run_ref: str, workspace: Path | None, *, stderr: bool, offset: int, once: bool = False) -> None:
    """Stream a detached run's output from its host until it ends (``once``: what it wrote so far); the
    run stays uncollected."""
    from ..workspace.output import OutputPump
    from .run import load_detached_run

    detached = load_detached_run(workspace, run_ref)
    run = detached.run
    pump = OutputPump()  # a slow reader (| less) never holds up the link
    writer = pump.sink(sys.stdout)

    def show(data: bytes) -> None:
        pump.write(writer, data)

    def drop(data: bytes) -> None:
        pass

    try:
        detached.coordinator.follow(detached.target, detached.info["detached"],
                                    on_stdout=drop if stderr else show, on_stderr=show if stderr else drop,
                                    offsets=(0 if stderr else offset, offset if stderr else 0), once=once)
    finally:
        pump.close()
    if once:
        typer.echo(f"rx: run {run.id}: its output so far on {detached.target.host} (follow it: rx logs -f "
                   f"{run.id}; collect it: rx attach {run.id})", err=True)
        return
    typer.echo(f"rx: run {run.id} ended on the host; collect it with rx attach {run.id}", err=True)


@app.command("export")
def export_command(
    run_refs: Annotated[list[str] | None, typer.Argument(
        metavar="RUN", show_default=False, autocompletion=complete_runs,
        help="Runs to export: ids, unique prefixes or 'latest' (default: latest).")] = None,
    fmt: Annotated[FormatName | None, typer.Option(
        "--format", show_default=False,
        help="Output format (default: from the -o suffix: .json .html .xml .txt).")] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", metavar="FILE", show_default=False,
        help="Write to FILE instead of standard output.")] = None,
    workspace: WorkspaceOption = None,
) -> None:
    """Export runs as JSON, a self-contained HTML page, JUnit XML or a text summary."""
    if fmt is None:
        fmt = _SUFFIX_FORMATS.get(output.suffix.lower()) if output is not None else None
        if fmt is None:
            raise ConfigError("--format is required", hint=f"one of {', '.join(EXPORT_FORMATS)}")
    ws = Workspace.resolve(workspace)
    runs: list[Run] = []
    for ref in run_refs or ["latest"]:
        run = ws.run(ref)
        if run not in runs:
            runs.append(run)
    text = export(runs, fmt)
    if output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    _write_atomically(output, text)
    _console(stderr=True).print(f"wrote {len(runs)} run{'s' if len(runs) != 1 else ''} as {fmt} to "
                                f"{escape(str(output))}")


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from exc


@app.command("clean")
def clean_command(
    keep: Annotated[int, typer.Option("--keep", metavar="N", min=0,
                                      help="How many of the newest runs to keep.")] = 20,
    workspace: WorkspaceOption = None,
) -> None:
    """Remove old runs, keeping the newest N; a run still pending or running is never removed."""
    ws = Workspace.resolve(workspace)
    removed = ws.clean(keep)
    left = ws.ids()
    console = _console()
    console.print(f"removed {len(removed)} run{'s' if len(removed) != 1 else ''}, {len(left)} left in "
                  f"{escape(str(ws.root))}")
    for rid in removed:
        console.print(f"[dim]  {rid}[/]")
