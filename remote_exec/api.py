"""The ``@task`` decorator and what a decorated call does on the coordinator.

Calling a :class:`TaskFunction` builds the call's :class:`~remote_exec.session.Session` and drives it through
its advice chain (:mod:`remote_exec.chains`); the executing advice at the end of the chain hands it to the
process's :class:`~remote_exec.coordinator.Coordinator`. Inside a running task (on the remote, or in a
local subprocess) a decorated function is called in place.

This module travels with the rest of the package, because task modules apply ``@task`` at import time on
the remote too; the coordinator's machinery is imported only when a call actually runs through a chain.
"""

from __future__ import annotations

import os
import sys

from .task import INSIDE_RUNNER_ENV, Task

TYPE_CHECKING = False  # neither typing nor the coordinator at import: the runner imports this package per call
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Sequence
    from concurrent.futures import Future
    from typing import Any, Generic, TypeVar, overload

    from .early import EarlyConnection

    R = TypeVar("R")
else:
    R = None

    class Generic:
        """Stands in for typing.Generic at run time: ``TaskFunction[int]`` stays subscriptable."""

        def __class_getitem__(cls, item: object) -> type:
            return cls

    def overload(function: object) -> object:
        return function


__all__ = ["TaskFunction", "for_caller", "get_run_id", "run_task", "set_run_id", "task"]


class TaskFunction(Generic[R]):
    """What ``@task`` returns: calling it runs the function through the configured advice chain.

    Attributes:
        function: The undecorated function.
        remote: The host (alias, ``[tool.rx.remotes]`` name or ``[user@]host[:port]``), or None for the
            configuration's default.
        chain: The name of the advice chain to use.
        config: A :class:`remote_exec.config.Configuration`, or None for the project's configuration.
        options: Further per-task options (``timeout``, ``python``, ``backend``, ``keep_warm``, ...),
            available to advices in the session context.
    """

    #: Marks task wrappers for :func:`remote_exec.task.unwrap` (which must not import this module).
    rx_task_function = True

    def __init__(self, function: Callable[..., R], *, remote: str | None = None, chain: str = "default",
                 config: Any = None, options: dict[str, Any] | None = None) -> None:
        for attribute in ("__module__", "__name__", "__qualname__", "__doc__"):
            try:
                setattr(self, attribute, getattr(function, attribute))
            except AttributeError:
                pass
        self.__dict__.update(getattr(function, "__dict__", {}))
        self.__wrapped__ = function
        self.function = function
        self.remote = remote
        self.chain = chain
        self.config = config
        self.options = dict(options or {})
        self._task: Task | None = None

    @property
    def task(self) -> Task:
        """The :class:`Task` for the function (computed once)."""
        if self._task is None:
            self._task = Task.from_function(self.function)
        return self._task

    def __call__(self, *args: Any, **kwargs: Any) -> R:
        if os.environ.get(INSIDE_RUNNER_ENV):
            return self.function(*args, **kwargs)
        try:
            return run_task(self, args, kwargs)  # type: ignore[no-any-return]
        except BaseException as exc:
            if os.environ.get("RX_DEBUG"):
                raise
            failure = for_caller(exc)
        raise failure  # what the call raised; rx's own frames are left out (RX_DEBUG=1 keeps them)

    def map(self, iterable: Iterable[Any], *iterables: Iterable[Any], hosts: Sequence[str] | str | None = None,
            star: bool = False, return_exceptions: bool = False, timeout: float | None = None,
            **pool_options: Any) -> Iterator[R]:
        """The task over the items, on a pool of hosts (a :class:`remote_exec.Executor` of its own, shut
        down once the results are read): results in order, lazily.

        Args:
            iterable: The first argument of each call (more iterables: the next arguments, as ``map``).
            hosts: The hosts (default: ``@task(hosts=[...])``, else its ``remote``).
            star: Each item is a tuple of the call's arguments (as :func:`itertools.starmap`).
            return_exceptions: Yield a call's exception in its place rather than raise it.
            timeout: Seconds from now for every result (``TimeoutError`` past it).
            **pool_options: :class:`remote_exec.Executor` options: ``per_host``, ``gpus``, ``retries``,
                ``retry_on``, ``progress``, ...
        """
        from .pool.executor import map_task

        return map_task(self, (iterable, *iterables), hosts=hosts, star=star, return_exceptions=return_exceptions,
                        timeout=timeout, **pool_options)

    def submit(self, *args: Any, **kwargs: Any) -> Future[R]:
        """Start one call on the task's pool (``@task(hosts=[...], per_host=..., gpus=...)``, else its
        ``remote``); return its :class:`concurrent.futures.Future`. The process keeps one pool per set of
        hosts and options, shut down at exit."""
        from .pool.executor import submit_task

        return submit_task(self, args, kwargs)

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        if instance is None:
            return self
        import types

        return types.MethodType(self, instance)

    def __repr__(self) -> str:
        return f"<task {self.function.__module__}:{self.function.__qualname__} remote={self.remote!r}>"


@overload
def task(function: Callable[..., R], /) -> TaskFunction[R]: ...


@overload
def task(*, remote: str | None = None, chain: str = "default", config: Any = None,  # noqa: F811
         **options: Any) -> Callable[[Callable[..., R]], TaskFunction[R]]: ...


def task(function: Callable[..., R] | None = None, /, *, remote: str | None = None, chain: str = "default",  # noqa: F811
         config: Any = None, **options: Any) -> TaskFunction[R] | Callable[[Callable[..., R]], TaskFunction[R]]:
    """Make a function a task: calling it runs it through an advice chain (remotely, cached, logged).

    Use bare (``@task``) or with options (``@task(remote="gpu1", timeout=600)``).

    Args:
        function: The function (when used bare).
        remote: The host to run on; None runs through the chain's own default (a local subprocess when
            the chain has no remote advice).
        chain: Name of the advice chain in the configuration.
        config: A Configuration to use instead of the project's.
        **options: Per-task options for advices: ``timeout`` (seconds), ``python`` (remote interpreter),
            ``backend`` (openssh or paramiko), ``ssh_config`` (the file to read instead of ``~/.ssh/config``:
            a path or a string), ``env`` (a dict), ``secret_env`` (names of local variables
            passed over the channel only), ``workdir`` (remote cache dir), ``keep_warm`` (a persistent
            worker), ``pull`` (file globs), ``no_pull``, ``pull_limit`` (bytes), ``restricted`` and
            ``allow_unpickle`` (unpickle results through an allow-list), ``keepalive_interval`` /
            ``keepalive_count``, ``slurm`` (a dict of Slurm settings over the remote's: ``partition``,
            ``time``, ``gres``, ... ``extra``; on a remote without a scheduler it makes the host a Slurm login
            node), ``keep_queued`` (Ctrl-C leaves the job queued instead of cancelling it); for the project
            the call runs in (a snapshot of it on the host): ``project`` (its root; False: none, the archive
            carries the code), ``include`` (gitignore patterns of ignored paths that travel),
            ``follow_symlinks``, ``force`` (above 2 GiB); for ``.map`` and ``.submit``, the pool's ``hosts``,
            ``per_host``, ``gpus`` and ``retries``.
    """
    if function is not None:
        if not callable(function):
            raise TypeError("@task decorates a function")
        return TaskFunction(function)

    def decorate(fn: Callable[..., R]) -> TaskFunction[R]:
        if not callable(fn):
            raise TypeError("@task decorates a function")
        return TaskFunction(fn, remote=remote, chain=chain, config=config, options=options)

    return decorate


def run_task(function: TaskFunction[Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run one call of a ``@task`` function through its chain; return its value or raise its exception."""
    early = _connect_first(function) if "remote_exec.coordinator" not in sys.modules else None
    from .advice import run_chain
    from .chains import chain_for
    from .coordinator import Coordinator

    coordinator = Coordinator.current()
    cwd = os.getcwd()
    config = function.config or coordinator.config_for(cwd)
    advices = chain_for(config, function.chain)
    session = coordinator.task_session(function.task, args, kwargs, remote=function.remote,
                                       options=function.options, config=config, cwd=cwd)
    if early is not None:  # (rx's machinery is imported now: no second head start when it does not fit)
        from .early import adopt

        session.local["backend_ahead"] = adopt(early, config, function.remote or "", dict(function.options))
    return run_chain(session, advices, config.extensions).unwrap()


#: The options of a ``@task`` that may change which ssh master its host gets (the memo's key holds them).
_CONNECTION_OPTIONS = ("host_key_policy", "connect_timeout", "keepalive_interval", "keepalive_count", "scheduler",
                       "slurm_args")


def _memo_words(function: TaskFunction[Any]) -> dict[str, str] | None:
    """The words of the prestart memo's key for ``function``'s host (:func:`remote_exec.prestart.memo_key`),
    or None when its configuration is an object of the caller's (nothing to key it by)."""
    if function.config is not None:
        return None
    options = function.options
    return {"remote": str(function.remote), "backend": str(options.get("backend") or ""),
            "ssh_config": str(options.get("ssh_config") or ""),
            "task": repr([(name, options.get(name)) for name in _CONNECTION_OPTIONS if name in options])}


def _connect_first(function: TaskFunction[Any]) -> EarlyConnection | None:
    """The first call of a process to a host: start the ssh master its last such call used, from the memo
    (:mod:`remote_exec.prestart`), then connecting before rx's machinery is imported (see
    :mod:`remote_exec.early`)."""
    if not isinstance(function.remote, str) or not function.remote:
        return None
    words = _memo_words(function)
    key = None
    if words is not None:
        from . import prestart

        key = prestart.start(words)
    try:
        from .config import Configuration

        config = function.config or Configuration.load()
    except Exception:  # the call itself reports a broken configuration
        return None
    from .early import connect_early

    memo = None if key is None else (key, tuple(str(path) for path in (config.source,) if path is not None))
    return connect_early(config, function.remote, dict(function.options), prestart_memo=memo)


def for_caller(exc: BaseException) -> BaseException:
    """What a ``@task`` call raises in its caller for ``exc``: the same exception without the frames of rx's
    own machinery (the caller sees its line, then the task's remote traceback as the cause); an interrupted
    call as a plain ``KeyboardInterrupt``, so that Python ends the script as it does on Ctrl-C (by SIGINT:
    a shell loop around it stops too)."""
    from .errors import Interrupted

    if isinstance(exc, Interrupted):
        interrupt = KeyboardInterrupt(str(exc))
        interrupt.__suppress_context__ = True
        return interrupt
    return exc.with_traceback(None)


def set_run_id(run_id: str) -> None:
    """Record the @task calls of this process under ``run_id`` (as bandsaw's ``set_run_id``)."""
    from .coordinator import Coordinator

    Coordinator.current().run_id = run_id


def get_run_id() -> str | None:
    """The run id @task calls of this process are recorded under (None until the first call)."""
    from .coordinator import Coordinator

    return Coordinator.current().run_id
