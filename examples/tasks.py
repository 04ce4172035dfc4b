"""@task functions: a module function, a closure and a lambda, run on a host; an exception comes back
with its remote traceback.

    python examples/tasks.py rx-testbed-1        # with RX_SSH_CONFIG pointing at the testbed's ssh_config
"""

from __future__ import annotations

import platform
import sys

from montecarlo import estimate_pi

from remote_exec import task

HOST = sys.argv[1] if len(sys.argv) > 1 else None


@task(remote=HOST)
def where_and_pi(samples: int) -> tuple[str, float]:
    return platform.node(), estimate_pi(samples, seed=1)


@task(remote=HOST)
def divide(a: float, b: float) -> float:
    return a / b


def main() -> None:
    print("module function:", where_and_pi(50_000))
    offset = 10
    add_offset = task(remote=HOST)(lambda value: value + offset)
    print("lambda with a closure:", add_offset(32))
    try:
        divide(1, 0)
    except ZeroDivisionError as exc:
        print("remote exception:", repr(exc))
        print("remote traceback ends with:", str(exc.__cause__).strip().splitlines()[-1])


if __name__ == "__main__":
    main()
