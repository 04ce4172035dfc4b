"""Detached runs: start a call that outlives this process and the connection, follow it, collect it, cancel it.

``detach`` hands the session to a supervisor on the host (in its own session, its output in files of the
run directory) and returns where it runs; ``attach`` follows those files and, with ``collect``, sends the
result exactly as an attached call would (signed with a fresh per-call key) and, once it landed, acknowledges it (``A``)
so that the host removes the run; ``cancel`` asks the supervisor to stop the task (SIGINT, SIGTERM, SIGKILL).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..backends.base import Backend
from ..errors import ConnectError, RunnerError
from ..launchers.base import Launcher
from ..packing import DistributionArchive
from ..session import Session
from . import wire
from .bootstrap import find_handshake, new_token, runner_argv, start_runner
from .call import Call, run_call, send_session
from .channel import reap
from .options import CallOptions, EventSink, FileLander, Outcome, OutputSink, PhaseCallback

__all__ = ["attach_detached", "cancel_detached", "follow_detached", "start_detached"]


def _ignore_phase(name: str, state: str) -> None:
    """Attaching and following record no phases."""


def start_detached(session: Session, backend: Backend, archive: DistributionArchive, options: CallOptions, *,
                   launcher: Launcher, on_phase: PhaseCallback | None = None) -> dict[str, Any]:
    """Start ``session`` on the host so that it outlives this process and the connection.

    Returns:
        What :func:`attach_detached` and :func:`cancel_detached` need: host, remote run directory,
        supervisor pid, archive sha256, interpreter and workdir.
    """
    channel = start_runner(launcher, backend, archive, options, "detach", on_phase or _ignore_phase)
    call_options = {"run_id": session.run_id or "run", "timeout": options.timeout, "env": dict(options.env),
                    "secret_env": dict(options.secret_env), "kind": session.task.kind,
                    "pull": list(options.pull), "no_pull": options.no_pull, "key": "00"}
    info: dict[str, Any] = {}

    def started(kind: bytes, payload: bytes) -> bool:
        if kind == b"P":
            info.update(json.loads(payload))
        return bool(info)

    try:
        with channel.write_lock:
            channel.process.write_stdin(wire.encode(b"G", wire.dump_options(call_options)))
            send_session(channel.process, session.to_wire())
        if not channel.pump(started, size=65536):
            raise RunnerError(f"starting the detached run on {backend.host} failed: "
                              f"{channel.stderr_tail() or 'no reason given'}", host=backend.host)
    finally:
        reap(channel.process, channel.stderr_reader)
    return {"host": backend.host, "run_dir": info["run_dir"], "supervisor_pid": info.get("supervisor_pid"),
            "archive": archive.sha256, "archive_path": str(archive.path), "python": options.python,
            "workdir": options.workdir}


def _archive_of(detached: Mapping[str, Any]) -> DistributionArchive:
    return DistributionArchive(path=Path(detached["archive_path"]), sha256=detached["archive"], size=0, modules=())


def follow_detached(backend: Backend, detached: Mapping[str, Any], options: CallOptions, *, launcher: Launcher,
                    on_stdout: OutputSink, on_stderr: OutputSink, offsets: tuple[int, int] = (0, 0),
                    once: bool = False, on_event: EventSink | None = None) -> None:
    """Stream a detached run's output from ``offsets`` until it ends (``rx logs -f``; ``once``: only what it
    wrote so far, ``rx logs``); collect nothing. ``on_event`` hears the runner's events.

    Raises:
        ConnectError: The link was lost, or went silent, while following.
    """
    channel = start_runner(launcher, backend, _archive_of(detached), options, "attach", _ignore_phase,
                           [str(detached["run_dir"])])
    key = secrets.token_bytes(32)
    call = Call(channel, options, key, on_stdout, on_stderr, on_event)
    try:
        channel.send(b"G", wire.dump_options({"key": key.hex(), "heartbeat": options.heartbeat, "once": once,
                                              "stdout_offset": offsets[0], "stderr_offset": offsets[1]}))
        channel.watch(call)  # a silent link is given up after dead_after, as for any call
        complete = channel.pump(lambda kind, payload: kind == b"Z" or call.handle(kind, payload))
    finally:
        call.stop.set()
        channel.closed.set()
        channel.process.kill()
    if not complete:
        raise ConnectError(backend.host, "the connection was lost while following the run")


def attach_detached(session: Session, backend: Backend, detached: Mapping[str, Any], options: CallOptions, *,
                    launcher: Launcher, on_stdout: OutputSink, on_stderr: OutputSink,
                    land_file: FileLander | None = None, offsets: tuple[int, int] = (0, 0),
                    on_event: EventSink | None = None) -> Outcome:
    """Follow a detached run's output from ``offsets`` until it ends, then bring its result back (checked
    as an attached call's is) and let the host remove its run directory."""
    channel = start_runner(launcher, backend, _archive_of(detached), options, "attach", _ignore_phase,
                           [str(detached["run_dir"]), "collect"])
    return run_call(channel, session, None, options, on_stdout=on_stdout, on_stderr=on_stderr,
                    land_file=land_file, phase=_ignore_phase, phases={}, uploaded=False, keep=False,
                    extra_options={"stdout_offset": offsets[0], "stderr_offset": offsets[1]}, on_event=on_event,
                    acknowledge=True)


def cancel_detached(backend: Backend, detached: Mapping[str, Any], options: CallOptions) -> dict[str, Any]:
    """Stop a detached run's task; return the host's status record of the run once it has ended."""
    token = new_token()
    argv = runner_argv(options, detached["archive"], "cancel", str(detached["run_dir"]), token=token)
    result = backend.run(argv, timeout=30)
    answer = find_handshake(result.stdout, token)
    lines = answer.rest.decode("utf-8", "replace").strip().splitlines() if answer is not None else []
    if result.failed or answer is None or answer.word != "HAVE" or not lines:
        raise RunnerError(f"cancelling the run on {backend.host} failed: {result.tail() or 'no reason given'}",
                          host=backend.host)
    status: dict[str, Any] = json.loads(lines[-1])
    return status
