"""Advice chains: a chain's name made into its advices.

A :class:`~remote_exec.config.Configuration` holds chains as data: advice instances added in code, or
``"module:Class"`` specs (from ``[tool.rx] chains``, and the built-in chains of
:data:`~remote_exec.config.DEFAULT_CHAINS`). :func:`chain_for` creates the advices of a spec once and
keeps them in the configuration, so ``config.py`` never imports an advice. Built in:

    default   LoggingAdvice, RemoteAdvice
    cached    CachingAdvice, RemoteAdvice

A configured chain of the same name replaces the built-in one.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .advice import Advice
from .errors import ConfigError

if TYPE_CHECKING:
    from .config import Configuration

__all__ = ["chain_for", "load_advice"]


def load_advice(spec: str) -> Advice:
    """An advice from a ``"module:Class"`` spec (the class is called without arguments).

    Raises:
        ConfigError: The spec is malformed, or the class cannot be imported or created.
    """
    module_name, _, attribute = spec.partition(":")
    if not attribute:
        raise ConfigError(f"advice {spec!r} must be written module:Class")
    try:
        advice = getattr(importlib.import_module(module_name), attribute)()
    except (ImportError, AttributeError, TypeError) as exc:
        raise ConfigError(f"cannot create advice {spec!r}: {exc}") from exc
    if not isinstance(advice, Advice):
        raise ConfigError(f"{spec!r} is not an Advice")
    return advice


def chain_for(config: Configuration, name: str) -> list[Advice]:
    """The advices of chain ``name`` in ``config``.

    ``"module:Class"`` specs are made into advices once and kept in the configuration, so a chain's
    advices (and their state, such as a cache directory) are the same for every call.

    Raises:
        ConfigError: No chain has that name, or one of its advices cannot be loaded.
    """
    configured = config.chains.get(name)
    if configured is None:
        raise ConfigError(f"no advice chain named {name!r}",
                          hint=f"configured chains: {', '.join(sorted(config.chains))}")
    if any(isinstance(item, str) for item in configured):
        configured[:] = [load_advice(item) if isinstance(item, str) else item for item in configured]
    return configured  # type: ignore[return-value]
