"""``rx map``: a script over a grid of argument values, across a pool of hosts.

The axes come after the script, GNU parallel's way: ``:::`` starts an axis, its values run until the next
word that looks like an option (``-x``, ``--name``; a negative number is a value), the next ``:::`` (a new
positional axis) or a lone ``--`` (which ends the axis and is dropped). The word before ``:::`` names the
axis: ``--lr ::: 0.1 0.01`` gives ``--lr 0.1`` and ``--lr 0.01``. Every combination of the axes is one
run (the Cartesian product, first axis slowest)::

    rx map -r gpu1 -r gpu2 train.py --epochs 3 --lr ::: 0.1 0.01 0.001 --seed ::: 1 2     # 6 runs

``--grid FILE`` adds axes (or whole combinations) from a file: JSON or TOML ``{"--lr": [0.1, 0.01]}``
(axes), JSON ``[{"--lr": 0.1, "--seed": 1}, ...]`` (combinations), or CSV with the options as its header
row (a row per combination). A value ``true`` is the option alone; ``false`` or empty leaves it out.

The ledger gets one parent run (kind ``sweep``) whose task board has a line per combination (its
arguments, host, GPUs, status, exit code, its attempts and its child run), and a child run per combination
(kind ``script``, ``sweep: {parent, index, label}`` in its state) with its own logs, result and files.
``rx rerun PARENT --failed`` runs the combinations that did not finish as a new sweep and merges the rest.
"""

from __future__ import annotations

import csv
import itertools
import json
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import Cancelled, ConfigError, Interrupted
from .events import PoolObserver
from .output import line_sinks
from .work import Work

if TYPE_CHECKING:
    from ..config import Configuration
    from ..session import Result, Session
    from ..task import Task
    from ..workspace.manager import Run, Workspace
    from .engine import Engine
    from .placement import Slot

__all__ = ["Axis", "Combination", "Grid", "Sweep", "SweepPlan", "grid_of", "parse_grid", "read_grid_file",
           "run_sweep"]

#: Separates an axis's values, as in GNU parallel.
AXIS = ":::"


@dataclass(frozen=True)
class Axis:
    """One axis of a sweep.

    Attributes:
        name: What labels call it (the option without its dashes, or ``argN``).
        option: The option its values follow (``--lr``), or None for a positional axis.
        values: Its values, in order.
    """

    name: str
    option: str | None
    values: tuple[str | None, ...]


@dataclass(frozen=True)
class Combination:
    """One run of a sweep.

    Attributes:
        index: Its number (0, 1, ...).
        args: The script's arguments.
        values: Each axis's value, by axis name.
    """

    index: int
    args: tuple[str, ...]
    values: tuple[tuple[str, str], ...]

    @property
    def label(self) -> str:
        """``lr=0.1 seed=2``."""
        return " ".join(f"{name}={value}" for name, value in self.values) or f"#{self.index}"

    @property
    def key(self) -> str:
        """Its line on the parent run's board."""
        return f"{self.index:04d}"


@dataclass(frozen=True)
class Grid:
    """The script's fixed words and the axes between them.

    Attributes:
        parts: Fixed words (str), and axis positions (int: an index into ``axes``).
        axes: The axes.
        rows: Whole combinations from a grid file (each a list of (option, value)), appended after the
            axes' product; empty when the file gave axes.
    """

    parts: tuple[str | int, ...]
    axes: tuple[Axis, ...]
    rows: tuple[tuple[tuple[str, str | None], ...], ...] = ()

    def combinations(self) -> list[Combination]:
        """Every combination, first axis slowest (times every grid-file row, if any)."""
        rows = self.rows or ((),)
        found: list[Combination] = []
        for chosen in itertools.product(*(axis.values for axis in self.axes)):
            for row in rows:
                args: list[str] = []
                for part in self.parts:
                    if isinstance(part, str):
                        args.append(part)
                        continue
                    axis, value = self.axes[part], chosen[part]
                    args.extend(_option_words(axis.option, value))
                for option, value in row:
                    args.extend(_option_words(option, value))
                values = [(axis.name, value) for axis, value in zip(self.axes, chosen, strict=True)
                          if value is not None]
                values += [(_axis_name(option, 0), value if value is not None else "-") for option, value in row]
                found.append(Combination(index=len(found), args=tuple(args),
                                         values=tuple((name, str(value)) for name, value in values)))
        return found

    def record(self) -> dict[str, Any]:
        """The grid as the parent run keeps it."""
        return {"parts": list(self.parts), "axes": [{"name": a.name, "option": a.option, "values": list(a.values)}
                                                    for a in self.axes],
                "rows": [[list(pair) for pair in row] for row in self.rows]}


def grid_of(record: dict[str, Any]) -> Grid:
    """The grid a parent run recorded (:meth:`Grid.record`)."""
    axes = tuple(Axis(name=str(a["name"]), option=a.get("option"), values=tuple(a.get("values") or ()))
                 for a in record.get("axes") or [])
    rows = tuple(tuple((str(option), value) for option, value in row) for row in record.get("rows") or [])
    return Grid(parts=tuple(record.get("parts") or ()), axes=axes, rows=rows)


def _option_words(option: str | None, value: str | None) -> list[str]:
    """The words for one value: ``--lr 0.1``; ``true``: the option alone; None: nothing."""
    if value is None:
        return []
    if option is None:
        return [value]
    if value == "true":
        return [option]
    return [option, value]


def _is_option(word: str) -> bool:
    if word == "--" or not word.startswith("-") or word == "-":
        return False
    try:
        float(word)
    except ValueError:
        return True
    return False


def _axis_name(option: str | None, position: int) -> str:
    return option.lstrip("-") if option else f"arg{position}"


def parse_grid(words: Sequence[str]) -> Grid:
    """The fixed words and ``:::`` axes of ``rx map``'s arguments (after the script).

    Raises:
        ConfigError: An axis without values, or two axes of one name.
    """
    parts: list[str | int] = []
    axes: list[Axis] = []
    index = 0
    while index < len(words):
        word = words[index]
        if word != AXIS:
            parts.append(word)
            index += 1
            continue
        option = None
        if parts and isinstance(parts[-1], str) and _is_option(parts[-1]):
            option = str(parts.pop())
        index += 1
        values: list[str | None] = []
        while index < len(words) and words[index] != AXIS and not _is_option(words[index]):
            if words[index] == "--":
                index += 1
                break
            values.append(words[index])
            index += 1
        name = _axis_name(option, len(axes))
        if not values:
            raise ConfigError(f"the axis {name} after ':::' has no values")
        if any(axis.name == name for axis in axes):
            raise ConfigError(f"two axes are named {name}")
        parts.append(len(axes))
        axes.append(Axis(name=name, option=option, values=tuple(values)))
    return Grid(parts=tuple(parts), axes=tuple(axes))


def _grid_value(value: Any) -> str | None:
    if value is None or value is False or value == "":
        return None
    if value is True:
        return "true"
    return str(value)


def read_grid_file(path: Path, grid: Grid) -> Grid:
    """``grid`` with the axes or combinations of a ``--grid`` file added.

    Raises:
        ConfigError: The file cannot be read or is not one of the shapes in the module's docstring.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--grid {path}: {exc.strerror or exc}") from exc
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            rows = list(csv.DictReader(text.splitlines()))
            return _with_rows(grid, [{key: row[key] for key in row if key} for row in rows], path)
        data: Any = _toml(text) if suffix == ".toml" else json.loads(text)
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"--grid {path}: {exc}") from exc
    if isinstance(data, list) and all(isinstance(item, dict) for item in data):
        return _with_rows(grid, data, path)
    if isinstance(data, dict) and all(isinstance(values, list) for values in data.values()):
        return _with_axes(grid, data, path)
    raise ConfigError(f"--grid {path}: expected an object of lists (axes) or a list of objects (combinations)")


def _with_axes(grid: Grid, data: dict[str, list[Any]], path: Path) -> Grid:
    """``grid`` with an axis per key of ``data`` (an option, or a positional axis for a key without dashes)."""
    axes = list(grid.axes)
    parts = list(grid.parts)
    for key, values in data.items():
        option = key if key.startswith("-") else None
        name = _axis_name(option, len(axes))
        if not values or any(axis.name == name for axis in axes):
            raise ConfigError(f"--grid {path}: the axis {key} is empty or named twice")
        parts.append(len(axes))
        axes.append(Axis(name=name, option=option, values=tuple(_grid_value(value) for value in values)))
    return Grid(parts=tuple(parts), axes=tuple(axes), rows=grid.rows)


def _toml(text: str) -> Any:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]
    return tomllib.loads(text)


def _with_rows(grid: Grid, rows: list[dict[str, Any]], path: Path) -> Grid:
    if not rows:
        raise ConfigError(f"--grid {path} lists no combinations")
    return Grid(parts=grid.parts, axes=grid.axes,
                rows=tuple(tuple((str(key), _grid_value(value)) for key, value in row.items()) for row in rows))


# -- running a sweep ---------------------------------------------------------------------------------------


class Sweep(PoolObserver):
    """One sweep: its parent run, a child run per combination, and their records as the pool runs them.

    Args:
        workspace: Where the runs are recorded.
        task: The script (or module) task.
        config: The configuration hosts are resolved in.
        hosts: The hosts.
        options: The task options of every run (``python``, ``timeout``, ``env``, ...).
        prefix: Prefix each output line with its combination (more than one run at a time).
    """

    def __init__(self, workspace: Workspace, task: Task, config: Configuration, hosts: Sequence[str],
                 options: dict[str, Any], *, prefix: bool) -> None:
        self.workspace = workspace
        self.task = task
        self.config = config
        self.hosts = list(hosts)
        self.options = dict(options)
        self.prefix = prefix
        self.parent: Run | None = None
        self.shape: dict[str, Any] = {}
        self.children: dict[int, Run] = {}
        self.combinations: dict[int, Combination] = {}
        self._sessions: dict[int, Session] = {}
        self._recorders: dict[int, Any] = {}
        self._lines = threading.Lock()
        self._board = threading.Lock()

    def open(self, grid: Grid, combinations: Sequence[Combination], *, argv: list[str], backend: str,
             kind_target: str, previous: Run | None = None, merged: Sequence[str] = ()) -> Run:
        """Create a child run per combination to run (pending), then the parent run (so that ``latest``
        names the sweep) with its board: a line per combination; return the parent."""
        from ..session import Session
        from ..task import Execution

        for combination in combinations:
            if combination.key not in merged:
                self.children[combination.index] = self.workspace.new_run(
                    target=kind_target, kind="script", argv=list(combination.args), remote=None, backend=backend)
                self.combinations[combination.index] = combination
        def saved(run_id: str) -> bytes:  # in the run before it is listed: a listed sweep can be rerun
            session = Session(task=self.task, execution=Execution.create(self.task, ()), run_id=run_id,
                              serializer="pickle", context={"remote": None, "options": self.options, "origin": "cli"})
            return bytes(session.dumps())

        parent = self.workspace.new_run(target=kind_target, kind="sweep", argv=argv, remote=",".join(self.hosts),
                                        backend=backend, parent=previous.id if previous is not None else None,
                                        session=saved)
        parent.update(sweep={"grid": grid.record(), "hosts": self.hosts, "combinations": len(combinations),
                             **self.shape})
        if previous is not None and merged:
            parent.merge_done(previous)
        changes = []
        for index, child in self.children.items():
            combination = self.combinations[index]
            child.update(sweep={"parent": parent.id, "index": index, "label": combination.label})
            changes.append((combination.key, {"name": combination.label, "args": list(combination.args),
                                              "values": [list(v) for v in combination.values], "status": "pending",
                                              "run": child.id}))
        parent.board.apply(changes)
        parent.set_status("running")
        self.parent = parent
        return parent

    def submit(self, engine: Engine, combination: Combination) -> Work:
        """Queue one combination (its child run was made by :meth:`open`)."""
        from ..advices.remote import RemoteAdvice

        work = Work(index=combination.index, key=combination.key, label=combination.label, future=Future(),
                    make_session=lambda slot: self._session(combination, slot), chain=[RemoteAdvice()],
                    value_of=_result, failed_of=lambda result: not result.ok, begin=self._begin,
                    finish=self._finish, code=self.task.task_id)
        engine.submit(work)
        return work

    def _session(self, combination: Combination, slot: Slot) -> Session:
        from ..session import Session
        from ..task import Execution

        child = self.children[combination.index]
        options = ({**self.options, "keep_warm": True, "slot": slot.name, "placement": slot.placement} if slot.warm
                   else dict(self.options))
        session = Session(task=self.task, execution=Execution.create(self.task, combination.args), run_id=child.id,
                          serializer="pickle", context={"remote": slot.host, "options": options, "origin": "cli"})
        session.config = self.config
        return session

    def _begin(self, work: Work, session: Session, slot: Slot) -> None:
        """An attempt starts: the child run records its output and phases (an earlier attempt's recorder is
        closed; its output stays in the logs)."""
        from ..workspace.recorder import RunRecorder

        child = self.children[work.index]
        if not child.session_path.exists():
            child.store.write_bytes("session.zip", session.dumps())
        previous = self._recorders.pop(work.index, None)
        if previous is not None:
            for part in reversed(previous):
                part.close()
        out, err = line_sinks(f"[{work.label}] " if self.prefix else "", self._lines)
        recorder = RunRecorder(child, host=slot.host, stdout=out, stderr=err)  # type: ignore[arg-type]
        self._recorders[work.index] = (recorder, out, err)
        session.local["recorder"] = recorder
        self._sessions[work.index] = session

    # -- what the pool tells -------------------------------------------------------------------------

    def _set(self, key: str, **fields: Any) -> None:
        assert self.parent is not None
        with self._board:
            self.parent.board.apply([(key, fields)])

    def _entry(self, key: str) -> dict[str, Any]:
        assert self.parent is not None
        return dict(self.parent.tasks().get(key) or {})

    def started(self, work: Work, slot: Slot) -> None:
        from ..workspace.state import utc_now

        child = self.children[work.index]
        attempts = list(self._entry(work.key).get("attempts") or [])
        attempts.append({"host": slot.host, "slot": slot.label, "gpus": slot.gpu_indices, "started": utc_now(),
                         "finished": None, "status": "running", "error": None})
        if child.status() != "running":
            child.set_status("running")
        backend = self.config.effective_backend(self.options.get("backend") or self.config.remote(slot.host).backend)
        child.update(remote=slot.host, backend=backend, slot=slot.label, gpus=slot.gpu_indices)
        self._set(work.key, status="running", host=slot.host, slot=slot.label, gpus=slot.gpu_indices,
                  started=attempts[0]["started"], finished=None, attempts=attempts)

    def retried(self, work: Work, slot: Slot, error: str) -> None:
        self._end_attempt(work.key, "failed", error, status="waiting")

    def _end_attempt(self, key: str, outcome: str, why: str | None, **fields: Any) -> None:
        from ..workspace.state import utc_now

        attempts = list(self._entry(key).get("attempts") or [])
        if attempts and attempts[-1].get("status") == "running":
            attempts[-1] = {**attempts[-1], "finished": utc_now(), "status": outcome, "error": why}
        self._set(key, attempts=attempts, **fields)

    def _finish(self, work: Work) -> None:
        """The combination's outcome is set: record its child run and its line on the board."""
        from ..workspace.outcome import EXIT_INTERRUPTED, result_record, run_outcome
        from ..workspace.state import utc_now

        child = self.children[work.index]
        session = self._sessions.pop(work.index, None)
        held = self._recorders.pop(work.index, None)
        if held is not None:
            recorder, out, err = held
            out.close()
            err.close()
            recorder.close()
        future = work.future
        if future.cancelled():
            child.set_status("cancelled", exit_code=EXIT_INTERRUPTED, error="cancelled before it ran")
            self._set(work.key, status="cancelled", exit_code=EXIT_INTERRUPTED, finished=utc_now())
            return
        error = future.exception()
        if error is not None:
            cancelled = isinstance(error, (Interrupted, Cancelled))
            code = int(getattr(error, "exit_code", 1))
            child.set_status("cancelled" if cancelled else "failed", exit_code=code, error=str(error))
            self._end_attempt(work.key, "cancelled" if cancelled else "failed", str(error),
                              status="cancelled" if cancelled else "failed", exit_code=code, error=str(error),
                              finished=utc_now())
            return
        result: Result = future.result()
        outcome = session.local.get("outcome") if session is not None else None
        record = (result_record(result, header=outcome.header, phases=outcome.phases, uploaded=outcome.uploaded,
                                files=outcome.files, run_dir=child.dir) if outcome is not None
                  else result_record(result))
        child.store.write_bytes("result.json", json.dumps(record, indent=1).encode())
        ended = run_outcome(result)
        child.set_status(ended.status, exit_code=ended.exit_code, error=ended.error)
        status = {"finished": "done", "cancelled": "cancelled"}.get(ended.status, "failed")
        self._end_attempt(work.key, status, ended.error, status=status, exit_code=ended.exit_code,
                          error=ended.error, finished=utc_now())

    def end(self, *, interrupted: bool = False) -> int:
        """Record the parent's end; return ``rx map``'s exit status (0 all done, 1 some failed, 130
        interrupted)."""
        assert self.parent is not None
        tasks = self.parent.tasks()
        failed = [key for key, entry in tasks.items() if entry.get("status") != "done"]
        if interrupted:
            self.parent.set_status("cancelled", exit_code=130, error="interrupted")
            return 130
        if failed:
            self.parent.set_status("failed", exit_code=1,
                                   error=f"{len(failed)} of {len(tasks)} combination(s) did not finish")
            return 1
        self.parent.set_status("finished", exit_code=0)
        return 0


def _result(result: Result) -> Result:
    return result


def wait_all(works: Sequence[Work], poll: float = 0.2) -> None:
    """Wait until every work's future is done (Ctrl-C interrupts the wait: the caller stops the pool)."""
    for work in works:
        while not work.future.done():
            time.sleep(poll)


@dataclass(frozen=True)
class SweepPlan:
    """Everything ``rx map`` (or ``rx rerun`` of a sweep) runs.

    Attributes:
        task: The script or module.
        grid: Its arguments and axes.
        combinations: The combinations to run (a rerun's subset).
        hosts: The hosts.
        per_host: Slots per host (None: by GPUs, else 1).
        gpus: GPUs per run.
        retries: Tries again after failures that were not the script's.
        options: Task options (``python``, ``timeout``, ``env``, ``backend``, ...).
        argv: ``rx map``'s words after its options (the parent run's argv).
        target: The script's path or ``-m MODULE``.
        progress: Draw a live table (True), print lines (False), or decide by the terminal (None).
    """

    task: Task
    grid: Grid
    combinations: tuple[Combination, ...]
    hosts: tuple[str, ...]
    per_host: int | None
    gpus: int
    retries: int
    options: dict[str, Any]
    argv: tuple[str, ...]
    target: str
    progress: bool | None = None


def run_sweep(plan: SweepPlan, workspace: Workspace, config: Configuration, *, previous: Run | None = None,
              merged: Sequence[str] = ()) -> tuple[Run, int]:
    """Run a sweep to its end: the parent run and ``rx map``'s exit status (0, 1 some failed, 130
    interrupted, 255 every host lost)."""
    import getpass
    import os

    from ..coordinator import Coordinator
    from .engine import Engine, PoolSettings
    from .events import Tee
    from .placement import GpuPolicy
    from .progress import ProgressView

    backend = ",".join(sorted({config.effective_backend(plan.options.get("backend") or config.remote(host).backend)
                               for host in plan.hosts}))
    prefix = len(plan.combinations) > 1 and _overlap(plan, config)
    sweep = Sweep(workspace, plan.task, config, plan.hosts, plan.options, prefix=prefix)
    sweep.shape = {"per_host": plan.per_host, "gpus": plan.gpus, "retries": plan.retries}
    parent = sweep.open(plan.grid, plan.combinations, argv=list(plan.argv), backend=backend,
                        kind_target=plan.target, previous=previous, merged=merged)
    view = ProgressView(live=plan.progress, name=f"sweep {parent.id}")
    view.expected = len(plan.combinations)
    settings = PoolSettings(hosts=plan.hosts, per_host=plan.per_host, gpus=plan.gpus, retries=plan.retries,
                            retry_on=(), config=config, cwd=os.getcwd(), gpu_request=GpuPolicy().request(plan.gpus),
                            options=plan.options)
    owner = {"user": getpass.getuser(), "workspace": str(workspace.root), "run_id": parent.id}
    engine = Engine(settings, Coordinator.current(), Tee(sweep, view), owner=owner)
    works = []
    try:
        for combination in plan.combinations:
            if combination.index in sweep.children:
                works.append(sweep.submit(engine, combination))
        engine.shutdown(wait=False, cancel_futures=False, interrupt=False)
        wait_all(works)
        engine.shutdown(wait=True, cancel_futures=False, interrupt=False)
    except KeyboardInterrupt:
        engine.shutdown(wait=True, cancel_futures=True, interrupt=True)
        return parent, sweep.end(interrupted=True)
    code = sweep.end()
    if engine.broken is not None and code:
        return parent, 255
    return parent, code


def _overlap(plan: SweepPlan, config: Configuration) -> bool:
    """Whether runs of the sweep may run at once (then their output lines are prefixed)."""
    from ..launchers.registry import launcher_class

    if len(plan.hosts) > 1 or (plan.per_host or 1) > 1 or plan.gpus:
        return True
    return launcher_class(config.remote(plan.hosts[0]).scheduler).schedules
