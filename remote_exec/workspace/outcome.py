"""How a task's result becomes a run's record: its status, its exit code, its one-line error.

One mapping for every way a run ends (``rx run``, ``rx attach``, ``rx cancel``):

    result status         run status    exit code
    finished, exit 0      finished      0
    finished, exit N      failed        N (the script's own)
    raised                failed        1
    timeout               failed        124
    cancelled             cancelled     130
    signal, oom, error    failed        the runner's (128 + signal number for a signal)
    preempted, node_fail  failed        the scheduler's verdict (3), said in the error line
    lost                  lost          3 (a job that vanished without a result)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..session import Result

__all__ = ["EXIT_INTERRUPTED", "EXIT_TIMEOUT", "RunOutcome", "result_record", "run_outcome"]

#: Exit status of a run that timed out (as GNU timeout's).
EXIT_TIMEOUT = 124
#: Exit status of a run that was interrupted or cancelled (128 + SIGINT).
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class RunOutcome:
    """A run's final status, exit code and error line.

    Attributes:
        status: ``finished``, ``failed``, ``cancelled`` or ``lost``.
        exit_code: What ``rx run`` exits with.
        error: One line saying what went wrong (None when it finished).
    """

    status: str
    exit_code: int
    error: str | None


def run_outcome(result: Result) -> RunOutcome:
    """The run status, exit code and error line for ``result``."""
    exit_code = int(result.exit_code)
    if result.status == "timeout":
        exit_code = EXIT_TIMEOUT
    elif result.status == "cancelled":
        exit_code = EXIT_INTERRUPTED
    if result.status in ("cancelled", "lost"):
        status = result.status  # a job that vanished without a result is lost, never finished
    else:
        status = "finished" if result.status == "finished" and exit_code == 0 else "failed"
    error = None
    if result.status not in ("finished", "raised"):
        error = result.detail or result.status
    elif result.exception_type:
        error = f"{result.exception_type.removeprefix('builtins.')}: {result.exception_message}"
    elif exit_code:
        error = f"exit status {exit_code}"
    return RunOutcome(status=status, exit_code=exit_code, error=error)


def result_record(result: Result, *, header: dict[str, Any] | None = None, phases: dict[str, float] | None = None,
                  uploaded: bool = False, files: Sequence[Path] = (), run_dir: Path | None = None) -> dict[str, Any]:
    """``result.json`` of a run: the result's own record, and where and how it ran when it ran."""
    record = result.record()
    if header is not None:
        record.update(host=header.get("host"), python=header.get("python"), duration=header.get("duration"),
                      phases=phases or {}, uploaded_archive=uploaded,
                      files=[str(path.relative_to(run_dir) if run_dir else path) for path in files])
        for name in ("skipped", "stray"):  # unreadable files left behind; processes stopped after the task
            if header.get(f"{name}_count"):
                record[f"{name}_count"] = header[f"{name}_count"]
                record[name] = header.get(name) or []
        if header.get("kept"):
            record["remote_run_dir"] = header["kept"]
    return record
