"""A worker process with ``ContextManager(max_history=N, summarize=True)``, driven by JSON
commands on stdin (one per line), configured from the environment like a deployed worker.

``python tests/summary_worker.py STORAGE SESSION MAX_HISTORY EVERY LEASE`` (EVERY 0:
``summarize=False``); commands:
``{"op": "turn", "message": ...}`` prints ``{"event": "answer", "answer", "seconds"}``;
``{"op": "summary"}`` prints ``{"event": "summary", "covered", "text"}``;
``{"op": "run_once"}`` prints ``{"event": "ran", "written"}``; ``{"op": "set", "messages"}``
replaces the history; ``{"op": "quit"}`` closes the agent and exits.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from vel import Agent, ContextManager, SummaryPolicy


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


async def main(storage: str, sid: str, window: int, every: int, lease: float) -> None:
    agent = Agent(
        id="summary-worker",
        model={"provider": "openai", "model": "fake-model"},
        session_storage=storage,
        context_manager=ContextManager(
            max_history=window,
            summarize=every > 0,
            summary_policy=SummaryPolicy(every=max(every, 1), lease=lease),
        ),
    )
    loop = asyncio.get_running_loop()
    emit(event="ready")
    try:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return
            command = json.loads(line)
            op = command["op"]
            if op == "turn":
                started = time.perf_counter()
                answer = await agent.run({"message": command["message"]}, session_id=sid)
                emit(event="answer", answer=answer, seconds=time.perf_counter() - started)
            elif op == "summary":
                summary = await agent.ctxmgr.aget_summary(sid)
                emit(
                    event="summary",
                    covered=summary.covered_seq if summary else 0,
                    text=summary.text if summary else None,
                )
            elif op == "run_once":
                assert agent.ctxmgr.summaries is not None
                emit(event="ran", written=await agent.ctxmgr.summaries.run_once(sid))
            elif op == "set":
                await agent.ctxmgr.aset_session_context(sid, command["messages"])
                emit(event="set")
            elif op == "quit":
                return
    finally:
        await agent.aclose()
        emit(event="closed")


if __name__ == "__main__":
    storage, sid, window, every, lease = sys.argv[1:6]
    asyncio.run(main(storage, sid, int(window), int(every), float(lease)))
