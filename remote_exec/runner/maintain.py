"""The runner's maintenance modes: ``sync`` stores a project tree without running anything (``rx sync``),
``gc`` collects the host's garbage on demand (``rx gc``) and prints what it removed as JSON."""

from __future__ import annotations

import os
import time

from ..protocol import wire
from .channel import Out

__all__ = ["serve_gc", "serve_sync"]


def serve_sync(cache_dir: str, out: Out) -> int:
    """Read a G frame naming a tree; store that tree (fetching what this host lacks); report with a P
    event ``{"event": "synced", "tree", "seconds"}``."""
    from .store import ensure_tree, first_options

    started = time.monotonic()
    inbox, options = first_options(out.send)
    ensure_tree(os.path.expanduser(cache_dir), str(options["tree"]), inbox)
    out.event({"event": "synced", "tree": options["tree"], "seconds": time.monotonic() - started})
    return 0


def serve_gc(cache_dir: str, args: list[str], out_fd: int = 1) -> int:
    """``gc LIMIT DAYS [dry-run]``: collect now; write the report as one line of JSON on ``out_fd``."""
    from .gc import collect

    limit = int(args[0]) if args else 10 << 30
    days = float(args[1]) if len(args) > 1 else 30.0
    report = collect(cache_dir, limit, days, dry_run=args[2:3] == ["dry-run"])
    data = (wire.json_text(report) + "\n").encode()
    while data:
        data = data[os.write(out_fd, data):]
    return 0
