"""A 'redis'-mode worker configured from the environment, as deployed, with whatever
POSTGRES_DSN it was given (tests/test_bad_dsn.py).

It tries a turn on ``PROBE_SID`` (already in Redis), a set on a new session, a plain set and
an append; closes the Agent; then prints one JSON line: what each call raised, whether
``aclose()`` raised, and the TCP sockets this process still has open.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from vel import Agent


def open_tcp_sockets() -> list[str]:
    """``local address:port`` (hex, as /proc shows them) of this process's TCP sockets."""
    local: dict[str, str] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.read().splitlines()[1:]:
                fields = line.split()
                local[fields[9]] = f"{fields[1]}->{fields[2]}"
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:[") and link[8:-1] in local:
            found.append(local[link[8:-1]])
    return found


async def outcome(call: Callable[[], Awaitable[Any]]) -> dict[str, Any]:
    began = time.monotonic()
    try:
        await call()
        result = "acknowledged"
    except Exception as exc:
        result = type(exc).__name__
    return {"result": result, "seconds": round(time.monotonic() - began, 2)}


async def main() -> None:
    sid = os.environ["PROBE_SID"]
    model = {"provider": "openai", "model": "m", "api_key": "k", "base_url": os.environ["LLM"]}
    report: dict[str, Any] = {}
    try:
        agent = Agent(id="probe", model=model, session_storage="redis")
    except Exception as exc:
        report["construct"] = type(exc).__name__
        report["sockets"] = open_tcp_sockets()
        print(json.dumps(report))
        return
    new = {"role": "user", "content": "must not be stored"}
    report["turn"] = await outcome(lambda: agent.run({"message": "hi"}, session_id=sid))
    new_sid = f"{sid}-new"
    report["set_new"] = await outcome(lambda: agent.ctxmgr.aset_session_context(new_sid, [new]))

    async def plain_set() -> None:  # as the spec calls it: no await, inside a running loop
        agent.ctxmgr.set_session_context(sid, [new])

    report["plain_set"] = await outcome(plain_set)
    report["append"] = await outcome(lambda: agent.store.append(sid, [new]))
    try:
        await agent.aclose()
        report["aclose"] = "ok"
    except BaseException as exc:
        report["aclose"] = f"{type(exc).__name__}: {exc}"
    report["sockets"] = open_tcp_sockets()
    print(json.dumps(report))


if __name__ == "__main__":
    asyncio.run(main())
