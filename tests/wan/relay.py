"""A delaying TCP relay for the WAN test bed: every link pays its one-way delay.

One relay process serves the whole bed. For each server (a node, the coordinator, the
broker) it listens on ``IP:PORT`` *inside that server's network namespace* (the address
the server advertises) and forwards every accepted connection to the server's real
listener on ``IP:REAL_PORT``. Each chunk read in either direction is held for the
one-way delay of the link between the connecting namespace (known from the peer's
source address) and the server, then written, in order. So a connection between two
namespaces costs two delays per round trip, and neither end knows it is delayed.

Invariants:
- order is kept per direction (one FIFO and one writer per direction);
- a FIN or a reset is passed on after the same delay as the data before it;
- each direction buffers at most ``MAX_CHUNKS`` chunks (reads pause when full);
- a connection to a dead server is closed at once (the real port refuses).

Run: ``python relay.py CONFIG.json``; the config is ``{"listeners": [{"netns": NAME,
"ip": IP, "port": P, "real_port": RP, "name": SERVER}], "delays": {"SRC_IP|SERVER":
seconds}, "default_delay": seconds}``. It prints ``relay ready`` once every listener
is bound, rereads the delays of its config on SIGHUP (later chunks get the new
delays; order is still kept), and exits on SIGTERM. Needs root (``setns``) and Linux.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("wan.relay")

CLONE_NEWNET = 0x40000000
MAX_CHUNKS = 256
CHUNK = 64 * 1024


@dataclass(frozen=True)
class Listener:
    netns: str
    ip: str
    port: int
    real_port: int
    name: str


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def listen_in(netns: str, ip: str, port: int) -> socket.socket:
    """A listening socket bound to ``ip:port`` inside the named network namespace."""
    own = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((ip, port))
            sock.listen(128)
            sock.setblocking(False)
        finally:
            _setns(own)
    finally:
        os.close(own)
        os.close(target)
    return sock


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: Callable[[], float]) -> None:
    """Copy ``reader`` to ``writer``, each chunk (and the end) ``delay()`` seconds late."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue(MAX_CHUNKS)

    async def send() -> None:
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if data is None:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    sender = loop.create_task(send())
    try:
        while True:
            try:
                data = await reader.read(CHUNK)
            except (ConnectionError, OSError):
                data = b""
            await queue.put((loop.time() + delay(), data or None))
            if not data:
                break
        await sender
    except (ConnectionError, OSError):
        pass
    finally:
        sender.cancel()


class Relay:
    def __init__(self, listeners: list[Listener], delays: Mapping[str, float], default_delay: float) -> None:
        self.listeners = listeners
        self.delays = dict(delays)
        self.default_delay = default_delay
        self.servers: list[asyncio.base_events.Server] = []

    def load(self, delays: Mapping[str, float], default_delay: float) -> None:
        self.delays = dict(delays)
        self.default_delay = default_delay

    def delay(self, src_ip: str, server: str) -> float:
        return self.delays.get(f"{src_ip}|{server}", self.default_delay)

    async def start(self) -> None:
        for spec in self.listeners:
            sock = listen_in(spec.netns, spec.ip, spec.port)

            async def handle(
                reader: asyncio.StreamReader, writer: asyncio.StreamWriter, spec: Listener = spec
            ) -> None:
                await self._serve(spec, reader, writer)

            self.servers.append(await asyncio.start_server(handle, sock=sock))

    async def _serve(self, spec: Listener, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        src = writer.get_extra_info("peername")[0]

        def delay() -> float:  # looked up per chunk: SIGHUP may change it
            return self.delay(src, spec.name)

        try:
            up_reader, up_writer = await asyncio.open_connection(spec.ip, spec.real_port)
        except OSError:
            writer.close()  # the server is gone: refuse at once, like the real port would
            return
        try:
            await asyncio.gather(_pump(reader, up_writer, delay), _pump(up_reader, writer, delay))
        finally:
            for w in (writer, up_writer):
                w.close()


async def main(config_path: str) -> None:
    config = json.loads(Path(config_path).read_text())
    relay = Relay(
        [Listener(**x) for x in config["listeners"]], config.get("delays", {}), float(config.get("default_delay", 0.0))
    )
    await relay.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def reload() -> None:
        fresh = json.loads(Path(config_path).read_text())
        relay.load(fresh.get("delays", {}), float(fresh.get("default_delay", 0.0)))
        print("relay reloaded", flush=True)

    loop.add_signal_handler(signal.SIGHUP, reload)
    print("relay ready", flush=True)
    await stop.wait()
    for server in relay.servers:
        server.close()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main(sys.argv[1]))
