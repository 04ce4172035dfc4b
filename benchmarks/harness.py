"""Running things with a time limit: agent processes spoken to over pipes, and timed commands.

Every process here is started by the benchmark in its own session (process group), and on a timeout or at
the end it is killed by that group id, never by name: ssh, scp and python children an agent started go with
it.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = ["Agent", "ProbeError", "Unsupported", "kill_group", "run_timed"]

logger = logging.getLogger("benchmarks")


class ProbeError(Exception):
    """One repetition of a measurement failed (its message is one line)."""


class Unsupported(Exception):
    """A contender cannot run here at all; the message says why, in one line."""


def kill_group(process: subprocess.Popen[Any]) -> None:
    """Kill a process we started in its own session, and everything in its process group."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            process.kill()
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        logger.warning("process %d did not exit after SIGKILL", process.pid)


def run_timed(argv: Sequence[str], *, timeout: float, env: Mapping[str, str] | None = None,
              cwd: Path | None = None, stdin: IO[bytes] | None = None, stdout: IO[bytes] | int | None = None,
              expect: int = 0) -> float:
    """Wall seconds of one command, from start to exit.

    Raises:
        ProbeError: It timed out (it was killed) or exited with another status than ``expect``.
    """
    started = time.perf_counter()
    process = subprocess.Popen(list(argv), stdin=stdin if stdin is not None else subprocess.DEVNULL,
                               stdout=stdout if stdout is not None else subprocess.DEVNULL,
                               stderr=subprocess.PIPE, env=dict(env) if env is not None else None, cwd=cwd,
                               start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(process)
        raise ProbeError(f"{Path(argv[0]).name} timed out after {timeout:g} s") from None
    seconds = time.perf_counter() - started
    if process.returncode != expect:
        text = stderr.decode("utf-8", "replace").strip().splitlines()
        raise ProbeError(f"{Path(argv[0]).name} exited {process.returncode}" + (f": {text[-1][:200]}" if text else ""))
    return seconds


class Agent:
    """One ``python -m benchmarks.agent KIND`` process: requests in, JSON replies out, each with a deadline.

    The process starts on the first request and again after a timeout killed it (a new process, so its
    warm state is rebuilt before the next timed call).

    Args:
        kind: The driver (``paramiko``, ``execnet``, ``mitogen``, ``bandsaw``, ``rx``).
        config: Passed to the driver as JSON.
        env: The environment for the process.
        cwd: Its working directory.
        log: Where its stderr goes.
        start_timeout: Seconds to wait for the driver to be ready.
    """

    def __init__(self, kind: str, config: Mapping[str, Any], *, env: Mapping[str, str], cwd: Path, log: Path,
                 start_timeout: float = 60.0) -> None:
        self.kind = kind
        self.config = dict(config)
        self.env = dict(env)
        self.cwd = cwd
        self.log = log
        self.start_timeout = start_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.replies: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.unsupported: str | None = None

    def _start(self) -> None:
        self.cwd.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.agent", self.kind, json.dumps(self.config)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=self.env, cwd=self.cwd,
                start_new_session=True)
        self.replies = queue.Queue()
        threading.Thread(target=self._read, args=(self.process, self.replies), daemon=True).start()
        ready = self._receive(self.start_timeout, "start")
        if ready.get("unsupported"):
            self.unsupported = str(ready["unsupported"])
            self.stop()
            raise Unsupported(self.unsupported)
        if not ready.get("ok"):
            self.stop()
            raise ProbeError(str(ready.get("error") or "the agent did not start"))

    @staticmethod
    def _read(process: subprocess.Popen[bytes], replies: queue.Queue[dict[str, Any] | None]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            try:
                replies.put(json.loads(line))
            except ValueError:
                logger.debug("agent %d wrote a line that is not JSON: %r", process.pid, line[:200])
        replies.put(None)

    def _receive(self, timeout: float, what: str) -> dict[str, Any]:
        try:
            reply = self.replies.get(timeout=timeout)
        except queue.Empty:
            self.stop(polite=False)
            raise ProbeError(f"{self.kind} agent: {what} timed out after {timeout:g} s (agent killed)") from None
        if reply is None:
            self.stop()
            raise ProbeError(f"{self.kind} agent exited during {what} (see {self.log.name})")
        return reply

    def request(self, op: str, *, timeout: float, **params: Any) -> dict[str, Any]:
        """Send one request and wait for its reply.

        Raises:
            Unsupported: The contender cannot run here.
            ProbeError: The request failed or timed out (then the agent is killed).
        """
        if self.unsupported is not None:
            raise Unsupported(self.unsupported)
        if self.process is None or self.process.poll() is not None:
            self._start()
        assert self.process is not None and self.process.stdin is not None
        try:
            self.process.stdin.write((json.dumps({"op": op, **params}) + "\n").encode())
            self.process.stdin.flush()
        except OSError as exc:
            self.stop()
            raise ProbeError(f"{self.kind} agent: cannot send {op}: {exc}") from exc
        reply = self._receive(timeout, op)
        if not reply.get("ok"):
            raise ProbeError(str(reply.get("error") or f"{op} failed"))
        return reply

    def stop(self, *, polite: bool = True) -> None:
        """End the process: politely (closing stdin lets the driver close its connections), then by force."""
        process, self.process = self.process, None
        if process is None:
            return
        if polite and process.poll() is None and process.stdin is not None:
            try:
                process.stdin.close()
                process.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                pass
        kill_group(process)


def one_shot(kind: str, config: Mapping[str, Any], *, env: Mapping[str, str], cwd: Path, log: Path,
             timeout: float) -> dict[str, Any]:
    """Run an agent that answers once (``rx-first``) and return its reply.

    Raises:
        ProbeError: It failed, or did not answer in time (then it is killed).
    """
    cwd.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "benchmarks.agent", kind, json.dumps(dict(config))],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, env=dict(env),
                                   cwd=cwd, start_new_session=True)
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(process)
        raise ProbeError(f"{kind} timed out after {timeout:g} s") from None
    lines = [line for line in out.decode("utf-8", "replace").splitlines() if line.strip()]
    if not lines:
        raise ProbeError(f"{kind} exited {process.returncode} without an answer (see {log.name})")
    reply: dict[str, Any] = json.loads(lines[-1])
    if not reply.get("ok"):
        raise ProbeError(str(reply.get("error") or f"{kind} failed"))
    return reply
