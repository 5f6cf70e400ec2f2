"""The contract every SessionStore keeps: memory, Postgres, Redis-only and tiered alike."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from stores import CLUSTER_KINDS, STORE_KINDS, make_store

from vel.errors import InvalidInputError, SessionLockedError
from vel.stores.base import SessionStore


@pytest.fixture(params=STORE_KINDS)
async def store(
    request: pytest.FixtureRequest,
    pg_dsn: str,
    migrated_schema: str,
    redis_url: str,
    key_prefix: str,
) -> AsyncIterator[SessionStore]:
    if request.param in CLUSTER_KINDS:
        redis_url = request.getfixturevalue("redis_cluster_url")
    async with make_store(
        request.param,
        pg_dsn=pg_dsn,
        schema=migrated_schema,
        redis_url=redis_url,
        prefix=key_prefix,
    ) as s:
        yield s


def msg(i: int, role: str = "user") -> dict[str, object]:
    return {"role": role, "content": f"message {i}"}


def sid() -> str:
    return f"s-{uuid.uuid4().hex[:8]}"


async def test_unknown_session_is_empty(store: SessionStore) -> None:
    assert await store.load(sid()) == []


async def test_append_returns_last_seq_and_keeps_order(store: SessionStore) -> None:
    s = sid()
    assert await store.append(s, [msg(1), msg(2, "assistant")]) == 2
    assert await store.append(s, [msg(3)]) == 3
    assert await store.load(s) == [msg(1), msg(2, "assistant"), msg(3)]


async def test_window_returns_the_last_n_in_order(store: SessionStore) -> None:
    s = sid()
    await store.append(s, [msg(i) for i in range(10)])
    assert await store.load(s, limit=3) == [msg(7), msg(8), msg(9)]
    assert await store.load(s, limit=0) == []
    assert await store.load(s, limit=50) == [msg(i) for i in range(10)]


async def test_replayed_append_with_same_ids_is_stored_once(store: SessionStore) -> None:
    s = sid()
    ids = [uuid.uuid4().hex, uuid.uuid4().hex]
    assert await store.append(s, [msg(1), msg(2)], message_ids=ids) == 2
    assert await store.append(s, [msg(1), msg(2)], message_ids=ids) == 2
    assert await store.load(s) == [msg(1), msg(2)]


async def test_replace_swaps_the_whole_history(store: SessionStore) -> None:
    s = sid()
    await store.append(s, [msg(1), msg(2)])
    await store.replace(s, [msg(9, "assistant")])
    assert await store.load(s) == [msg(9, "assistant")]
    await store.append(s, [msg(10)])
    assert await store.load(s) == [msg(9, "assistant"), msg(10)]


async def test_clear_forgets_the_session_and_it_can_start_again(store: SessionStore) -> None:
    s = sid()
    await store.append(s, [msg(1)])
    await store.clear(s)
    assert await store.load(s) == []
    await store.clear(sid())  # unknown: no-op
    assert await store.append(s, [msg(2)]) == 1
    assert await store.load(s) == [msg(2)]


async def test_loaded_messages_are_copies(store: SessionStore) -> None:
    s = sid()
    await store.append(s, [{"role": "user", "content": "x", "meta": {"k": [1]}}])
    first = await store.load(s)
    first[0]["meta"]["k"].append(2)
    assert await store.load(s) == [{"role": "user", "content": "x", "meta": {"k": [1]}}]


async def test_messages_round_trip_verbatim(store: SessionStore) -> None:
    s = sid()
    message = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
        ],
    }
    tool = {"role": "tool", "tool_call_id": "c1", "content": 'héllo ✓ \n\t "q"'}
    await store.append(s, [message, tool])
    assert await store.load(s) == [message, tool]


# Responses API items as the OpenAI Agents SDK stores them: most have no role.
RESPONSES_ITEMS: list[dict[str, object]] = [
    {"content": "what is the weather?", "role": "user"},
    {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAA=="},
    {
        "type": "function_call",
        "id": "fc_1",
        "call_id": "call_1",
        "name": "weather",
        "arguments": '{"city": "Paris"}',
        "provider_data": {"model": "m", "response_id": "r1"},
    },
    {"type": "function_call_output", "call_id": "call_1", "output": "sunny, 21.5 °C"},
    {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": "Sunny.", "annotations": [], "logprobs": []}],
    },
    {"type": "item_reference", "id": "msg_0"},
    {"id": "msg_0"},
]


async def test_any_json_object_is_kept_verbatim_role_or_not(store: SessionStore) -> None:
    s = sid()
    await store.append(s, RESPONSES_ITEMS[:3])
    await store.append(s, RESPONSES_ITEMS[3:])
    assert await store.load(s) == RESPONSES_ITEMS
    assert await store.load(s, limit=2) == RESPONSES_ITEMS[-2:]
    await store.replace(s, RESPONSES_ITEMS[1:3])
    assert await store.load(s) == RESPONSES_ITEMS[1:3]


@pytest.mark.parametrize(
    "bad_id", ["", "x" * 10_000, "nul\x00id", 42, None], ids=["empty", "10KB", "NUL", "int", "None"]
)
async def test_bad_session_ids_are_rejected(store: SessionStore, bad_id: object) -> None:
    with pytest.raises(InvalidInputError):
        await store.append(bad_id, [msg(1)])  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        await store.load(bad_id)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "bad",
    [
        {"role": "user", "content": object()},
        {"role": "user", "content": "x" * (5 * 1024 * 1024)},
        "not a dict",
        ["a", "list"],
    ],
    ids=["unserialisable", "too-big", "not-a-dict", "a-list"],
)
async def test_bad_messages_are_rejected_and_nothing_changes(
    store: SessionStore, bad: object
) -> None:
    s = sid()
    await store.append(s, [msg(1)])
    with pytest.raises(InvalidInputError):
        await store.append(s, [msg(2), bad])  # type: ignore[list-item]
    with pytest.raises(InvalidInputError):
        await store.replace(s, [bad])  # type: ignore[list-item]
    assert await store.load(s) == [msg(1)]


async def test_deeply_nested_message_is_rejected(store: SessionStore) -> None:
    nested: dict[str, object] = {"role": "user", "content": "x"}
    node = nested
    for _ in range(100_000):
        child: dict[str, object] = {}
        node["n"] = child
        node = child
    with pytest.raises(InvalidInputError):
        await store.append(sid(), [nested])


async def test_ids_with_special_characters_never_share_data(store: SessionStore) -> None:
    ids = [
        "a",
        "a:m",
        "a:h",
        "{a}",
        "a}",
        "{",
        "}",
        "*",
        "a*",
        "a\nb",
        "a b",
        "ünï✓",
        "h:a",
        "{0}:h:a",
        "vel:{0}:h:a",
        "x" * 512,
    ]
    for i, session_id in enumerate(ids):
        await store.append(session_id, [msg(i)])
    for i, session_id in enumerate(ids):
        assert await store.load(session_id) == [msg(i)], session_id


async def test_concurrent_appends_lose_nothing_and_keep_each_batch_contiguous(
    store: SessionStore,
) -> None:
    s = sid()

    async def writer(w: int) -> None:
        for j in range(10):
            await store.append(s, [msg(w * 100 + j), msg(w * 100 + j, "assistant")])

    await asyncio.gather(*(writer(w) for w in range(8)))
    history = await store.load(s)
    assert len(history) == 160
    for k in range(0, 160, 2):
        assert history[k]["content"] == history[k + 1]["content"]
        assert (history[k]["role"], history[k + 1]["role"]) == ("user", "assistant")
    for w in range(8):
        mine = [m["content"] for m in history[::2] if int(str(m["content"]).split()[1]) // 100 == w]
        assert mine == [f"message {w * 100 + j}" for j in range(10)]


async def flushed(store: SessionStore) -> None:
    """Let a two-tier store write everything behind, so what follows acts on Postgres too."""
    flush = getattr(store, "flush", None)
    if flush is not None:
        assert await flush()


async def test_pop_takes_the_newest_message_and_the_next_append_takes_its_seq(
    store: SessionStore,
) -> None:
    s = sid()
    await store.append(s, [msg(1), msg(2), msg(3)])
    await flushed(store)
    assert await store.pop(s) == msg(3)
    assert await store.load(s) == [msg(1), msg(2)]
    assert await store.append(s, [msg(4)]) == 3
    await flushed(store)
    assert await store.load(s) == [msg(1), msg(2), msg(4)]
    assert await store.pop(s) == msg(4)  # not yet written behind, then again after it was
    assert await store.pop(s) == msg(2)
    await flushed(store)
    assert await store.load(s) == [msg(1)]


async def test_pop_keeps_any_item_verbatim(store: SessionStore) -> None:
    s = sid()
    await store.append(s, RESPONSES_ITEMS)
    popped = [await store.pop(s) for _ in RESPONSES_ITEMS]
    assert popped == RESPONSES_ITEMS[::-1]


async def test_pop_of_an_unknown_or_emptied_session_is_none(store: SessionStore) -> None:
    s = sid()
    assert await store.pop(s) is None
    await store.append(s, [msg(1)])
    await flushed(store)
    assert await store.pop(s) == msg(1)
    assert await store.pop(s) is None
    assert await store.load(s) == []
    assert await store.append(s, [msg(2)]) == 1
    assert await store.load(s) == [msg(2)]


async def test_pop_after_clear_finds_nothing(store: SessionStore) -> None:
    s = sid()
    await store.append(s, [msg(1), msg(2)])
    await flushed(store)
    await store.clear(s)
    assert await store.pop(s) is None
    await flushed(store)
    assert await store.load(s) == []


async def test_concurrent_pops_each_take_another_message(store: SessionStore) -> None:
    s = sid()
    await store.append(s, [msg(i) for i in range(20)])
    popped = await asyncio.gather(*(store.pop(s) for _ in range(30)))
    taken = [m["content"] for m in popped if m is not None]
    assert sorted(taken) == sorted(f"message {i}" for i in range(20))
    assert popped.count(None) == 10
    assert await store.load(s) == []


async def test_pops_racing_appends_lose_and_duplicate_nothing(store: SessionStore) -> None:
    s = sid()
    popped: list[dict[str, object]] = []

    async def writer(w: int) -> None:
        for j in range(10):
            await store.append(s, [msg(w * 100 + j), msg(w * 100 + j, "assistant")])

    async def popper() -> None:
        for _ in range(15):
            item = await store.pop(s)
            if item is not None:
                popped.append(item)
            await asyncio.sleep(0)

    await asyncio.gather(*(writer(w) for w in range(4)), popper(), popper())
    await flushed(store)
    remaining = await store.load(s)
    appended = [
        (m["role"], m["content"])
        for w in range(4)
        for j in range(10)
        for m in (msg(w * 100 + j), msg(w * 100 + j, "assistant"))
    ]
    seen = [(m["role"], m["content"]) for m in remaining + popped]
    assert sorted(seen) == sorted(appended)  # every message exactly once, kept or popped
    for w in range(4):  # what is left of each writer keeps its order
        mine = [
            str(m["content"]) for m in remaining if int(str(m["content"]).split()[1]) // 100 == w
        ]
        assert mine == sorted(mine, key=lambda c: int(c.split()[1]))


async def test_pop_refuses_a_bad_session_id(store: SessionStore) -> None:
    with pytest.raises(InvalidInputError):
        await store.pop("")


async def test_list_sessions_filters_by_inactivity(store: SessionStore) -> None:
    old, new = sid(), sid()
    await store.append(old, [msg(1)])
    if hasattr(store, "flush"):
        await store.flush()
    await asyncio.sleep(1.2)
    await store.append(new, [msg(2)])
    if hasattr(store, "flush"):
        await store.flush()
    inactive = [i.session_id for i in await store.list_sessions(inactive_for=1.0)]
    assert old in inactive and new not in inactive
    everything = {i.session_id: i for i in await store.list_sessions()}
    assert {old, new} <= set(everything)
    assert everything[old].message_count == 1


async def test_turn_lock_serialises_holders(store: SessionStore) -> None:
    s = sid()
    order: list[str] = []

    async def turn(name: str) -> None:
        async with store.turn_lock(s, timeout=10):
            order.append(f"{name}-in")
            await asyncio.sleep(0.05)
            order.append(f"{name}-out")

    await asyncio.gather(turn("a"), turn("b"), turn("c"))
    assert all(order[i].split("-")[0] == order[i + 1].split("-")[0] for i in range(0, 6, 2))


async def test_turn_lock_times_out_with_a_typed_error(store: SessionStore) -> None:
    s = sid()
    async with store.turn_lock(s, timeout=5):
        with pytest.raises(SessionLockedError):
            async with store.turn_lock(s, timeout=0.2):
                pass
    async with store.turn_lock(s, timeout=1):
        pass  # released: free again


async def test_stats_reports_numbers(store: SessionStore) -> None:
    await store.append(sid(), [msg(1)])
    stats = await store.stats()
    assert stats and all(isinstance(v, (int, float)) for v in stats.values())
