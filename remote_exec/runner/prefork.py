"""The task process of a process-per-call runner, forked before its call arrives.

``serve`` forks the task process first thing (:meth:`Prefork.start`), while the call's frames are still
on their way: the task process loads what restoring a session needs (the session, serialization and task
modules; the C pickle module too while it has nothing else to do, for a function sent by value) on the
host's other core, while the runner reads the call and makes its run directory. Then the runner hands it
the call (:meth:`Prefork.go`: the run directory, the options and the session over a pipe) and the task runs
as a freshly forked one would (:func:`.child.run_child`). Nothing of the call exists in the process before
that: it learns its options, environment, secrets and session only from the go message.

The process dies with the runner from its first instruction (the parent-death signal), and a call that
never comes (the coordinator gone, a failed run directory) ends it: the go pipe closes and it exits. A
session larger than :data:`GO_LIMIT` is not copied through the pipe: the runner drops the early process
and forks as before (the fork shares the session's memory).
"""

from __future__ import annotations

import marshal
import os

from .child import fork_task, run_child
from .contain import Containment

TYPE_CHECKING = False  # typing is not imported at run time: the runner's start-up is on every call's path
if TYPE_CHECKING:
    from typing import Any

__all__ = ["GO_LIMIT", "Prefork"]

#: The largest session handed to an early task process through its go pipe.
GO_LIMIT = 1 << 20


class Prefork:
    """A task process waiting for its call.

    Attributes:
        pid: The process.
        containment: Its containment (named once the run directory is known: :meth:`go`).
        pipes: The read ends of its stdout, stderr and result pipes, as ``_TaskProcess`` keeps them.
        stdin: The write end of its stdin pipe (closed by :meth:`go` unless the call forwards stdin).
        taken: :meth:`go` handed it its call (from then on the supervisor owns it).
    """

    def __init__(self, pid: int, containment: Containment, pipes: dict[bytes, int], stdin: int, go_w: int) -> None:
        self.pid = pid
        self.containment = containment
        self.pipes = pipes
        self.stdin: int | None = stdin
        self.go_w = go_w
        self.taken = False

    @classmethod
    def start(cls, out_fd: int, *, pickle: bool = False) -> Prefork:
        """Fork the task process now; it waits for :meth:`go` (the protocol's ``out_fd`` closed in it) and
        meanwhile loads the modules a session needs (with ``pickle``, the C pickle module too)."""
        containment = Containment("")
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        result_r, result_w = os.pipe()
        in_r, in_w = os.pipe()
        go_r, go_w = os.pipe()

        def start() -> None:  # pragma: no cover - runs in the child
            containment.join()
            _wait_for_call(go_r, out_w, err_w, result_w, in_r, pickle)

        pid = fork_task(start, (out_r, err_r, result_r, in_w, go_w, out_fd if out_fd > 2 else None))
        for fd in (out_w, err_w, result_w, in_r, go_r):
            os.close(fd)
        return cls(pid, containment, {b"O": out_r, b"E": err_r, b"R": result_r}, in_w, go_w)

    def go(self, run_dir: str, options: dict[str, Any], session_bytes: bytes) -> None:
        """Hand the process its call: it runs the task from here on (its containment adopted it first)."""
        self.taken = True
        self.containment.name = os.path.basename(run_dir)
        header = marshal.dumps((run_dir, options, bool(options.get("stdin"))), 4)
        if not options.get("stdin") and self.stdin is not None:
            os.close(self.stdin)
            self.stdin = None
        data = memoryview(b"".join((len(header).to_bytes(8, "big"), header,
                                    len(session_bytes).to_bytes(8, "big"), session_bytes)))
        try:
            while data:
                data = data[os.write(self.go_w, data):]
        except OSError:  # it died before its call: the supervisor finds how it ended
            pass
        finally:
            os.close(self.go_w)

    def drop(self) -> None:
        """End the process if it never got its call (closing its go pipe ends it) and collect it."""
        if self.taken:
            return
        self.taken = True
        for fd in (self.go_w, self.stdin, *self.pipes.values()):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


def _read_exactly(fd: int, size: int) -> bytes:
    parts = []
    while size:
        chunk = os.read(fd, min(size, 1 << 20))
        if not chunk:
            os._exit(0)  # no call came: the runner dropped this process (or died)
        parts.append(chunk)
        size -= len(chunk)
    return b"".join(parts)


def _wait_for_call(go_r: int, out_w: int, err_w: int, result_w: int, in_r: int,
                   pickle: bool) -> None:  # pragma: no cover - runs in the child
    """In the early task process: load what restoring a session takes while the call travels (``pickle``:
    the C pickle module too), read the call from ``go_r``, run it."""
    try:
        from .. import session  # noqa: F401  (the session, serialization and task modules)

        if pickle:
            import _pickle  # noqa: F401
    except Exception:  # the task's own start reports what cannot be imported
        pass
    header = _read_exactly(go_r, int.from_bytes(_read_exactly(go_r, 8), "big"))
    run_dir, options, stdin = marshal.loads(header)
    session_bytes = _read_exactly(go_r, int.from_bytes(_read_exactly(go_r, 8), "big"))
    os.close(go_r)
    if not stdin:
        os.close(in_r)
    run_child(session_bytes, run_dir, options, out_w, err_w, result_w, in_r if stdin else None)
