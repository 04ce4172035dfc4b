"""The pool's live view: a line per finished call when stderr is not a terminal, a table of hosts with
their slots, GPUs and counts (and the calls queued, rate and ETA) when it is; what hosts report is cleaned
before it reaches the terminal."""

from __future__ import annotations

import io
from concurrent.futures import Future

from rich.console import Console

from remote_exec.pool.placement import HostState, Slot
from remote_exec.pool.progress import ProgressView, clean, format_eta
from remote_exec.pool.work import Work


def work(index: int, label: str) -> Work:
    return Work(index=index, key=f"k{index}", label=label, future=Future(), make_session=lambda slot: None,  # type: ignore[arg-type,return-value]
                chain=[])


def test_plain_lines_say_what_ended_where_and_why_a_slot_waits() -> None:
    out = io.StringIO()
    view = ProgressView(live=False, console=Console(file=out, width=200))
    first, second = work(0, "lr=0.1"), work(1, "lr=0.2")
    slot = Slot(host="gpu1", number=0, name="p/gpu1#0", gpus=[{"index": 1}])
    for item in (first, second):
        view.queued(item)
    view.slot_state(slot, "waiting", "waiting for 1 GPU(s): GPU 0 used by 1 process(es) rx did not start (pid 9)")
    view.started(first, slot)
    first.future.set_result(None)
    view.finished(first, slot, 1.25, None, False)
    view.started(second, slot)
    error = RuntimeError("boom\x1b[31m")
    second.future.set_exception(error)
    view.finished(second, slot, 0.5, error, True)
    view.host_state(HostState("gpu2"), "down", "ConnectError: gpu2: the link went silent")
    view.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "rx: gpu1#0 waiting for 1 GPU(s): GPU 0 used by 1 process(es) rx did not start (pid 9)"
    assert lines[1] == "rx: [1/2] lr=0.1: done on gpu1 (GPU 1) in 1.2 s"
    assert lines[2] == "rx: [2/2] lr=0.2: failed on gpu1 (GPU 1): RuntimeError: boom?[31m"
    assert lines[3].startswith("rx: gpu2 is down (ConnectError: gpu2: the link went silent)")
    assert lines[4].startswith("pool: 2/2 ended (1 done, 1 failed), 0 running, 0 queued")


def test_the_table_counts_per_host() -> None:
    out = io.StringIO()
    view = ProgressView(live=False, console=Console(file=out, width=200))
    slots = [Slot(host="gpu1", number=n, name=f"p/gpu1#{n}", state="running", gpus=[{"index": n}]) for n in (0, 1)]
    items = [work(n, f"#{n}") for n in range(5)]
    for item in items:
        view.queued(item)
    for item, slot in zip(items, slots, strict=False):
        view.started(item, slot)
    rendered = io.StringIO()
    Console(file=rendered, width=200).print(view.render())
    text = rendered.getvalue()
    assert "gpu1" in text and "0,1" in text and "2/2" in text
    assert "0/5 ended (0 done, 0 failed), 2 running, 3 queued" in text


def test_helpers() -> None:
    assert clean("a\x1b]0;x\x07b") == "a?]0;x?b"
    assert (format_eta(None), format_eta(65), format_eta(3725)) == ("?", "1:05", "1:02:05")
