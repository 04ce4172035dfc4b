"""``remote_exec.Executor``: a :class:`concurrent.futures.Executor` over a pool of hosts and their GPUs.

::

    from remote_exec import Executor, task

    @task
    def train(lr, seed): ...

    with Executor(hosts=["gpu1", "gpu2"], gpus=1) as pool:           # a slot per GPU, one GPU per call
        for loss in pool.map(train, [0.1, 0.01], [1, 2]):           # ordered, lazy, bounded in flight
            print(loss)
        future = pool.submit(train, 0.001, seed=3)                  # concurrent.futures.Future

    losses = list(train.map([(0.1, 1), (0.01, 2)], hosts=["gpu1", "gpu2"], star=True))
    future = train.submit(0.1, seed=1)            # with @task(hosts=[...]): the process's pool of them

Calls run in persistent workers, one per slot (see :mod:`.slots`), so a sweep of small calls costs what a
``keep_warm`` call costs. Each call is one task entry of the process's workspace run, with the host, slot
and GPUs of every attempt. The futures follow the standard library's rules: ``cancel()`` works while a
call waits, ``as_completed`` and ``wait`` take them, a task's exception is the future's exception (with
the remote traceback as its cause), and ``shutdown(wait, cancel_futures=...)`` ends the pool; leaving a
``with`` block by Ctrl-C stops every running call on every host.
"""

from __future__ import annotations

import collections
import getpass
import os
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from concurrent.futures import Executor as _StdExecutor
from concurrent.futures import Future
from types import TracebackType
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, Interrupted
from .engine import BrokenPool, Engine, PoolSettings
from .events import PoolObserver, Tally, Tee
from .output import line_sinks
from .placement import GpuPolicy
from .work import Work

if TYPE_CHECKING:
    from ..api import TaskFunction
    from ..config import Configuration
    from ..coordinator import Coordinator
    from ..session import Session
    from .placement import Slot

__all__ = ["POOL_OPTIONS", "BrokenPool", "Executor", "GpuPolicy", "MapResults", "map_task", "submit_task"]


def _hosts(hosts: Sequence[str] | str | None) -> tuple[str, ...]:
    names = (hosts,) if isinstance(hosts, str) else tuple(hosts or ())
    if not names:
        raise ConfigError("a pool needs at least one host", hint="Executor(hosts=['gpu1', 'gpu2'])")
    if len(set(names)) != len(names):
        raise ConfigError(f"a host is named twice in {list(names)}", hint="use per_host=N for more slots")
    return names


class Executor(_StdExecutor):
    """Runs calls on a pool of hosts: ``per_host`` slots on each (or one per ``gpus`` GPUs of the host).

    Args:
        hosts: The hosts (ssh_config aliases, ``[tool.rx.remotes]`` names or ``[user@]host[:port]``).
        per_host: Slots per host; default: one per ``gpus`` GPUs the host has, or 1 when calls use no GPU.
        gpus: GPUs each call holds; the call sees them as CUDA_VISIBLE_DEVICES (0: no GPU).
        retries: How many times a call is tried again after a failure that was not its own (a host that
            dropped or never answered, a worker that crashed), on another host when there is one.
        retry_on: Exception types of the task itself that are tried again too (within ``retries``).
        gpu_policy: When a GPU rx does not hold counts as taken anyway (foreign processes, utilization).
        progress: True: a live view on stderr (a line per call when it is not a terminal); or a
            :class:`~remote_exec.pool.events.PoolObserver` of your own.
        config: The configuration hosts are resolved in (default: the project's).
        coordinator: The coordinator to run through (default: this process's).
        max_in_flight: ``map`` keeps at most this many calls submitted ahead of the results read
            (default: 8 per slot, at least 32).
        **options: Task options for every call (``timeout``, ``python``, ``backend``, ``env``, ``pull``,
            ...), under those of a ``@task`` function's own.
    """

    def __init__(self, hosts: Sequence[str] | str, *, per_host: int | None = None, gpus: int = 0,
                 retries: int = 2, retry_on: tuple[type[BaseException], ...] = (),
                 gpu_policy: GpuPolicy | None = None, progress: bool | PoolObserver | None = None,
                 config: Configuration | None = None, coordinator: Coordinator | None = None,
                 max_in_flight: int | None = None, **options: Any) -> None:
        from ..coordinator import Coordinator

        if per_host is not None and per_host < 1:
            raise ConfigError(f"per_host must be at least 1, not {per_host}")
        if gpus < 0 or retries < 0:
            raise ConfigError("gpus and retries must not be negative")
        names = _hosts(hosts)
        self.coordinator = coordinator or Coordinator.current()
        self.cwd = os.getcwd()
        self.config = config or self.coordinator.config_for(self.cwd)
        self.options = dict(options)
        view = _progress_view(progress)
        self.tally = view if isinstance(view, Tally) else Tally()
        settings = PoolSettings(hosts=names, per_host=per_host, gpus=gpus, retries=retries,
                                retry_on=tuple(retry_on), config=self.config, cwd=self.cwd,
                                gpu_request=(gpu_policy or GpuPolicy()).request(gpus), options=self.options)
        observer = Tee(self.tally, view) if view is not None and view is not self.tally else self.tally
        self._engine = Engine(settings, self.coordinator, observer, owner=self._owner())
        self.max_in_flight = max_in_flight or max(32, 8 * len(names) * (per_host or 1))
        self._lines = threading.Lock()
        self._tasks: dict[Any, tuple[TaskFunction[Any], Configuration, list[Any], dict[str, Any]]] = {}
        self._slots_hint = len(names) * (per_host or 1)

    def _owner(self) -> dict[str, Any]:
        from ..workspace.manager import Workspace

        try:
            user = getpass.getuser()
        except Exception:  # no name for this uid
            user = str(os.getuid())
        return {"user": user, "workspace": str(Workspace.resolve(self.config.workspace).root),
                "run_id": self.coordinator.process_run_id()}

    # -- the Executor interface -----------------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        """Run ``fn(*args, **kwargs)`` on a slot of the pool; return its future.

        ``fn`` is a ``@task`` function (its chain and options apply) or any function (made a task here).

        Raises:
            BrokenPool: Every host of the pool is lost.
            RuntimeError: The executor is shut down.
        """
        known = self._tasks.get(fn) if isinstance(fn, Hashable) else None
        if known is None:
            known = self._known(fn)
            if isinstance(fn, Hashable) and len(self._tasks) < 1024:
                self._tasks[fn] = known
        function, config, chain, base = known
        engine = self._engine
        index = engine.next_index()
        future: Future[Any] = Future()
        label = f"{getattr(function, '__name__', 'call')}[{index}]"
        work = Work(index=index, key=f"{engine.pool_id}-{index:05d}", label=label, future=future,
                    make_session=lambda slot: self._session(function, args, kwargs, slot, config, base, label),
                    chain=chain, extensions=tuple(config.extensions), code=function.task.task_id)
        engine.submit(work)
        return future

    def _known(self, fn: Callable[..., Any]) -> tuple[TaskFunction[Any], Configuration, list[Any], dict[str, Any]]:
        """What every call of ``fn`` shares: the task, its configuration, its chain, its task options."""
        from ..chains import chain_for

        function = _as_task(fn)
        config = function.config or self.config
        options = {key: value for key, value in {**self.options, **function.options}.items()
                   if key not in POOL_OPTIONS}
        return function, config, chain_for(config, function.chain), options

    def _session(self, function: TaskFunction[Any], args: tuple[Any, ...], kwargs: dict[str, Any], slot: Slot,
                 config: Configuration, base: dict[str, Any], label: str) -> Session:
        options = {**base, "keep_warm": True, "slot": slot.name, "placement": slot.placement} if slot.warm else base
        session = self.coordinator.task_session(function.task, args, kwargs, remote=slot.host, options=options,
                                                config=config, cwd=self.cwd)
        if self._slots_hint > 1 or len(self._engine.hosts[slot.host].slots) > 1:
            out, err = line_sinks(f"[{label}] ", self._lines)
            session.local["sinks"] = (out.write_bytes, err.write_bytes)
        return session

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int = 1, buffersize: int | None = None, return_exceptions: bool = False) -> Iterator[Any]:
        """``fn`` over the items of ``iterables`` on the pool: results in order, as they are read.

        Lazy: at most ``buffersize`` calls (default :attr:`max_in_flight`) are submitted ahead of the
        results read, so a long (or endless) iterable is fine. A call's exception is raised when its
        result is reached (the calls not yet run are cancelled then), or, with ``return_exceptions``,
        yielded in its place. ``timeout`` counts from this call, as in the standard library.
        """
        del chunksize  # one call per item: a slot's worker makes small calls cheap already
        return MapResults(self, fn, zip(*iterables, strict=False), timeout=timeout,
                          window=buffersize or self.max_in_flight, return_exceptions=return_exceptions)

    def starmap(self, fn: Callable[..., Any], iterable: Iterable[Sequence[Any]], *, timeout: float | None = None,
                buffersize: int | None = None, return_exceptions: bool = False) -> Iterator[Any]:
        """:meth:`map` with each item's elements as the arguments (as :func:`itertools.starmap`)."""
        return MapResults(self, fn, (tuple(item) for item in iterable), timeout=timeout,
                          window=buffersize or self.max_in_flight, return_exceptions=return_exceptions)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False, interrupt: bool = False) -> None:
        """No more calls; release the hosts once the calls submitted are done.

        Args:
            wait: Return once every call ended and every slot released its host (its GPUs).
            cancel_futures: Cancel the calls that have not started.
            interrupt: Also stop the calls running now (their futures raise ``Interrupted``).
        """
        self._engine.shutdown(wait=wait, cancel_futures=cancel_futures, interrupt=interrupt)

    def __exit__(self, exc_type: type[BaseException] | None, exc_val: BaseException | None,
                 exc_tb: TracebackType | None) -> None:
        stop = exc_type is not None and issubclass(exc_type, (KeyboardInterrupt, Interrupted))
        self.shutdown(wait=True, cancel_futures=stop, interrupt=stop)

    # -- more ------------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The pool now: calls queued, running, done and failed (per host too), calls per second, seconds
        left, and every slot's state (``waiting`` for GPUs says what holds them)."""
        snapshot = self.tally.snapshot()
        snapshot["slots"] = {slot.label: {"state": slot.state, "detail": slot.detail, "gpus": slot.gpu_indices}
                             for host in self._engine.hosts.values() for slot in host.slots}
        snapshot["host_states"] = {name: host.status for name, host in self._engine.hosts.items()}
        return snapshot

    @property
    def broken(self) -> BrokenPool | None:
        """Why the pool broke (every host lost), or None."""
        return self._engine.broken


class MapResults(Iterator[Any]):
    """The results of :meth:`Executor.map`, in order; submits more calls as results are read."""

    def __init__(self, executor: Executor, fn: Callable[..., Any], items: Iterator[tuple[Any, ...]], *,
                 timeout: float | None, window: int, return_exceptions: bool) -> None:
        self.executor = executor
        self.fn = fn
        self._items = items
        self._pending: collections.deque[Future[Any]] = collections.deque()
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._window = max(1, window)
        self._return_exceptions = return_exceptions
        self._exhausted = False
        self._fill()

    def _fill(self) -> None:
        while not self._exhausted and len(self._pending) < self._window:
            try:
                args = next(self._items)
            except StopIteration:
                self._exhausted = True
                return
            self._pending.append(self.executor.submit(self.fn, *args))

    def __next__(self) -> Any:
        if not self._pending:
            raise StopIteration
        future = self._pending.popleft()
        try:
            left = None if self._deadline is None else self._deadline - time.monotonic()
            try:
                value = future.result(left)
            except BaseException as exc:
                if isinstance(exc, KeyboardInterrupt) or not future.done():  # Ctrl-C, or the map's timeout
                    raise
                if not self._return_exceptions or future.cancelled():
                    raise
                value = exc
        except BaseException as exc:
            self.close(interrupt=isinstance(exc, KeyboardInterrupt))
            raise
        self._fill()
        return value

    def close(self, *, interrupt: bool = False) -> None:
        """Cancel the calls not started (``interrupt``: stop the running ones too, on every host)."""
        self._exhausted = True
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        if interrupt:
            self.executor.shutdown(wait=False, cancel_futures=True, interrupt=True)

    def __del__(self) -> None:
        try:
            for future in self._pending:
                future.cancel()
        except Exception:
            pass


def _as_task(fn: Callable[..., Any]) -> TaskFunction[Any]:
    """``fn`` if it is a ``@task`` function, else ``fn`` made one (the default chain, no options)."""
    if getattr(fn, "rx_task_function", False):
        return fn  # type: ignore[return-value]
    if not callable(fn):
        raise TypeError(f"{fn!r} is not callable")
    return _Plain(fn)  # type: ignore[return-value]


class _Plain:
    """A plain function as the pool sees a ``@task`` function (without importing ``api``, which imports
    this module when ``task.map`` is called)."""

    rx_task_function = True

    def __init__(self, function: Callable[..., Any]) -> None:
        from ..task import Task

        self.function = function
        self.__name__ = getattr(function, "__name__", type(function).__name__)
        self.task = Task.from_function(function)
        self.options: dict[str, Any] = {}
        self.config: Configuration | None = None
        self.chain = "default"
        self.remote: str | None = None


def _progress_view(progress: bool | PoolObserver | None) -> PoolObserver | None:
    if isinstance(progress, PoolObserver):
        return progress
    if progress:
        from .progress import ProgressView

        return ProgressView()
    return None


class _OwnedResults(Iterator[Any]):
    """Map results whose executor is shut down when they are exhausted, closed or dropped."""

    def __init__(self, executor: Executor, results: MapResults) -> None:
        self.executor = executor
        self.results = results

    def __next__(self) -> Any:
        try:
            return next(self.results)
        except StopIteration:
            self.executor.shutdown(wait=True)
            raise
        except KeyboardInterrupt:
            self.executor.shutdown(wait=True, cancel_futures=True, interrupt=True)
            raise
        except BaseException:
            self.executor.shutdown(wait=False, cancel_futures=True)
            raise

    def close(self) -> None:
        """Stop: cancel what has not run, let the pool go."""
        self.results.close()
        self.executor.shutdown(wait=False, cancel_futures=True)

    def __del__(self) -> None:
        try:
            self.executor.shutdown(wait=False, cancel_futures=True)
        except Exception:
            pass


def map_task(function: TaskFunction[Any], iterables: Sequence[Iterable[Any]], *, hosts: Sequence[str] | str | None,
             star: bool = False, return_exceptions: bool = False, timeout: float | None = None,
             **executor_options: Any) -> Iterator[Any]:
    """``TaskFunction.map``: the function over the items, on a pool of its own (shut down at the end)."""
    executor = Executor(_task_hosts(function, hosts), **{**_pool_options(function), **executor_options})
    if star:
        if len(iterables) != 1:
            raise TypeError("star=True takes one iterable of argument tuples")
        results = executor.starmap(function, iterables[0], timeout=timeout, return_exceptions=return_exceptions)
    else:
        results = executor.map(function, *iterables, timeout=timeout, return_exceptions=return_exceptions)
    assert isinstance(results, MapResults)
    return _OwnedResults(executor, results)


def submit_task(function: TaskFunction[Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Future[Any]:
    """``TaskFunction.submit``: one call on the pool of the task's hosts (one pool per set of hosts in the
    process, kept by the coordinator and shut down at exit)."""
    from ..coordinator import Coordinator

    coordinator = Coordinator.current()
    hosts = _hosts(_task_hosts(function, None))
    options = _pool_options(function)
    key = (hosts, tuple(sorted(options.items())), id(function.config))
    executor: Executor = coordinator.pool_for(key, lambda: Executor(hosts, config=function.config,
                                                                    coordinator=coordinator, **options))
    return executor.submit(function, *args, **kwargs)


#: The @task options that shape a pool rather than a call.
POOL_OPTIONS = ("hosts", "per_host", "gpus", "retries")


def _task_hosts(function: TaskFunction[Any], hosts: Sequence[str] | str | None) -> Sequence[str] | str:
    names = hosts or function.options.get("hosts") or function.remote
    if not names:
        raise ConfigError(f"{getattr(function, '__name__', 'the task')} has no hosts to run on",
                          hint="@task(hosts=['gpu1', 'gpu2']) or task.map(items, hosts=[...])")
    return names


def _pool_options(function: TaskFunction[Any]) -> dict[str, Any]:
    return {key: function.options[key] for key in ("per_host", "gpus", "retries") if key in function.options}
