"""A slow local reader never holds up the link: :class:`OutputPump` takes output at once, keeps its order,
holds at most its memory bound in memory (the rest in a spill file) and delivers every byte."""

from __future__ import annotations

import io
import threading
import time

from remote_exec.workspace.output import OutputPump
from remote_exec.workspace.recorder import StreamSink


class SlowStream(io.StringIO):
    """A text stream with a binary buffer whose writes block until ``release`` is set (a reader that does
    not read: a full pipe, a terminal paused with Ctrl-S)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.data = bytearray()
        self.buffer = self

    def write(self, data):  # type: ignore[no-untyped-def,override]
        self.release.wait()
        if isinstance(data, str):
            data = data.encode()
        self.data += data
        return len(data)


def test_writes_return_at_once_while_the_reader_blocks_and_everything_arrives_in_order() -> None:
    stream = SlowStream()
    pump = OutputPump(memory=64 * 1024)
    writer = pump.sink(stream)
    chunks = [f"{index:06d} ".encode() * 1000 for index in range(300)]  # 2.1 MB, past the memory bound
    started = time.monotonic()
    for chunk in chunks:
        pump.write(writer, chunk)
    assert time.monotonic() - started < 2.0  # nothing waited for the reader
    assert pump.pending() == sum(map(len, chunks))
    assert pump._held <= 64 * 1024  # the rest waits in the spill file, not in memory
    assert not pump.drain(timeout=0.2)
    stream.release.set()
    assert pump.drain(timeout=30)
    assert bytes(stream.data) == b"".join(chunks)
    pump.close()


def test_stdout_and_stderr_keep_their_interleaving_and_a_gone_reader_stops_nothing() -> None:
    out, err = io.StringIO(), io.StringIO()
    pump = OutputPump(memory=10)
    log = io.BytesIO()
    sinks = (StreamSink(out, log, pump), StreamSink(err, None, pump))
    for index in range(50):
        sinks[index % 2](f"{index},".encode())
    pump.close()
    assert out.getvalue() == "".join(f"{i}," for i in range(0, 50, 2))
    assert err.getvalue() == "".join(f"{i}," for i in range(1, 50, 2))
    assert log.getvalue().decode() == out.getvalue()

    class Gone(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    gone = pump.sink(Gone())
    pump.write(gone, b"lost")
    assert pump.drain(timeout=5) and gone.gone
    pump.write(gone, b"more")  # dropped at once
    assert pump.pending() == 0


def test_a_character_split_between_chunks_stays_whole() -> None:
    text = io.StringIO()
    pump = OutputPump()
    writer = pump.sink(text)
    data = "héllo wörld".encode()
    for index in range(len(data)):
        pump.write(writer, data[index:index + 1])
    pump.close()
    assert text.getvalue() == "héllo wörld"
