"""The live view of a pool (rich): per host its slots, GPUs and calls; the calls queued, the rate, the time left.

On a terminal it is a table redrawn a few times a second on stderr (the calls' output prints above it);
elsewhere (a log, a pipe) it is one plain line per finished call, and one when a slot starts waiting for
GPUs or a host goes down. With :mod:`.output` and :mod:`remote_exec.cli`, the only rich user besides the
CLI: the CLI and ``Executor(progress=True)`` share it.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from .events import Tally

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.live import Live

    from .placement import HostState, Slot
    from .work import Work

__all__ = ["ProgressView", "clean", "format_eta"]


def clean(text: object) -> str:
    """``text`` with control characters replaced (what hosts report never drives the terminal)."""
    return "".join(ch if ch.isprintable() else "?" for ch in str(text))


def format_eta(seconds: float | None) -> str:
    """``1:02:03``, ``2:03``, or ``?``."""
    if seconds is None:
        return "?"
    seconds = int(seconds + 0.5)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressView(Tally):
    """Counts a pool's calls (a :class:`~.events.Tally`) and shows them.

    Args:
        live: Redraw a table (True), print a line per finished call (False); default: a table when stderr
            is a terminal.
        console: Where to draw (default: stderr).
        name: What the summary line calls the pool (``sweep 2024...``, ``map``).
    """

    def __init__(self, *, live: bool | None = None, console: Console | None = None, name: str = "pool") -> None:
        super().__init__()
        from rich.console import Console

        self.console = console or Console(stderr=True, highlight=False, soft_wrap=True)
        self.live_mode = self.console.is_terminal if live is None else live
        self.name = name
        self._live: Live | None = None
        self._guard = threading.Lock()
        self._said: dict[str, str | None] = {}
        self._closed = False

    # -- drawing ---------------------------------------------------------------------------------------

    def _start(self) -> None:
        if not self.live_mode or self._live is not None or self._closed:
            return
        with self._guard:
            if self._live is None and not self._closed:
                from rich.live import Live

                self._live = Live(self, console=self.console, refresh_per_second=4, transient=False,
                                  redirect_stdout=True, redirect_stderr=True)
                self._live.start()

    def __rich__(self) -> RenderableType:
        return self.render()

    def render(self) -> RenderableType:
        """The table of hosts and the summary line."""
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        snapshot = self.snapshot()
        table = Table(box=None, header_style="bold", pad_edge=False, padding=(0, 2, 0, 0))
        for column in ("host", "state", "slots", "GPUs", "running", "done", "failed"):
            table.add_column(column, justify="right" if column in ("running", "done", "failed") else "left")
        slots_by_host: dict[str, list[Slot]] = {}
        for slot in list(self.slots.values()):
            slots_by_host.setdefault(slot.host, []).append(slot)
        for host, counts in snapshot["hosts"].items():
            table.add_row(*_host_row(host, counts, sorted(slots_by_host.get(host, []), key=lambda s: s.number)))
        parts = [self._summary(snapshot)]
        waiting = [slot for slots in slots_by_host.values() for slot in slots if slot.state == "waiting"]
        for slot in waiting[:4]:
            parts.append(f"  {clean(slot.label)}: {clean(slot.detail or 'waiting')}")
        return Group(table, Text("\n".join(parts), style="dim"))

    def _summary(self, snapshot: dict[str, Any]) -> str:
        total = snapshot["total"]
        finished = snapshot["done"] + snapshot["failed"] + snapshot["cancelled"]
        text = (f"{self.name}: {finished}/{total} ended ({snapshot['done']} done, {snapshot['failed']} failed"
                + (f", {snapshot['cancelled']} cancelled" if snapshot["cancelled"] else "")
                + f"), {snapshot['running']} running, {snapshot['queued']} queued")
        if snapshot["rate"]:
            text += f"; {snapshot['rate']:.1f} calls/s, ETA {format_eta(snapshot['eta'])}"
        return text

    def _say(self, text: str, style: str = "") -> None:
        if self._live is not None:
            self._live.console.print(text, style=style, markup=False, highlight=False)
        else:
            self.console.print(text, style=style, markup=False, highlight=False)

    # -- events ----------------------------------------------------------------------------------------

    def queued(self, work: Work) -> None:
        super().queued(work)
        self._start()

    def finished(self, work: Work, slot: Slot | None, seconds: float, error: BaseException | None,
                 failed: bool) -> None:
        super().finished(work, slot, seconds, error, failed)
        if self.live_mode and not failed:
            return
        snapshot = self.snapshot()
        ended = snapshot["done"] + snapshot["failed"] + snapshot["cancelled"]
        where = f" on {slot.host}" + (f" (GPU {','.join(map(str, slot.gpu_indices))})" if slot.gpu_indices else "") \
            if slot is not None else ""
        if work.future.cancelled():
            outcome = "cancelled"
        elif error is not None:
            outcome = f"failed{where}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        else:
            outcome = ("failed" if failed else "done") + f"{where} in {seconds:.1f} s"
            detail = getattr(work, "detail", None)
            if detail:
                outcome += f" ({detail})"
        self._say(f"rx: [{ended}/{snapshot['total']}] {clean(work.label)}: {clean(outcome)}",
                  style="red" if failed else "")

    def slot_state(self, slot: Slot, state: str, detail: str | None) -> None:
        super().slot_state(slot, state, detail)
        if state in ("waiting", "restarting") and self._said.get(slot.name) != detail:
            self._said[slot.name] = detail
            if not self.live_mode or state == "restarting":
                self._say(f"rx: {clean(slot.label)} {clean(detail or state)}", style="yellow")
        elif state == "ready":
            self._said.pop(slot.name, None)

    def host_state(self, host: HostState, state: str, detail: str | None) -> None:
        super().host_state(host, state, detail)
        if state == "down":
            self._say(f"rx: {clean(host.name)} is down ({clean(detail)}); its calls go to the other hosts",
                      style="yellow")
        elif state == "lost":
            self._say(f"rx: {clean(host.name)} is lost ({clean(detail)})", style="red")
        elif state == "up":
            self._say(f"rx: {clean(host.name)} is back", style="green")

    def close(self) -> None:
        with self._guard:
            self._closed = True
            live, self._live = self._live, None
        if live is not None:
            live.refresh()
            live.stop()
        snapshot = self.snapshot()
        if snapshot["submitted"]:
            self.console.print(self._summary(snapshot) + f" in {format_eta(snapshot['elapsed'])}",
                               markup=False, highlight=False, style="dim")


_STATE_STYLE = {"down": "yellow", "lost": "red"}


def _host_row(host: str, counts: dict[str, Any], slots: list[Slot]) -> tuple[Any, ...]:
    """One line of the live table: host, state, slots ready, GPUs held, running, done, failed."""
    from rich.text import Text

    gpus = ",".join(str(i) for slot in slots for i in slot.gpu_indices) or "-"
    state = counts["state"] if counts["state"] != "up" else _slots_state(slots)
    return (clean(host), Text(clean(state), style=_STATE_STYLE.get(counts["state"], "")),
            f"{sum(slot.state in ('ready', 'running') for slot in slots)}/{len(slots)}", gpus,
            str(max(counts["running"], 0)), str(counts["done"]),
            Text(str(counts["failed"]), style="red" if counts["failed"] else ""))


def _slots_state(slots: list[Slot]) -> str:
    states = [slot.state for slot in slots]
    for state in ("running", "waiting", "starting", "ready"):
        if state in states:
            return state if state != "running" else "busy"
    return states[0] if states else "starting"
