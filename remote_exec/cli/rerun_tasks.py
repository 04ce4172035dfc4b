"""``rx rerun`` of a run recorded by ``@task`` calls: every call again, or with ``--failed`` only the calls
that did not finish, with the done results merged in (valjean's merge)."""

from __future__ import annotations

import json
from typing import Any

import typer

from ..errors import RemoteExecError, WorkspaceError

__all__ = ["rerun_tasks"]


def rerun_tasks(workspace: Any, previous: Any, *, failed: bool, remote: str | None, as_json: bool) -> int:
    """Rerun the recorded calls of ``previous`` as a new run; return the exit status (0 all done)."""
    from ..advice import run_chain
    from ..advices.remote import RemoteAdvice
    from ..config import Configuration
    from ..coordinator import Coordinator
    from ..session import Session

    config = Configuration.load()
    info = previous.info()
    tasks: dict[str, dict[str, Any]] = previous.tasks()
    run = workspace.new_run(target=info.get("target") or "tasks", kind="task", argv=info.get("argv"),
                            remote=remote or info.get("remote"), backend=info.get("backend"), parent=previous.id)
    merged = run.merge_done(previous) if failed else []
    todo = [key for key in sorted(tasks) if key not in merged]
    run.set_status("running")
    failures = 0
    for key in todo:
        saved = previous.call_record(f"sessions/{key}.session") or previous.call_record(f"sessions/{key}.zip")
        if saved is None:
            run.set_task(key, "skipped", name=tasks[key].get("name"), error="no saved session to rerun")
            failures += 1
            continue
        session = Session.loads(saved)
        if remote:
            session.context["remote"] = remote
        session.run_id = run.id
        session.config = config
        try:
            result = run_chain(session, [RemoteAdvice()])
        except RemoteExecError:
            failures += 1
            continue
        if not result.ok:
            failures += 1
    Coordinator.current().flush()
    run.set_status("finished" if failures == 0 else "failed", exit_code=0 if failures == 0 else 1,
                   error=None if failures == 0 else f"{failures} task(s) did not finish")
    if as_json:
        typer.echo(json.dumps(run.info(), indent=2))
    else:
        typer.echo(f"rx: run {run.id}: {len(todo) - failures} task(s) done, {failures} failed, "
                   f"{len(merged)} merged from {previous.id}", err=True)
    if not todo and not merged:
        raise WorkspaceError(f"run {previous.id} recorded no tasks")
    return 0 if failures == 0 else 1
