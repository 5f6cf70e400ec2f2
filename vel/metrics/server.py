"""A tiny HTTP server for ``GET /metrics`` (what ``vel flusher --metrics-port`` runs).

Counters are this process's since it started, as Prometheus expects (it sums over processes
and handles restarts); gauges are read fresh at every scrape.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping

from vel.bounds import PORT
from vel.logs import get_logger
from vel.metrics.exposition import CONTENT_TYPE, render

__all__ = ["MetricsServer"]

log = get_logger("vel.metrics")

Collect = Callable[[], Awaitable[Mapping[str, float]]]


class MetricsServer:
    """Serves ``render(await collect(), tier=tier)`` and this process's histograms on
    ``GET /metrics`` (HTTP/1.0, one request per connection: all a Prometheus scraper needs).

    Args:
        collect: returns the current figures (``stats()`` keys).
        port: TCP port (0 picks a free one; see :attr:`port` after :meth:`start`).
        host: address to listen on: loopback unless told otherwise, since the figures
            describe the deployment (``0.0.0.0`` for every interface, as in a container).
        tier: the ``tier`` label of the unprefixed figures (see :func:`render`).
    """

    def __init__(
        self, collect: Collect, port: int, host: str = "127.0.0.1", *, tier: str | None = None
    ) -> None:
        self.collect = collect
        self.tier = tier
        self.host = host
        self.port = PORT.check_int("port", port)
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def aclose(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                request = await reader.readline()
                while (await reader.readline()).strip():
                    pass  # headers are not needed
                parts = request.decode("latin-1").split()
                if len(parts) < 2 or parts[0] not in ("GET", "HEAD"):
                    await self._reply(writer, 405, "method not allowed\n")
                elif parts[1].split("?")[0] != "/metrics":
                    await self._reply(writer, 404, "try /metrics\n")
                else:
                    try:
                        body = render(await self.collect(), tier=self.tier)
                    except Exception as exc:
                        log.warning("metrics collection failed: %s", exc)
                        await self._reply(writer, 503, f"collection failed: {exc}\n")
                    else:
                        await self._reply(writer, 200, body, CONTENT_TYPE)
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def _reply(
        writer: asyncio.StreamWriter,
        status: int,
        body: str,
        content_type: str = "text/plain; charset=utf-8",
    ) -> None:
        reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed"}.get(status, "Error")
        data = body.encode()
        head = (
            f"HTTP/1.0 {status} {reason}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode() + data)
        await writer.drain()
