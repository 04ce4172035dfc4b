"""Write docs/reliability.md from the fault suite's recorded results.

    RX_REQUIRE_DOCKER=1 python -m pytest tests/faults      # records tests/faults/.results/results.json
    python scripts/reliability_report.py                   # writes docs/reliability.md

Options: ``--results FILE`` (default the suite's results file), ``-o FILE`` (default docs/reliability.md,
``-`` for stdout). Standard library only; every figure in the document is computed from the results file.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = REPO / "tests" / "faults" / ".results" / "results.json"
DEFAULT_OUTPUT = REPO / "docs" / "reliability.md"
BACKENDS = ("openssh", "paramiko")


_TEMPORARY = re.compile(r"/tmp/pytest-of-[^/\s]+/pytest-\d+/")


def _cell(value: object) -> str:
    text = _TEMPORARY.sub("<tmp>/", "" if value is None else str(value))
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").strip() or " "


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(cell) for cell in row) + " |" for row in rows]
    return lines


def _test_outcome(data: dict[str, Any], trial: dict[str, Any]) -> str:
    return str(data["tests"].get(trial["test"], {}).get("outcome", "not run"))


def _verdict(data: dict[str, Any], trial: dict[str, Any]) -> str:
    outcome = _test_outcome(data, trial)
    if trial.get("error"):
        return f"**check failed** ({outcome}): {trial['error']}"
    return "ok" if outcome in ("passed", "xfailed", "failed") else outcome


def _sum(trials: list[dict[str, Any]], fact: str) -> tuple[int, int]:
    """Total of a numeric or boolean fact, and how many trials measured it."""
    measured = [t["facts"][fact] for t in trials if fact in t["facts"]]
    return sum(int(value) for value in measured), len(measured)


def acceptance(data: dict[str, Any]) -> list[str]:
    """The acceptance figures, over every recorded trial."""
    trials = data["trials"]
    known = [t for t in trials if _test_outcome(data, t) == "xfailed"]
    rows = []

    def row(label: str, fact: str, target: str, unit: str = "") -> None:
        total, measured = _sum(trials, fact)
        in_known, _ = _sum(known, fact)
        rows.append([label, f"{total}{unit}", str(measured), str(in_known), target])

    row("Hangs (no answer within bound + 5 s)", "hang", "0")
    lost, lost_measured = _sum(trials, "lost")
    corrupted, corrupted_measured = _sum(trials, "corrupted")
    known_lost = _sum(known, "lost")[0] + _sum(known, "corrupted")[0]
    rows.append(["Lost or corrupted results", str(lost + corrupted), str(lost_measured + corrupted_measured),
                 str(known_lost), "0"])
    row("Orphaned remote processes (5 s after the fault; 15 s after a 20,000-file result)", "orphans", "0")
    row("rx files left on the remote (run dirs, .tmp-*)", "leftover_files", "0")
    row("Files written outside the workspace", "outside_files", "0")
    row("Files of a rejected result that landed", "landed_of_rejected", "0")
    row("Injections (canary files created)", "injections", "0")
    refused = [t for t in trials if "refused" in t["facts"]]
    share = 100.0 * sum(bool(t["facts"]["refused"]) for t in refused) / len(refused) if refused else 0.0
    rows.append(["Changed host keys refused", f"{share:.0f} %", str(len(refused)),
                 str(sum(1 for t in known if "refused" in t["facts"])), "100 %"])
    row("Secret canaries found (places)", "canary_leaks", "0")
    row("Python tracebacks shown for rx errors", "traceback", "0")
    lines = _table(["Figure", "Measured", "Trials measuring it", "of which in known-bug tests", "Target"], rows)
    return lines


#: The facts each row of the classes table totals: (column, fact or facts summed).
CLASS_FIGURES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Hangs", ("hang",)),
    ("Lost or corrupted", ("lost", "corrupted")),
    ("Orphans", ("orphans",)),
    ("Left on the remote", ("leftover_files",)),
    ("Tracebacks", ("traceback",)),
)


def classes(data: dict[str, Any]) -> list[str]:
    """One row per fault class (a scenario's ``class``; ``other`` without one): its scenarios, trials per
    backend, how its tests ended, and the acceptance facts totalled over its trials."""
    groups: dict[str, list[str]] = {}
    for key, info in data["scenarios"].items():
        groups.setdefault(info.get("class") or "other", []).append(key)
    rows = []
    for name, keys in groups.items():
        trials = [t for t in data["trials"] if t["scenario"] in keys]
        tests = {t["test"] for t in trials}
        outcomes = Counter(data["tests"].get(test, {}).get("outcome", "not run") for test in tests)
        figures = [str(sum(_sum(trials, fact)[0] for fact in facts)) for _, facts in CLASS_FIGURES]
        worst = max((t["overrun"] for t in trials), default=0.0)
        rows.append([name, ", ".join(f"`{key}`" for key in keys),
                     " / ".join(str(sum(t["backend"] == b for t in trials)) for b in BACKENDS),
                     ", ".join(f"{count} {outcome}" for outcome, count in sorted(outcomes.items())) or "not run",
                     *figures, f"{worst:.2f}"])
    header = ["Class", "Scenarios", "Trials (" + " / ".join(BACKENDS) + ")", "Tests",
              *(column for column, _ in CLASS_FIGURES), "Worst overrun (s)"]
    return _table(header, rows)


def scenario_section(data: dict[str, Any], key: str, info: dict[str, str]) -> list[str]:
    trials = [t for t in data["trials"] if t["scenario"] == key]
    tests = {t["test"] for t in trials}
    outcomes = Counter(data["tests"].get(test, {}).get("outcome", "not run") for test in tests)
    lines = [f"### {info['title']} (`{key}`)", "", f"- Class: {info.get('class') or 'other'}.",
             f"- Fault: {info['fault']}.", f"- Expected: {info['expect']}."]
    if not trials:
        return [*lines, "- Not run in the recorded session.", ""]
    worst = max((t["overrun"] for t in trials), default=0.0)
    per_backend = ", ".join(f"{b} {sum(t['backend'] == b for t in trials)}" for b in BACKENDS)
    lines += [
        f"- Trials: {len(trials)} ({per_backend}); tests: "
        + ", ".join(f"{count} {name}" for name, count in sorted(outcomes.items()))
        + f"; worst overrun past the bound: {worst:.2f} s.",
        f"- Reproduce: `RX_REQUIRE_DOCKER=1 python -m pytest tests/faults -k {key}`",
        "",
    ]
    rows = [[t["backend"], t["variant"] or "-", t["outcome"], _seconds(t["seconds"]), _seconds(t["bound"]),
             _seconds(t["overrun"]), _verdict(data, t)] for t in trials]
    lines += _table(["Backend", "Variant", "Outcome", "Seconds", "Bound", "Overrun", "Verdict"], rows)
    return [*lines, ""]


#: What rx leaves on purpose, decided and bounded (not counted as a failure by any scenario).
KNOWN_LIMITS = [
    "- **A local ssh master outlives rx, also a `kill -9` of it, for up to `RX_SSH_PERSIST` seconds (default "
    "300) after its last use** (OpenSSH backend). Decided: the master is kept on purpose so that the next rx "
    "starts without a new connection (benchmarks/RESULTS-speed.md: a second `rx run`); it is one `ssh` process per "
    "host and settings, in the user's private directory (mode 0700), holding an authenticated connection and "
    "no remote process (a killed rx's task is stopped by the runner's own dead-link policy, as the scenarios "
    "above show), and it ends by itself once idle for its `ControlPersist` time. `rx hosts --disconnect` ends "
    "them at once; `RX_SSH_PERSIST=0` gives each rx a master of its own, stopped when it exits (after a "
    "`kill -9`, that one too ends 300 s after its last use). paramiko's connection ends with its process.",
    "- **A changed host key is checked by the next new connection, not by a shared master already up** "
    "(OpenSSH backend): the master's connection was verified when it was made and, being encrypted and "
    "authenticated end to end, keeps serving the host it reached, as OpenSSH's own `ControlPersist` does; "
    "`rx hosts --disconnect HOST` makes the next rx connect (and check) afresh "
    "(tests/integration/test_shared_master.py). The fault scenarios run with `RX_SSH_PERSIST=0`: each rx "
    "opens its own connection, as they assume.",
    "- **The fault scenarios do not exercise the master an `rx run` (or a process's first `@task` call) "
    "starts from its memo** (OpenSSH, shared masters only, so not with their `RX_SSH_PERSIST=0`). What was "
    "tried instead (tests/integration/test_shared_master.py, tests/unit/test_prestart.py): the memo's "
    "master taken by a `@task` script's first call, the memo's ssh refused for a "
    "changed host key (exit 255, the host named, no traceback, nothing left), a memo made for settings that "
    "changed where its stamps do not look (stopped, the run connects anew), an ssh still connecting at exit "
    "(killed), a failed ssh (its message mapped as always), a memo others may write (ignored), `rx run` of a "
    "missing script, Ctrl-C and SIGTERM at 30-120 ms (exit 130, nothing left). An rx killed with `kill -9` "
    "after starting it leaves that master at a socket no other rx uses; the next rx that connects ends it "
    "(its pid is gone), else its idle `ControlPersist` does.",
    "- **paramiko's head start from the memo** (a TCP connection to the address the last run of the line "
    "connected to, opened as the process starts) was tried in tests/unit/test_prestart.py and "
    "tests/integration/test_shared_master.py, not as a fault scenario of its own: refused (the backend "
    "connects itself and reports as always), another address or timeout than the backend resolved (closed "
    "unused; sshd sees a connection end before its banner), an ssh_config changed since (nothing dialed), a "
    "forked child (never takes its parent's), a process that ends without taking it (closed at exit), a "
    "listener that drops the connection attempt, as a silent firewall does (its timeout is raised, met once: the "
    "backend does not dial and wait again).",
    "- **The runner's code bundle** (`.rx-code-*` in an installed archive, remote_exec/runner/bundle.py) serves"
    " the calls on each host in the scenarios above (shipped for the coordinator's interpreter). Its own "
    "failures were tried in tests/unit/test_runner_bundle.py, not here: a bundle of the wrong size or not a "
    "marshal (passed over, written again), one module's code damaged at the right size (that module loaded from"
    " its file, the bundle removed and written again), a `.pyc` stale against its source (left out). A runner "
    "killed while writing one leaves its `.tmp-PID` file in the archive's directory until the archive is "
    "collected; a process killed while it unpacks `.rx-lazy.zip` (remote_exec/lazy.py, tried in "
    "tests/unit/test_lazy_modules.py: six processes at once, a damaged file) leaves its `.tmp-lazy-*` folder "
    "there likewise.",
]


def render(data: dict[str, Any]) -> str:
    """The whole document."""
    tests = data["tests"]
    counts = Counter(entry["outcome"] for entry in tests.values())
    trials = data["trials"]
    served = sum("through the rx server" in trial.get("variant", "") for trial in trials)
    lines = [
        "# Reliability",
        "",
        "<!-- Generated by scripts/reliability_report.py from tests/faults/.results/results.json; "
        "do not edit by hand. -->",
        "",
        "What rx does when things break, measured by the fault-injection suite in `tests/faults/` (marker "
        "`faults`) against the Docker testbed, on both SSH backends. Each scenario breaks one thing on purpose "
        "and checks what a user would notice: no hang, nothing lost or corrupted, the right status in the "
        "workspace, one clear error line (no Python traceback), and nothing of the task left running or "
        "lying around on the remote host 5 s later.",
        "",
        "Regenerate: `RX_REQUIRE_DOCKER=1 python -m pytest tests/faults && python scripts/reliability_report.py`"
        " (`RX_FAULTS_SEED=N` repeats a run's random choices).",
        "",
        "## The recorded run",
        "",
        f"- Started {data['started']}, took {data['duration']:.0f} s on {data['machine']}, Python {data['python']}.",
        f"- Commit {data['commit'] or 'unknown'}"
        + (" with uncommitted changes in remote_exec/" if data.get("library_dirty") else "")
        + f"; seed {data.get('seed')}.",
        f"- {len(tests)} tests: " + ", ".join(f"{count} {name}" for name, count in sorted(counts.items()))
        + f"; {len(trials)} trials, {served} of them with their `rx` commands through an rx server "
        "(`RX_FAULTS_SERVER`: by default one backend of each test; the variant says so).",
        "",
        "## Acceptance figures",
        "",
        "Totals over every recorded trial. Trials of known-bug tests (marked `xfail(strict=True)` until the "
        "bug is fixed) count too; the column beside says how much of each figure comes from them.",
        "",
        *acceptance(data),
        "",
        "## Fault classes",
        "",
        "Each scenario below belongs to one class; this table totals its trials (a class's row counts what "
        "its trials measured: hangs, results lost or corrupted, processes and files left on the remote 5 s "
        "after the fault, Python tracebacks shown for rx errors).",
        "",
        *classes(data),
        "",
    ]
    known = sorted((nodeid, entry) for nodeid, entry in tests.items() if entry["outcome"] == "xfailed")
    unexpected = sorted((nodeid, entry) for nodeid, entry in tests.items()
                        if entry["outcome"] in ("failed", "error", "xpassed"))
    lines += ["## Known limits", "", *KNOWN_LIMITS, ""]
    lines += ["## Known bugs (xfail until fixed)", ""]
    lines += [f"- `{nodeid.split('::', 1)[-1]}`: {entry.get('reason', '')}" for nodeid, entry in known] or ["- None."]
    lines += ["", "## Unexpected failures", ""]
    lines += [f"- `{nodeid.split('::', 1)[-1]}` ({entry['outcome']}): {entry.get('reason', '')}"
              for nodeid, entry in unexpected] or ["- None."]
    lines += ["", "## Scenarios", ""]
    for key, info in data["scenarios"].items():
        lines += scenario_section(data, key, info)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="results JSON of a fault run")
    parser.add_argument("-o", "--output", default=str(DEFAULT_OUTPUT), help="output file, or - for stdout")
    args = parser.parse_args(argv)
    try:
        data = json.loads(args.results.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        print(f"reliability_report: cannot read {args.results}: {exc}", file=sys.stderr)
        return 1
    text = render(data)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text, encoding="utf-8")
        print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
