"""A backend that lives outside rx, as a plug-in would: it exists for rx only once
``remote_exec.backends.registry.register("double", "backend_double:DoubleBackend")`` has run.

It runs commands as local subprocesses (it is a :class:`~remote_exec.backends.local.LocalBackend`) and says
nothing else about itself, so it copies files with the base class's default ``put``/``get`` (``cat`` over
:meth:`start`), as a new backend without a faster way would.
"""

from __future__ import annotations

from typing import ClassVar

from remote_exec.backends.base import Backend
from remote_exec.backends.local import LocalBackend

__all__ = ["TARGET", "DoubleBackend"]

TARGET = "backend_double:DoubleBackend"
"""Where the registry finds it (``tests/unit`` is on sys.path while the unit tests run)."""


class DoubleBackend(LocalBackend):
    """A local-subprocess backend under another name, with the default transfers of :class:`Backend`."""

    put = Backend.put
    get = Backend.get

    name: ClassVar[str] = "double"
