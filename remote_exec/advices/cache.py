"""CachingAdvice: return the stored value of an identical earlier call instead of running it again.

The cache key covers the code (task id, derived from the function's code), the arguments (execution id)
and the Python version and interpreter, so a changed function never returns a stale value. Only
successful results are stored, each atomically (temporary file, fsync, rename), so a crash never leaves a
half-written entry that a later call would read.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import sys
import tempfile
from pathlib import Path

from ..advice import Advice
from ..packing import default_cache_dir
from ..session import Result, Session

__all__ = ["CachingAdvice"]

logger = logging.getLogger(__name__)


class CachingAdvice(Advice):
    """Caches successful results of function tasks on the local disk.

    Args:
        directory: Where entries live (default: ``<user cache>/remote_exec/results``).
    """

    def __init__(self, directory: Path | str | None = None) -> None:
        self.directory = Path(directory) if directory else default_cache_dir().parent / "results"

    def key(self, session: Session) -> str:
        """The cache key of a session: code, arguments, Python version and interpreter."""
        options = session.context.get("options") or {}
        digest = hashlib.sha256()
        for part in (session.task.task_id, session.execution.execution_id, "{}.{}".format(*sys.version_info[:2]),
                     str(options.get("python") or "python3"), str(session.context.get("remote") or "local")):
            digest.update(part.encode() + b"\0")
        return digest.hexdigest()

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.pkl"

    def before(self, session: Session) -> None:
        if session.task.kind != "function":
            session.proceed()
            return
        key = self.key(session)
        path = self._path(key)
        try:
            data = path.read_bytes()
            value = pickle.loads(data)
        except FileNotFoundError:
            session.context["cache_key"] = key
            session.proceed()
            return
        except Exception as exc:  # a damaged entry is a miss, and is replaced
            logger.warning("cache entry %s unreadable (%s); running the task", path, exc)
            session.context["cache_key"] = key
            session.proceed()
            return
        logger.info("cache hit for %s (%s)", session.task.name, key[:12])
        session.conclude(Result(value=value, cached=True))

    def after(self, session: Session) -> None:
        key = session.context.pop("cache_key", None)
        result = session.result
        if key is None or result is None or result.cached or not result.ok:
            return
        try:
            data = pickle.dumps(result.value, protocol=5)
        except Exception as exc:
            logger.info("result of %s not cached: %s", session.task.name, exc)
            return
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        except OSError as exc:  # a cache that cannot be written never fails a task that succeeded
            logger.warning("result of %s not cached: %s", session.task.name, exc)
            return
        try:
            with os.fdopen(fd, "wb") as stream:
                stream.write(data)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, path)
        except OSError as exc:
            Path(temporary).unlink(missing_ok=True)
            logger.warning("result of %s not cached: %s", session.task.name, exc)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
