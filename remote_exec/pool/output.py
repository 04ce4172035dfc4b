"""The output of calls running side by side: whole lines, each prefixed with the call's label.

When a pool runs more than one call at a time, their output would interleave mid-line; a
:class:`PrefixedLines` per call and stream gathers what a call writes into lines and writes each whole
line at once as ``[label] line``. It looks up ``sys.stdout`` / ``sys.stderr`` at every write, so a live
progress view that redirects them (rich's ``Live``) prints the lines above itself.
"""

from __future__ import annotations

import codecs
import sys
import threading

__all__ = ["PrefixedLines", "line_sinks"]

class PrefixedLines:
    """A text stream (``write``, ``flush``) that writes whole lines of one call, prefixed, to stdout or stderr.

    Args:
        prefix: Put before each line (``"[lr=0.1 seed=2] "``); empty: lines as they are.
        stream: ``"stdout"`` or ``"stderr"``.
        lock: Held while a line is written (one lock for every call of a pool: no line is cut by another).
    """

    def __init__(self, prefix: str, stream: str, lock: threading.Lock) -> None:
        self.prefix = prefix
        self.stream = stream
        self.lock = lock
        self._partial = ""
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def write(self, text: str) -> int:
        """Gather ``text``; write the lines it completes."""
        data = self._partial + text
        lines = data.split("\n")
        self._partial = lines.pop()
        if lines:
            self._emit("".join(f"{self.prefix}{line}\n" for line in lines))
        return len(text)

    def write_bytes(self, data: bytes) -> None:
        """Gather output bytes (UTF-8, decoded across chunk boundaries)."""
        self.write(self._decoder.decode(data))

    def flush(self) -> None:
        """Nothing to do: whole lines go out as they complete (see :meth:`close`)."""

    def close(self) -> None:
        """Write a last line that did not end in a newline."""
        tail = self._partial + self._decoder.decode(b"", final=True)
        self._partial = ""
        if tail:
            self._emit(f"{self.prefix}{tail}\n")

    def _emit(self, text: str) -> None:
        target = sys.stdout if self.stream == "stdout" else sys.stderr
        with self.lock:
            try:
                target.write(text)
                target.flush()
            except (OSError, ValueError):
                pass


def line_sinks(prefix: str, lock: threading.Lock) -> tuple[PrefixedLines, PrefixedLines]:
    """A call's stdout and stderr as prefixed lines."""
    return PrefixedLines(prefix, "stdout", lock), PrefixedLines(prefix, "stderr", lock)
