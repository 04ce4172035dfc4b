"""``rx map``'s end and ``rx rerun`` of a sweep: run a sweep plan, report it; rerun a recorded sweep (with
``--failed``, only the combinations that did not finish; the rest are merged in)."""

from __future__ import annotations

import json
from typing import Any

import typer

__all__ = ["rerun_sweep", "run_plan"]


def run_plan(plan: Any, workspace: Any, config: Any, as_json: bool, **rerun: Any) -> int:
    """Run a sweep, print where it landed (or its record as JSON); return its exit status."""
    from ..pool.sweep import run_sweep

    parent, code = run_sweep(plan, workspace, config, **rerun)
    if as_json:
        typer.echo(json.dumps(parent.info(), indent=2))
    else:
        typer.echo(f"rx: sweep {parent.id}: {_counts(parent.tasks())}; rx show {parent.id}", err=True)
    return code


def _counts(tasks: dict[str, dict[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for entry in tasks.values():
        status = str(entry.get("status"))
        counts[status] = counts.get(status, 0) + 1
    return ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "no runs"


def rerun_sweep(workspace: Any, previous: Any, *, failed: bool, remote: str | None, as_json: bool) -> int:
    """``rx rerun SWEEP [--failed]``: the sweep again as a new parent run (with ``--failed`` only the
    combinations that did not finish; the rest are merged in); return the exit status."""
    from ..config import Configuration
    from ..pool.sweep import SweepPlan, grid_of
    from ..session import Session

    info = previous.info()
    record = info.get("sweep") or {}
    with previous.session_path.open("rb") as stream:
        session = Session.restore(stream)
    combinations, merged = _recorded(previous.tasks(), failed)
    if not combinations:
        typer.echo(f"rx: sweep {previous.id}: every combination finished; nothing to rerun", err=True)
        return 0
    options = dict(session.context.get("options") or {})
    hosts = (remote,) if remote else tuple(record.get("hosts") or ())
    plan = SweepPlan(task=session.task, grid=grid_of(record.get("grid") or {}), combinations=tuple(combinations),
                     hosts=hosts, per_host=record.get("per_host"), gpus=int(record.get("gpus") or 0),
                     retries=int(record.get("retries", 2)), options=options, argv=tuple(info.get("argv") or ()),
                     target=str(info.get("target")))
    config = Configuration.load()
    return run_plan(plan, workspace, config, as_json, previous=previous, merged=merged)


def _recorded(tasks: dict[str, dict[str, Any]], failed: bool) -> tuple[list[Any], list[str]]:
    """The combinations of a sweep's board to run again (with ``failed``, those not done) and the keys of
    those merged instead."""
    from ..pool.sweep import Combination

    combinations = [Combination(index=int(key), args=tuple(entry.get("args") or ()),
                                values=tuple((str(n), str(v)) for n, v in entry.get("values") or ()))
                    for key, entry in sorted(tasks.items()) if not failed or entry.get("status") != "done"]
    merged = [key for key, entry in tasks.items() if entry.get("status") == "done"] if failed else []
    return combinations, merged
