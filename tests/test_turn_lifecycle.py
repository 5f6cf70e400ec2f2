"""A turn's lifecycle under cancellation: whole or absent, the caller told which, no lock left.

Written the way users cancel turns: ``asyncio.wait_for``, ``asyncio.timeout``,
``anyio.move_on_after`` (how Starlette/FastAPI time out requests and react to disconnects)
and ``task.cancel()``, at random instants spread over the whole turn, commit included. The
rule under test (README, "Cancelling a turn"): a cancellation that arrives before the commit
is sent stores nothing; once the commit is sent it completes, the lock is released, then the
cancellation propagates unchanged and the turn is stored; ``vel.turn_committed(exc)`` and a
:class:`vel.TurnReceipt` say which happened. Whatever ended the turn, its session lock is
free when ``run()`` has returned or raised.

The backends sit behind :class:`FaultProxy` with a few milliseconds of latency, so that the
commit (one round trip in 'redis' mode, an append and a release in 'database' mode) is a fair
share of the turn and random instants land in it. Sizes are reduced in the default suite;
``scripts/turn-lifecycle`` runs them at full size (500 cancellations per mode). This module runs on
Python 3.11, 3.12 and 3.13 (``scripts/test``).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest
import redis
import redis.cluster
from conftest import model_for, schema_dsn
from servers import sized

import vel
from vel import Agent, MemoryStore, SessionLockedError, StoreUnavailableError
from vel.messages import Message
from vel.stores.redis.keys import KeyLayout
from vel.testing import FakeOpenAIServer
from vel.testing.proxy import FaultProxy

FIGURES = Path(os.environ.get("VEL_FIGURES_DIR", "/tmp/vel-figures"))
HOW = ("wait_for", "timeout", "move_on_after", "cancel")


def write_figures(name: str, figures: dict[str, Any]) -> None:
    FIGURES.mkdir(parents=True, exist_ok=True)
    (FIGURES / f"{name}.json").write_text(json.dumps(figures, indent=1) + "\n")


# -- backends ---------------------------------------------------------------------------------


def _proxied(url: str, proxy: FaultProxy) -> str:
    parts = urllib.parse.urlsplit(url)
    userinfo, _, _ = parts.netloc.rpartition("@")
    host = f"127.0.0.1:{proxy.port}"
    return urllib.parse.urlunsplit(
        parts._replace(netloc=f"{userinfo}@{host}" if userinfo else host)
    )


@dataclass
class Backend:
    """One storage mode as a user configures it, and what the test needs to look inside."""

    mode: str  # memory | database | redis | cluster
    pg_dsn: str = ""
    schema: str = ""
    redis_url: str = ""
    prefix: str = ""

    @property
    def storage(self) -> str:
        return "redis" if self.mode == "cluster" else self.mode

    async def locked(self, agent: Agent, sids: list[str]) -> list[str]:
        """The sessions whose turn lock is held right now."""
        if self.mode == "memory":
            assert isinstance(agent.store, MemoryStore)
            held = agent.store._locks._locks
            return [sid for sid in sids if sid in held and held[sid][0].locked()]
        if self.mode == "database":
            conn = await asyncpg.connect(schema_dsn(self.pg_dsn, self.schema))
            try:
                rows = await conn.fetch(
                    "SELECT session_id FROM vel_locks WHERE session_id = ANY($1::text[]) "
                    "AND expires_at > now()",
                    sids,
                )
            finally:
                await conn.close()
            return sorted(r["session_id"] for r in rows)
        layout = KeyLayout(self.prefix)
        keys = {sid: layout.session(sid).turn_lock for sid in sids}
        client: Any
        if self.mode == "cluster":
            host, _, port = (
                self.redis_url.removeprefix("redis+cluster://").split(",")[0].rpartition(":")
            )
            client = redis.cluster.RedisCluster(host=host, port=int(port))
        else:
            client = redis.Redis.from_url(self.redis_url)
        try:
            return sorted(sid for sid, key in keys.items() if lock_held(client.get(key)))
        finally:
            client.close()


def lock_held(value: bytes | None) -> bool:
    """A Redis lock key's value holds the lock (``~token`` is an abandoned attempt's
    tombstone, ``?`` a released lock reserved for a turn that waited for it: neither is a
    turn holding it)."""
    return value is not None and not value.startswith((b"~", b"?"))


@pytest.fixture
def proxies(pg_dsn: str, redis_url: str) -> Iterator[tuple[FaultProxy, FaultProxy]]:
    """Postgres and Redis behind fault proxies (latency set per test)."""
    pg = urllib.parse.urlsplit(pg_dsn)
    rd = urllib.parse.urlsplit(redis_url)
    with (
        FaultProxy(pg.hostname or "127.0.0.1", pg.port or 5432) as pg_proxy,
        FaultProxy(rd.hostname or "127.0.0.1", rd.port or 6379) as redis_proxy,
    ):
        yield pg_proxy, redis_proxy


def _configure(
    mode: str,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    pg_dsn: str,
    redis_url: str,
    schema: str,
    prefix: str,
    proxies: tuple[FaultProxy, FaultProxy] | None,
) -> Backend:
    backend = Backend(mode, pg_dsn, schema, redis_url, prefix)
    if mode == "memory":
        return backend
    dsn = pg_dsn if proxies is None else _proxied(pg_dsn, proxies[0])
    url = redis_url if proxies is None else _proxied(redis_url, proxies[1])
    if mode == "cluster":
        url = backend.redis_url = request.getfixturevalue("redis_cluster_url")
    monkeypatch.setenv("POSTGRES_DSN", schema_dsn(dsn, schema))
    monkeypatch.setenv("REDIS_URL", url)
    monkeypatch.setenv("VEL_KEY_PREFIX", prefix)
    return backend


@pytest.fixture(params=["memory", "database", "redis"])
def slow_backend(
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    pg_dsn: str,
    redis_url: str,
    migrated_schema: str,
    key_prefix: str,
    proxies: tuple[FaultProxy, FaultProxy],
) -> Backend:
    """Each storage mode, its backends 2 ms (each way) away."""
    for proxy in proxies:
        proxy.set_latency(0.002)
    return _configure(
        request.param, request, monkeypatch, pg_dsn, redis_url, migrated_schema, key_prefix, proxies
    )


@pytest.fixture(params=["memory", "database", "redis", "cluster"])
def any_backend(
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    pg_dsn: str,
    redis_url: str,
    migrated_schema: str,
    key_prefix: str,
) -> Backend:
    """Each storage mode (a Redis Cluster too), talking to the servers directly."""
    return _configure(
        request.param, request, monkeypatch, pg_dsn, redis_url, migrated_schema, key_prefix, None
    )


# -- turns --------------------------------------------------------------------------------------


@dataclass
class ToolLog:
    """When the turns' tool ran (monotonic seconds) and with what."""

    calls: list[tuple[float, str]] = field(default_factory=list)

    def tool(self) -> Any:
        async def note(tag: str) -> str:
            """Record that the turn ran its tool.

            Args:
                tag: the turn's tag.
            """
            self.calls.append((time.monotonic(), tag))
            return f"noted {tag}"

        return note


def tool_turn(tag: str, slow: float) -> str:
    """A turn that calls the ``note`` tool once, then answers (two model steps)."""
    return f'{tag} [[call note {{"tag": "{tag}"}}]] [[slow {slow}]]'


@dataclass
class Outcome:
    """What the caller saw of one cancelled-or-not turn."""

    how: str
    at: float
    returned: bool = False
    exc: BaseException | None = None
    locked: SessionLockedError | None = None
    receipt: vel.TurnReceipt = field(default_factory=vel.TurnReceipt)

    @property
    def told_stored(self) -> bool:
        """What vel told the caller: the turn is stored."""
        if self.returned:
            return True
        if self.locked is not None:
            return False
        if self.exc is not None:
            told = vel.turn_committed(self.exc)
            assert told == self.receipt.stored, (self.exc, told, self.receipt)
            return bool(told)
        return bool(self.receipt.stored)


async def cancelled_turn(agent: Agent, sid: str, message: str, how: str, at: float) -> Outcome:
    """One ``agent.run`` cancelled after ``at`` seconds, the way ``how`` says."""
    out = Outcome(how, at)

    async def run() -> str:
        return await agent.run({"message": message}, session_id=sid, receipt=out.receipt)

    try:
        if how == "wait_for":
            await asyncio.wait_for(run(), at)
            out.returned = True
        elif how == "timeout":
            async with asyncio.timeout(at):
                await run()
            out.returned = True
        elif how == "move_on_after":
            with anyio.move_on_after(at):
                await run()
                out.returned = True
        else:
            task = asyncio.create_task(run())
            await asyncio.sleep(at)
            task.cancel()
            await task
            out.returned = True
    except (TimeoutError, asyncio.CancelledError) as exc:
        out.exc = exc
    except SessionLockedError as exc:  # a lock left by an earlier turn: reported by the test
        out.exc = out.locked = exc
    return out


def turns_of(history: list[Message]) -> list[tuple[str, list[Message]]]:
    """Split a session into turns (each starts with its user message); checks each is whole:
    a tool turn is user, assistant tool call, tool result, answer; a plain turn user, answer."""
    turns: list[tuple[str, list[Message]]] = []
    for message in history:
        if message["role"] == "user":
            turns.append((str(message["content"]).split(" ")[0], [message]))
        else:
            assert turns, f"the session starts with a {message['role']} message: {history}"
            turns[-1][1].append(message)
    for tag, messages in turns:
        roles = [m["role"] for m in messages]
        if "[[call" in str(messages[0]["content"]):
            assert roles == ["user", "assistant", "tool", "assistant"], (tag, roles)
            assert messages[1]["tool_calls"][0]["id"] == messages[2]["tool_call_id"], messages
            assert messages[2]["content"] == f"noted {tag}", messages
            assert messages[3]["content"] == f"Tool results: noted {tag}", messages
        else:
            assert roles == ["user", "assistant"], (tag, roles)
    return turns


async def timed_turn(agent: Agent, sid: str, message: str) -> float:
    began = time.monotonic()
    await agent.run({"message": message}, session_id=sid)
    return time.monotonic() - began


# -- 1. cancelled turns are all-or-nothing, and the caller can tell which -------------------------


async def test_cancelled_turns_are_whole_or_absent_as_the_caller_was_told(
    slow_backend: Backend, srv: FakeOpenAIServer
) -> None:
    """Random cancellations over the whole turn (commit included), each followed by a turn on
    the same session that must not find the lock held (``lock_timeout`` 0 tries once)."""
    trials = int(sized(24, 500))
    rng = random.Random(f"{slow_backend.mode}-{trials}")
    log = ToolLog()
    run_id = uuid.uuid4().hex[:8]
    sids = [f"cx-{run_id}-{k}" for k in range(8)]
    outcomes: dict[str, Outcome] = {}
    locked_next: list[str] = []
    async with Agent(
        id="cancel",
        model=model_for(srv),
        session_storage=slow_backend.storage,
        tools=[log.tool()],
        policies={"lock_timeout": 0},
    ) as agent:
        for k, sid in enumerate(sids):  # the sessions exist (warm in Redis) as in a service
            await agent.run({"message": f"w{k}"}, session_id=sid)
        # The turn's length under the machine's current load: the median of the last 9
        # uncancelled turns of the same shape (each trial's follow-up turn is one).
        durations = [await timed_turn(agent, sids[k], tool_turn(f"t{k}", 0.002)) for k in range(5)]
        for i in range(trials):
            turn = statistics.median(durations[-9:])
            sid = sids[i % len(sids)]
            tag = f"c{i}"
            how = HOW[i % len(HOW)]
            # Half over the whole turn, half over its last quarter, where the commit is.
            at = rng.uniform(0, 1.1 * turn) if i % 2 else rng.uniform(0.75 * turn, 1.05 * turn)
            outcomes[tag] = await cancelled_turn(agent, sid, tool_turn(tag, 0.002), how, at)
            try:
                durations.append(await timed_turn(agent, sid, tool_turn(f"n{i}", 0.002)))
            except SessionLockedError:
                locked_next.append(tag)
        histories = {sid: await agent.store.load(sid) for sid in sids}
        still_locked = await slow_backend.locked(agent, sids)

    stored = {tag for sid in sids for tag, _ in turns_of(histories[sid])}
    told_stored = {tag for tag, o in outcomes.items() if o.told_stored}
    cancelled = {tag for tag, o in outcomes.items() if not o.returned}
    wrong = sorted(
        (tag, outcomes[tag].how, outcomes[tag].at, tag in stored)
        for tag in outcomes
        if (tag in stored) != (tag in told_stored)
    )
    figures = {
        "mode": slow_backend.mode,
        "trials": trials,
        "turn_seconds_median": round(statistics.median(durations), 4),
        "returned": trials - len(cancelled),
        "cancelled": len(cancelled),
        "cancelled_but_stored (committed, as told)": len(cancelled & stored & told_stored),
        "stored_not_as_told": len(wrong),
        "next_turn_locked": len(locked_next),
        "turn_locked": sum(o.locked is not None for o in outcomes.values()),
        "locked_after": len(still_locked),
        "python": f"{__import__('sys').version_info[:2]}",
    }
    print("\ncancelled turns:", json.dumps(figures))
    write_figures(f"cancelled_turns_{slow_backend.mode}", figures)
    assert wrong == [], f"stored differs from what the caller was told: {wrong[:10]}"
    assert locked_next == [], f"the next turn found the lock held after {locked_next[:10]}"
    assert figures["turn_locked"] == 0, figures
    assert still_locked == []
    # Every follow-up turn (never cancelled) is stored, in order after its trial.
    for sid in sids:
        tags = [tag for tag, _ in turns_of(histories[sid])]
        nexts = [t for t in tags if t.startswith("n")]
        assert nexts == sorted(nexts, key=lambda t: int(t[1:])), tags
    assert len({t for t in stored if t.startswith("n")}) == trials


class SlowCommitStore(MemoryStore):
    """A store object (a user may pass their own) whose append takes ``delay`` seconds."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay
        self.appending = asyncio.Event()

    async def append(self, session_id: str, messages: Any, message_ids: Any = None) -> int:
        self.appending.set()
        await asyncio.sleep(self.delay)
        return await super().append(session_id, messages, message_ids)


@pytest.mark.parametrize("how", ["timeout", "cancel", "move_on_after"])
async def test_a_cancellation_during_the_commit_lets_it_finish_then_propagates(
    srv: FakeOpenAIServer, how: str
) -> None:
    store = SlowCommitStore(0.3)
    receipt = vel.TurnReceipt()
    async with Agent(id="c", model=model_for(srv), session_storage=store) as agent:
        task = asyncio.current_task()
        assert task is not None
        began = time.monotonic()
        caught: BaseException | None = None

        async def run() -> None:
            await agent.run({"message": "hello"}, session_id="s", receipt=receipt)

        async def cancel_when_appending(cancel: Any) -> None:
            await store.appending.wait()
            await asyncio.sleep(0.05)
            cancel()

        try:
            if how == "timeout":
                async with asyncio.timeout(None) as deadline:
                    watcher = asyncio.create_task(
                        cancel_when_appending(lambda: deadline.reschedule(-1))
                    )
                    await run()
            elif how == "cancel":
                inner = asyncio.create_task(run())
                watcher = asyncio.create_task(cancel_when_appending(inner.cancel))
                await inner
            else:
                with anyio.CancelScope() as scope:
                    watcher = asyncio.create_task(cancel_when_appending(scope.cancel))
                    await run()
                assert scope.cancelled_caught
        except (TimeoutError, asyncio.CancelledError) as exc:
            caught = exc
        await watcher
        elapsed = time.monotonic() - began
        if how == "move_on_after":
            assert caught is None
        else:
            assert isinstance(caught, TimeoutError if how == "timeout" else asyncio.CancelledError)
            assert vel.turn_committed(caught) is True
            assert any("stored" in note for note in vel_notes(caught)), vel_notes(caught)
        assert receipt.stored is True and receipt.seq == 2, receipt
        assert elapsed >= 0.3  # the commit was not cut short
        assert await store.load("s") == [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "You said: hello"},
        ]
        assert await agent.run({"message": "next"}, session_id="s") == "You said: next"


class LostReplyStore(MemoryStore):
    """A store whose append is sent, then fails the way a lost reply does."""

    def __init__(self) -> None:
        super().__init__()
        self.appending = asyncio.Event()

    async def append(self, session_id: str, messages: Any, message_ids: Any = None) -> int:
        self.appending.set()
        await asyncio.sleep(0.2)
        raise StoreUnavailableError("the connection broke before the reply came")


async def test_a_commit_that_failed_after_it_was_sent_is_reported_as_unknown(
    srv: FakeOpenAIServer,
) -> None:
    store = LostReplyStore()
    async with Agent(id="c", model=model_for(srv), session_storage=store) as agent:
        receipt = vel.TurnReceipt()
        with pytest.raises(StoreUnavailableError) as failed:
            await agent.run({"message": "hello"}, session_id="s", receipt=receipt)
        assert vel.turn_committed(failed.value) is None
        assert receipt.stored is None and receipt.seq is None

        # Cancelled meanwhile: the cancellation propagates (unchanged), the failure noted.
        receipt = vel.TurnReceipt()
        store.appending.clear()
        task = asyncio.create_task(agent.run({"message": "again"}, session_id="s", receipt=receipt))
        await store.appending.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError) as cancelled:
            await task
        assert vel.turn_committed(cancelled.value) is None
        assert any("StoreUnavailableError" in note for note in vel_notes(cancelled.value))
        assert receipt.stored is None


def vel_notes(exc: BaseException) -> list[str]:
    notes: list[str] = []
    seen: BaseException | None = exc
    while seen is not None:
        notes += getattr(seen, "__notes__", [])
        seen = seen.__cause__ or seen.__context__
    return notes


async def test_a_cancellation_before_the_commit_stores_nothing_and_says_so(
    srv: FakeOpenAIServer,
) -> None:
    receipt = vel.TurnReceipt()
    async with Agent(id="c", model=model_for(srv)) as agent:
        with pytest.raises(TimeoutError) as caught:
            async with asyncio.timeout(0.1):
                await agent.run({"message": "hi [[slow 0.05]]"}, session_id="s", receipt=receipt)
        assert vel.turn_committed(caught.value) is False
        assert receipt.stored is False and receipt.seq is None
        assert await agent.ctxmgr.aget_session_context("s") == []
        assert vel.turn_committed(ValueError("unrelated")) is False


# -- 2. the turn lock is released whatever ends the turn -----------------------------------------


async def test_an_anyio_timeout_mid_model_leaves_no_lock(
    any_backend: Backend, srv: FakeOpenAIServer
) -> None:
    """Failing input 7: a 0.3 s model, ``anyio.move_on_after(0.1)``, then the next turn."""
    sid = f"an-{uuid.uuid4().hex[:8]}"
    async with Agent(
        id="a",
        model=model_for(srv),
        session_storage=any_backend.storage,
        policies={"lock_timeout": 0},
    ) as agent:
        for i in range(3):
            with anyio.move_on_after(0.1) as scope:
                await agent.run({"message": f"t{i} [[slow 0.06]] a b c d e"}, session_id=sid)
            assert scope.cancelled_caught
            assert await any_backend.locked(agent, [sid]) == []
            assert await agent.run({"message": f"n{i}"}, session_id=sid) == f"You said: n{i}"
        assert [m["content"] for m in await agent.store.load(sid)] == [
            "n0",
            "You said: n0",
            "n1",
            "You said: n1",
            "n2",
            "You said: n2",
        ]


async def test_cancellations_in_the_first_milliseconds_leave_no_lock(
    any_backend: Backend, srv: FakeOpenAIServer
) -> None:
    """Cancelled 0-4 ms in (acquiring the lock, reading the window): the server may have
    granted the lock while its reply was never read; the lock must be released anyway."""
    trials = int(sized(40, 200))
    rng = random.Random(trials)
    run_id = uuid.uuid4().hex[:8]
    sids = [f"early-{run_id}-{k}" for k in range(10)]
    cancelled = 0
    async with Agent(
        id="e",
        model=model_for(srv),
        session_storage=any_backend.storage,
        policies={"lock_timeout": 0},
    ) as agent:
        for sid in sids:  # sessions exist (warm in Redis), as in a running service
            await agent.run({"message": "w"}, session_id=sid)
        for i in range(trials):
            how = ("timeout", "move_on_after")[i % 2]
            out = await cancelled_turn(
                agent, sids[i % len(sids)], f"e{i} [[slow 0.05]]", how, rng.uniform(0, 0.004)
            )
            cancelled += not out.returned
        locked = await any_backend.locked(agent, sids)
    figures = {"mode": any_backend.mode, "turns": trials, "cancelled": cancelled}
    figures["sessions_locked_after"] = len(locked)
    print("\nearly cancellations:", json.dumps(figures))
    write_figures(f"early_cancellations_{any_backend.mode}", figures)
    assert cancelled == trials
    assert locked == []


# -- 4. deadlines are honoured at the turn's own boundaries ---------------------------------------


async def test_no_tool_runs_and_nothing_is_stored_after_a_short_deadline(
    any_backend: Backend, srv: FakeOpenAIServer
) -> None:
    """Failing input 8: ``asyncio.timeout(0-4 ms)`` around a turn whose model takes 0.3 s and
    asks for a tool. Whatever a driver does with the cancellation (Python 3.11's ``wait_for``
    can drop it), vel checks at its own boundaries: no tool runs, nothing is stored."""
    trials = int(sized(40, 100))
    rng = random.Random(trials)
    log = ToolLog()
    sids = [f"dl-{uuid.uuid4().hex[:8]}-{k}" for k in range(10)]
    late: list[str] = []
    async with Agent(
        id="d",
        model=model_for(srv),
        session_storage=any_backend.storage,
        tools=[log.tool()],
        policies={"lock_timeout": 5},
    ) as agent:
        for sid in sids:
            await agent.run({"message": "w"}, session_id=sid)
        for i in range(trials):
            tag = f"d{i}"
            out = await cancelled_turn(
                agent, sids[i % len(sids)], tool_turn(tag, 0.06), "timeout", rng.uniform(0, 0.004)
            )
            if out.returned:
                late.append(tag)
        stored = {
            tag
            for sid in sids
            for tag, _ in turns_of(await agent.store.load(sid))
            if tag.startswith("d")
        }
    figures = {
        "mode": any_backend.mode,
        "turns": trials,
        "returned_after_deadline": len(late),
        "tools_run": len(log.calls),
        "stored": len(stored),
        "python": f"{__import__('sys').version_info[:2]}",
    }
    print("\nshort deadlines:", json.dumps(figures))
    write_figures(f"short_deadlines_{any_backend.mode}", figures)
    assert late == [] and log.calls == [] and stored == set(), figures
