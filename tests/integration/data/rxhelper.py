"""A plain top-level helper module of the test project, imported by :mod:`rxproj.tasks`."""

from __future__ import annotations

import hashlib
from typing import Any


def describe(text: str) -> dict[str, Any]:
    """The UTF-8 bytes of ``text`` as hex, their sha256, and the code points, for byte-exact comparison."""
    data = text.encode("utf-8", "surrogateescape")
    return {"hex": data.hex(), "sha256": hashlib.sha256(data).hexdigest(), "codepoints": [ord(c) for c in text]}
