"""remote_exec: offload Python work to machines reachable over SSH."""

from __future__ import annotations

__version__ = "0.1.0"
