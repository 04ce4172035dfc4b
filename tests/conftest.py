"""Shared pytest setup: the testbed fixtures, and markers by directory.

Every test under ``tests/integration`` is marked ``integration`` and every test under ``tests/faults`` is
marked ``faults``, so ``-m "not integration"`` runs without Docker.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

_TESTS = Path(__file__).resolve().parent
_ROOT = _TESTS.parent

# The testbed package lives at the repository root, which is not on sys.path when pytest imports this
# conftest (tests/ has no __init__.py). Until pyproject sets `pythonpath = ["."]`, put the root there.
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

pytest_plugins = ["testbed.pytest_plugin"]

# Every rx a test starts runs in its own process: no rx server is started for the next one (each test's
# environment differs, so each would get a server of its own). tests/unit/test_cli_server.py turns it on.
os.environ["RX_SERVER"] = "0"

_MARKER_OF_DIR = {"integration": "integration", "faults": "faults"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test by the top directory under ``tests/`` that holds it."""
    for item in items:
        try:
            relative = Path(item.path).resolve().relative_to(_TESTS)
        except ValueError:
            continue
        marker = _MARKER_OF_DIR.get(relative.parts[0]) if len(relative.parts) > 1 else None
        if marker is not None:
            item.add_marker(getattr(pytest.mark, marker))
