"""The errors of remote_exec, all under one root.

::

    RemoteExecError                 exit status 3 unless said otherwise
    ├── ConfigError                 bad configuration or bad input (options, pyproject, host spec)
    │   └── UsageError              exit status 2: a bad option value (--timeout nan, --env 'A B=1')
    ├── PackError                   the distribution archive could not be built
    ├── SyncError                   the project tree cannot travel: too large, a symlink out of it, unreadable
    ├── EnvError                    a task's dependencies: unresolvable, no wheel for the host, install failed
    ├── SessionError                a saved session is damaged or of an unknown format version
    ├── SerializationError          a value could not be serialized or deserialized
    ├── WorkspaceError              the local workspace: unknown or ambiguous run, unreadable state
    │   ├── RunBusy                 another rx process holds the run (one rx attach of a run at a time)
    │   └── LocalDiskFull           the local disk filled up while a result was collected (kept on the host)
    ├── IntegrityError              a file that crossed the link failed its sha256 or HMAC check
    ├── BackendError(host)          exit status 255: the link to a host
    │   ├── ConnectError            host unreachable, refused, name unknown, link lost
    │   ├── AuthError               no accepted key, agent or password
    │   ├── HostKeyError            the host's key changed (or checks refused it)
    │   ├── TransferError           a put or get failed
    │   └── CommandTimeout          exit status 124: a command or task ran past its timeout
    ├── RunnerError                 the remote runner failed (not the task): interpreter missing or too
    │                               old, killed by a signal, out of memory, exit 0 without a result
    ├── Cancelled                   exit status 130: the task was cancelled where it ran, by someone
    │                               else (rx cancel from another shell, the scheduler, an admin)
    └── RemoteError                 the task raised and its exception could not be rebuilt locally

    KeyboardInterrupt
    └── Interrupted                 exit status 130: Ctrl-C or SIGTERM of the coordinator (the remote
                                    task was stopped first)

:class:`Interrupted` is a ``KeyboardInterrupt``, not an ``Exception``: Ctrl-C during a ``@task`` call stops
a sweep whose loop catches ``Exception``, as Ctrl-C during a local call would. It still carries the
``exit_code``, ``message`` and ``hint`` of the tree above.

A remote exception that *can* be rebuilt is raised as its own type; in every case its ``__cause__`` is a
:class:`RemoteTraceback` holding the remote traceback text, as ``concurrent.futures`` does.

Text that came from a host (exception messages, tracebacks, host names it reported, file names, its
stderr) reaches a terminal only through :func:`printable`, which shows control characters as escapes:
a remote ESC or NUL can neither drive the user's terminal nor hide what is written around it.
"""

from __future__ import annotations

__all__ = [
    "AuthError",
    "BackendError",
    "Cancelled",
    "CommandTimeout",
    "ConfigError",
    "ConnectError",
    "EnvError",
    "HostKeyError",
    "IntegrityError",
    "Interrupted",
    "LocalDiskFull",
    "PackError",
    "RemoteError",
    "RemoteExecError",
    "RemoteTraceback",
    "RunBusy",
    "RunnerError",
    "SerializationError",
    "SessionError",
    "SyncError",
    "TransferError",
    "UsageError",
    "WorkspaceError",
    "printable",
]

# Control characters (C0 but tab, DEL, C1) and the bidirectional overrides, shown as escapes. Newlines
# are kept only where the text may span lines (a traceback).
_ESCAPES = {code: f"\\x{code:02x}" for code in (*range(0x20), 0x7F, *range(0x80, 0xA0)) if code != 0x09}
_ESCAPES.update({ord("\n"): "\\n", ord("\r"): "\\r"})
_ESCAPES.update({code: f"\\u{code:04x}" for code in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))})
_ESCAPES_LINES = {code: escape for code, escape in _ESCAPES.items() if code != 0x0A}


def printable(text: object, *, lines: bool = False) -> str:
    """``text`` safe for a terminal: control characters, DEL, C1 controls and bidirectional overrides
    written as escapes (``\\x1b``), lone surrogates as U+FFFD; newlines kept only with ``lines``."""
    value = str(text).translate(_ESCAPES_LINES if lines else _ESCAPES)
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            value = "".join("\ufffd" if 0xD800 <= ord(char) <= 0xDFFF else char for char in value)
    return value



class RemoteExecError(Exception):
    """Root of every error remote_exec raises on its own account.

    Attributes:
        exit_code: The exit status ``rx`` ends with when this error reaches the command line.
        hint: An optional sentence telling the user what to try.
    """

    exit_code: int = 3

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message


class ConfigError(RemoteExecError):
    """Bad configuration or bad user input."""


class UsageError(ConfigError):
    """A bad option value: on the command line (exit status 2), in ``@task(...)`` or ``[tool.rx]``."""

    exit_code = 2


class PackError(RemoteExecError):
    """The distribution archive could not be built."""


class SyncError(RemoteExecError):
    """The project tree cannot travel: larger than the limit, a symlink leading out of it, a file that
    cannot be read or changed while it was sent."""


class EnvError(RemoteExecError):
    """A task's dependencies could not be resolved, fetched or installed on its host (a package without a
    wheel for the host, a version conflict, no uv)."""


class SessionError(RemoteExecError):
    """A saved session is damaged, truncated or of an unknown format version."""


class SerializationError(RemoteExecError):
    """A value could not be serialized or deserialized."""


class WorkspaceError(RemoteExecError):
    """Something in the local workspace: unknown or ambiguous run id, unreadable state."""


class RunBusy(WorkspaceError):
    """Another rx process holds the run: one ``rx attach`` (or ``rx cancel``) of a run at a time.

    Attributes:
        holder: Who holds it: ``pid``, ``hostname``, ``started`` (as far as known).
    """

    def __init__(self, message: str, *, holder: dict[str, object] | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.holder = dict(holder or {})


class LocalDiskFull(WorkspaceError):
    """The local disk (or quota) filled up while a result was collected: nothing of it landed.

    Attributes:
        kept: Where the host keeps the result for another try (``host``, ``run_dir``, ...), or None.
    """

    def __init__(self, message: str, *, kept: dict[str, object] | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.kept = kept


class IntegrityError(RemoteExecError):
    """A file or payload that crossed the link failed its sha256 or HMAC check."""


class BackendError(RemoteExecError):
    """The link to a host failed.

    Attributes:
        host: The host as the user named it (alias or ``[user@]host[:port]``).
    """

    exit_code = 255

    def __init__(self, host: str, message: str, *, hint: str | None = None) -> None:
        super().__init__(f"{host}: {message}", hint=hint)
        self.host = host


class ConnectError(BackendError):
    """The host could not be reached, refused the connection, or the link was lost."""


class AuthError(BackendError):
    """The host refused every key, agent identity or password offered."""


class HostKeyError(BackendError):
    """The host's key does not match the one recorded in known_hosts."""


class TransferError(BackendError):
    """Copying a file to or from the host failed."""


class CommandTimeout(BackendError):
    """A command or task ran past its timeout and was stopped."""

    exit_code = 124


class RunnerError(RemoteExecError):
    """The runner failed rather than the task.

    Attributes:
        reason: A short machine-readable word: ``interpreter-missing``, ``python-too-old``,
            ``signal``, ``oom``, ``no-result``, ``protocol``, ``crashed``.
        host: Where it ran (``local`` for a subprocess run).
    """

    def __init__(self, message: str, *, reason: str = "crashed", host: str = "local",
                 hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.reason = reason
        self.host = host


class Cancelled(RemoteExecError):
    """The task was cancelled where it ran, not by this process (``rx cancel`` from another shell, a
    scheduler's cancel, an administrator): an ordinary error of the call, unlike :class:`Interrupted`."""

    exit_code = 130


class Interrupted(KeyboardInterrupt):
    """The coordinator was interrupted (Ctrl-C or SIGTERM); the remote task was stopped first.

    A ``KeyboardInterrupt`` (not an ``Exception``), so that ``except Exception`` does not swallow Ctrl-C.

    Attributes:
        exit_code: 130, what ``rx`` exits with.
        message: What was interrupted.
        hint: An optional sentence telling the user what to try.
    """

    exit_code: int = 130

    def __init__(self, message: str = "interrupted", *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    __str__ = RemoteExecError.__str__  # "message (hint)", as every rx error reads


class RemoteTraceback(Exception):
    """The text of a remote traceback, attached as ``__cause__`` of a re-raised remote exception."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        # printed under "remote_exec.errors.RemoteTraceback:", from its start; no control character raw
        return "\n" + printable(self.tb.rstrip("\n"), lines=True)


class RemoteError(RemoteExecError):
    """The task raised an exception that could not be rebuilt as its own type.

    Attributes:
        type_name: Qualified name of the remote exception type, e.g. ``mypkg.errors.BadInput`` (what an
            ``except`` clause cannot match: its class is not importable here, or it could not be rebuilt).
        remote_message: ``str()`` of the remote exception.
        formatted: The remote traceback text.
    """

    def __init__(self, type_name: str, remote_message: str, formatted: str) -> None:
        shown = printable(f"{type_name}: {remote_message}" if remote_message else type_name, lines=True)
        super().__init__(shown)
        self.type_name = type_name
        self.remote_message = remote_message
        self.formatted = formatted
