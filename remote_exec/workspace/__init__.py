"""The local workspace: where every run is recorded.

* :mod:`.store` -- :class:`Store`, whole-file writes through ``tmp -> new -> cur`` (nothing appears
  under a final name incomplete) and live append-only logs.
* :mod:`.state` -- :class:`StateFile` (JSON rewritten atomically under a thread- and process-safe lock),
  :class:`ActionTracker` (named steps of a run), :class:`StatusBoard` (per-task status).
* :mod:`.manager` -- :class:`Workspace` (``--workspace`` / ``RX_WORKSPACE`` / ``./.rx``, run lookup by
  id, prefix or ``latest``, retention) and :class:`Run` (one run directory and its ``state.json``).
* :mod:`.export` -- :func:`~.export.export` of runs as json, html, junit or text (import it from
  there: it is not loaded with the package, which every run records through).
"""

from __future__ import annotations

from .manager import ENV_WORKSPACE, Run, Workspace, new_run_id
from .state import RUN_STATUSES, TASK_STATUSES, ActionTracker, StateFile, StatusBoard
from .store import Store

__all__ = [
    "ENV_WORKSPACE",
    "RUN_STATUSES",
    "TASK_STATUSES",
    "ActionTracker",
    "Run",
    "StateFile",
    "StatusBoard",
    "Store",
    "Workspace",
    "new_run_id",
]
