"""Export recorded runs for people and for other tools (plainbox's exporters).

:func:`export` renders a list of runs in one of :data:`EXPORT_FORMATS`:

``json``
    A list with one object per run: the ``state.json`` content (see :mod:`.manager`), plus ``result``
    (the ``result.json`` record or null) and ``files`` (``[{"path", "size"}]``).
``html``
    One self-contained page (inline CSS, no scripts, no external assets): per run a coloured status
    badge, target, host, backend, clocks, duration, exit code, the exception with its traceback, the
    actions and tasks tables, the last :data:`LOG_TAIL` bytes of stdout and stderr, and the pulled files
    with their sizes. Every value is HTML-escaped.
``junit``
    JUnit XML: a ``<testsuites>`` with one ``<testsuite>`` per run and one ``<testcase>`` per task; a run
    without tasks is one test case itself, and so is a failed or lost run none of whose tasks failed.
    Failures carry the message and traceback; the logs go to ``<system-out>``/``<system-err>``.
    Characters XML 1.0 forbids (terminal escapes, NUL) are replaced.
``text``
    A readable summary, with the last lines of the logs.
"""

from __future__ import annotations

import html
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from .state import parse_time

if TYPE_CHECKING:
    from .manager import Run

__all__ = ["EXPORT_FORMATS", "LOG_TAIL", "export", "format_duration", "format_size"]

#: The formats :func:`export` knows.
EXPORT_FORMATS = ("json", "html", "junit", "text")
#: How much of each log (from its end) the HTML and JUnit reports include.
LOG_TAIL = 200 * 1024
#: How many log lines the text summary shows.
TEXT_LOG_LINES = 20

_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")
_XML_INVALID = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")

_STATUS_COLOURS = {
    "finished": "#1a7f37", "done": "#1a7f37",
    "failed": "#cf222e", "lost": "#8250df",
    "running": "#0969da", "started": "#0969da",
    "pending": "#6e7781", "waiting": "#6e7781",
    "cancelled": "#9a6700", "skipped": "#9a6700",
}


def format_duration(seconds: float | None) -> str:
    """``1.23s``, ``2m05s``, ``1h02m``; empty for ``None``."""
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.2f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def format_size(size: int) -> str:
    """``512 B``, ``1.5 KiB``, ``3.2 MiB``..."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"  # pragma: no cover - the loop always returns


def _clean(text: str) -> str:
    """Drop terminal escape sequences and characters XML 1.0 cannot hold."""
    return _XML_INVALID.sub("\ufffd", _ANSI.sub("", text))


@dataclass(frozen=True)
class _Report:
    """What every exporter needs about one run, read once."""

    info: dict[str, Any]
    result: dict[str, Any] | None
    stdout: str
    stderr: str
    stdout_size: int
    stderr_size: int
    files: list[tuple[str, int]]

    @classmethod
    def of(cls, run: Run) -> _Report:
        sizes = []
        for path in (run.stdout_log, run.stderr_log):
            try:
                sizes.append(path.stat().st_size)
            except OSError:
                sizes.append(0)
        return cls(info=run.info(), result=run.result(),
                   stdout=run.read_log(tail=LOG_TAIL).decode("utf-8", "replace"),
                   stderr=run.read_log(stderr=True, tail=LOG_TAIL).decode("utf-8", "replace"),
                   stdout_size=sizes[0], stderr_size=sizes[1], files=run.files())

    @property
    def host(self) -> str:
        return str(self.info.get("remote") or "local")

    @property
    def status(self) -> str:
        return str(self.info.get("status") or "unknown")

    @property
    def exception(self) -> dict[str, Any] | None:
        exc = (self.result or {}).get("exception")
        return exc if isinstance(exc, dict) else None

    @property
    def exit_code(self) -> Any:
        code = self.info.get("exit_code")
        return code if code is not None else (self.result or {}).get("exit_code")

    def failure(self) -> tuple[str, str] | None:
        """(message, details) explaining why the run failed, or ``None`` if it did not."""
        exc = self.exception
        if exc is not None:
            message = f"{exc.get('type') or 'Exception'}: {exc.get('message') or ''}".rstrip(": ")
            return message, str(exc.get("traceback") or message)
        if self.status in ("failed", "lost"):
            message = str(self.info.get("error") or f"run {self.status}, exit code {self.exit_code}")
            return message, message
        return None


def export(runs: list[Run], fmt: str) -> str:
    """Render ``runs`` as ``json``, ``html``, ``junit`` or ``text``.

    Raises:
        ConfigError: ``fmt`` is not one of :data:`EXPORT_FORMATS`.
        WorkspaceError: A run's state cannot be read.
    """
    renderers: dict[str, Callable[[list[_Report]], str]] = {
        "json": _json, "html": _html, "junit": _junit, "text": _text}
    if fmt not in renderers:
        raise ConfigError(f"unknown export format {fmt!r}", hint=f"one of {', '.join(EXPORT_FORMATS)}")
    return renderers[fmt]([_Report.of(run) for run in runs])


# -- json ------------------------------------------------------------------------------------------

def _json(reports: list[_Report]) -> str:
    items = [{**r.info, "result": r.result, "files": [{"path": p, "size": s} for p, s in r.files]}
             for r in reports]
    text = json.dumps(items, indent=2, ensure_ascii=False) + "\n"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from bytes that were not UTF-8: keep them, escaped
        text = json.dumps(items, indent=2, ensure_ascii=True) + "\n"
    return text


# -- text ------------------------------------------------------------------------------------------

def _text(reports: list[_Report]) -> str:
    out: list[str] = []
    for r in reports:
        info = r.info
        code = r.exit_code
        out.append(f"run {info.get('run_id')}  {r.status}" + (f"  (exit {code})" if code is not None else ""))
        argv = " ".join(str(a) for a in info.get("argv") or [])
        out.append(f"  target    {info.get('target')} ({info.get('kind')})" + (f" {argv}" if argv else ""))
        out.append(f"  host      {r.host}" + (f" via {info['backend']}" if info.get("backend") else ""))
        for key in ("created", "started", "finished"):
            if info.get(key):
                out.append(f"  {key:<9} {info[key]}")
        if info.get("duration") is not None:
            out.append(f"  duration  {format_duration(info['duration'])}")
        if info.get("parent"):
            out.append(f"  reran     {info['parent']}")
        if info.get("error"):
            out.append(f"  error     {info['error']}")
        exc = r.exception
        if exc is not None:
            out.append(f"  exception {exc.get('type')}: {exc.get('message')}")
            out.extend("    " + line for line in str(exc.get("traceback") or "").rstrip().splitlines())
        tasks = info.get("tasks") or {}
        if tasks:
            out.append(f"  tasks ({len(tasks)}):")
            for key, t in tasks.items():
                line = f"    {t.get('status', ''):<9} {key}"
                if t.get("name") and t.get("name") != key:
                    line += f" ({t['name']})"
                if t.get("host"):
                    line += f" on {t['host']}"
                if t.get("duration") is not None:
                    line += f"  {format_duration(t['duration'])}"
                if t.get("error"):
                    line += f"  {t['error']}"
                out.append(line)
        if r.files:
            total = sum(size for _, size in r.files)
            out.append(f"  files     {len(r.files)} ({format_size(total)}) in files/")
        for label, text in (("stdout", r.stdout), ("stderr", r.stderr)):
            lines = _ANSI.sub("", text).rstrip("\n").splitlines()
            if lines:
                shown = lines[-TEXT_LOG_LINES:]
                note = f", last {len(shown)} of {len(lines)} lines" if len(lines) > len(shown) else ""
                out.append(f"  {label}{note}:")
                out.extend("    " + line for line in shown)
        out.append("")
    return "\n".join(out) if out else "no runs\n"


# -- html ------------------------------------------------------------------------------------------

_CSS = """
body { font: 14px/1.45 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #1f2328;
       margin: 2em auto; max-width: 72em; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: .2em; }
h2 { font-size: 1.25em; border-bottom: 1px solid #d0d7de; padding-bottom: .3em; margin-top: 2em; }
h3 { font-size: 1em; margin: 1.2em 0 .4em; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12.5px; }
pre { background: #f6f8fa; border: 1px solid #d0d7de; border-radius: 6px; padding: .8em;
      overflow-x: auto; white-space: pre-wrap; word-break: break-all; max-height: 40em; }
pre.traceback { background: #fff5f5; border-color: #ffcecb; }
table { border-collapse: collapse; margin: .3em 0; }
th, td { text-align: left; padding: .25em .8em .25em 0; vertical-align: top; }
table.grid th, table.grid td { border-bottom: 1px solid #eaeef2; padding-right: 1.2em; }
table.facts th { color: #656d76; font-weight: normal; width: 8em; }
.badge { display: inline-block; color: #fff; border-radius: 1em; padding: .05em .7em; font-size: .85em;
         font-weight: 600; vertical-align: middle; }
.note, .meta { color: #656d76; }
.num { text-align: right; }
"""


def _e(value: Any) -> str:
    return html.escape(_clean("" if value is None else str(value)), quote=True)


def _badge(status: str) -> str:
    colour = _STATUS_COLOURS.get(status, "#57606a")
    return (f'<span class="badge status-{_e(status)}" data-status="{_e(status)}" '
            f'style="background:{colour}">{_e(status)}</span>')


def _html_run(r: _Report) -> str:
    info = r.info
    rid = str(info.get("run_id"))
    parts = [f'<section class="run" id="run-{_e(rid)}" data-status="{_e(r.status)}">',
             f"<h2>{_badge(r.status)} <code>{_e(rid)}</code> {_e(info.get('target'))}</h2>",
             '<table class="facts">']
    argv = " ".join(str(a) for a in info.get("argv") or [])
    facts: list[tuple[str, Any]] = [
        ("Target", f"{info.get('target')} ({info.get('kind')})"), ("Arguments", argv or None),
        ("Host", r.host), ("Backend", info.get("backend")), ("Created", info.get("created")),
        ("Started", info.get("started")), ("Finished", info.get("finished")),
        ("Duration", format_duration(info.get("duration")) or None), ("Exit code", r.exit_code),
        ("Reran", info.get("parent")), ("Error", info.get("error")),
    ]
    for label, value in facts:
        if value is not None and value != "":
            css = ' class="host"' if label == "Host" else ""
            parts.append(f"<tr><th>{label}</th><td{css}>{_e(value)}</td></tr>")
    parts.append("</table>")

    exc = r.exception
    if exc is not None:
        parts.append("<h3>Exception</h3>")
        parts.append(f"<p><strong>{_e(exc.get('type'))}</strong>: {_e(exc.get('message'))}</p>")
        if exc.get("traceback"):
            parts.append(f'<pre class="traceback">{_e(exc.get("traceback"))}</pre>')
    elif r.result is not None and r.result.get("value_repr") is not None:
        parts.append(f"<h3>Value</h3><pre>{_e(r.result.get('value_repr'))}</pre>")

    actions = info.get("actions") or []
    if actions:
        parts.append('<h3>Actions</h3><table class="grid"><tr><th>Action</th><th>Host</th><th>Status</th>'
                     "<th>Started</th><th>Finished</th><th>Error</th></tr>")
        for a in actions:
            parts.append(f"<tr><td>{_e(a.get('name'))}</td><td>{_e(a.get('host'))}</td>"
                         f"<td>{_badge(str(a.get('status')))}</td><td>{_e(a.get('started'))}</td>"
                         f"<td>{_e(a.get('finished'))}</td><td>{_e(a.get('error'))}</td></tr>")
        parts.append("</table>")

    tasks = info.get("tasks") or {}
    if tasks:
        parts.append('<h3>Tasks</h3><table class="grid tasks"><tr><th>Key</th><th>Name</th><th>Host</th>'
                     "<th>Status</th><th>Started</th><th>Duration</th><th>Error</th></tr>")
        for key, t in tasks.items():
            parts.append(f"<tr><td><code>{_e(key)}</code></td><td>{_e(t.get('name'))}</td>"
                         f"<td>{_e(t.get('host'))}</td><td>{_badge(str(t.get('status')))}</td>"
                         f"<td>{_e(t.get('started'))}</td>"
                         f'<td class="num">{_e(format_duration(t.get("duration")))}</td>'
                         f"<td>{_e(t.get('error'))}</td></tr>")
        parts.append("</table>")

    for label, css, text, size in (("Standard output", "stdout", r.stdout, r.stdout_size),
                                   ("Standard error", "stderr", r.stderr, r.stderr_size)):
        parts.append(f"<h3>{label}</h3>")
        if size == 0:
            parts.append('<p class="note">(empty)</p>')
            continue
        if size > LOG_TAIL:
            parts.append(f'<p class="note">last {format_size(LOG_TAIL)} of {format_size(size)}</p>')
        parts.append(f'<pre class="log {css}">{_e(text)}</pre>')

    parts.append("<h3>Files</h3>")
    if r.files:
        parts.append('<table class="grid files"><tr><th>Path</th><th class="num">Size</th></tr>')
        for path, size in r.files:
            parts.append(f'<tr><td><code>{_e(path)}</code></td>'
                         f'<td class="num">{_e(format_size(size))}</td></tr>')
        parts.append("</table>")
    else:
        parts.append('<p class="note">(none)</p>')
    parts.append("</section>")
    return "\n".join(parts)


def _html(reports: list[_Report]) -> str:
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    title = (f"rx run {reports[0].info.get('run_id')}" if len(reports) == 1 else f"rx: {len(reports)} runs")
    counts: dict[str, int] = {}
    for r in reports:
        counts[r.status] = counts.get(r.status, 0) + 1
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "no runs"
    body = "\n".join(_html_run(r) for r in reports)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            f"<h1>{_e(title)}</h1>\n<p class=\"meta\">{_e(summary)} &middot; exported {_e(now)}</p>\n"
            f"{body}\n</body>\n</html>\n")


# -- junit -----------------------------------------------------------------------------------------

def _junit_time(value: Any) -> str:
    parsed = parse_time(value)
    return parsed.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S") if parsed else ""


def _seconds(value: Any) -> str:
    return f"{float(value):.3f}" if isinstance(value, (int, float)) else "0.000"


def _junit(reports: list[_Report]) -> str:
    suites = ET.Element("testsuites", name="rx")
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    total_time = 0.0
    for r in reports:
        info = r.info
        rid = str(info.get("run_id"))
        suite = ET.SubElement(suites, "testsuite", name=_clean(f"{rid} {info.get('target')}"), id=rid,
                              hostname=_clean(r.host), timestamp=_junit_time(info.get("started") or
                                                                            info.get("created")),
                              time=_seconds(info.get("duration")))
        props = ET.SubElement(suite, "properties")
        for key in ("run_id", "status", "target", "kind", "remote", "backend", "exit_code", "parent"):
            if info.get(key) is not None:
                ET.SubElement(props, "property", name=key, value=_clean(str(info[key])))
        counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
        classname = _clean(f"rx.{info.get('target')}")
        tasks: dict[str, dict[str, Any]] = info.get("tasks") or {}
        for key, t in tasks.items():
            case = ET.SubElement(suite, "testcase", name=_clean(str(t.get("name") or key)),
                                 classname=classname, time=_seconds(t.get("duration")))
            counts["tests"] += 1
            status = t.get("status")
            if status == "failed":
                message = str(t.get("error") or "task failed")
                failure = ET.SubElement(case, "failure", message=_clean(message), type="failed")
                failure.text = _clean(str(t.get("traceback") or message))
                counts["failures"] += 1
            elif status != "done":
                ET.SubElement(case, "skipped", message=_clean(f"task {status}"))
                counts["skipped"] += 1
        failure_info = r.failure()
        task_failed = any(t.get("status") == "failed" for t in tasks.values())
        if not tasks or (failure_info is not None and not task_failed):
            case = ET.SubElement(suite, "testcase", name=_clean(str(info.get("target"))), classname=classname,
                                 time=_seconds(info.get("duration")))
            counts["tests"] += 1
            if r.status == "lost":
                message, details = failure_info or ("run lost", "run lost")
                error = ET.SubElement(case, "error", message=_clean(message), type="lost")
                error.text = _clean(details)
                counts["errors"] += 1
            elif failure_info is not None:
                message, details = failure_info
                exc_type = str((r.exception or {}).get("type") or "failed")
                failure = ET.SubElement(case, "failure", message=_clean(message), type=_clean(exc_type))
                failure.text = _clean(details)
                counts["failures"] += 1
            elif r.status != "finished":
                ET.SubElement(case, "skipped", message=_clean(f"run {r.status}"))
                counts["skipped"] += 1
        ET.SubElement(suite, "system-out").text = _clean(r.stdout)
        ET.SubElement(suite, "system-err").text = _clean(r.stderr)
        for key, value in counts.items():
            suite.set(key, str(value))
            totals[key] += value
        if isinstance(info.get("duration"), (int, float)):
            total_time += float(info["duration"])
    for key, value in totals.items():
        suites.set(key, str(value))
    suites.set("time", f"{total_time:.3f}")
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"
