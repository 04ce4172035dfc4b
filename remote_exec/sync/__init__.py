"""The project tree on the coordinator's side: what a run's project is, what of it travels, and its id.

- :mod:`.root`: the project root (the first ``.git``, ``pyproject.toml``, ``setup.py`` or ``setup.cfg``
  walking up, never the home directory);
- :mod:`.rules`: what never travels, and gitignore-syntax matchers (``.gitignore``, ``.rxignore``, includes);
- :mod:`.listing`: the file list (``git ls-files -co --exclude-standard`` in a git work tree, else a walk);
- :mod:`.statcache`: a digest per file by its stat data, like git's index;
- :mod:`.tree`: the tree (entries, id, manifest) and the guardrails on its size;
- :mod:`.project`: a project scanned on demand, as cheaply as its changes allow.

The host's side (the store of blobs and trees, the per-run snapshot) is :mod:`remote_exec.runner.store` and
:mod:`remote_exec.runner.snapshot`; the frames between them are in :mod:`remote_exec.protocol.wire`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["MARKERS", "Project", "ProjectSpec", "Tree", "TreeFile", "find_project_root", "guard", "human_size"]

# Imported on first use: the workspace needs only .root (to find the project root), cheaply.
_LOCATIONS = {"MARKERS": "root", "find_project_root": "root", "Project": "project", "ProjectSpec": "project",
              "Tree": "tree", "TreeFile": "tree", "guard": "tree", "human_size": "tree"}

if TYPE_CHECKING:
    from .project import Project, ProjectSpec
    from .root import MARKERS, find_project_root
    from .tree import Tree, TreeFile, guard, human_size


def __getattr__(name: str) -> Any:
    module = _LOCATIONS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
