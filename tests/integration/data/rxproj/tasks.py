"""``@task`` functions that run on ``rx-testbed-1`` (backend from RX_BACKEND, ssh_config from RX_SSH_CONFIG).

Every function reports facts only the remote can know (its host name, its working directory, the file
its code was loaded from), so a test can tell that it really ran there.
"""

from __future__ import annotations

import os
import platform
from typing import Any

import rxhelper

from remote_exec import task
from rxproj.errors import BadInput

HOST = "rx-testbed-1"


def square(x: int) -> dict[str, Any]:
    """``x * x`` with where it was computed (undecorated: tests wrap it with their own task options)."""
    return {"value": x * x, "node": platform.node(), "cwd": os.getcwd()}


@task(remote=HOST)
def where(x: int) -> dict[str, Any]:
    """``x + 1`` with the remote's host name, working directory and this module's file."""
    return {"value": x + 1, "node": platform.node(), "cwd": os.getcwd(), "file": __file__}


@task(remote=HOST)
def check_positive(x: int) -> int:
    """``x``, or :class:`BadInput` raised on the remote for a negative ``x``."""
    if x < 0:
        raise BadInput(f"negative: {x}", value=x)
    return x


@task(remote=HOST)
def divide(a: float, b: float) -> float:
    """``a / b``: a ZeroDivisionError for ``b == 0`` comes back as itself."""
    return a / b


@task(remote=HOST)
def fingerprint(text: str) -> dict[str, Any]:
    """What the remote received, measured there by :func:`rxhelper.describe`, plus that module's file."""
    return {**rxhelper.describe(text), "helper_file": rxhelper.__file__, "node": platform.node()}


def describe_here(text: str) -> dict[str, Any]:
    """:func:`rxhelper.describe` computed locally, for comparison."""
    return rxhelper.describe(text)
