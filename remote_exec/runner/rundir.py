"""A call's run directory on the host: made private (0700) per call, its own status file, removed whole."""

from __future__ import annotations

import os

from ..protocol import wire

TYPE_CHECKING = False  # typing is not imported at run time: the runner's start-up is on every call's path
if TYPE_CHECKING:
    from typing import Any

__all__ = ["PRIVATE", "RunStatus", "make_run_dir", "new_run_path", "read_status", "rmtree"]

#: The run directory's own private directory: the runner's status, a detached run's output and outcome.
PRIVATE = ".rx"
_STATUS_FILE = "status.json"


def new_run_path(cache_dir: str, options: dict[str, Any]) -> str:
    """A fresh run directory's path (not made; ``runs/`` is)."""
    runs = os.path.join(cache_dir, "runs")
    if not os.path.isdir(runs):
        os.makedirs(runs, mode=0o700, exist_ok=True)
    return os.path.join(runs, f"{options.get('run_id', 'run')}-{os.urandom(4).hex()}")


def make_run_dir(cache_dir: str, options: dict[str, Any], *, private: bool = True) -> str:
    """A new private (0700) run directory for one call; with ``private``, its own ``.rx`` inside (status
    and logs of the runner; a persistent worker's calls keep none there)."""
    runs = os.path.join(cache_dir, "runs")
    run_dir = os.path.join(runs, f"{options.get('run_id', 'run')}-{os.urandom(4).hex()}")
    try:
        os.mkdir(run_dir, 0o700)
    except FileNotFoundError:
        os.makedirs(runs, mode=0o700, exist_ok=True)
        os.mkdir(run_dir, 0o700)
    if private:
        os.mkdir(os.path.join(run_dir, PRIVATE), 0o700)
    return run_dir


class RunStatus:
    """The run's own status file (``.rx/status.json``), rewritten whole (atomically) on every update.

    ``fields`` given at construction are written with the first :meth:`update`.
    """

    def __init__(self, run_dir: str, **fields: object) -> None:
        self.path = os.path.join(run_dir, PRIVATE, _STATUS_FILE)
        self.fields: dict[str, object] = dict(fields)

    def update(self, **fields: object) -> None:
        """Merge ``fields`` into the status and rewrite the file."""
        self.fields.update(fields)
        temporary = self.path + ".tmp"
        with open(temporary, "wb") as stream:
            stream.write(wire.json_bytes(self.fields))
        os.rename(temporary, self.path)


def read_status(run_dir: str) -> dict[str, Any]:
    """The run's status file as written by :class:`RunStatus` (empty if there is none yet)."""
    import json

    try:
        with open(os.path.join(run_dir, PRIVATE, _STATUS_FILE)) as stream:
            status: dict[str, Any] = json.load(stream)
            return status
    except (OSError, ValueError):
        return {}


def rmtree(path: str) -> None:
    """Remove a directory tree, whatever the task left in it (shutil costs the runner too much to import)."""
    try:
        os.rmdir(path)  # most calls leave their run directory empty
        return
    except OSError:
        pass
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            try:
                os.unlink(os.path.join(root, name))
            except OSError:
                pass
        for name in dirs:
            _remove_dir(os.path.join(root, name))
    try:
        os.rmdir(path)
    except OSError:
        pass


def _remove_dir(entry: str) -> None:
    """Remove an emptied directory (or a symlink to one); one the task made unreadable is opened first."""
    try:
        os.unlink(entry) if os.path.islink(entry) else os.rmdir(entry)
    except OSError:
        try:
            os.chmod(entry, 0o700)
            for child in os.listdir(entry):
                os.unlink(os.path.join(entry, child))
            os.rmdir(entry)
        except OSError:
            pass
