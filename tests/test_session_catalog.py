"""Organising sessions in every mode: owner and metadata, listings by cursor, history pages,
deletion by owner (the calls of agent.ctxmgr, against real Redis and Postgres)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from vel import ContextManager
from vel.errors import InvalidInputError
from vel.stores.base import SessionStore
from vel.stores.memory import MemoryStore
from vel.stores.postgres import PostgresStore
from vel.stores.redis import RedisStore
from vel.stores.tiered import TieredStore

MODES = ["memory", "database", "redis", "redis-only"]


def msg(i: int, role: str = "user") -> dict[str, Any]:
    return {"role": role, "content": f"message {i}"}


def uid(kind: str = "s") -> str:
    return f"{kind}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(params=MODES)
async def cm(
    request: pytest.FixtureRequest,
    pg_dsn: str,
    migrated_schema: str,
    redis_url: str,
    key_prefix: str,
) -> AsyncIterator[ContextManager]:
    store: SessionStore
    if request.param == "memory":
        store = MemoryStore()
    elif request.param == "database":
        store = PostgresStore(pg_dsn, schema=migrated_schema)
    elif request.param == "redis-only":
        store = RedisStore(redis_url, key_prefix=key_prefix, write_behind=False)
    else:
        store = TieredStore(
            RedisStore(redis_url, key_prefix=key_prefix, write_behind=True, flush_delay=0),
            PostgresStore(pg_dsn, schema=migrated_schema),
            flusher=False,
        )
    manager = ContextManager()
    manager.bind(store)
    try:
        yield manager
    finally:
        await store.aclose()


async def settle(cm: ContextManager) -> None:
    """What a flush interval does in 'redis' mode: bring Postgres up to date."""
    if isinstance(cm.store, TieredStore):
        assert await cm.store.flush(10)


async def turn(cm: ContextManager, session_id: str, *messages: dict[str, Any]) -> None:
    await cm.store.append(session_id, list(messages))


async def test_details_set_before_the_first_turn_are_read_back_with_the_info(
    cm: ContextManager,
) -> None:
    s, owner = uid(), uid("u")
    assert await cm.aget_session_info(s) is None
    await cm.aset_session_details(s, owner=owner, metadata={"title": "Trip", "tags": ["a"]})
    assert await cm.aget_session_info(s) is None  # no messages yet
    await turn(cm, s, msg(1), msg(2, "assistant"))
    info = await cm.aget_session_info(s)
    assert info is not None
    assert (info.session_id, info.owner, info.metadata, info.message_count) == (
        s,
        owner,
        {"title": "Trip", "tags": ["a"]},
        2,
    )
    assert info.created_at <= info.updated_at


async def test_details_set_later_keep_what_is_not_given(cm: ContextManager) -> None:
    s = uid()
    await turn(cm, s, msg(1))
    info = await cm.aget_session_info(s)
    assert info is not None and (info.owner, info.metadata) == (None, {})
    await cm.aset_session_details(s, metadata={"title": "x"})
    await cm.aset_session_details(s, owner="alice")
    info = await cm.aget_session_info(s)
    assert info is not None and (info.owner, info.metadata) == ("alice", {"title": "x"})
    await cm.aset_session_details(s, owner=None, metadata={})
    info = await cm.aget_session_info(s)
    assert info is not None and (info.owner, info.metadata) == (None, {})


async def test_details_outlive_a_clear_but_the_info_needs_messages(cm: ContextManager) -> None:
    s = uid()
    await turn(cm, s, msg(1))
    await cm.aset_session_details(s, owner="bob")
    await cm.aclear_session(s)
    assert await cm.aget_session_info(s) is None
    await turn(cm, s, msg(2))
    info = await cm.aget_session_info(s)
    assert info is not None and (info.owner, info.message_count) == ("bob", 1)


@pytest.mark.parametrize(
    "bad",
    [{"owner": ""}, {"owner": 5}, {"metadata": [1]}, {"metadata": {"x": object()}}],
)
async def test_bad_details_are_refused(cm: ContextManager, bad: dict[str, Any]) -> None:
    with pytest.raises(InvalidInputError):
        await cm.aset_session_details(uid(), **bad)


async def test_an_owners_sessions_are_listed_newest_first_or_oldest_first(
    cm: ContextManager,
) -> None:
    owner, other = uid("u"), uid("u")
    ids = [uid() for _ in range(4)]
    for s in ids:
        await cm.aset_session_details(s, owner=owner)
        await turn(cm, s, msg(1))
        await asyncio.sleep(0.002)  # distinct activity times
    await cm.aset_session_details("not-mine", owner=other)
    await turn(cm, "not-mine", msg(1))
    await turn(cm, ids[1], msg(2))  # the most recent activity now
    await settle(cm)
    newest = await cm.afind_sessions(owner)
    assert [i.session_id for i in newest.sessions] == [ids[1], ids[3], ids[2], ids[0]]
    assert newest.next_cursor is None
    assert newest.sessions[0].message_count == 2
    oldest = await cm.afind_sessions(owner, order="oldest")
    assert [i.session_id for i in oldest.sessions] == [ids[0], ids[2], ids[3], ids[1]]


async def test_metadata_filters_by_containment(cm: ContextManager) -> None:
    owner = uid("u")
    work, home = uid(), uid()
    await cm.aset_session_details(work, owner=owner, metadata={"tags": ["work", "x"], "n": 1})
    await cm.aset_session_details(home, owner=owner, metadata={"tags": ["home"], "n": 2})
    for s in (work, home):
        await turn(cm, s, msg(1))
    await settle(cm)
    found = await cm.afind_sessions(owner, metadata={"tags": ["work"]})
    assert [i.session_id for i in found.sessions] == [work]
    found = await cm.afind_sessions(owner, metadata={"n": 2})
    assert [i.session_id for i in found.sessions] == [home]
    found = await cm.afind_sessions(owner, metadata={"n": 3})
    assert found.sessions == []


async def test_cursor_pages_walk_every_session_once(cm: ContextManager) -> None:
    owner = uid("u")
    ids = [uid() for _ in range(7)]
    for s in ids:
        await cm.aset_session_details(s, owner=owner)
        await turn(cm, s, msg(1))
    await settle(cm)
    for order in ("newest", "oldest"):
        seen: list[str] = []
        page = await cm.afind_sessions(owner, order=order, limit=3)
        sizes = [len(page.sessions)]
        seen += [i.session_id for i in page.sessions]
        while page.next_cursor is not None:
            page = await cm.afind_sessions(cursor=page.next_cursor, limit=3)
            sizes.append(len(page.sessions))
            seen += [i.session_id for i in page.sessions]
        assert sizes == [3, 3, 1]
        assert sorted(seen) == sorted(ids)
        expected = await cm.afind_sessions(owner, order=order, limit=100)
        assert seen == [i.session_id for i in expected.sessions]


async def test_paging_never_skips_or_repeats_while_sessions_are_created_and_written(
    cm: ContextManager,
) -> None:
    """Sessions unchanged during the listing come exactly once; none comes twice."""
    owner = uid("u")
    ids = [uid() for _ in range(30)]
    for s in ids:
        await cm.aset_session_details(s, owner=owner)
        await turn(cm, s, msg(1))
    await settle(cm)
    for order in ("newest", "oldest"):
        written: set[str] = set()
        seen: list[str] = []
        page = await cm.afind_sessions(owner, order=order, limit=4)
        n = 0
        while True:
            seen += [i.session_id for i in page.sessions]
            # Between pages: a new session, and writes to one already listed and one not yet.
            fresh = uid()
            await cm.aset_session_details(fresh, owner=owner)
            await turn(cm, fresh, msg(1))
            written.add(fresh)
            listed = seen[n % len(seen)]
            unlisted = [s for s in ids if s not in seen]
            for s in [listed, *unlisted[:1]]:
                await turn(cm, s, msg(2))
                written.add(s)
            await settle(cm)
            n += 1
            if page.next_cursor is None:
                break
            page = await cm.afind_sessions(cursor=page.next_cursor, limit=4)
        assert len(seen) == len(set(seen)), f"{order}: a session was listed twice"
        unchanged = [s for s in ids if s not in written]
        assert unchanged and all(s in seen for s in unchanged), f"{order}: one was skipped"
        ids += sorted(written - set(ids))


async def test_a_bad_cursor_is_refused(cm: ContextManager) -> None:
    for cursor in ("nope", "eyJ2IjoxfQ", ""):
        with pytest.raises(InvalidInputError):
            await cm.afind_sessions(cursor=cursor)
    owner = uid("u")
    for _ in range(3):
        s = uid()
        await cm.aset_session_details(s, owner=owner)
        await turn(cm, s, msg(1))
    await settle(cm)
    page = await cm.afind_sessions(owner, limit=1)
    assert page.next_cursor is not None
    with pytest.raises(InvalidInputError, match="another owner"):
        await cm.afind_sessions("someone-else", cursor=page.next_cursor)


async def test_history_pages_go_back_and_forth(cm: ContextManager) -> None:
    s = uid()
    await turn(cm, s, *[msg(i) for i in range(1, 24)])
    last = await cm.aget_session_messages(s, limit=5)
    assert last.seqs == [19, 20, 21, 22, 23] and last.messages == [msg(i) for i in last.seqs]
    assert (last.last_seq, last.has_older, last.has_newer) == (23, True, False)
    back, pages = last, [last.seqs]
    while back.has_older:
        back = await cm.aget_session_messages(s, before=back.seqs[0], limit=5)
        pages.append(back.seqs)
    assert [seq for page in reversed(pages) for seq in page] == list(range(1, 24))
    assert back.seqs == [1, 2, 3]
    forward = await cm.aget_session_messages(s, after=20, limit=5)
    assert forward.seqs == [21, 22, 23] and not forward.has_newer
    middle = await cm.aget_session_messages(s, after=5, before=9, limit=10)
    assert middle.messages == [msg(6), msg(7), msg(8)]
    assert (middle.has_older, middle.has_newer) == (True, True)
    empty = await cm.aget_session_messages(uid())
    assert (empty.messages, empty.last_seq) == ([], 0)


async def test_history_pages_check_their_arguments(cm: ContextManager) -> None:
    for bad in ({"before": -1}, {"after": "3"}, {"limit": 0}, {"limit": 5000}):
        with pytest.raises(InvalidInputError):
            await cm.aget_session_messages(uid(), **bad)


async def test_deleting_an_owner_deletes_its_sessions_and_details_only(
    cm: ContextManager,
) -> None:
    owner, other = uid("u"), uid("u")
    mine = [uid() for _ in range(3)]
    keep = uid()
    for s in mine:
        await cm.aset_session_details(s, owner=owner, metadata={"title": s})
        await turn(cm, s, msg(1), msg(2))
    await cm.aset_session_details(keep, owner=other)
    await turn(cm, keep, msg(1))
    await settle(cm)
    assert await cm.adelete_owner_sessions(owner) == 3
    for s in mine:
        assert await cm.aget_session_context(s) == []
        assert await cm.aget_session_info(s) is None
    await settle(cm)
    assert (await cm.afind_sessions(owner)).sessions == []
    assert await cm.aget_session_context(keep) == [msg(1)]
    # A new turn of a deleted session starts afresh, with no owner.
    await turn(cm, mine[0], msg(3))
    info = await cm.aget_session_info(mine[0])
    assert info is not None and (info.owner, info.metadata, info.message_count) == (None, {}, 1)
    assert await cm.adelete_owner_sessions(owner) == 0


def test_plain_calls_work_outside_an_event_loop() -> None:
    manager = ContextManager()
    manager.set_session_details("p1", owner="u1", metadata={"title": "t"})
    asyncio.run(manager.store.append("p1", [msg(1)]))
    info = manager.get_session_info("p1")
    assert info is not None and info.owner == "u1"
    assert [i.session_id for i in manager.find_sessions("u1").sessions] == ["p1"]
    assert manager.get_session_messages("p1").messages == [msg(1)]
    assert manager.delete_owner_sessions("u1") == 1


async def test_redis_only_details_expire_with_their_session(
    redis_url: str, key_prefix: str
) -> None:
    store = RedisStore(redis_url, key_prefix=key_prefix, write_behind=False, hot_ttl=30)
    cm = ContextManager()
    cm.bind(store)
    try:
        s = uid()
        await cm.aset_session_details(s, owner="u", metadata={"t": 1})
        keys = store.keys.session(s)
        redis = (await store.client()).redis
        assert 0 < await redis.pttl(keys.details) <= 30_000  # never without a TTL
        await turn(cm, s, msg(1))
        await redis.pexpire(keys.meta, 500_000)  # the session lives on (reads slide its TTL)
        assert await cm.aget_session_info(s) is not None
        assert await redis.pttl(keys.details) > 30_000  # the details follow it
    finally:
        await store.aclose()


@pytest.mark.parametrize("order", ["newest", "oldest"])
async def test_paging_while_writers_run_concurrently(
    cm: ContextManager, request: pytest.FixtureRequest, order: str
) -> None:
    """A writer task creates sessions and writes to existing ones while a reader pages."""
    if request.node.callspec.params["cm"] == "redis-only":
        pytest.skip("Redis-only snapshots are times: exact only beyond the clock's resolution")
    owner = uid("u")
    ids = [uid() for _ in range(40)]
    for s in ids:
        await cm.aset_session_details(s, owner=owner)
        await turn(cm, s, msg(1))
    await settle(cm)
    touched: set[str] = set()
    stop = asyncio.Event()

    async def writer() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            if n % 3 == 0:
                s = uid()
                touched.add(s)
                await cm.aset_session_details(s, owner=owner)
            else:
                s = ids[::2][(n * 7) % (len(ids) // 2)]  # every other session, in turn
                touched.add(s)  # before the write: a superset of what changed
            await turn(cm, s, msg(n))
            await settle(cm)
            await asyncio.sleep(0.001)

    task = asyncio.create_task(writer())
    try:
        seen: list[str] = []
        page = await cm.afind_sessions(owner, order=order, limit=3)
        seen += [i.session_id for i in page.sessions]
        while page.next_cursor is not None:
            await asyncio.sleep(0.005)
            page = await cm.afind_sessions(cursor=page.next_cursor, limit=3)
            seen += [i.session_id for i in page.sessions]
    finally:
        stop.set()
        await task
    assert len(seen) == len(set(seen)), "a session was listed twice"
    untouched = [s for s in ids if s not in touched]
    assert set(untouched) <= set(seen), "a session unchanged during the listing was skipped"
    assert touched, "no concurrent writes happened"
