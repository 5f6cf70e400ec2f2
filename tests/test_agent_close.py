"""``Agent.aclose()`` with turns still running, in one process (the fresh-process cases, in
both storage modes, are in test_loop_lifecycle.py): what it waits for, and how a turn it
stopped waiting for fails."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from conftest import model_for

from vel import Agent, AgentClosedError, turn_committed
from vel.testing import FakeOpenAIServer


async def test_a_turn_that_outlives_the_wait_fails_with_agent_closed_error(
    srv: FakeOpenAIServer, caplog: pytest.LogCaptureFixture
) -> None:
    agent = Agent(id="c", model=model_for(srv))
    slow = asyncio.create_task(
        agent.run({"message": "a long answer, word by word [[slow 0.3]]"}, session_id="s")
    )
    await asyncio.sleep(0.2)  # the turn is streaming its answer
    began = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="vel"):
        await agent.aclose(timeout=0.1)
    assert time.monotonic() - began < 1.0
    assert "1 turn(s) still running" in caplog.text
    with pytest.raises(AgentClosedError) as closed:
        await slow
    assert "closed while this turn ran" in str(closed.value)
    assert closed.value.__cause__ is not None  # what failed once the model client closed
    assert turn_committed(closed.value) is False
    await agent.aclose()  # idempotent


async def test_aclose_does_not_wait_for_a_stream_suspended_in_its_own_task(
    srv: FakeOpenAIServer,
) -> None:
    """Only the task that calls aclose() could resume it: waiting would cost the whole
    timeout for nothing."""
    agent = Agent(id="c", model=model_for(srv))
    stream = agent.run_stream({"message": "hello there"}, session_id="s")
    assert (await anext(stream))["type"] == "start"
    began = time.monotonic()
    await agent.aclose(timeout=5)
    assert time.monotonic() - began < 1.0
    await stream.aclose()


async def test_a_failure_while_aclose_waits_is_the_turn_s_own(srv: FakeOpenAIServer) -> None:
    """A turn that fails by itself while aclose() waits for it keeps its own error."""
    agent = Agent(id="c", model=model_for(srv))
    failing = asyncio.create_task(agent.run({"message": "[[slow 0.05]] [[error 500]]"}))
    await asyncio.sleep(0.01)
    await agent.aclose(timeout=5)
    with pytest.raises(Exception) as failed:
        await failing
    assert not isinstance(failed.value, AgentClosedError), failed.value
