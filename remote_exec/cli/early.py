"""Connecting before the command line is parsed: ``rx run --remote HOST SCRIPT ...`` starts its SSH
connection from the raw arguments, then the runner on the host, before typer and the command's own code
are imported (~50 ms a cold connection no longer waits for; over a live connection the runner is up by the
time the run is recorded).

It is only a head start. The words are read conservatively (:func:`peek_run`): anything but a plain
``rx run [OPTIONS] SCRIPT`` line, or an option that changes how the host is reached, and nothing starts
here. ``rx run`` then works out the host from the parsed options as always and adopts this connection only
when it is for the very same host spec and backend (:func:`remote_exec.early.adopt_or_connect`), and the
runner only when the run would have started the very same one
(:meth:`~remote_exec.coordinator.Coordinator.runner_ahead`); otherwise it starts its own (the runner started
here is stopped).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..early import EarlyConnection, connect_early
from .words import RUN_FLAGS, leading_flags, peek_run

__all__ = ["RUN_FLAGS", "HeadStart", "connect_from_argv", "peek_run", "run_session"]

@dataclass
class HeadStart:
    """What ``rx run`` started from its raw words: the connection (adopted as
    :func:`~remote_exec.early.adopt_or_connect` says), the configuration it read (the run's own: same
    directory, same moment) and maybe the script's runner (see :meth:`close`)."""

    connection: EarlyConnection
    config: Any
    runner: Any = None  # a RunnerAhead, or None

    def take_runner(self) -> Any:
        """The runner started here (once; None if none)."""
        runner, self.runner = self.runner, None
        return runner

    def close(self) -> None:
        """Stop the runner started here unless the run took it (a usage error ends ``rx run`` first)."""
        runner = self.take_runner()
        if runner is not None:
            runner.close()


def run_session(task: Any, args: list[str], remote: str | None, options: dict[str, Any], config: Any) -> Any:
    """The session of an ``rx run`` of ``task`` with ``args`` (the run's, and its head start's: the two must
    not differ but in the options the head start could not read)."""
    from ..session import Session
    from ..task import Execution

    session = Session(task=task, execution=Execution.create(task, tuple(args)), serializer="pickle",
                      context={"remote": remote, "options": options, "origin": "cli", "cwd": os.getcwd()})
    session.config = config
    return session


def connect_from_argv(words: list[str], seen: dict[str, str] | None = None,
                      key: str | None = None) -> HeadStart | None:
    """:func:`connect_early` from the raw words of an ``rx run`` line (``seen``: :func:`peek_run` of them,
    if already read), and for a script, its runner (see :func:`_runner_head`). The OpenSSH backend notes
    its master for the line's next head start (:mod:`remote_exec.prestart`) under ``key`` (its memo key,
    if already worked out)."""
    seen = peek_run(words) if seen is None else seen
    if seen is None:
        return None
    from .logs import configure

    configure(leading_flags(words)[1])  # what connecting logs goes to rx's log, as it would after the parse
    try:
        from ..config import Configuration

        config = Configuration.load()
    except Exception:  # a broken pyproject.toml: the run says so
        return None
    options: dict[str, Any] = {"backend": seen.get("backend")}
    if seen.get("ssh_config"):
        options["ssh_config"] = Path(seen["ssh_config"])  # as typer makes it
    if key is None:
        from ..prestart import memo_key

        key = memo_key(seen)
    memo = (key, tuple(str(path) for path in (config.source,) if path is not None))
    connection = connect_early(config, seen["remote"], options, prestart_memo=memo)
    if connection is None:
        return None
    head = HeadStart(connection, config)
    if seen.get("script") and not seen.get("module"):
        python = {"python": seen["python"]} if seen.get("python") else {}  # (the runner's, not the connection's)
        head.runner = _runner_head(config, seen["remote"], {**options, **python}, connection, seen["script"])
    return head


def _runner_head(config: Any, remote: str, options: dict[str, Any], connection: EarlyConnection,
                 script: str) -> Any:
    """Start the runner of ``script``'s run on ``remote`` as the coordinator would for it with these
    options (the command line's others may still make it unfit: the run then stops it); None when there is
    none to start or anything fails (the run itself says what)."""
    try:
        from ..coordinator import Coordinator
        from ..task import Task

        session = run_session(Task.from_script(Path(script)), [], remote, options, config)
        session.local["backend_ahead"] = connection
        coordinator = Coordinator.current()
        target = coordinator.resolve_target(session)
        if target.spec != connection[0]:
            return None
        plan = coordinator.plan_for(session)
        return coordinator.runner_ahead(session, target, plan.spec.root if plan is not None else None)
    except Exception:  # only a head start
        return None
