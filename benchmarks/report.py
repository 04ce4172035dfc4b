"""The rows, the targets, and the markdown the run prints and writes to ``benchmarks/RESULTS.md``.

Every row's samples are seconds. A throughput row also says how many bytes one sample moved (both
directions), and shows MB/s: the median row is the rate at the median time, the p90 row the rate at the
p90 time (the slow tail). A row with no samples shows why (``notes``), never a number.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .stats import Summary, format_rate, format_seconds, percentile

__all__ = ["PhaseRecord", "Results", "Row", "Target", "render_phases", "render_tables", "render_targets"]

PHASES = ("connect", "upload", "execute", "collect")


@dataclass(frozen=True)
class Row:
    """One line of the table.

    Attributes:
        key: Stable identifier (``rx-openssh.warm``).
        label: What was measured, for people.
        short: A short name, used where another row is compared with this one.
        section: The table the row belongs to.
        reference: The key of the row this one is compared with (the ratio column), if any.
        moved_bytes: For a throughput row: bytes moved per sample, both directions; 0 for a latency row.
    """

    key: str
    label: str
    short: str
    section: str
    reference: str | None = None
    moved_bytes: int = 0

    @property
    def throughput(self) -> bool:
        """True when the row shows MB/s rather than a duration."""
        return self.moved_bytes > 0


@dataclass
class Results:
    """Samples (seconds) per row key, and why rows without samples have none.

    Attributes:
        samples: Row key -> seconds per repetition.
        notes: Row key -> one line saying why the row has no number (not installed, not implemented, ...).
        failures: Row key -> error lines of the repetitions that failed.
    """

    samples: dict[str, list[float]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    failures: dict[str, list[str]] = field(default_factory=dict)

    def add(self, key: str, seconds: float) -> None:
        """Record one sample of ``key``."""
        self.samples.setdefault(key, []).append(seconds)

    def fail(self, key: str, error: str) -> None:
        """Record a failed repetition of ``key``."""
        self.failures.setdefault(key, []).append(error)

    def summary(self, key: str) -> Summary | None:
        """The summary of ``key``'s samples, or None when it has none."""
        values = self.samples.get(key)
        return Summary.of(values) if values else None

    def value(self, row: Row) -> float | None:
        """The row's headline number: median seconds, or bytes per second at the median time."""
        summary = self.summary(row.key)
        if summary is None:
            return None
        if row.throughput:
            return row.moved_bytes / summary.median if summary.median > 0 else None
        return summary.median

    def ratio(self, row: Row, reference: Row) -> float | None:
        """``row`` relative to ``reference``: a time ratio for durations, a rate ratio for throughputs.

        Both rows must be of the same kind; a duration compared with a throughput has no ratio.
        """
        if row.throughput != reference.throughput:
            return None
        mine = self.value(row)
        theirs = self.value(reference)
        if mine is None or theirs is None or theirs == 0:
            return None
        return mine / theirs

    def why_missing(self, key: str) -> str:
        """One line explaining a row without samples."""
        if key in self.notes:
            return self.notes[key]
        errors = self.failures.get(key)
        if errors:
            return f"failed: {errors[-1]}"
        return "not measured"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_tables(rows: Sequence[Row], results: Results) -> str:
    """One markdown table per section, in the order the rows come."""
    by_key = {row.key: row for row in rows}
    sections: dict[str, list[Row]] = {}
    for row in rows:
        sections.setdefault(row.section, []).append(row)
    out: list[str] = []
    for section, members in sections.items():
        throughput = any(row.throughput for row in members)
        p90_title = "p90 (slow tail)" if throughput else "p90"
        out.append(f"### {section}\n")
        out.append(f"| Measurement | Median | {p90_title} | n | Ratio | Compared with |")
        out.append("|---|---:|---:|---:|---:|---|")
        for row in members:
            summary = results.summary(row.key)
            reference = by_key.get(row.reference) if row.reference else None
            if summary is None:
                out.append(f"| {_cell(row.label)} | {_cell(results.why_missing(row.key))} | — | 0 | — | "
                           f"{_cell(reference.short) if reference else ''} |")
                continue
            if row.throughput:
                median = format_rate(row.moved_bytes / summary.median)
                p90 = format_rate(row.moved_bytes / summary.p90)
            else:
                median = format_seconds(summary.median)
                p90 = format_seconds(summary.p90)
            ratio_text = "—"
            if reference is not None:
                ratio = results.ratio(row, reference)
                ratio_text = f"{ratio:.2f}x" if ratio is not None else "—"
            failed = len(results.failures.get(row.key, ()))
            n_text = f"{summary.n}" + (f" ({failed} failed)" if failed else "")
            out.append(f"| {_cell(row.label)} | {median} | {p90} | {n_text} | {ratio_text} | "
                       f"{_cell(reference.short) if reference else ''} |")
        out.append("")
    return "\n".join(out)


@dataclass(frozen=True)
class Target:
    """A goal from the issue, checked against the measured rows.

    Attributes:
        text: The goal as people read it.
        row: The row measured.
        reference: The row it is compared with; None for an absolute bound on the row's median seconds.
        bound: The ratio (or, without a reference, the seconds) to stay within.
        at_least: True when the measured value must be at least ``bound``; else at most.
    """

    text: str
    row: str
    reference: str | None
    bound: float
    at_least: bool = False


@dataclass(frozen=True)
class Verdict:
    """How one target came out.

    Attributes:
        status: ``met``, ``not met`` or ``not measured``.
        measured: The ratio (or seconds) measured, if any.
        detail: What was measured, for people.
    """

    status: str
    measured: float | None
    detail: str


def evaluate(target: Target, rows: Mapping[str, Row], results: Results) -> Verdict:
    """Check one target."""
    row = rows[target.row]
    summary = results.summary(row.key)
    if summary is None:
        return Verdict("not measured", None, f"{row.short}: {results.why_missing(row.key)}")
    if target.reference is None:
        measured = summary.median
        ok = measured >= target.bound if target.at_least else measured <= target.bound
        return Verdict("met" if ok else "not met", measured, f"{format_seconds(measured)} median")
    reference = rows[target.reference]
    ratio = results.ratio(row, reference)
    if ratio is None:
        return Verdict("not measured", None, f"{reference.short}: {results.why_missing(reference.key)}")
    ok = ratio >= target.bound if target.at_least else ratio <= target.bound
    mine = results.value(row)
    theirs = results.value(reference)
    assert mine is not None and theirs is not None
    show = format_rate if row.throughput else format_seconds
    return Verdict("met" if ok else "not met", ratio,
                   f"{ratio:.2f}x ({row.short} {show(mine)} vs {reference.short} {show(theirs)})")


def render_targets(targets: Sequence[Target], rows: Sequence[Row], results: Results) -> str:
    """The targets as a markdown list, each marked met / not met / not measured with what was measured."""
    by_key = {row.key: row for row in rows}
    lines = []
    for target in targets:
        verdict = evaluate(target, by_key, results)
        mark = {"met": "**met**", "not met": "**not met**"}.get(verdict.status, verdict.status)
        lines.append(f"- {mark}: {target.text} — {verdict.detail}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class PhaseRecord:
    """One rx call's total time and its phases as ``dispatch()`` recorded them.

    Attributes:
        seconds: The call as the caller timed it.
        phases: Seconds per phase (connect, upload, execute, collect; pack for ``rx run``); a phase that did
            not happen is absent.
    """

    seconds: float
    phases: Mapping[str, float]


def render_phases(groups: Mapping[str, Sequence[PhaseRecord]]) -> str:
    """A markdown table of median phase times per kind of call.

    A phase that only some calls had shows its median over those calls and how many they were.

    ``other`` is the median of (call time - the sum of its phases): packing, serializing the session,
    recording it in the workspace, importing backends; what ``dispatch()`` does not time itself.
    """
    columns = list(PHASES)
    if any("pack" in record.phases for records in groups.values() for record in records):
        columns.insert(0, "pack")
    out = ["| Call | n | Call (median) | " + " | ".join(columns) + " | other |",
           "|---|---:|---:|" + "---:|" * len(columns) + "---:|"]
    for name, records in groups.items():
        if not records:
            continue
        calls = [record.seconds for record in records]
        cells = []
        for phase in columns:
            values = [float(record.phases[phase]) for record in records if phase in record.phases]
            if not values:
                cells.append("—")
            elif len(values) == len(records):
                cells.append(format_seconds(percentile(values, 50)))
            else:  # e.g. an upload only when the code changed
                cells.append(f"{format_seconds(percentile(values, 50))} ({len(values)} of {len(records)})")
        other = [record.seconds - sum(float(v) for v in record.phases.values()) for record in records]
        out.append(f"| {_cell(name)} | {len(records)} | {format_seconds(percentile(calls, 50))} | "
                   + " | ".join(cells) + f" | {format_seconds(percentile(other, 50))} |")
    return "\n".join(out) + "\n"


def phase_records(raw: Sequence[Mapping[str, Any]]) -> list[PhaseRecord]:
    """PhaseRecords from the agents' JSON (``{"seconds": .., "phases": {..}}``); calls without phases are left
    out."""
    records = []
    for item in raw:
        phases = item.get("phases")
        if isinstance(phases, Mapping) and phases:
            records.append(PhaseRecord(seconds=float(item["seconds"]),
                                       phases={str(k): float(v) for k, v in phases.items()}))
    return records
