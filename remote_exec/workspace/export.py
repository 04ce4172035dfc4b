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
    A readable summary, with the last lines of the logs; control characters (a host's ESC or NUL in an
    exception message, a traceback, a log line) are written as escapes (``\\x1b``).
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

from ..errors import ConfigError, printable
from .state import parse_time

if TYPE_CHECKING:
    from .manager import Run

__all__ = ["EXPORT_FORMATS", "LOG_TAIL", "export", "format_duration", "format_size", "job_fact", "run_facts",
           "shown"]

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


def run_facts(info: dict[str, Any], *, exit_code: Any, duration: str | None,
              clock: Callable[[Any], Any] | None = None) -> dict[str, Any]:
    """The facts every report of a run shows, by label, in the order they are shown.

    One table for the text and HTML exports and ``rx show``, so that they list the same things.

    Args:
        info: The run's ``state.json``.
        exit_code: The exit code to show (the exports fall back to the result record's).
        duration: The duration as the report writes it.
        clock: Renders the ``created``, ``started`` and ``finished`` times (default: as stored).

    Returns:
        ``{label: value}``; a value the run does not have is ``None`` or ``""`` (see :func:`shown`).
    """
    when = clock or (lambda value: value)
    argv = " ".join(str(a) for a in info.get("argv") or [])
    return {
        "target": f"{info.get('target')} ({info.get('kind')})", "arguments": argv or None,
        "host": info.get("remote") or "local", "backend": info.get("backend"),
        "created": when(info.get("created")), "started": when(info.get("started")),
        "finished": when(info.get("finished")), "duration": duration, "exit code": exit_code,
        "reran": info.get("parent"), "error": info.get("error"), "job": job_fact(info.get("job")),
    }


def job_fact(job: Any) -> str | None:
    """A scheduler job in one line: ``slurm job 42: COMPLETED on c1 (debug), elapsed 00:00:02, MaxRSS 22 MiB;
    seen PENDING, RUNNING, COMPLETED`` (None for a run that was no job)."""
    if not isinstance(job, dict) or not job.get("job_id"):
        return None
    text = f"{job.get('scheduler', 'scheduler')} job {job['job_id']}"
    if job.get("state"):
        text += f": {job['state']}" + (f" on {job['nodes']}" if job.get("nodes") else "")
        text += f" ({job['partition']})" if job.get("partition") else ""
    details = [f"elapsed {job['elapsed']}" if job.get("elapsed") else "",
               f"MaxRSS {job['max_rss_kib'] / 1024:.0f} MiB" if isinstance(job.get("max_rss_kib"), int) else "",
               f"reason {job['reason']}" if job.get("reason") else ""]
    text += "".join(f", {detail}" for detail in details if detail)
    seen = job.get("states") or job.get("seen")
    return text + (f"; states {', '.join(seen)}" if seen else "")


def shown(value: Any) -> bool:
    """Tell whether a report shows a fact: it does unless the value is ``None`` or empty text."""
    return value is not None and value != ""


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
    def tasks(self) -> dict[str, dict[str, Any]]:
        return self.info.get("tasks") or {}

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

    def facts(self) -> dict[str, Any]:
        """:func:`run_facts` as the exports show them: stored times, the result's exit code as fallback."""
        return run_facts(self.info, exit_code=self.exit_code,
                         duration=format_duration(self.info.get("duration")) or None)

    def logs(self) -> tuple[tuple[str, str, int], ...]:
        """``(name, tail of the text, whole size)`` of ``stdout`` and ``stderr``."""
        return ("stdout", self.stdout, self.stdout_size), ("stderr", self.stderr, self.stderr_size)

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
    out = [printable(line) for r in reports for line in _text_run(r)]
    return "\n".join(out) if out else "no runs\n"


def _text_run(r: _Report) -> list[str]:
    """The lines of one run's summary, the last one empty."""
    return [*(line for section in _TEXT_SECTIONS for line in section(r)), ""]


def _text_facts(r: _Report) -> list[str]:
    facts = r.facts()
    code = facts["exit code"]
    head = f"run {r.info.get('run_id')}  {r.status}" + (f"  (exit {code})" if code is not None else "")
    target = f"  target    {facts['target']}" + (f" {facts['arguments']}" if facts["arguments"] else "")
    host = f"  host      {facts['host']}" + (f" via {facts['backend']}" if facts["backend"] else "")
    return [head, target, host, *(f"  {label:<9} {facts[label]}" for label in _TEXT_FACT_LINES
                                  if shown(facts[label]))]


#: The facts the text summary writes one per line (target, host and exit code share lines).
_TEXT_FACT_LINES = ("created", "started", "finished", "duration", "reran", "error")


def _text_exception(r: _Report) -> list[str]:
    exc = r.exception
    if exc is None:
        return []
    traceback = str(exc.get("traceback") or "").rstrip().splitlines()
    return [f"  exception {exc.get('type')}: {exc.get('message')}", *("    " + line for line in traceback)]


def _text_tasks(r: _Report) -> list[str]:
    if not r.tasks:
        return []
    return [f"  tasks ({len(r.tasks)}):", *(_text_task(key, t) for key, t in r.tasks.items())]


def _text_task(key: str, t: dict[str, Any]) -> str:
    return "".join((f"    {t.get('status', ''):<9} {key}",
                    f" ({t['name']})" if t.get("name") and t.get("name") != key else "",
                    f" on {t['host']}" if t.get("host") else "",
                    f" GPU {','.join(str(g) for g in t['gpus'])}" if t.get("gpus") else "",
                    f"  {format_duration(t['duration'])}" if t.get("duration") is not None else "",
                    f"  {t['error']}" if t.get("error") else ""))


def _text_files(r: _Report) -> list[str]:
    if not r.files:
        return []
    return [f"  files     {len(r.files)} ({format_size(sum(size for _, size in r.files))}) in files/"]


def _text_logs(r: _Report) -> list[str]:
    out: list[str] = []
    for label, text, _size in r.logs():
        lines = _ANSI.sub("", text).rstrip("\n").splitlines()
        if lines:
            shown_lines = lines[-TEXT_LOG_LINES:]
            note = f", last {len(shown_lines)} of {len(lines)} lines" if len(lines) > len(shown_lines) else ""
            out.append(f"  {label}{note}:")
            out.extend("    " + line for line in shown_lines)
    return out


#: The text summary of one run: these sections in order, each a list of lines.
_TEXT_SECTIONS: tuple[Callable[[_Report], list[str]], ...] = (
    _text_facts, _text_exception, _text_tasks, _text_files, _text_logs)


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


def _td(content: str, css: str = "") -> str:
    """A table cell around ``content`` (already escaped)."""
    return f'<td class="{css}">{content}</td>' if css else f"<td>{content}</td>"


def _tr(*cells: str) -> str:
    return "<tr>" + "".join(cells) + "</tr>"


def _html_run(r: _Report) -> str:
    rid = str(r.info.get("run_id"))
    return "\n".join([f'<section class="run" id="run-{_e(rid)}" data-status="{_e(r.status)}">',
                      f"<h2>{_badge(r.status)} <code>{_e(rid)}</code> {_e(r.info.get('target'))}</h2>",
                      *(line for section in _HTML_SECTIONS for line in section(r)), "</section>"])


def _html_facts(r: _Report) -> list[str]:
    parts = ['<table class="facts">']
    for label, value in r.facts().items():
        if shown(value):
            css = ' class="host"' if label == "host" else ""
            parts.append(f"<tr><th>{label.capitalize()}</th><td{css}>{_e(value)}</td></tr>")
    parts.append("</table>")
    return parts


def _html_outcome(r: _Report) -> list[str]:
    """The exception with its traceback, else the value."""
    exc = r.exception
    if exc is not None:
        parts = ["<h3>Exception</h3>", f"<p><strong>{_e(exc.get('type'))}</strong>: {_e(exc.get('message'))}</p>"]
        if exc.get("traceback"):
            parts.append(f'<pre class="traceback">{_e(exc.get("traceback"))}</pre>')
        return parts
    if r.result is not None and r.result.get("value_repr") is not None:
        return [f"<h3>Value</h3><pre>{_e(r.result.get('value_repr'))}</pre>"]
    return []


def _html_actions(r: _Report) -> list[str]:
    actions = r.info.get("actions") or []
    if not actions:
        return []
    rows = [_tr(_td(_e(a.get("name"))), _td(_e(a.get("host"))), _td(_badge(str(a.get("status")))),
                _td(_e(a.get("started"))), _td(_e(a.get("finished"))), _td(_e(a.get("error"))))
            for a in actions]
    return ['<h3>Actions</h3><table class="grid"><tr><th>Action</th><th>Host</th><th>Status</th>'
            "<th>Started</th><th>Finished</th><th>Error</th></tr>", *rows, "</table>"]


def _html_tasks(r: _Report) -> list[str]:
    if not r.tasks:
        return []
    rows = [_tr(_td(f"<code>{_e(key)}</code>"), _td(_e(t.get("name"))), _td(_e(t.get("host"))),
                _td(_badge(str(t.get("status")))), _td(_e(t.get("started"))),
                _td(_e(format_duration(t.get("duration"))), "num"), _td(_e(t.get("error"))))
            for key, t in r.tasks.items()]
    return ['<h3>Tasks</h3><table class="grid tasks"><tr><th>Key</th><th>Name</th><th>Host</th>'
            "<th>Status</th><th>Started</th><th>Duration</th><th>Error</th></tr>", *rows, "</table>"]


#: The HTML headings of the logs.
_LOG_TITLES = {"stdout": "Standard output", "stderr": "Standard error"}


def _html_logs(r: _Report) -> list[str]:
    parts: list[str] = []
    for name, text, size in r.logs():
        parts.append(f"<h3>{_LOG_TITLES[name]}</h3>")
        if size == 0:
            parts.append('<p class="note">(empty)</p>')
            continue
        if size > LOG_TAIL:
            parts.append(f'<p class="note">last {format_size(LOG_TAIL)} of {format_size(size)}</p>')
        parts.append(f'<pre class="log {name}">{_e(text)}</pre>')
    return parts


def _html_files(r: _Report) -> list[str]:
    if not r.files:
        return ["<h3>Files</h3>", '<p class="note">(none)</p>']
    rows = [_tr(_td(f"<code>{_e(path)}</code>"), _td(_e(format_size(size)), "num")) for path, size in r.files]
    return ["<h3>Files</h3>", '<table class="grid files"><tr><th>Path</th><th class="num">Size</th></tr>',
            *rows, "</table>"]


#: The HTML section of one run, under its heading: these parts in order, each a list of lines.
_HTML_SECTIONS: tuple[Callable[[_Report], list[str]], ...] = (
    _html_facts, _html_outcome, _html_actions, _html_tasks, _html_logs, _html_files)


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


#: The counters of a suite (and of the whole report), in the order they are written.
_COUNTERS = ("tests", "failures", "errors", "skipped")
#: The run fields each suite lists as properties.
_JUNIT_PROPERTIES = ("run_id", "status", "target", "kind", "remote", "backend", "exit_code", "parent")


@dataclass(frozen=True)
class _Outcome:
    """How a test case did not pass: a ``failure``, an ``error`` or ``skipped``."""

    tag: str
    message: str
    type: str | None = None
    details: str | None = None

    @property
    def counter(self) -> str:
        return {"failure": "failures", "error": "errors"}.get(self.tag, self.tag)


def _task_outcome(t: dict[str, Any]) -> _Outcome | None:
    status = t.get("status")
    if status == "failed":
        message = str(t.get("error") or "task failed")
        return _Outcome("failure", message, "failed", str(t.get("traceback") or message))
    if status != "done":
        return _Outcome("skipped", f"task {status}")
    return None


def _run_outcome(r: _Report, failure: tuple[str, str] | None) -> _Outcome | None:
    if r.status == "lost":
        message, details = failure or ("run lost", "run lost")
        return _Outcome("error", message, "lost", details)
    if failure is not None:
        return _Outcome("failure", failure[0], str((r.exception or {}).get("type") or "failed"), failure[1])
    if r.status != "finished":
        return _Outcome("skipped", f"run {r.status}")
    return None


def _cases(r: _Report) -> list[tuple[str, Any, _Outcome | None]]:
    """``(name, duration, outcome)`` of each test case of a run: one per task, and one for the run itself
    when it has no tasks or failed without a failed task to show it."""
    cases = [(str(t.get("name") or key), t.get("duration"), _task_outcome(t)) for key, t in r.tasks.items()]
    failure = r.failure()
    task_failed = any(t.get("status") == "failed" for t in r.tasks.values())
    if not r.tasks or (failure is not None and not task_failed):
        cases.append((str(r.info.get("target")), r.info.get("duration"), _run_outcome(r, failure)))
    return cases


def _junit_suite(suites: ET.Element, r: _Report) -> dict[str, int]:
    """Add one run's ``<testsuite>``; return its counters."""
    info = r.info
    rid = str(info.get("run_id"))
    suite = ET.SubElement(suites, "testsuite", name=_clean(f"{rid} {info.get('target')}"), id=rid,
                          hostname=_clean(r.host), timestamp=_junit_time(info.get("started") or info.get("created")),
                          time=_seconds(info.get("duration")))
    props = ET.SubElement(suite, "properties")
    for key in _JUNIT_PROPERTIES:
        if info.get(key) is not None:
            ET.SubElement(props, "property", name=key, value=_clean(str(info[key])))
    counts = dict.fromkeys(_COUNTERS, 0)
    classname = _clean(f"rx.{info.get('target')}")
    for name, seconds, outcome in _cases(r):
        case = ET.SubElement(suite, "testcase", name=_clean(name), classname=classname, time=_seconds(seconds))
        counts["tests"] += 1
        if outcome is not None:
            attributes = {"message": _clean(outcome.message)}
            if outcome.type is not None:
                attributes["type"] = _clean(outcome.type)
            ET.SubElement(case, outcome.tag, attributes).text = (
                None if outcome.details is None else _clean(outcome.details))
            counts[outcome.counter] += 1
    ET.SubElement(suite, "system-out").text = _clean(r.stdout)
    ET.SubElement(suite, "system-err").text = _clean(r.stderr)
    for key, value in counts.items():
        suite.set(key, str(value))
    return counts


def _junit(reports: list[_Report]) -> str:
    suites = ET.Element("testsuites", name="rx")
    totals = dict.fromkeys(_COUNTERS, 0)
    for r in reports:
        for key, value in _junit_suite(suites, r).items():
            totals[key] += value
    for key, value in totals.items():
        suites.set(key, str(value))
    total_time = sum(float(r.info["duration"]) for r in reports if isinstance(r.info.get("duration"), (int, float)))
    suites.set("time", f"{total_time:.3f}")
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"
