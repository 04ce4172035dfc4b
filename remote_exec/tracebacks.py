"""Remote tracebacks as the user reads them: their own frames, at their local files, with local source lines.

The runner sends a task's exception with its chain of causes and contexts, each with its frames as the
remote saw them (remote paths: the archive installed on the host, the run directory); see
:func:`remote_exec.runner.child.run_task`. Here they are rendered the way Python prints a traceback, with:

- each remote path mapped back to the local file it came from, through a :class:`PathMap` of (remote
  prefix -> local root) pairs the coordinator provides (:func:`roots_for`): the project modules in the
  archive, the script in its run directory, and rx's own files;
- a path shown relative to the current directory when the file lies below it (what an editor opens);
- the source line read from the local file (a function pickled by value runs as ``<dynamic-code>`` on
  the host: :class:`DynamicCode` finds the local file by the function's name and line);
- rx's own frames (the runner, the task wrapper, ``runpy``, cloudpickle) left out unless asked for, but
  kept when there is nothing else to show (the failure is then rx's).

This module runs on the coordinator only.
"""

from __future__ import annotations

import linecache
import os
import traceback
import types
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import RemoteError, RemoteTraceback
from .session import Result

__all__ = ["DynamicCode", "PathMap", "Root", "localize", "render", "roots_for", "syntax_error"]

#: The separators Python prints between the exceptions of a chain.
_LINKS = {
    "cause": "\nThe above exception was the direct cause of the following exception:\n\n",
    "context": "\nDuring handling of the above exception, another exception occurred:\n\n",
}
#: Where cloudpickle says a function rebuilt from its pickle came from.
DYNAMIC_CODE = "<dynamic-code>"


@dataclass(frozen=True)
class Root:
    """One pair of the path mapping: what lies under ``remote`` on the host is under ``local`` here.

    Attributes:
        remote: A remote path: a directory (its files map below ``local``) or a file.
        local: The local directory or file it stands for.
        internal: rx's own machinery: shown only when every frame is asked for.
    """

    remote: str
    local: Path
    internal: bool = False


class PathMap:
    """Remote paths to local ones, by the longest matching :class:`Root`."""

    def __init__(self, roots: Iterable[Root]) -> None:
        self.roots = sorted(roots, key=lambda root: len(root.remote), reverse=True)

    def find(self, remote: str) -> tuple[Path | None, bool]:
        """The local path of ``remote`` (None: not one of ours) and whether it is rx's own."""
        for root in self.roots:
            prefix = root.remote.rstrip("/")
            if remote == prefix:
                return root.local, root.internal
            if remote.startswith(prefix + "/"):
                return root.local.joinpath(*remote[len(prefix) + 1:].split("/")), root.internal
        return None, False


@dataclass(frozen=True)
class _Code:
    name: str
    first: int
    last: int
    filename: str


class DynamicCode:
    """Where the functions a task carried by value were written: by name and line, their local file.

    cloudpickle rebuilds a function on the host with ``<dynamic-code>`` as its file; the coordinator still
    has the function, and so its file and line range, and those of the functions of its module it calls.
    """

    def __init__(self, function: Callable[..., Any] | None = None) -> None:
        self._codes: list[_Code] = []
        if function is not None:
            self._add_function(function, set())

    def _add_function(self, function: Any, seen: set[int]) -> None:
        function = getattr(function, "function", function) if getattr(type(function), "rx_task_function",
                                                                        False) else function
        code = getattr(function, "__code__", None)
        if not isinstance(code, types.CodeType) or id(code) in seen:
            return
        seen.add(id(code))
        self._add_code(code)
        module_globals = getattr(function, "__globals__", {})
        for name in code.co_names:
            value = module_globals.get(name)
            if isinstance(value, types.FunctionType) or getattr(type(value), "rx_task_function", False):
                self._add_function(value, seen)
        for cell in getattr(function, "__closure__", None) or ():
            try:
                self._add_function(cell.cell_contents, seen)
            except ValueError:  # an empty cell
                continue

    def _add_code(self, code: types.CodeType) -> None:
        lines = [line for _, _, line in code.co_lines() if line is not None]
        if lines:
            self._codes.append(_Code(code.co_name, min(lines), max(lines), code.co_filename))
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                self._add_code(const)

    def find(self, name: str, lineno: int) -> str | None:
        """The local file of function ``name`` running at line ``lineno`` (None: not one of these)."""
        found = {code.filename for code in self._codes if code.name == name and code.first <= lineno <= code.last}
        return found.pop() if len(found) == 1 else None


def roots_for(*, remote_roots: Mapping[str, Any], sources: Iterable[tuple[str, str]] = (),
              script: tuple[str, Path] | None = None, project: Path | None = None) -> list[Root]:
    """The (remote prefix -> local root) pairs of one call.

    Args:
        remote_roots: What the runner reported: ``archive`` (where the archive is installed on the host)
            and ``run_dir`` (the call's run directory).
        sources: The user modules in the archive: (top-level name in the archive, local path).
        script: For a script: (its path relative to the run directory, its local file).
        project: The local project folder, when the run directory is a snapshot of it (its files are
            then the project's, at the same relative paths).
    """
    archive = str(remote_roots.get("archive") or "")
    roots: list[Root] = []
    if archive:  # rx's own files: this package
        roots.append(Root(f"{archive}/remote_exec", Path(__file__).resolve().parent, internal=True))
        roots.append(Root(f"{archive}/cloudpickle", _cloudpickle_dir(), internal=True))
        roots += [Root(f"{archive}/{name}", Path(local)) for name, local in sources]
    run_dir = str(remote_roots.get("run_dir") or "")
    if script is not None and run_dir:
        roots.append(Root(f"{run_dir}/{script[0]}", script[1]))
    if project is not None and run_dir:
        roots.append(Root(run_dir, project))
    return roots


def _cloudpickle_dir() -> Path:
    try:
        import cloudpickle
    except ImportError:  # pragma: no cover - a dependency
        return Path("cloudpickle")
    return Path(cloudpickle.__file__).resolve().parent


def _is_runpy(filename: str) -> bool:
    return filename == "<frozen runpy>" or filename.endswith(("/runpy.py", "\\runpy.py"))


@dataclass(frozen=True)
class _Frame:
    summary: traceback.FrameSummary
    internal: bool


def _shown(path: Path, cwd: Path) -> str:
    """``path`` relative to ``cwd`` when it lies below it, else absolute."""
    try:
        return str(path.relative_to(cwd))
    except ValueError:
        return str(path)


def _local_frame(raw: Sequence[Any], paths: PathMap, dynamic: DynamicCode, cwd: Path) -> _Frame:
    """One remote frame ``[file, line, function, source line, end line, column, end column]`` as shown here."""
    filename, lineno, name, remote_line = str(raw[0]), int(raw[1] or 0), str(raw[2]), raw[3]
    positions = {"end_lineno": raw[4], "colno": raw[5], "end_colno": raw[6]} if len(raw) >= 7 else {}
    local: Path | None
    internal = _is_runpy(filename)
    if filename == DYNAMIC_CODE:
        found = dynamic.find(name, lineno)
        local = Path(found) if found else None
    else:
        local, internal = paths.find(filename)
        internal = internal or _is_runpy(filename)
    line = linecache.getline(str(local), lineno) if local is not None else ""
    if local is None or not line or (remote_line and line.strip() != str(remote_line).strip()):
        # Not a file of ours, or it changed here since: the host's path and line (no column marks, which
        # would point into the line as it is here).
        shown = filename if local is None else _shown(local, cwd)
        summary = traceback.FrameSummary(shown, lineno, name, lookup_line=False, line=remote_line or None)
        return _Frame(summary, internal)
    try:  # the line as linecache gives it (with its newline): what Python's column marks count from
        summary = traceback.FrameSummary(_shown(local, cwd), lineno, name, lookup_line=False, line=line,
                                         **positions)
    except TypeError:  # a Python without column positions in tracebacks
        summary = traceback.FrameSummary(_shown(local, cwd), lineno, name, lookup_line=False, line=line)
    return _Frame(summary, internal)


def _entries(chain: Sequence[Mapping[str, Any]], paths: PathMap, dynamic: DynamicCode,
             cwd: Path) -> list[tuple[Mapping[str, Any], list[_Frame]]]:
    return [(entry, [_local_frame(raw, paths, dynamic, cwd) for raw in entry.get("frames") or []])
            for entry in chain]


def _map_text(text: str, paths: PathMap, cwd: Path) -> str:
    """Remote paths named in free text (a SyntaxError's ``File "..."`` line) replaced by local ones."""
    for root in paths.roots:
        if root.remote and root.remote in text:
            text = text.replace(root.remote, _shown(root.local, cwd))
    return text


def render(exception: Mapping[str, Any], paths: PathMap, *, dynamic: DynamicCode | None = None,
           all_frames: bool = False, cwd: Path | None = None) -> str | None:
    """A task's remote exception as Python would print it here (see the module docstring); None when the
    runner sent no frames (the text it sent is then all there is).

    Args:
        exception: The ``exception`` of a result header: ``chain`` (frames) and ``traceback`` (text).
        paths: Remote paths to local ones.
        dynamic: Where the functions the task carried by value were written.
        all_frames: Keep rx's own frames too (``rx -v``).
        cwd: Paths below it are shown relative to it (default: the current directory).
    """
    chain = exception.get("chain")
    if not isinstance(chain, list) or not chain:
        return None
    here = (cwd or Path(os.getcwd())).resolve()  # as the local paths are (macOS: /tmp is /private/tmp)
    entries = _entries(chain, paths, dynamic or DynamicCode(), here)
    hide = not all_frames and any(not frame.internal for _, frames in entries for frame in frames)
    return "".join(_lines(entries, hide, paths, here))


def _lines(entries: list[tuple[Mapping[str, Any], list[_Frame]]], hide: bool, paths: PathMap,
           cwd: Path) -> Iterator[str]:
    for entry, frames in entries:
        shown = [frame.summary for frame in frames if not (hide and frame.internal)]
        if shown:
            yield "Traceback (most recent call last):\n"
            yield from traceback.StackSummary.from_list(shown).format()
        yield _map_text(str(entry.get("only") or f"{entry.get('type')}\n"), paths, cwd)
        link = entry.get("then")
        if isinstance(link, str) and link in _LINKS:
            yield _LINKS[link]


def syntax_error(source: str, filename: str) -> str | None:
    """What Python prints for a syntax error in ``source`` (shown as ``filename``), or None if it compiles."""
    try:
        compile(source, filename, "exec", dont_inherit=True)
    except SyntaxError as exc:
        return "".join(traceback.format_exception_only(type(exc), exc))
    except ValueError as exc:  # source code string cannot contain null bytes
        return f"SyntaxError: {exc}\n"
    return None


def localize(result: Result, exception: Mapping[str, Any] | None, roots: Iterable[Root], *,
             function: Callable[..., Any] | None = None, all_frames: bool = False,
             hint: str | None = None) -> str | None:
    """Map ``result``'s remote traceback to the user's files (see :func:`render`): ``result.traceback``
    becomes what the user reads (the host's text stays in ``remote_traceback``), and so does the text of
    the exception's ``__cause__`` (with rx's frames if ``all_frames``). Returns the text to show, or None
    when there was nothing to map.

    Args:
        result: A task's result.
        exception: The ``exception`` of its result header.
        roots: The call's (remote prefix -> local root) pairs (:func:`roots_for`).
        function: The task's function, when it travelled by value.
        all_frames: Keep rx's own frames too.
        hint: What to try (:mod:`remote_exec.hints`): a last line, and a note of the exception.
    """
    if not exception:
        return None
    paths, dynamic = PathMap(roots), DynamicCode(function)
    text = render(exception, paths, dynamic=dynamic)
    if text is None:
        if not hint or not result.traceback:
            return None
        text = result.traceback  # what the host printed is all there is; the hint still goes below it
    everything = render(exception, paths, dynamic=dynamic, all_frames=True) if all_frames else None
    shown = everything if everything is not None else text
    note = f"rx: hint: {hint}\n" if hint else ""
    result.remote_traceback = result.traceback
    result.traceback = text + note  # what the run's record keeps: the user's frames
    if result.exception is not None:
        add_note: Callable[[str], None] | None = getattr(result.exception, "add_note", None)  # Python >= 3.11
        noted = False
        if note and add_note is not None:  # Python prints it under the exception's own line, where one looks
            add_note(note.rstrip("\n"))
            noted = True
        result.exception.__cause__ = RemoteTraceback(shown if noted else shown + note)
        if isinstance(result.exception, RemoteError):
            result.exception.formatted = shown + note
    return shown + note
