"""Which project a session's task runs in, and where in it: the root, what travels, the working directory,
the script's path and the task's ``sys.path``.

The root is ``--project`` (``options["project"]``), else ``[tool.rx] project``, else the first directory
holding a project marker walking up from the script (a script task), the task's module file (a function)
or the current directory (``-m``), never the home directory. With none, there is no project: the archive
carries the script and the modules it imports, as before.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Configuration
from ..protocol.options import ProjectCall
from ..session import Session
from ..workspace.manager import ENV_WORKSPACE
from .project import ProjectSpec
from .root import find_project_root

__all__ = ["ProjectPlan", "plan_directory", "plan_project", "pool_key"]


@dataclass(frozen=True)
class ProjectPlan:
    """A session's project, before its tree is scanned.

    Attributes:
        spec: The root and how its tree is made.
        cwd: The task's working directory relative to the root (``""``: the root).
        path: Directories (relative) first on the task's ``sys.path``.
        script: The script's path relative to the root (a script task inside it).
    """

    spec: ProjectSpec
    cwd: str = ""
    path: tuple[str, ...] = (".",)
    script: str | None = None

    def call(self, tree: Any) -> ProjectCall:
        """The call's project once its tree is scanned."""
        return ProjectCall(tree=tree, cwd=self.cwd, path=self.path, script=self.script, pool=pool_key(self.spec.root))


def pool_key(root: Path) -> str:
    """The project's name on hosts (its snapshots' pool): this machine and the root, hashed."""
    import hashlib
    import socket

    return hashlib.sha256(f"{socket.gethostname()}\0{root}".encode("utf-8", "surrogateescape")).hexdigest()[:24]


def _relative(path: Path, root: Path) -> str | None:
    """``path`` relative to ``root`` (``""`` for the root itself), or None when it is outside."""
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        return None
    return "/".join(parts)


def _module_file(session: Session) -> tuple[Path | None, Path | None]:
    """A function task's module file and the directory it is imported from (its sys.path entry)."""
    name = session.task.module or "__main__"
    module = sys.modules.get(name)
    file = getattr(module, "__file__", None)
    if not file:
        return None, None
    path = Path(file).resolve()
    root = path.parent
    for _ in range(name.count(".") + (1 if path.name == "__init__.py" and name != "__main__" else 0)):
        root = root.parent
    return path, root


def _start(session: Session, cwd: Path) -> tuple[Path, Path | None, Path | None]:
    """(where the walk for the root starts, the script's path, the function's import directory)."""
    task = session.task
    if task.kind == "script" and task.filename:
        script = (cwd / task.filename).resolve()
        return script, script, None
    if task.kind == "function":
        file, import_dir = _module_file(session)
        if file is not None:
            main = sys.modules.get("__main__")
            main_file = getattr(main, "__file__", None)
            return file, Path(main_file).resolve() if main_file else None, import_dir
    return cwd, None, None


def _root(options: dict[str, Any], config: Configuration, start: Path, cwd: Path) -> Path | None:
    explicit = options.get("project")
    if explicit:
        return (cwd / Path(str(explicit)).expanduser()).resolve()
    if config.project is not None:
        return config.project
    return find_project_root(start)


def _private() -> tuple[Path, ...]:
    """rx's cache and the home directory: never part of a project, even one that holds them."""
    from ..packing import default_cache_dir
    from .root import home_directory

    home = home_directory()
    return (default_cache_dir().parent, *((home,) if home is not None else ()))


def _workspace(config: Configuration, root: Path) -> Path:
    if config.workspace is not None:
        return Path(config.workspace)
    from_env = os.environ.get(ENV_WORKSPACE)
    return Path(from_env) if from_env else root / ".rx"


def _folders(session: Session, root: Path, here: str | None, script: Path | None,
             import_dir: Path | None) -> tuple[str, ...]:
    """The task's ``sys.path`` head, relative to the root: the current directory (``-m``), the script's
    directory (or the function module's import directory and the main script's), the root, ``src``."""
    folders: list[str] = []
    if session.task.kind == "module":
        folders.append(here or ".")
    for folder in (script.parent if script is not None else None, import_dir):
        relative = _relative(folder, root) if folder is not None else None
        if relative is not None:
            folders.append(relative or ".")
    folders.append(".")
    if (root / "src").is_dir():
        folders.append("src")
    return tuple(dict.fromkeys(folders))


def plan_project(session: Session, config: Configuration) -> ProjectPlan | None:
    """The project ``session``'s task runs in, or None when it has none (or ``[tool.rx] project = false``)."""
    options: dict[str, Any] = dict(session.context.get("options") or {})
    if not config.use_project or options.get("project") is False:
        return None
    cwd = Path(session.context.get("cwd") or os.getcwd()).resolve()
    start, script, import_dir = _start(session, cwd)
    root = _root(options, config, start, cwd)
    if root is None or not root.is_dir():
        return None
    is_script = session.task.kind == "script"
    script_relative = _relative(script, root) if script is not None and is_script else None
    here = _relative(cwd, root)
    spec = ProjectSpec(root=root, include=tuple(options.get("include") or ()) + tuple(config.include),
                       follow_symlinks=bool(options.get("follow_symlinks")), workspace=_workspace(config, root),
                       private=_private(),
                       always=(script_relative,) if script_relative else ())
    return ProjectPlan(spec=spec, cwd=here or "", path=_folders(session, root, here, script, import_dir),
                       script=script_relative)


def plan_directory(directory: Path, config: Configuration, *, project: Path | None = None,
                   include: tuple[str, ...] = (), follow_symlinks: bool = False) -> ProjectPlan | None:
    """The project ``directory`` is in (``project``: that root), for what is not a task (``rx sync``)."""
    here = directory.resolve()
    root = project.resolve() if project is not None else config.project or find_project_root(here)
    if root is None or not root.is_dir():
        return None
    spec = ProjectSpec(root=root, include=tuple(include) + tuple(config.include), follow_symlinks=follow_symlinks,
                       workspace=_workspace(config, root), private=_private())
    return ProjectPlan(spec=spec, cwd=_relative(here, root) or "")
