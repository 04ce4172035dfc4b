"""Runs through a batch scheduler: the calls wait in run directories on the shared filesystem for their job.

- ``prepare`` (on the login node, over the coordinator's channel): for each call that comes in (G, S..., s,
  as for any call; Q ends), make its run directory under the workdir with the name the coordinator chose,
  store the session and the options there (private, 0600; the options hold no secret and no key), and
  answer with a P event naming the directory. Nothing runs yet.
- ``batch RUN_DIR`` (inside the scheduler's allocation: the job's own process): run the stored call as a
  detached run's supervisor does (its output appended to the run's files, USR1 and USR2 reach it; the
  scheduler's SIGTERM, which reached the task too, is the task's to handle for a grace before this process
  sends SIGTERM, then SIGKILL: :data:`.policy.SCHEDULER_ENDS`), store its outcome, and exit with the task's
  exit code, so the scheduler's accounting says COMPLETED or FAILED as the task did. A call that names a
  project tree (stored by the coordinator before ``prepare``) runs in a snapshot of it: the run directory is
  made the snapshot when the job starts,
  as a direct call's is, so its outputs are what it created or changed. A ``{index}`` in ``RUN_DIR`` is the array index
  (``RX_ARRAY_INDEX``). A job the scheduler requeued starts the call again in the same run directory:
  the files the task wrote stay, its output is appended, ``RX_JOB_ATTEMPT`` counts the attempts; a call
  that already ended is not run twice.
- ``seal RUN_DIR VERDICT`` (on the login node, from the coordinator, once the scheduler says the job is
  over): mark the run done, with the verdict (JSON: status, exit code, detail) as its outcome when the
  job left none; print the run's status as JSON.

A run ends ``done`` (``attach`` collects it at once), or ``ended`` when its job may be requeued
(``RX_JOB_REQUEUE=1``): a task stopped by SIGTERM may be a node failure or a preemption that the scheduler
requeues, and then the call must find its run directory again; so only the scheduler's word ends such a
run (the coordinator asks it and seals the run).

The script the launcher writes exports ``RX_JOB_ID``, ``RX_ARRAY_INDEX``, ``RX_JOB_ATTEMPT`` and
``RX_JOB_REQUEUE`` from the scheduler's own variables and the job's settings; nothing here knows which
scheduler it is.
"""

from __future__ import annotations

import os
import time

from ..protocol import wire
from .detached import OUTCOME, check_run_dir, run_to_files, store_outcome
from .rundir import PRIVATE, RunStatus, read_status

TYPE_CHECKING = False  # typing is not imported at run time
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any

    from .channel import Out

__all__ = ["serve_batch", "serve_prepare", "serve_seal"]

_SESSION = "session.bin"
_OPTIONS = "options.json"
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def _write_private(path: str, data: bytes) -> None:
    """Write ``data`` to a new file only its owner may read."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def _new_run_dir(cache_dir: str, name: str) -> str:
    """The new private run directory ``name`` (with its ``.rx``) under the workdir's ``runs``."""
    if not name or name.startswith(".") or not set(name) <= _NAME_CHARS:
        raise RuntimeError(f"not a run directory name: {name!r}")
    runs = os.path.join(cache_dir, "runs")
    os.makedirs(runs, mode=0o700, exist_ok=True)
    run_dir = os.path.join(runs, name)
    os.mkdir(run_dir, 0o700)
    os.mkdir(os.path.join(run_dir, PRIVATE), 0o700)
    return run_dir


def _incoming_calls() -> Iterator[tuple[dict[str, Any], bytes]]:
    """Each call on stdin (G, S..., s), until Q or the end of stdin."""
    reader = wire.FrameReader()
    options: dict[str, Any] | None = None
    parts: list[bytes] = []
    while data := os.read(0, 1 << 20):
        for kind, payload in reader.feed(data):
            if kind == b"G":
                options, parts = wire.load_options(payload), []
            elif kind == b"S":
                parts.append(payload)
            elif kind == b"s":
                session_bytes = b"".join(parts)
                if options is None or len(session_bytes) != wire.load_options(payload).get("size"):
                    raise RuntimeError("protocol: a call arrived damaged")
                yield options, session_bytes
                options, parts = None, []
            elif kind == b"Q":
                return


def serve_prepare(cache_dir: str, out: Out) -> None:
    """Store each call that comes in its own run directory, until Q or the end of stdin."""
    for options, session_bytes in _incoming_calls():
        if options.get("secret_env"):
            raise RuntimeError("secrets are never stored on the shared filesystem")
        if options.get("tree") and _tree(cache_dir, options) is None:
            raise RuntimeError(f"the project's tree {str(options['tree'])[:12]} is not stored under {cache_dir}")
        run_dir = _new_run_dir(cache_dir, str(options.get("run_name") or ""))
        options = dict(options, key="00")  # the job never holds a coordinator's key
        private = os.path.join(run_dir, PRIVATE)
        _write_private(os.path.join(private, _SESSION), session_bytes)
        _write_private(os.path.join(private, _OPTIONS), wire.json_bytes(options))
        RunStatus(run_dir).update(state="queued", queued=time.time(), tree=options.get("tree"))
        out.event({"event": "prepared", "run_dir": run_dir, "host": os.uname().nodename})


def _tree(cache_dir: str, options: dict[str, Any]) -> Any:
    """The stored manifest of the call's tree (None when the store lacks it)."""
    from .store import load_tree

    return load_tree(cache_dir, str(options["tree"]))


def _snapshot(cache_dir: str, run_dir: str, options: dict[str, Any]) -> None:
    """Make ``run_dir`` (its ``.rx`` only, so far) the snapshot of the call's tree; a requeued job's run
    directory is one already (the files its earlier attempt wrote are kept).

    Raises:
        RuntimeError: The tree, or a blob of it, is no longer in the store (removed since the call was
            stored: submit it again).
    """
    from .snapshot import BASELINE, DamagedBlob, materialize

    if os.path.exists(os.path.join(run_dir, PRIVATE, BASELINE)):
        return
    entries = _tree(cache_dir, options)
    tree_id = str(options["tree"])
    try:
        if entries is None:
            raise DamagedBlob(tree_id)
        materialize(cache_dir, entries, run_dir, tree_id, str(options.get("cwd") or ""),
                    str(options.get("project") or ""))
    except DamagedBlob:
        raise RuntimeError(f"the project's tree {tree_id[:12]} is no longer whole in {cache_dir} "
                           "(removed since the job was submitted?): run the call again") from None


def _stored_call(run_dir: str) -> tuple[dict[str, Any], bytes]:
    import json

    private = os.path.join(run_dir, PRIVATE)
    with open(os.path.join(private, _OPTIONS), "rb") as stream:
        options: dict[str, Any] = json.loads(stream.read())
    with open(os.path.join(private, _SESSION), "rb") as stream:
        return options, stream.read()


def _clear_attempt(run_dir: str, previous: dict[str, Any]) -> None:
    """Remove what an earlier attempt of the job left of its outcome, and say in the run's stderr that the
    call starts again (the task's own files stay)."""
    private = os.path.join(run_dir, PRIVATE)
    for name in (OUTCOME, "value.bin", "exception.bin"):
        try:
            os.unlink(os.path.join(private, name))
        except FileNotFoundError:
            pass
    if previous.get("state") in ("running", "ended"):
        note = (f"rx: job {os.environ.get('RX_JOB_ID', '?')} started again on {os.uname().nodename} "
                f"(attempt {os.environ.get('RX_JOB_ATTEMPT', '?')}); the files written before are kept\n")
        with open(os.path.join(private, "stderr"), "ab") as stream:
            stream.write(note.encode())


def serve_batch(cache_dir: str, run_dir: str) -> int:
    """Run the call stored in ``run_dir`` here, inside the allocation; return the task's exit code."""
    run_dir = check_run_dir(cache_dir, run_dir.replace("{index}", os.environ.get("RX_ARRAY_INDEX") or "0"))
    previous = read_status(run_dir)
    if previous.get("state") == "done":  # requeued after the call had ended: it is not run twice
        return int(previous.get("exit_code") or 0) & 0xFF
    options, session_bytes = _stored_call(run_dir)
    _clear_attempt(run_dir, previous)
    status = RunStatus(run_dir, **previous)
    attempts = list(previous.get("attempts") or [])
    attempts.append({"job_id": os.environ.get("RX_JOB_ID"), "node": os.uname().nodename, "started": time.time()})
    status.update(state="running", supervisor_pid=os.getpid(), node=os.uname().nodename, started=time.time(),
                  job_id=os.environ.get("RX_JOB_ID"), attempt=int(os.environ.get("RX_JOB_ATTEMPT") or 0),
                  attempts=attempts)
    if options.get("tree"):
        _snapshot(cache_dir, run_dir, options)
    header, _ = run_to_files(options, session_bytes, run_dir, status, scheduled=True)
    # A job that may be requeued (a node failure, a preemption) is over only when its scheduler says so:
    # the coordinator asks it and seals the run. Any other job's run is done now (a cancel or a time limit
    # that stopped it is the scheduler's verdict, which the coordinator reads when it collects).
    requeue = os.environ.get("RX_JOB_REQUEUE") == "1"
    status.update(state="ended" if requeue else "done", status=header["status"], exit_code=header["exit_code"],
                  finished=time.time())
    code = header.get("exit_code")
    return (code if isinstance(code, int) else 1) & 0xFF


def _log_tail(run_dir: str, name: str) -> str:
    """The last lines of the scheduler's own log of the job (what the batch script printed), if any."""
    if not name or "/" in name or name.startswith("."):
        return ""
    try:
        with open(os.path.join(run_dir, PRIVATE, name), "rb") as stream:
            stream.seek(0, 2)
            stream.seek(max(0, stream.tell() - 2048))
            lines = stream.read().decode("utf-8", "replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in lines[-3:] if line.strip())[-400:]


def serve_seal(cache_dir: str, run_dir: str, verdict_json: str, out_fd: int = 1) -> int:
    """Mark the run done with ``verdict`` (status, exit_code, detail, log) as its outcome if it has none."""
    import json

    run_dir = check_run_dir(cache_dir, run_dir)
    verdict: dict[str, Any] = json.loads(verdict_json)
    status = read_status(run_dir)
    if status.get("state") != "done":
        if not os.path.exists(os.path.join(run_dir, PRIVATE, OUTCOME)):
            detail = str(verdict.get("detail") or "the job ended without a result")
            tail = _log_tail(run_dir, str(verdict.get("log") or ""))
            header = {"protocol": wire.PROTOCOL, "duration": 0.0, "python": "", "status": verdict.get("status", "lost"),
                      "host": status.get("node") or os.uname().nodename, "exit_code": int(verdict.get("exit_code", 3)),
                      "detail": f"{detail}; its batch output ends: {tail}" if tail else detail,
                      "signal": None, "exception": None, "value": None, "exc_pickle": None}
            try:
                options = _stored_call(run_dir)[0]
            except OSError:
                options = {}
            store_outcome(options, run_dir, header, b"", b"")
            status.update(status=header["status"], exit_code=header["exit_code"])
        RunStatus(run_dir, **status).update(state="done", sealed=time.time())
    data = (wire.json_text(read_status(run_dir)) + "\n").encode()
    while data:
        data = data[os.write(out_fd, data):]
    return 0
