"""A TCP relay that delays every byte by a fixed time each way: a link with a round trip, on one machine.

``python -m testbed.delay --rtt 20 --to 127.0.0.1:32768`` listens on 127.0.0.1 (a free port, printed as
``listening <port>`` on stdout) and relays each connection to ``--to``, holding what it reads for half the
round trip before writing it on, in order, in each direction. No bandwidth limit and no loss: only the
latency a real link adds to each round trip, which is what a protocol's count of round trips costs. The
kernel's traffic shaping (``tc netem``) does the same where the kernel has it; this machine's does not.

Used by ``python -m benchmarks --rtt MS`` to measure the first-call rows over a slow link.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time

__all__ = ["main", "relay"]

CHUNK = 1 << 16


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Copy ``reader`` to ``writer``, each chunk written ``delay`` seconds after it was read (in order)."""
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def send() -> None:
        while True:
            due, data = await queue.get()
            if not data:
                break
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        with contextlib.suppress(OSError, RuntimeError):
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            writer.write_eof()

    sender = asyncio.ensure_future(send())
    try:
        while True:
            data = await reader.read(CHUNK)
            await queue.put((time.monotonic() + delay, data))
            if not data:
                break
        await sender
    except (OSError, asyncio.IncompleteReadError):
        sender.cancel()


async def relay(listen_port: int, host: str, port: int, rtt: float, ready: asyncio.Future[int] | None = None) -> None:
    """Serve until cancelled: each connection to 127.0.0.1:``listen_port`` (0: a free port, told through
    ``ready``) is relayed to ``host``:``port`` with ``rtt`` / 2 seconds of delay each way."""

    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(host, port)
        except OSError:
            client_writer.close()
            return
        try:
            await asyncio.gather(_pipe(client_reader, server_writer, rtt / 2),
                                 _pipe(server_reader, client_writer, rtt / 2))
        finally:
            for writer in (client_writer, server_writer):
                with contextlib.suppress(OSError):
                    writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", listen_port)
    if ready is not None:
        ready.set_result(server.sockets[0].getsockname()[1])
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed.delay", description=__doc__.splitlines()[0])
    parser.add_argument("--rtt", type=float, required=True, metavar="MS", help="round trip to add, in milliseconds")
    parser.add_argument("--to", required=True, metavar="HOST:PORT", help="where to relay connections")
    parser.add_argument("--port", type=int, default=0, help="port to listen on, on 127.0.0.1 (default: a free one)")
    args = parser.parse_args(argv)
    host, _, port = args.to.rpartition(":")
    if not host or not port.isdigit() or args.rtt < 0:
        parser.error("--to HOST:PORT and --rtt >= 0 are needed")

    async def serve() -> None:
        ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(relay(args.port, host, int(port), args.rtt / 1000, ready))
        print(f"listening {await ready}", flush=True)
        await task

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
