"""Benchmark agents: one process per contender, driven by the runner over stdin/stdout, one JSON per line.

    python -m benchmarks.agent KIND CONFIG_JSON

The runner sends ``{"op": NAME, ...parameters}`` and reads back ``{"ok": true, ...}`` or
``{"ok": false, "error": "..."}``. An agent keeps what makes a contender *warm* (an open transport, a
gateway, a context, rx's pooled connection) between requests; the runner kills it on a timeout and starts a
new one. The kind ``rx-first`` answers once and exits: a first call must run in a new process.

Replies go to a duplicate of the original stdout; file descriptor 1 itself is pointed at stderr, so output
of child processes (bandsaw's ssh and scp inherit it) can never corrupt the protocol.

Timing is ``time.perf_counter()`` around exactly the call a user makes; setup that a user pays once (opening
a warm connection) happens before the first timed request, and result checks happen after the clock stops.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

Reply = dict[str, Any]

#: Commands the raw paramiko measurement runs.
TRIVIAL_COMMAND = "python3 -c pass"


class UnsupportedError(Exception):
    """The contender cannot do this here (not installed, feature missing); the message says why."""


def _payload() -> Any:
    return importlib.import_module("rxbench_payload")


def noop_by_value(i: int) -> int:
    """The trivial task as a user's script defines it: this module runs as ``__main__`` (``python -m
    benchmarks.agent``), so rx sends this function by value (cloudpickle), not by reference."""
    return i


def _timed_noop(function: Any, argument: int) -> tuple[float, str | None]:
    """Seconds one call of ``function(argument)`` took, and an error if it did not return its argument."""
    started = time.perf_counter()
    value = function(argument)
    seconds = time.perf_counter() - started
    return seconds, None if value == argument else f"the call returned {value!r}, not {argument!r}"


def _phases_of(entry: dict[str, Any]) -> dict[str, float] | None:
    """The phases a workspace task entry recorded, or None."""
    phases = entry.get("phases")
    return {str(k): float(v) for k, v in phases.items()} if isinstance(phases, dict) else None


def _blob(size: int, cache: dict[int, bytes]) -> bytes:
    if size not in cache:
        cache.clear()  # keep one size in memory at a time (100 MB blobs add up)
        cache[size] = os.urandom(size)
    return cache[size]


class Driver:
    """Handles one contender's requests; ``op_NAME(**params)`` answers the request ``NAME``."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.ssh_config = str(config["ssh_config"])
        self.hosts: list[str] = list(config["hosts"])
        self.host = self.hosts[0]

    def handle(self, request: dict[str, Any]) -> Reply:
        op = str(request.pop("op"))
        handler: Callable[..., Reply] | None = getattr(self, f"op_{op}", None)
        if handler is None:
            return {"ok": False, "error": f"unknown op {op!r}"}
        return handler(**request)

    def close(self) -> None:
        """Release what the driver holds (called before the agent exits)."""


# -- raw paramiko -------------------------------------------------------------------------------------------


class ParamikoDriver(Driver):
    """paramiko by itself: exec on an open transport (with and without TCP_NODELAY), SFTP put + get."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.clients: dict[bool, Any] = {}

    def _client(self, nodelay: bool) -> Any:
        if nodelay in self.clients:
            return self.clients[nodelay]
        import paramiko

        ssh_config = paramiko.SSHConfig.from_path(self.ssh_config).lookup(self.host)
        hostname = ssh_config["hostname"]
        port = int(ssh_config.get("port", 22))
        sock = socket.create_connection((hostname, port), timeout=30)
        if nodelay:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client = paramiko.SSHClient()
        client.load_host_keys(os.path.expanduser(ssh_config["userknownhostsfile"].split()[0]))
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        client.connect(hostname, port=port, username=ssh_config["user"],
                       key_filename=ssh_config["identityfile"][0], sock=sock, look_for_keys=False,
                       allow_agent=False, timeout=30, banner_timeout=30, auth_timeout=30)
        self.clients[nodelay] = client
        return client

    def op_exec(self, nodelay: bool, count: int) -> Reply:
        transport = self._client(nodelay).get_transport()
        samples = []
        for _ in range(count):
            started = time.perf_counter()
            channel = transport.open_session(timeout=30)
            channel.exec_command(TRIVIAL_COMMAND)
            status = channel.recv_exit_status()
            samples.append(time.perf_counter() - started)
            channel.close()
            if status != 0:
                return {"ok": False, "error": f"{TRIVIAL_COMMAND} exited {status}"}
        return {"ok": True, "samples": samples}

    def op_sftp(self, local: str, remote: str, size: int) -> Reply:
        sftp = self._client(True).open_sftp()
        back = Path(tempfile.mkdtemp(prefix="rxbench-sftp-")) / "back"
        try:
            started = time.perf_counter()
            sftp.put(local, remote)
            sftp.get(remote, str(back))
            seconds = time.perf_counter() - started
            if back.stat().st_size != size:
                return {"ok": False, "error": f"SFTP brought back {back.stat().st_size} bytes, not {size}"}
            sftp.remove(remote)
        finally:
            sftp.close()
            back.unlink(missing_ok=True)
            back.parent.rmdir()
        return {"ok": True, "samples": [seconds]}

    def close(self) -> None:
        for client in self.clients.values():
            client.close()


# -- execnet ------------------------------------------------------------------------------------------------


class ExecnetDriver(Driver):
    """execnet over ``ssh -F``: gateway start + first call, warm ``remote_exec`` calls, echo round trips."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        try:
            import execnet
        except ImportError as exc:
            raise UnsupportedError(f"execnet is not installed ({exc})") from exc
        self.execnet = execnet
        self.spec = f"ssh=-F {self.ssh_config} {self.host}//python=python3"
        self.gateway: Any = None
        self.group: Any = None
        self.blobs: dict[int, bytes] = {}

    def _warm(self) -> Any:
        if self.gateway is None:
            self.gateway = self.execnet.makegateway(self.spec)
            self.gateway.remote_exec("channel.send(None)").receive(timeout=60)
        return self.gateway

    def op_cold(self) -> Reply:
        started = time.perf_counter()
        gateway = self.execnet.makegateway(self.spec)
        gateway.remote_exec("channel.send(None)").receive(timeout=60)
        seconds = time.perf_counter() - started
        gateway.exit()
        return {"ok": True, "samples": [seconds]}

    def op_warm(self, count: int) -> Reply:
        gateway = self._warm()
        samples = []
        for _ in range(count):
            started = time.perf_counter()
            gateway.remote_exec("channel.send(None)").receive(timeout=30)
            samples.append(time.perf_counter() - started)
        return {"ok": True, "samples": samples}

    def op_echo(self, size: int) -> Reply:
        gateway = self._warm()
        data = _blob(size, self.blobs)
        started = time.perf_counter()
        channel = gateway.remote_exec("channel.send(channel.receive())")
        channel.send(data)
        back = channel.receive(timeout=300)
        seconds = time.perf_counter() - started
        if back != data:
            return {"ok": False, "error": "execnet echoed different bytes"}
        return {"ok": True, "samples": [seconds]}

    def op_fanout(self, count: int) -> Reply:
        """``count`` trivial calls dealt round-robin to a Group of gateways, one thread (one call in flight)
        per host, wall time."""
        if self.group is None:
            self.group = self.execnet.Group()
            for host in self.hosts:
                gateway = self.group.makegateway(f"ssh=-F {self.ssh_config} {host}//python=python3")
                gateway.remote_exec("channel.send(None)").receive(timeout=60)

        def serve(gateway: Any, numbers: list[int]) -> None:
            for i in numbers:
                if gateway.remote_exec(f"channel.send({i})").receive(timeout=60) != i:
                    raise RuntimeError("execnet returned another value")

        return _fanout(list(self.group), count, serve)

    def close(self) -> None:
        if self.gateway is not None:
            self.gateway.exit()
        if self.group is not None:
            self.group.terminate(timeout=10)


def _fanout(targets: list[Any], count: int, serve: Callable[[Any, list[int]], None]) -> Reply:
    """``count`` calls dealt round-robin to ``targets``, each served in order by a thread of its own; the
    wall time as one sample."""
    shares = [list(range(start, count, len(targets))) for start in range(len(targets))]
    errors: list[BaseException] = []

    def run(target: Any, numbers: list[int]) -> None:
        try:
            serve(target, numbers)
        except BaseException as exc:
            errors.append(exc)

    seconds = _wall([threading.Thread(target=run, args=pair) for pair in zip(targets, shares, strict=True)])
    if errors:
        return {"ok": False, "error": _error(errors[0])}
    return {"ok": True, "samples": [seconds]}


def _wall(threads: list[threading.Thread]) -> float:
    """Seconds from starting ``threads`` to the last one's end."""
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


# -- mitogen ------------------------------------------------------------------------------------------------


class MitogenDriver(Driver):
    """mitogen over ``ssh -F``: context start + first call, warm ``context.call``, echo round trips."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        try:
            import mitogen.master  # type: ignore[import-untyped]
        except ImportError as exc:
            raise UnsupportedError(f"mitogen is not installed ({exc})") from exc
        self.broker = mitogen.master.Broker()
        # mitogen pickles with protocol 2, where bytes travel as latin-1 text (~1.5x their size): the default
        # 128 MiB message limit refuses a 100 MB argument, so the limit is raised for the round-trip rows.
        self.router = mitogen.master.Router(self.broker, max_message_size=512 * 1024 * 1024)
        self.context: Any = None
        self.contexts: list[Any] = []
        self.blobs: dict[int, bytes] = {}

    def _connect(self) -> Any:
        return self.router.ssh(hostname=self.host, ssh_args=["-F", self.ssh_config], python_path="python3",
                               connect_timeout=60)

    def _warm(self) -> Any:
        if self.context is None:
            self.context = self._connect()
            self.context.call(_payload().noop, 0)
        return self.context

    def op_cold(self) -> Reply:
        payload = _payload()
        started = time.perf_counter()
        context = self._connect()
        context.call(payload.noop, 0)
        seconds = time.perf_counter() - started
        context.shutdown(wait=True)
        return {"ok": True, "samples": [seconds]}

    def op_warm(self, count: int) -> Reply:
        context = self._warm()
        noop = _payload().noop
        samples = []
        for i in range(count):
            started = time.perf_counter()
            context.call(noop, i)
            samples.append(time.perf_counter() - started)
        return {"ok": True, "samples": samples}

    def op_echo(self, size: int) -> Reply:
        context = self._warm()
        echo = _payload().echo
        data = _blob(size, self.blobs)
        started = time.perf_counter()
        back = context.call(echo, data)
        seconds = time.perf_counter() - started
        if back != data:
            return {"ok": False, "error": "mitogen echoed different bytes"}
        return {"ok": True, "samples": [seconds]}

    def op_fanout(self, count: int) -> Reply:
        """``count`` trivial calls dealt round-robin to a context per host, one thread (one call in flight)
        per host, wall time."""
        noop = _payload().noop
        if not self.contexts:
            for host in self.hosts:
                context = self.router.ssh(hostname=host, ssh_args=["-F", self.ssh_config], python_path="python3",
                                          connect_timeout=60)
                context.call(noop, 0)
                self.contexts.append(context)

        def serve(context: Any, numbers: list[int]) -> None:
            for i in numbers:
                if context.call(noop, i) != i:
                    raise RuntimeError("mitogen returned another value")

        return _fanout(self.contexts, count, serve)

    def close(self) -> None:
        for context in [self.context, *self.contexts]:
            if context is not None:
                context.shutdown(wait=True)
        self.broker.shutdown()
        self.broker.join()


# -- bandsaw ------------------------------------------------------------------------------------------------

_BANDSAW_MODULE = '''"""bandsaw 0.3 for the testbed (written by benchmarks.agent; bandsaw imports it remotely too)."""
import logging
import subprocess

from bandsaw.advices.ssh import Remote, SshAdvice, SshCommandLineBackend
from bandsaw.config import Configuration
from bandsaw.decorator import task
from bandsaw.interpreter import Interpreter

SSH_CONFIG = {ssh_config!r}
logger = logging.getLogger(__name__)


class ConfigFileBackend(SshCommandLineBackend):
    """bandsaw's own ssh and scp command lines, plus ``-F`` so they read the testbed's ssh_config
    (its known_hosts); everything else is bandsaw's."""

    @staticmethod
    def _run(command):
        logger.debug("running command %s", command)
        subprocess.check_call([command[0], "-F", SSH_CONFIG, *command[1:]])


ssh = SshAdvice(backend=ConfigFileBackend())
ssh.add_remote(Remote(host={host!r}, port={port!r}, user={user!r}, key_file={key_file!r},
                      interpreter=Interpreter(executable="python3"), directory="/tmp"))
configuration = Configuration()
configuration.add_advice_chain(ssh)


@task(config=__name__)
def noop(i):
    return i
'''


class BandsawDriver(Driver):
    """bandsaw 0.3: one ``@task`` call with its SSH advice per request (six ssh/scp processes each)."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        try:
            import bandsaw  # type: ignore[import-untyped]  # noqa: F401
        except ImportError as exc:
            raise UnsupportedError(f"bandsaw is not installed ({exc})") from exc
        import paramiko

        ssh_config = paramiko.SSHConfig.from_path(self.ssh_config).lookup(self.host)
        folder = Path(tempfile.mkdtemp(prefix="rxbench-bandsaw-"))
        (folder / "rxbench_bandsaw.py").write_text(_BANDSAW_MODULE.format(
            ssh_config=self.ssh_config, host=self.host, port=int(ssh_config.get("port", 22)),
            user=ssh_config["user"], key_file=ssh_config["identityfile"][0]), encoding="utf-8")
        sys.path.insert(0, str(folder))
        self.module = importlib.import_module("rxbench_bandsaw")
        self.calls = 0

    def op_task(self) -> Reply:
        self.calls += 1
        argument = int(time.time() * 1000) * 1000 + self.calls  # a new execution id, so a new remote dir
        started = time.perf_counter()
        value = self.module.noop(argument)
        seconds = time.perf_counter() - started
        if value != argument:
            return {"ok": False, "error": f"bandsaw returned {value!r}, not {argument!r}"}
        return {"ok": True, "samples": [seconds]}


# -- rx -----------------------------------------------------------------------------------------------------


class RxDriver(Driver):
    """rx ``@task`` calls on one backend: warm calls, keep_warm calls, echo round trips, four hosts.

    Every call gets a distinct argument, so each is its own task entry in the workspace run (which holds
    the phases ``dispatch()`` measured).
    """

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        from remote_exec import task

        self.task = task
        self.backend = str(config["backend"])
        self.payload = _payload()
        self.counter = int(time.time() * 1000) * 1000
        self.noops = {host: task(remote=host, backend=self.backend)(self.payload.noop) for host in self.hosts}
        # The by-value function in the by-reference row's one-file project (the payload's), so the two rows
        # differ in how the function travels only; and in this agent's own project (the repository, 300-odd
        # files): what a project's size adds to each call.
        self.value_noops = {
            "payload": task(remote=self.host, backend=self.backend,
                            project=str(Path(self.payload.__file__).resolve().parent))(noop_by_value),
            "repository": task(remote=self.host, backend=self.backend)(noop_by_value)}
        self.value_warmed: set[str] = set()
        self.edited: tuple[Path, Any] | None = None  # the edit-run row's project and function
        self.echo = task(remote=self.host, backend=self.backend)(self.payload.echo)
        self.warmed: set[str] = set()
        self.keep_warm: Any = None
        self.keep_warm_reason: str | None = None
        self.keep_warm_noops: dict[str, Any] | None = None
        self.seen: set[str] = set()
        self.blobs: dict[int, bytes] = {}

    def _next(self) -> int:
        self.counter += 1
        return self.counter

    def _warm(self, host: str) -> None:
        if host not in self.warmed:
            self.noops[host](self._next())
            self.warmed.add(host)
            self._new_phases()

    def _new_phases(self) -> list[dict[str, float]]:
        """Phases of the task entries recorded since the last look, oldest first."""
        from remote_exec import get_run_id
        from remote_exec.workspace import Workspace

        run_id = get_run_id()
        if run_id is None:
            return []
        tasks = Workspace.resolve(os.environ["RX_WORKSPACE"]).run(run_id).tasks()
        fresh = []
        for key, entry in tasks.items():
            if key not in self.seen:
                self.seen.add(key)
                phases = _phases_of(entry)
                if phases is not None:
                    fresh.append(phases)
        return fresh

    def _timed_calls(self, function: Any, count: int, before: Any = None) -> Reply:
        """``count`` calls back to back (as the peers' warm calls are made; ``before()`` ahead of each, not
        timed); their phases are read from the workspace afterwards, so reading them does not come between
        the calls."""
        samples = []
        for _ in range(count):
            if before is not None:
                before()
            seconds, error = _timed_noop(function, self._next())
            if error is not None:
                return {"ok": False, "error": error}
            samples.append(seconds)
        phases = self._new_phases()[-count:]
        phases = [{}] * (count - len(phases)) + phases
        calls = [{"seconds": seconds, "phases": entry} for seconds, entry in zip(samples, phases, strict=True)]
        return {"ok": True, "samples": samples, "calls": calls}

    def op_warm(self, count: int) -> Reply:
        self._warm(self.host)
        return self._timed_calls(self.noops[self.host], count)

    def op_warm_value(self, count: int, project: str = "payload") -> Reply:
        """Warm calls of a ``__main__`` function (by value), process per call, in the payload's project or in
        the repository's (``project``)."""
        noop = self.value_noops[project]
        if project not in self.value_warmed:
            noop(self._next())
            self.value_warmed.add(project)
            self._new_phases()
        return self._timed_calls(noop, count)

    def op_edited_value(self, count: int) -> Reply:
        """Calls of a ``__main__`` function (by value), process per call, each after an edit of a file of its
        project (a copy of the payload's): each runs in a tree the host has not seen, as in an edit-run
        cycle."""
        if self.edited is None:
            root = Path(tempfile.mkdtemp(prefix="rxbench-edited-"))
            shutil.copytree(Path(self.payload.__file__).resolve().parent, root, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__"))
            self.edited = (root, self.task(remote=self.host, backend=self.backend, project=str(root))(noop_by_value))
            self._edit()
            self.edited[1](self._next())
            self._new_phases()
        return self._timed_calls(self.edited[1], count, before=self._edit)

    def _edit(self) -> None:
        assert self.edited is not None
        (self.edited[0] / "settings.py").write_text(f"VERSION = {self._next()}\n")

    def _check_keep_warm(self) -> None:
        """Find out whether ``keep_warm=True`` gives a persistent worker: two calls, the same remote process
        (or the same Python parent) serving both."""
        if self.keep_warm is not None or self.keep_warm_reason is not None:
            return
        try:
            where = self.task(remote=self.host, backend=self.backend, keep_warm=True)(self.payload.where)
            first = where(self._next())
            second = where(self._next())
        except Exception as exc:
            self.keep_warm_reason = f"not implemented: keep_warm=True failed ({type(exc).__name__}: {exc})"
            return
        self._new_phases()
        same_process = first[0] == second[0]
        same_worker = first[1] == second[1] and str(first[2]).startswith("python")
        if not (same_process or same_worker):
            self.keep_warm_reason = ("not implemented: two keep_warm=True calls ran in different remote "
                                     "processes (process per call)")
            return
        self.keep_warm = self.task(remote=self.host, backend=self.backend, keep_warm=True)(self.payload.noop)
        self.keep_warm(self._next())
        self._new_phases()

    def op_keep_warm(self, count: int) -> Reply:
        self._check_keep_warm()
        if self.keep_warm is None:
            return {"ok": True, "unsupported": self.keep_warm_reason}
        return self._timed_calls(self.keep_warm, count)

    def op_echo(self, size: int) -> Reply:
        self._warm(self.host)
        data = bytearray(_blob(size, self.blobs))
        data[:8] = self._next().to_bytes(8, "big")  # a new execution each time, as a changed input would be
        argument = bytes(data)
        del data
        started = time.perf_counter()
        back = self.echo(argument)
        seconds = time.perf_counter() - started
        if back != argument:
            return {"ok": False, "error": "rx echoed different bytes"}
        phases = self._new_phases()
        return {"ok": True, "samples": [seconds],
                "calls": [{"seconds": seconds, "phases": phases[-1] if phases else {}}]}

    def op_project(self, root: str, count: int = 1) -> Reply:
        """``count`` calls of a ``@task`` defined in the project at ``root`` (a module of it): each runs in a
        snapshot of the project as it is now (what changed travels first)."""
        if root not in sys.path:
            sys.path.insert(0, root)
        module = importlib.import_module("bench_task")
        call = self.task(remote=self.host, backend=self.backend)(module.noop)
        samples = []
        for _ in range(count):
            seconds, error = _timed_noop(call, self._next())
            if error is not None:
                return {"ok": False, "error": error}
            samples.append(seconds)
        return {"ok": True, "samples": samples}

    def op_sync(self, root: str, remote: str = "sync-warm", count: int = 1) -> Reply:
        """``count`` syncs of the project at ``root`` to ``remote`` (a remote of the project's configuration,
        with its own workdir), as ``rx sync --remote`` does but from this warm process: its tree scanned,
        then stored there if the host lacks it (only missing blobs travel)."""
        from remote_exec.config import Configuration
        from remote_exec.coordinator import Coordinator
        from remote_exec.sync.plan import plan_directory

        coordinator = Coordinator.current()
        config = Configuration.load(Path(root))
        target = coordinator.host_target(remote, config, backend=self.backend)
        samples = []
        for _ in range(count):
            started = time.perf_counter()
            plan = plan_directory(Path(root), config)
            assert plan is not None
            project, _ = coordinator.scan(plan)
            coordinator.sync(target, project, config)
            samples.append(time.perf_counter() - started)
        return {"ok": True, "samples": samples}

    def op_hosts(self, keep_warm: bool = False) -> Reply:
        """The same call on every host at once (threads), then one host after another."""
        for host in self.hosts:
            self._warm(host)
        noops = self.noops
        if keep_warm:
            if self.keep_warm_noops is None:
                self.keep_warm_noops = {host: self.task(remote=host, backend=self.backend, keep_warm=True)(
                    self.payload.noop) for host in self.hosts}
                for host in self.hosts:  # start each host's worker outside the clock
                    self.keep_warm_noops[host](self._next())
            noops = self.keep_warm_noops
        results: dict[str, Any] = {}
        errors: list[str] = []

        def call(host: str, argument: int) -> None:
            try:
                results[host] = (noops[host](argument), argument)
            except Exception as exc:
                errors.append(f"{host}: {type(exc).__name__}: {exc}")

        parallel = _wall([threading.Thread(target=call, args=(host, self._next())) for host in self.hosts])
        if errors or any(value != argument for value, argument in results.values()):
            return {"ok": False, "error": "; ".join(errors) or "a host returned the wrong value"}
        started = time.perf_counter()
        for host in self.hosts:
            call(host, self._next())
        sequential = time.perf_counter() - started
        if errors:
            return {"ok": False, "error": "; ".join(errors)}
        self._new_phases()
        return {"ok": True, "parallel": parallel, "sequential": sequential}


class RxPoolDriver(RxDriver):
    """rx's pool on one backend: ``Executor.map`` of trivial calls over every host (a warm pool, as the peers'
    gateways and contexts are warm), 40 one-second calls over 2 slots per host, and, for scale, 4 threads
    making process-per-call ``@task`` calls."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        from remote_exec import Executor

        self.executor = Executor
        self.pools: dict[int, Any] = {}

    def _pool(self, per_host: int) -> Any:
        pool = self.pools.get(per_host)
        if pool is None:
            pool = self.pools[per_host] = self.executor(self.hosts, per_host=per_host, backend=self.backend)
            slots = len(self.hosts) * per_host
            deadline = time.monotonic() + 120
            while True:  # every slot's worker up (as the peers' gateways and contexts are) before the clock
                list(pool.map(self.payload.nap, [0.05] * 2 * slots))
                states = [slot["state"] for slot in pool.status()["slots"].values()]
                if len(states) == slots and all(state == "ready" for state in states):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the pool's slots did not all start: {states}")
        return pool

    def op_pool_map(self, count: int, per_host: int = 1) -> Reply:
        pool = self._pool(per_host)
        start = self._next()
        started = time.perf_counter()
        values = list(pool.map(self.payload.noop, range(start, start + count)))
        seconds = time.perf_counter() - started
        self.counter += count
        if values != list(range(start, start + count)):
            return {"ok": False, "error": "the pool returned other values"}
        return {"ok": True, "samples": [seconds]}

    def op_pool_naps(self, count: int, seconds: float, per_host: int) -> Reply:
        pool = self._pool(per_host)
        started = time.perf_counter()
        values = list(pool.map(self.payload.nap, [seconds + i * 1e-9 for i in range(count)]))
        wall = time.perf_counter() - started
        if len(values) != count:
            return {"ok": False, "error": "calls went missing"}
        return {"ok": True, "samples": [wall]}

    def op_threads_map(self, count: int) -> Reply:
        """``count`` process-per-call ``@task`` calls dealt round-robin to the hosts, a thread per host."""
        for host in self.hosts:
            self._warm(host)

        def serve(host: str, numbers: list[int]) -> None:
            base = self._next() * 10_000
            for i in numbers:
                if self.noops[host](base + i) != base + i:
                    raise RuntimeError("rx returned another value")

        return _fanout(list(self.hosts), count, serve)

    def close(self) -> None:
        for pool in self.pools.values():
            pool.shutdown(wait=True)


def first_call(config: dict[str, Any]) -> Reply:
    """Two first calls in this new process, each to a fresh remote workdir (connect, upload, execute, collect).

    The first, to the second host, is the process's very first call: it also pays the imports rx makes on
    first use and building the archive. The second, to the first host, is what the target is about: the
    first call to a fresh host from a process that is already running (no connection to that host yet,
    no archive there).
    """
    from remote_exec import get_run_id, task
    from remote_exec.workspace import Workspace

    payload = _payload()
    hosts = config["hosts"]
    samples: list[float] = []
    calls: list[dict[str, Any]] = []
    order = ((hosts[1 % len(hosts)], config["workdir"] + "-process"), (hosts[0], config["workdir"]))
    for host, workdir in order:
        noop = task(remote=host, backend=config["backend"], workdir=workdir)(payload.noop)
        seconds, error = _timed_noop(noop, int(time.time() * 1000) + len(samples))
        if error is not None:
            return {"ok": False, "error": error}
        samples.append(seconds)
        calls.append({"seconds": seconds, "phases": {}})
    run_id = get_run_id()
    if run_id is not None:
        from remote_exec.coordinator import Coordinator

        Coordinator.current().flush()
        by_host = {entry.get("host"): entry
                   for entry in Workspace.resolve(os.environ["RX_WORKSPACE"]).run(run_id).tasks().values()}
        for call, (host, _) in zip(calls, order, strict=True):
            call["phases"] = _phases_of(by_host.get(host) or {}) or {}
    # samples: [fresh host from a running process, first call of a new process]
    return {"ok": True, "samples": [samples[1], samples[0]], "calls": [calls[1], calls[0]]}


DRIVERS: dict[str, type[Driver]] = {
    "paramiko": ParamikoDriver,
    "execnet": ExecnetDriver,
    "mitogen": MitogenDriver,
    "bandsaw": BandsawDriver,
    "rx": RxDriver,
    "rx-pool": RxPoolDriver,
}


def _error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def main(argv: list[str]) -> int:
    kind, config = argv[0], json.loads(argv[1])
    out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)

    def reply(message: Reply) -> None:
        out.write(json.dumps(message) + "\n")
        out.flush()

    if kind == "rx-first":
        try:
            reply(first_call(config))
        except Exception as exc:
            traceback.print_exc()
            reply({"ok": False, "error": _error(exc)})
        return 0
    try:
        driver = DRIVERS[kind](config)
    except UnsupportedError as exc:
        reply({"ok": False, "unsupported": str(exc)})
        return 0
    except Exception as exc:
        traceback.print_exc()
        reply({"ok": False, "error": f"setup failed: {_error(exc)}"})
        return 1
    reply({"ok": True, "ready": kind})
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                reply(driver.handle(json.loads(line)))
            except Exception as exc:
                traceback.print_exc()
                reply({"ok": False, "error": _error(exc)})
    finally:
        driver.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
