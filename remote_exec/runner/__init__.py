"""The runner: the archive's entry point on the remote (standard library only, plus the archive's cloudpickle).

Started by the bootstrap (see :mod:`remote_exec.protocol.bootstrap`) as ``main([cache_dir, "serve"], fd)``,
where ``fd`` is the protocol's private copy of the real stdout (fd 1 then points at stderr, so nothing an
import prints reaches the frames). It reads the call's options and session from stdin, creates a private
run directory (mode 0700) under the cache dir (a snapshot of the project's tree when the call names one:
fetched over the channel first if the host lacks it), forks the task into its own session and process
group with that directory as working directory (held with all it starts by :mod:`.contain`), and streams
the task's stdout and stderr back as frames while it runs. It watches the task's end, the coordinator
(stdin closed or heartbeats stopped: the link or the coordinator died; a C frame: cancel), the timeout and
its own SIGTERM; in all but the first it stops the task and everything it started. Then it sends the
result (value or exception with its traceback text, the files the task created or changed), signed with
the per-call HMAC key, removes the run directory (or returns an untouched snapshot to its pool) and exits
0. A runner failure (not the task's) exits 70 with one line on stderr.

Statuses it reports: ``finished`` (the task ran to its end; see exit_code), ``raised`` (a function task
raised), ``timeout``, ``cancelled``, ``signal`` (killed by a signal it did not send; named in detail),
``oom`` (killed by the kernel's out-of-memory killer), ``lost`` (the coordinator went away), ``error``
(the task process ended without a result).

The rooms, each imported only by the modes that need it:

- :mod:`.channel`: frames in (the call) and out (signed with the call's HMAC), the poller;
- :mod:`.policy`: heartbeat, timeout, cancel, dead link, kill grace: one pure policy for every loop;
- :mod:`.supervise`: ``serve``, one call in a forked task process, watched to its end;
- :mod:`.child`: what runs in the task process (stdio, environment, the task, the result pipe);
- :mod:`.result`: how the task ended, and the R, V, X, F and Z frames;
- :mod:`.rundir`: the run directory, its status file, its removal;
- :mod:`.worker`: ``worker``, the persistent worker (``keep_warm``) and its watcher thread;
- :mod:`.slot`: a pool worker's slot (its lock file, the GPUs it holds) and ``probe`` (GPUs, locks, memory);
- :mod:`.detached`: ``detach``, ``attach`` and ``cancel`` of detached runs;
- :mod:`.store`: the host's store of project trees (blobs, manifests) and their transfer's receiving end;
- :mod:`.snapshot`: each run's own copy of the project, what the run changed in it, the pool of
  untouched copies;
- :mod:`.gc`: the host's garbage collector (trees, blobs, archives, leftovers), at most once a day;
- :mod:`.maintain`: ``sync`` (store a tree without running anything) and ``gc`` on demand.
- :mod:`.envs`: ``env`` (a task's dependencies as an environment, built once per key) and ``envprobe``.
- :mod:`.batch`: ``prepare``, ``batch`` and ``seal`` of runs through a batch scheduler (Slurm).
- :mod:`.bundle`: the archive's compiled code in one file per interpreter, written after a call served
  without it, read by the bootstrap: the next calls' imports skip the search of ``sys.path``.

Every import is paid on every call (process-per-call mode): only what the mode needs, and the lean
variants (_signal and select.poll rather than signal and selectors, which pull in enum; wire's JSON writer
rather than json, which pulls in re; marshal for built-in data rather than even the C pickle module, which
loads functools and collections). The rest is imported where it is used.
"""

from __future__ import annotations

import os
import sys

from .channel import EXIT_RUNNER_FAILURE, CoordinatorGone, Out

__all__ = ["main"]


def main(argv: list[str] | None = None, out_fd: int = 1, leave: bool = False) -> int:
    """Serve one call (``serve``), many (``worker IDLE [SLOT]``), a detached run (``detach``, ``attach RUN_DIR
    [collect]``, ``cancel RUN_DIR``) or a scheduler's (``prepare``, ``batch RUN_DIR``, ``seal RUN_DIR
    VERDICT``); store a project tree (``sync``); collect the host's garbage (``gc LIMIT DAYS
    [dry-run]``); report the host's GPUs and slots (``probe``); build or find an environment (``env``,
    ``envprobe``); over stdin and ``out_fd``; see the module
    docstring. With ``leave`` (the bootstrap's process), a call served in full ends the process at once:
    its result is out and its run directory gone, so the interpreter's teardown (milliseconds of the
    host's CPU on every call) is skipped."""
    args = list(sys.argv[1:] if argv is None else argv)
    cache_dir = os.path.expanduser(args[0]) if args else os.path.expanduser("~/.cache/remote_exec")
    mode = args[1] if len(args) > 1 else "serve"
    try:
        code = _serve(mode, cache_dir, args[2:], out_fd)
        if leave and mode == "serve":
            if getattr(__spec__.loader, "rx_bundle", None) is None:  # served: write the code bundle it lacked
                _bundle()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code
    except CoordinatorGone:
        return 0
    except Exception as exc:
        named = type(exc).__name__ != "StoreError"  # the store's messages are written for the user
        sys.stderr.write(f"rx runner: {type(exc).__name__ + ': ' if named else ''}{exc}\n")
        if os.environ.get("RX_DEBUG"):
            import traceback

            traceback.print_exc()
        return EXIT_RUNNER_FAILURE


def _bundle() -> None:
    """Write the archive's bundle for this interpreter (see :mod:`.bundle`): the next calls import the
    runner from it. Never the call's failure."""
    try:
        from .bundle import write_bundle

        write_bundle()
    except Exception as exc:
        if os.environ.get("RX_DEBUG"):
            sys.stderr.write(f"rx runner: no code bundle: {type(exc).__name__}: {exc}\n")


def _serve(mode: str, cache_dir: str, rest: list[str], out_fd: int) -> int:
    """Run ``mode``; ``rest`` holds its arguments; frames go out on ``out_fd``."""
    if mode == "serve":
        from .prefork import Prefork

        # the task process loads its modules (pickle too: the coordinator's hint) while the call travels
        early = Prefork.start(out_fd, pickle=rest[:1] == ["pickle"])
        try:
            from .channel import read_call
            from .supervise import serve_call

            options, session, reader = read_call(0)
            serve_call(options, session, reader, cache_dir, Out(out_fd), early)
        finally:
            early.drop()
        return 0
    if mode == "worker":
        from .worker import serve_worker

        slot = None
        if len(rest) > 1:  # a pool's worker: the slot it takes first (its lock, its GPUs)
            import json

            slot = json.loads(rest[1])
        return serve_worker(cache_dir, float(rest[0]) if rest else 600.0, out_fd, slot)
    if mode == "probe":
        from .slot import probe

        Out(out_fd).event(probe(cache_dir))
        return 0
    if mode in ("sync", "gc", "env", "envprobe"):
        return _maintain(mode, cache_dir, rest, out_fd)
    if mode in ("detach", "attach", "cancel"):
        from . import detached

        if mode == "detach":
            detached.serve_detached(cache_dir, Out(out_fd))
        elif mode == "attach":
            detached.serve_attach(cache_dir, rest[0], rest[1:2] == ["collect"], Out(out_fd))
        else:
            return detached.serve_cancel(cache_dir, rest[0], out_fd)
        return 0
    if mode in ("prepare", "batch", "seal"):
        from . import batch

        if mode == "prepare":
            batch.serve_prepare(cache_dir, Out(out_fd))
            return 0
        if mode == "batch":
            return batch.serve_batch(cache_dir, rest[0])
        return batch.serve_seal(cache_dir, rest[0], rest[1], out_fd)
    sys.stderr.write(f"rx runner: unknown mode {mode!r}\n")
    return EXIT_RUNNER_FAILURE


def _maintain(mode: str, cache_dir: str, rest: list[str], out_fd: int) -> int:
    """The modes that run no task: store a tree, collect garbage, build or probe an environment."""
    if mode in ("env", "envprobe"):
        from . import envs

        if mode == "env":
            return envs.serve_env(cache_dir, Out(out_fd))
        return envs.serve_env_probe(cache_dir, rest, Out(out_fd))
    from . import maintain

    if mode == "sync":
        return maintain.serve_sync(cache_dir, Out(out_fd))
    return maintain.serve_gc(cache_dir, rest, out_fd)
