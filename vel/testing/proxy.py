"""A TCP fault proxy for tests: put it between vel and Redis or Postgres and break the link.

Runs its own event loop on a daemon thread, so it works under any test (sync or async) and
in front of servers used by other OS processes. Modes:

- ``pass``: forward bytes both ways (optionally after ``latency`` seconds per chunk, see
  :meth:`FaultProxy.set_latency`);
- ``refuse``: new connections are closed at once and existing ones are reset;
- ``blackhole``: connections are accepted (and existing ones kept) but nothing is forwarded,
  like a frozen server or a dropped route; what was held back is delivered once the mode
  changes (a late request, as after a network partition heals);
- ``reset``: requests reach the server but a reply is dropped and both sides are reset, with
  probability ``reset_probability`` per reply (1.0 by default): the client cannot know
  whether its command ran, which is what makes retries dangerous.

:meth:`FaultProxy.reset_connections` aborts every open connection once, whatever the mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import threading
from collections.abc import Callable
from typing import Literal

Mode = Literal["pass", "refuse", "blackhole", "reset"]


class FaultProxy:
    def __init__(
        self, target_host: str, target_port: int, *, listen_port: int = 0, seed: int = 0
    ) -> None:
        self.target = (target_host, target_port)
        self._listen_port = listen_port
        self.mode: Mode = "pass"
        self.latency = 0.0
        self.reset_probability = 1.0
        self.replies_dropped = 0
        self.connections_total = 0
        self._random = random.Random(seed)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self.port = 0

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> FaultProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self._listen_port)
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self._reset_all()

    def _apply(self, change: Callable[[], None]) -> None:
        """Run ``change`` on the proxy's loop and return once it has taken effect."""

        async def run() -> None:
            change()

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)
        else:
            change()

    def set_mode(self, mode: Mode) -> None:
        """Switch mode; ``refuse`` also resets every open connection."""

        def apply() -> None:
            self.mode = mode
            if mode == "refuse":
                self._reset_all()

        self._apply(apply)

    def set_latency(self, seconds: float) -> None:
        """Delay every forwarded chunk (both directions) by ``seconds``."""
        self._apply(lambda: setattr(self, "latency", seconds))

    def set_reset(self, probability: float = 1.0) -> None:
        """``reset`` mode: drop each reply (and reset its link) with ``probability``."""

        def apply() -> None:
            self.reset_probability = probability
            self.mode = "reset"

        self._apply(apply)

    def reset_connections(self) -> None:
        """Abort every open connection now (the next ones go through per the mode)."""
        self._apply(self._reset_all)

    def _reset_all(self) -> None:
        for client, upstream in list(self._links):
            for writer in (client, upstream):
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                        )
                writer.transport.abort()
        self._links.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections_total += 1
        if self.mode == "refuse":
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        link = (writer, up_writer)
        self._links.add(link)
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer), self._pipe(up_reader, writer, replies=True)
            )
        finally:
            self._links.discard(link)
            for w in link:
                w.transport.abort()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, replies: bool = False
    ) -> None:
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                while self.mode == "blackhole":
                    await asyncio.sleep(0.05)
                if self.mode == "refuse":
                    break
                if self.latency:
                    await asyncio.sleep(self.latency)
                if (
                    replies
                    and self.mode == "reset"
                    and self._random.random() < self.reset_probability
                ):
                    self.replies_dropped += 1
                    break  # the finally below resets this side, the handler the other
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.transport.abort()
