"""Several worker processes, one conversation.

A load balancer sends each request of a chat to whichever worker is free. This example starts
``--workers`` OS processes, each with its own Agent (``session_storage='redis'``: Redis shared
by all of them, written behind to Postgres), and sends the turns of one session to them in
turn. Worker 3 knows the name the user told worker 1, because the history lives in Redis,
not in any process.

Run it with the services up and the schema migrated (see the README's quickstart)::

    export POSTGRES_DSN=postgresql://postgres@127.0.0.1:5432/test
    vel migrate
    python examples/multi_worker.py --workers 3

With ``OPENAI_API_KEY`` set it talks to the OpenAI API (``VEL_EXAMPLE_MODEL``, default
``gpt-4o-mini``); without it, it starts vel's fake OpenAI-compatible server and every worker
talks to that, through the real openai SDK.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import uuid
from contextlib import ExitStack
from multiprocessing.connection import Connection
from typing import Any

TURNS = [
    "My name is Alice.",
    "I like green tea.",
    "What is my name?",
    "What is my name?",
]


def model_config() -> dict[str, Any]:
    return {"provider": "openai", "model": os.environ.get("VEL_EXAMPLE_MODEL", "gpt-4o-mini")}


async def serve(conn: Connection, storage: str) -> None:
    """A worker: answer the turns the parent sends until it sends None."""
    from vel import Agent

    async with Agent(id="assistant", model=model_config(), session_storage=storage) as agent:
        conn.send(("ready", os.getpid()))
        while True:
            request = await asyncio.to_thread(conn.recv)
            if request is None:
                break
            session_id, message = request
            answer = await agent.run({"message": message}, session_id=session_id)
            stored = await agent.ctxmgr.aget_session_context(session_id)
            conn.send((answer, len(stored)))


def worker_main(conn: Connection, storage: str) -> None:
    asyncio.run(serve(conn, storage))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument(
        "--storage", default="redis", help="redis, database, or memory (not shared: the control)"
    )
    parser.add_argument("--session-id", default=f"multi-{uuid.uuid4().hex[:8]}")
    args = parser.parse_args()

    with ExitStack() as stack:
        if not os.environ.get("OPENAI_API_KEY"):
            from vel.testing import FakeOpenAIServer

            server = stack.enter_context(FakeOpenAIServer())
            # Children inherit the environment; the openai SDK reads these two.
            os.environ["OPENAI_BASE_URL"] = server.base_url
            os.environ["OPENAI_API_KEY"] = "fake"
            print(f"model: vel's fake OpenAI server at {server.base_url}")
        ctx = mp.get_context("spawn")
        workers = []
        for _ in range(args.workers):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(child, args.storage), daemon=True)
            proc.start()
            workers.append((proc, parent))
        try:
            pids = [conn.recv()[1] for _, conn in workers]
            print(
                f"{args.workers} worker processes (pids {', '.join(map(str, pids))}), "
                f"session_storage={args.storage!r}, session {args.session_id!r}\n"
            )
            for i, message in enumerate(TURNS):
                n = i % args.workers
                _, conn = workers[n]
                conn.send((args.session_id, message))
                answer, stored = conn.recv()
                print(f"[worker {n + 1}, pid {pids[n]}] user:      {message}")
                print(f"[worker {n + 1}, pid {pids[n]}] assistant: {answer}")
                print(f"    (the session now holds {stored} messages)")
        finally:
            for _, conn in workers:
                conn.send(None)
            for proc, _ in workers:
                proc.join(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
