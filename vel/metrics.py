"""Prometheus text exposition of vel's counters and gauges, with no dependency.

:func:`render` turns a ``stats()``-style mapping into the text format (version 0.0.4);
:class:`MetricsServer` serves it on ``GET /metrics`` from a tiny asyncio HTTP server (what
``vel flusher --metrics-port`` runs). Counters are this process's since it started, as
Prometheus expects (it sums over processes and handles restarts); gauges are read fresh.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Mapping

from vel.bounds import PORT
from vel.logs import get_logger

__all__ = ["METRICS", "MetricsServer", "render"]

log = get_logger("vel.metrics")

# name -> (type, help). Names are vel's stats() keys; exported as ``vel_<name>``.
METRICS: dict[str, tuple[str, str]] = {
    "unflushed_messages": ("gauge", "Messages in Redis not yet written to Postgres."),
    "oldest_dirty_age": ("gauge", "Seconds the oldest unflushed session has waited."),
    "dirty_sessions": ("gauge", "Sessions with unflushed messages."),
    "flush_batches_ok": ("counter", "Flush transactions committed."),
    "flush_batches_failed": ("counter", "Flush transactions that failed (retried)."),
    "flush_retries": ("counter", "Flusher sweeps retried after an error."),
    "flushed_messages": ("counter", "Messages written to Postgres by the flusher."),
    "flush_duplicates_suppressed": ("counter", "Replayed rows Postgres already had."),
    "flush_stale_generations": ("counter", "Batches ignored: Postgres had a newer generation."),
    "flush_conflicts": ("counter", "Sessions set aside because Redis and Postgres diverged."),
    "warm_loads_ok": ("counter", "Sessions loaded from Postgres into Redis."),
    "warm_loads_exists": ("counter", "Warms that found the session already in Redis."),
    "warm_loads_stale": ("counter", "Warms abandoned because the lease was lost."),
    "warm_waits": ("counter", "Reads that waited for another task's warm."),
    "redis_hits": ("counter", "Reads served from Redis without warming."),
    "redis_misses": ("counter", "Reads or appends that found the session absent in Redis."),
    "evictions_seen": ("counter", "Sessions Postgres had that Redis had lost or expired."),
    "appends": ("counter", "Appends to Redis."),
    "duplicates_suppressed": ("counter", "Replayed appends recognised by message id."),
    "backpressure_rejections": ("counter", "Appends refused because the backlog was full."),
    "lock_waits": ("counter", "Turns that had to wait for the session's turn lock."),
    "damaged_reads": ("counter", "Stored messages that could not be decoded."),
}


def _value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if value != int(value) else str(int(value))


def render(values: Mapping[str, float], prefix: str = "vel_") -> str:
    """Return ``values`` in the Prometheus text format, one family per name.

    Known names get their type and help from :data:`METRICS`; others are untyped.
    """
    lines: list[str] = []
    for name in sorted(values):
        kind, text = METRICS.get(name, ("untyped", f"vel {name}."))
        metric = prefix + "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in name)
        if kind == "counter":
            metric += "_total"
        lines.append(f"# HELP {metric} {text}")
        lines.append(f"# TYPE {metric} {kind}")
        lines.append(f"{metric} {_value(values[name])}")
    return "\n".join(lines) + "\n"


Collect = Callable[[], Awaitable[Mapping[str, float]]]


class MetricsServer:
    """Serves ``render(await collect())`` on ``GET /metrics`` (HTTP/1.0, one request per
    connection: all a Prometheus scraper needs).

    Args:
        collect: returns the current figures.
        port: TCP port (0 picks a free one; see :attr:`port` after :meth:`start`).
        host: address to listen on.
    """

    def __init__(self, collect: Collect, port: int, host: str = "0.0.0.0") -> None:
        self.collect = collect
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
                        body = render(await self.collect())
                    except Exception as exc:
                        log.warning("metrics collection failed: %s", exc)
                        await self._reply(writer, 503, f"collection failed: {exc}\n")
                    else:
                        await self._reply(
                            writer, 200, body, "text/plain; version=0.0.4; charset=utf-8"
                        )
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
