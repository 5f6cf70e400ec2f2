"""Agent-level cost: a full ``agent.run`` turn, minus the model's time, is vel's overhead.

The model is the real ``openai.AsyncOpenAI`` client (vel's provider code path unchanged) on
an ``httpx.MockTransport`` that answers every request with the same streamed ~800 B answer,
so no server or socket adds noise. The model's time is what the provider's stream takes to
produce its chunks (SDK request, SSE parsing), timed around each ``__anext__``; the rest of
the turn (window read and turn lock, context building, events, commit) is vel's.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import AsyncGenerator
from typing import Any

import httpx

from benchmarks.modes import StoreDriver, make_driver
from vel.agent import Agent
from vel.context import ContextManager

_ANSWER = ("Here is a considered answer to your question about the session store. " * 12)[:800]


def _sse_body() -> bytes:
    base = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "bench",
    }

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return f"data: {json.dumps({**base, 'choices': [choice]})}\n\n".encode()

    words = _ANSWER.split(" ")
    pieces = [" ".join(words[i : i + 6]) + " " for i in range(0, len(words), 6)]
    parts = [chunk({"role": "assistant", "content": ""})]
    parts += [chunk({"content": p}) for p in pieces]
    parts.append(chunk({}, "stop"))
    parts.append(b"data: [DONE]\n\n")
    return b"".join(parts)


def mock_http_client() -> httpx.AsyncClient:
    body = _sse_body()

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


async def measure_agent(
    mode: str, spec: dict[str, Any], turns: int, window: int, separate_lock: bool = False
) -> dict[str, Any]:
    """Run ``turns`` sequential agent turns on ``mode``'s store; summarise per-turn costs.

    ``separate_lock``: take the turn lock, read and append in separate calls (how a Redis
    turn ran before the lock was folded into the read and append scripts), for comparison.
    """
    driver = make_driver(mode, {**spec, "pool_max": 4})
    assert isinstance(driver, StoreDriver)
    http = mock_http_client()
    agent = Agent(
        id="bench",
        model={
            "provider": "openai",
            "model": "bench",
            "api_key": "x",
            "client": {"http_client": http},
        },
        session_storage=driver.store,
        context_manager=ContextManager(max_history=window),
    )
    if separate_lock:
        agent._turns = None
    model_time = model_cpu = 0.0
    stream = agent.provider.stream

    async def timed(*args: Any) -> AsyncGenerator[Any, None]:
        nonlocal model_time, model_cpu
        chunks = stream(*args)
        try:
            while True:
                start, cpu = time.perf_counter(), time.process_time()
                try:
                    chunk = await anext(chunks)
                except StopAsyncIteration:
                    return
                finally:
                    model_time += time.perf_counter() - start
                    model_cpu += time.process_time() - cpu
                yield chunk
        finally:
            await chunks.aclose()

    agent.provider.stream = timed  # type: ignore[method-assign,assignment]
    totals: list[float] = []
    models: list[float] = []
    overheads: list[float] = []
    cpu_overheads: list[float] = []
    run = spec["run"]
    message = "Tell me more about how the turns of a conversation are stored. " * 5
    try:
        for _ in range(10):  # connections and caches, not timed
            await agent.run({"message": message}, session_id=f"{run}-agent-warmup")
        for i in range(turns):
            model_time = model_cpu = 0.0
            start, cpu = time.perf_counter(), time.process_time()
            await agent.run({"message": message}, session_id=f"{run}-agent-{i % 10}")
            total = time.perf_counter() - start
            cpu_overheads.append(time.process_time() - cpu - model_cpu)
            totals.append(total)
            models.append(model_time)
            overheads.append(total - model_time)
    finally:
        await agent.aclose()
        await http.aclose()
        await driver.aclose()

    def ms(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)

    return {
        "turns": turns,
        "total_p50_ms": ms(totals, 0.5),
        "model_p50_ms": ms(models, 0.5),
        "overhead_p50_ms": ms(overheads, 0.5),
        "overhead_p99_ms": ms(overheads, 0.99),
        "overhead_mean_ms": round(statistics.fmean(overheads) * 1000, 3),
        # CPU of this process outside the model call: vel's work without waiting on servers
        # or on other processes of a busy machine.
        "overhead_cpu_p50_ms": ms(cpu_overheads, 0.5),
    }
