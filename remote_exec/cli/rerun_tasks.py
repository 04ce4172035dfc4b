"""``rx rerun`` of a run recorded by ``@task`` calls: every call again, or with ``--failed`` only the calls
that did not finish, with the done results merged in (valjean's merge)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import typer

from ..errors import RemoteExecError, WorkspaceError

if TYPE_CHECKING:
    from ..config import Configuration
    from ..workspace.manager import Run, Workspace

__all__ = ["rerun_tasks"]


def rerun_tasks(workspace: Workspace, previous: Run, *, failed: bool, remote: str | None, as_json: bool) -> int:
    """Rerun the recorded calls of ``previous`` as a new run; return the exit status (0 all done)."""
    from ..config import Configuration
    from ..coordinator import Coordinator

    config = Configuration.load()
    info = previous.info()
    tasks: dict[str, dict[str, Any]] = previous.tasks()
    run = workspace.new_run(target=info.get("target") or "tasks", kind="task", argv=info.get("argv"),
                            remote=remote or info.get("remote"), backend=info.get("backend"), parent=previous.id)
    merged = run.merge_done(previous) if failed else []
    todo = [key for key in sorted(tasks) if key not in merged]
    run.set_status("running")
    failures = _rerun_as_array(run, previous, todo, tasks, config=config, remote=remote)
    if failures is None:
        failures = sum(not _rerun_call(run, previous, key, tasks[key], config=config, remote=remote) for key in todo)
    Coordinator.current().flush()
    if failures:
        run.set_status("failed", exit_code=1, error=f"{failures} task(s) did not finish")
    else:
        run.set_status("finished", exit_code=0)
    if as_json:
        typer.echo(json.dumps(run.info(), indent=2))
    else:
        typer.echo(f"rx: run {run.id}: {len(todo) - failures} task(s) done, {failures} failed, "
                   f"{len(merged)} merged from {previous.id}", err=True)
    if not todo and not merged:
        raise WorkspaceError(f"run {previous.id} recorded no tasks")
    return 1 if failures else 0


def _saved_session(run: Run, previous: Run, key: str, entry: dict[str, Any], *, config: Configuration,
                   remote: str | None) -> Any:
    """The saved session of call ``key`` of ``previous``, made a call of ``run`` (None: none was saved)."""
    from ..session import Session

    saved = previous.call_record(f"sessions/{key}.session") or previous.call_record(f"sessions/{key}.zip")
    if saved is None:
        run.set_task(key, "skipped", name=entry.get("name"), error="no saved session to rerun")
        return None
    session = Session.loads(saved)
    if remote:
        session.context["remote"] = remote
    session.run_id = run.id
    session.config = config
    return session


def _rerun_as_array(run: Run, previous: Run, todo: list[str], tasks: dict[str, dict[str, Any]], *,
                    config: Configuration, remote: str | None) -> int | None:
    """Rerun the calls as one job array when they go to a scheduler remote (None: they do not; run them one
    by one); return how many did not finish."""
    from ..coordinator import Coordinator

    if len(todo) < 2:
        return None
    sessions = [_saved_session(run, previous, key, tasks[key], config=config, remote=remote) for key in todo]
    found = [session for session in sessions if session is not None]
    coordinator = Coordinator.current()
    if len(found) < 2 or not coordinator.resolve_target(found[0]).launcher.schedules:
        return None
    try:
        results = coordinator.run_array(found)
    except RemoteExecError:
        return len(todo)
    return len(todo) - sum(1 for result in results if result.ok)


def _rerun_call(run: Run, previous: Run, key: str, entry: dict[str, Any], *, config: Configuration,
                remote: str | None) -> bool:
    """Run the call ``key`` of ``previous`` again, recorded in ``run``; tell whether it finished."""
    from ..advice import run_chain
    from ..advices.remote import RemoteAdvice

    session = _saved_session(run, previous, key, entry, config=config, remote=remote)
    if session is None:
        return False
    try:
        return run_chain(session, [RemoteAdvice()]).ok
    except RemoteExecError:
        return False
