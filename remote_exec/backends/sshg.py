"""A memo of ``ssh -G`` answers, kept across processes: a new process's first connection to a host spares
the ~10 ms of running ``ssh -G`` when nothing it depends on changed.

An answer is kept with what it was worked out from: the ssh_config files ssh reads for it (``-F FILE``, else
``~/.ssh/config`` and ``/etc/ssh/ssh_config``), every file they ``Include`` and the folder of each
``Include`` pattern (a file added to ``config.d/`` changes its folder), and the ``ssh`` binary itself, each by
its stat data; and it is keyed by the command's arguments, the user, ``$HOME`` and the machine's name. It is
used only while all of that is as it was.

Nothing is kept where the answer can change without any of that changing: a configuration with ``Match
exec``, ``localnetwork``, ``canonical`` or ``final``, ``CanonicalizeHostname`` (DNS), or an environment
variable (``${VAR}``); nor when a file cannot be read. One small file per answer in rx's cache directory
(``ssh-G/<digest>``), readable by this user alone; it holds host names, paths and options, no secret.
Best effort: a cache; a file that cannot be read or written is no memo.
"""

from __future__ import annotations

import glob
import marshal
import os
import re
import shlex
from collections.abc import Sequence

__all__ = ["recall", "remember"]

_VERSION = 1
#: Configuration that makes ``ssh -G``'s answer depend on more than its files and arguments.
_VOLATILE = re.compile(r"^\s*(?:match\b.*\b(?:exec|localnetwork|canonical|final)\b|canonicalizehostname\s*=?\s*"
                       r"(?:yes|always)\b)|\$\{", re.IGNORECASE | re.MULTILINE)
_INCLUDE = re.compile(r"^\s*include\s*=?\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)
_MAX_DEPTH = 16

Stamp = tuple[str, int, int, int]


def _stamp(path: str) -> Stamp:
    try:
        info = os.stat(path)
    except OSError:
        return (path, -1, -1, -1)
    return (path, info.st_mtime_ns, info.st_size, info.st_ino)


def _configs(argv: Sequence[str]) -> list[tuple[str, str]]:
    """The ssh_config files ``argv`` makes ssh read, each with the folder its relative Includes start from."""
    words = list(argv)
    for index, word in enumerate(words[:-1]):
        if word == "--":
            break
        if word == "-F":
            return [(os.path.expanduser(words[index + 1]), os.path.expanduser("~/.ssh"))]
    import pwd

    home = pwd.getpwuid(os.getuid()).pw_dir
    return [(os.path.join(home, ".ssh", "config"), os.path.join(home, ".ssh")), ("/etc/ssh/ssh_config", "/etc/ssh")]


def _sources(argv: Sequence[str], ssh: str) -> list[Stamp] | None:
    """The stamps of what ssh's answer for ``argv`` comes from, or None when it may come from more."""
    stamps = [_stamp(ssh)]
    pending = [(path, base, 0) for path, base in _configs(argv)]
    while pending:
        path, base, depth = pending.pop()
        stamps.append(_stamp(path))
        try:
            with open(path, encoding="utf-8", errors="replace") as file:
                text = file.read()
        except FileNotFoundError:
            continue
        except OSError:
            return None
        if _VOLATILE.search(text) or depth > _MAX_DEPTH:
            return None
        for match in _INCLUDE.finditer(text):
            try:
                words = shlex.split(match[1], comments=True)
            except ValueError:
                return None
            for word in words:
                pattern = os.path.join(base, os.path.expanduser(word))
                if glob.has_magic(os.path.dirname(pattern)):  # (a new folder would go unseen)
                    return None
                stamps.append(_stamp(os.path.dirname(pattern)))
                pending += [(found, base, depth + 1) for found in sorted(glob.glob(pattern)) if os.path.isfile(found)]
    return stamps


def _path(argv: Sequence[str], ssh: str) -> str:
    import hashlib

    from ..prestart import memo_path

    key = (_VERSION, tuple(argv), ssh, os.getuid(), os.environ.get("HOME", ""), os.environ.get("USER", ""),
           os.uname().nodename)
    digest = hashlib.sha256(marshal.dumps(key, 2)).hexdigest()  # (version 2: equal values, equal bytes)
    return os.path.join(os.path.dirname(memo_path()), "ssh-G", digest[:32])


def recall(argv: Sequence[str], ssh: str) -> str | None:
    """The answer :func:`remember` kept for ``argv`` (run as ``ssh``), if what it came from is unchanged."""
    try:
        with open(_path(argv, ssh), "rb") as file:
            info = os.fstat(file.fileno())
            if info.st_uid != os.getuid() or info.st_mode & 0o022:
                return None
            version, stamps, text = marshal.loads(file.read())
    except Exception:  # missing, unreadable, truncated, another layout: no memo
        return None
    if version != _VERSION or not isinstance(text, str) or not isinstance(stamps, list):
        return None
    return text if all(_stamp(stamp[0]) == stamp for stamp in stamps) else None


def remember(argv: Sequence[str], ssh: str, text: str) -> None:
    """Keep ``text``, ssh's answer to ``argv``, unless it may change while its sources do not."""
    stamps = _sources(argv, ssh)
    if stamps is None:
        return
    from ..prestart import write_private

    write_private(_path(argv, ssh), marshal.dumps((_VERSION, stamps, text), 4))
