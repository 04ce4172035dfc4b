"""``@task`` calls for the fault suite, each in a process of its own (a hang or a crash stays contained).

    python task_driver.py MODE HOST [ARGS]...

Modes:
    nap HOST SECONDS       a call with keepalive_interval=1, keepalive_count=2 that prints "task started"
                           and sleeps (the host gets paused under it)
    fill HOST MEGABYTES    a call that writes MEGABYTES into its working directory and returns the count
    echo HOST JSONFILE     a call that gets the strings of JSONFILE as arguments and returns them as hex
    escape HOST TOKEN WARM a call (keep_warm if WARM is 1) that starts processes that leave its session and
                           group (setsid, a double fork), each with TOKEN in its command line, and returns
    hello HOST             a call that prints and returns "hello" (on a host whose login prints)

The last stdout line is ``RESULT {json}``: ``{"ok": true, "value": ...}`` or ``{"ok": false, "type": ...,
"message": ..., "errno": ..., "exit_code": ..., "seconds": ...}``. Standard library and remote_exec only: the
archive ships what this file imports.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from remote_exec import task


def _nap(host: str, seconds: str) -> Any:
    @task(remote=host, keepalive_interval=1, keepalive_count=2)
    def nap(duration: float) -> str:
        import time

        print("task started", flush=True)
        time.sleep(duration)
        return "woke up"

    return nap(float(seconds))


def _fill(host: str, megabytes: str) -> Any:
    @task(remote=host, project=False)  # the scenario is the task's own ENOSPC: not the rx repo it sits in
    def fill(count: int) -> int:
        print("task started", flush=True)
        with open("fill.bin", "wb") as stream:
            for index in range(count):
                stream.write(bytes([index % 256]) * (1 << 20))
                stream.flush()
        return count

    return fill(int(megabytes))


def _echo(host: str, path: str) -> Any:
    strings = json.loads(Path(path).read_text(encoding="utf-8"))

    @task(remote=host)
    def echo(*values: str) -> list[str]:
        return [value.encode("utf-8", "surrogateescape").hex() for value in values]

    return echo(*strings)


def _escape(host: str, token: str, warm: str) -> Any:
    @task(remote=host, keep_warm=warm == "1")
    def escape(token: str) -> str:
        import os
        import subprocess
        import time

        subprocess.Popen(["setsid", "sleep", f"600.{token}"])
        if os.fork() == 0:  # a daemon: fork, setsid, fork again, the middle one exits
            os.setsid()
            if os.fork():
                os._exit(0)
            os.execvp("sleep", ["sleep", f"601.{token}"])
        time.sleep(0.5)
        return "escaped"

    return escape(token)


def _hello(host: str) -> Any:
    @task(remote=host)
    def hello() -> str:
        print("hello from the task", flush=True)
        return "hello"

    return hello()


MODES = {"nap": _nap, "fill": _fill, "echo": _echo, "escape": _escape, "hello": _hello}


def main(argv: list[str]) -> int:
    mode, *args = argv
    started = time.monotonic()
    try:
        value = MODES[mode](*args)
    except BaseException as exc:  # the outcome is what this driver reports
        result = {
            "ok": False,
            "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
            "message": str(exc),
            "errno": getattr(exc, "errno", None),
            "exit_code": getattr(exc, "exit_code", None),
            "seconds": time.monotonic() - started,
        }
    else:
        result = {"ok": True, "value": value, "seconds": time.monotonic() - started}
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
