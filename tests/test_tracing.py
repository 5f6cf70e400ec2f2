"""OpenTelemetry spans for turn, load, append, warm and flush, recorded by the SDK's in-memory
exporter; without an SDK (or without the package) the instrumentation does nothing."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator

import pytest
from conftest import model_for
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from vel import Agent, ProviderError, tracing
from vel.testing import FakeOpenAIServer

_EXPORTER = InMemorySpanExporter()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """The process's SDK provider (OpenTelemetry allows one per process), exporting to
    memory; emptied before each test."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    if not getattr(provider, "_vel_test_exporter", False):
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        provider._vel_test_exporter = True  # type: ignore[attr-defined]
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


def named(exporter: InMemorySpanExporter, name: str, sid: str | None = None) -> list[ReadableSpan]:
    return [
        s
        for s in exporter.get_finished_spans()
        if s.name == name and (sid is None or (s.attributes or {}).get("vel.session_id") == sid)
    ]


async def test_turn_load_and_append_spans_carry_the_session_and_nest(
    spans: InMemorySpanExporter, srv: FakeOpenAIServer, storage_mode: str
) -> None:
    sid = f"t-{uuid.uuid4().hex[:8]}"
    async with Agent(id="o", model=model_for(srv), session_storage=storage_mode) as agent:
        await agent.run({"message": "My name is Alice"}, session_id=sid)
        await agent.run({"message": "What is my name?"}, session_id=sid)
        if storage_mode == "redis":
            assert await agent.store.flush()
    assert tracing.enabled()
    turns = named(spans, "vel.turn", sid)
    loads = named(spans, "vel.load", sid)
    appends = named(spans, "vel.append", sid)
    assert len(turns) == 2 and len(loads) == 2 and len(appends) == 2
    turn_ids = {t.context.span_id for t in turns}
    for child in loads + appends:
        assert child.parent is not None and child.parent.span_id in turn_ids, child.name
        assert child.context.trace_id in {t.context.trace_id for t in turns}
    if storage_mode == "redis":
        # The first turn found the session absent from Redis and warmed it; the flusher
        # wrote it behind (a flush spans sessions: it counts them).
        warms = named(spans, "vel.warm", sid)
        assert len(warms) == 1 and warms[0].parent is not None
        flushes = named(spans, "vel.flush")
        assert flushes and all((f.attributes or {}).get("vel.sessions", 0) >= 1 for f in flushes)


async def test_a_failed_turn_span_has_the_error_status(
    spans: InMemorySpanExporter, srv: FakeOpenAIServer
) -> None:
    async with Agent(id="o", model=model_for(srv)) as agent:
        with pytest.raises(ProviderError):
            await agent.run({"message": "[[error 400]]"}, session_id="fails")
    (turn,) = named(spans, "vel.turn", "fails")
    assert turn.status.status_code is trace.StatusCode.ERROR
    assert any(e.name == "exception" for e in turn.events)


def run_python(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_without_an_sdk_the_spans_are_a_shared_no_op() -> None:
    out = run_python(
        """
        from vel import tracing
        assert not tracing.enabled()
        assert tracing.span("load", "s") is tracing.span("append", "t")
        assert tracing.start("turn", "s") is None
        print("ok")
        """
    )
    assert out.strip() == "ok"


def test_without_the_package_vel_runs_a_turn() -> None:
    out = run_python(
        """
        import asyncio, sys
        sys.modules["opentelemetry"] = None  # as if the otel extra were not installed
        from vel import Agent, tracing
        from vel.testing import FakeOpenAIServer

        async def main() -> str:
            with FakeOpenAIServer() as srv:
                model = {"provider": "openai", "model": "m", "base_url": srv.base_url}
                model["api_key"] = "k"
                async with Agent(id="a", model=model) as agent:
                    return await agent.run({"message": "hi"}, session_id="s")

        assert tracing.trace is None and not tracing.enabled()
        print(asyncio.run(main()))
        """
    )
    assert out.strip() == "You said: hi"
