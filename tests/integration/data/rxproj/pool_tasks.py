"""Functions the pool tests map over the testbed's hosts (undecorated: the tests choose hosts and slots)."""

from __future__ import annotations

import os
import platform
import time

from rxproj.errors import BadInput


def square(x: int) -> tuple[int, str]:
    """``x * x`` and the host that computed it; :class:`BadInput` for 3."""
    if x == 3:
        raise BadInput("three is not allowed", value=x)
    return x * x, platform.node()


def slow(x: int, seconds: float = 0.5) -> tuple[int, str]:
    """``x`` after ``seconds``, and the host."""
    time.sleep(seconds)
    return x, platform.node()


def gpu_window(seconds: float) -> tuple[str | None, float, float, str]:
    """The GPUs this call sees, and when (the host's clock) it held them."""
    started = time.time()
    time.sleep(seconds)
    return os.environ.get("CUDA_VISIBLE_DEVICES"), started, time.time(), platform.node()
