"""The bench's own ``redis-server``: a free loopback port in a temporary directory.

Redis commands per turn are read from ``INFO commandstats`` deltas, which count every client
of a server: on a private server nothing but the mode being measured runs, so the counts are
that mode's alone (commands run inside Lua scripts included, as Redis counts them). The server
is stopped by its pid; a shared Redis is never touched.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

# Commands the bench itself sends to read the counters: not part of any turn.
_OWN_COMMANDS = frozenset({"info", "ping", "hello", "client|setinfo", "client|setname"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True, slots=True)
class ServerCounters:
    """What a Redis server has done so far: calls per command, and its CPU seconds."""

    calls: dict[str, int]
    cpu_s: float

    def since(self, before: ServerCounters) -> ServerCounters:
        calls = {k: v - before.calls.get(k, 0) for k, v in self.calls.items()}
        return ServerCounters({k: v for k, v in calls.items() if v}, self.cpu_s - before.cpu_s)

    def per_turn(self, turns: int) -> dict[str, Any]:
        """Commands (all, and the busiest by name) and server CPU per turn."""
        calls = {k: v for k, v in self.calls.items() if k not in _OWN_COMMANDS}
        n = max(1, turns)
        top = sorted(calls.items(), key=lambda kv: -kv[1])[:12]
        return {
            "commands_per_turn": round(sum(calls.values()) / n, 2),
            "server_cpu_us_per_turn": round(self.cpu_s * 1e6 / n, 1),
            "by_command": {k: round(v / n, 3) for k, v in top},
        }


async def counters(client: aioredis.Redis) -> ServerCounters:
    stats = await client.info("commandstats")
    cpu = await client.info("cpu")
    calls = {
        name.removeprefix("cmdstat_"): int(value["calls"])
        for name, value in stats.items()
        if isinstance(value, dict) and "calls" in value
    }
    return ServerCounters(calls, float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]))


class PrivateRedis:
    """``redis-server`` (no persistence, like the shared test server) on a free port."""

    def __init__(self, binary: str = "redis-server") -> None:
        self.binary = binary
        self.port = _free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="vel-bench-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        if shutil.which(self.binary) is None:
            raise SystemExit(
                f"bench: {self.binary!r} not found; install Redis, or measure against an "
                "existing server with --redis-url (commands per turn then count every client)"
            )
        args = [
            self.binary,
            *("--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir)),
            *("--save", "", "--appendonly", "no", "--logfile", str(self.dir / "log")),
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log = self.dir / "log"
                    tail = log.read_text()[-2000:] if log.exists() else ""
                    self.stop()
                    raise SystemExit(f"bench: redis-server did not start:\n{tail}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)
