"""A TCP relay that delays every byte by a fixed time each way: a link with a round trip, on one machine.

``python -m testbed.delay --rtt 20 --to 127.0.0.1:32768`` listens on 127.0.0.1 (a free port, printed as
``listening <port>`` on stdout) and relays each connection to ``--to``, holding what it reads for half the
round trip before writing it on, in order, in each direction. No bandwidth limit and no loss: only the
latency a real link adds to each round trip, which is what a protocol's count of round trips costs. The
kernel's traffic shaping (``tc netem``) does the same where the kernel has it; this machine's does not.

Used by ``python -m benchmarks --rtt MS`` to measure the first-call rows over a slow link.

``--stdio``: relay this process's stdin and stdout to ``--to`` instead of listening (one connection, as
``nc HOST PORT`` would): what an ssh_config ``ProxyCommand`` runs (``ProxyCommand python3 -m testbed.delay
--stdio --rtt 0 --to %h:%p``). It ends when either side ends.
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


def stdio(host: str, port: int, rtt: float) -> None:
    """Relay stdin and stdout to ``host``:``port`` (``rtt`` / 2 seconds of delay each way) until either ends."""
    import os
    import queue
    import socket
    import threading

    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    done = threading.Event()

    def pipe(read: object, write: object, finish: object) -> None:
        chunks: queue.Queue[tuple[float, bytes]] = queue.Queue()

        def send() -> None:
            while True:
                due, data = chunks.get()
                time.sleep(max(0.0, due - time.monotonic()))
                if not data:
                    break
                write(data)  # type: ignore[operator]
            finish()  # type: ignore[operator]
            done.set()

        threading.Thread(target=send, daemon=True).start()
        while True:
            try:
                data = read()  # type: ignore[operator]
            except OSError:
                data = b""
            chunks.put((time.monotonic() + rtt / 2, data))
            if not data:
                return

    def write_out(data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(1, view):]

    threading.Thread(target=pipe, args=(lambda: sock.recv(CHUNK), write_out, lambda: os.close(1)),
                     daemon=True).start()
    threading.Thread(target=pipe, args=(lambda: os.read(0, CHUNK), sock.sendall,
                                        lambda: sock.shutdown(socket.SHUT_WR)), daemon=True).start()
    done.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed.delay", description=__doc__.splitlines()[0])
    parser.add_argument("--rtt", type=float, required=True, metavar="MS", help="round trip to add, in milliseconds")
    parser.add_argument("--to", required=True, metavar="HOST:PORT", help="where to relay connections")
    parser.add_argument("--port", type=int, default=0, help="port to listen on, on 127.0.0.1 (default: a free one)")
    parser.add_argument("--stdio", action="store_true", help="relay stdin and stdout instead of listening (a "
                                                              "ProxyCommand)")
    args = parser.parse_args(argv)
    host, _, port = args.to.rpartition(":")
    if not host or not port.isdigit() or args.rtt < 0:
        parser.error("--to HOST:PORT and --rtt >= 0 are needed")
    if args.stdio:
        stdio(host.strip("[]"), int(port), args.rtt / 1000)
        return 0

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
