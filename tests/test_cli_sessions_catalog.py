"""``vel sessions list|show|delete|export|import`` with owners, metadata, cursors and pages, run
as the operator runs them (a ``vel`` process against the real services)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from test_cli_ops import Env

from vel import ContextManager


@pytest.fixture
async def ops(
    pg_dsn: str, migrated_schema: str, redis_url: str, key_prefix: str
) -> AsyncIterator[Env]:
    e = Env(pg_dsn, migrated_schema, redis_url, key_prefix)
    try:
        yield e
    finally:
        await e.store.aclose()


def manager(env: Env) -> ContextManager:
    cm = ContextManager()
    cm.bind(env.store)
    return cm


def msg(i: int) -> dict[str, Any]:
    return {"role": "user", "content": f"message {i}"}


async def seed(env: Env) -> None:
    cm = manager(env)
    for sid, owner, title in (("a1", "ann", "one"), ("a2", "ann", "two"), ("b1", "bob", "x")):
        await cm.aset_session_details(sid, owner=owner, metadata={"title": title})
        await env.store.append(sid, [msg(i) for i in range(1, 6)])
    await env.store.append("a1", [msg(6)])  # a1 is now ann's most recent
    assert await env.store.flush(10)


async def test_list_by_owner_and_metadata_a_page_at_a_time(ops: Env) -> None:
    await seed(ops)
    first = await ops.vel("sessions", "list", "--owner", "ann", "--limit", "1", "--json")
    assert first.returncode == 0, first.stderr
    assert [json.loads(line)["id"] for line in first.stdout.splitlines()] == ["a1"]
    row = json.loads(first.stdout)
    assert (row["owner"], row["metadata"], row["messages"]) == ("ann", {"title": "one"}, 6)
    cursor = first.stderr.split("--cursor ")[1].split(")")[0].strip()
    second = await ops.vel("sessions", "list", "--cursor", cursor, "--limit", "1", "--json")
    assert [json.loads(line)["id"] for line in second.stdout.splitlines()] == ["a2"]
    assert "--cursor" not in second.stderr
    found = await ops.vel("sessions", "list", "--metadata", '{"title": "x"}', "--json")
    assert [json.loads(line)["id"] for line in found.stdout.splitlines()] == ["b1"]
    bad = await ops.vel("sessions", "list", "--cursor", "garbage")
    assert bad.returncode != 0 and "cursor" in bad.stderr


async def test_show_prints_details_and_pages_back(ops: Env) -> None:
    await seed(ops)
    shown = await ops.vel("sessions", "show", "a1", "--before", "4", "--limit", "2")
    assert shown.returncode == 0, shown.stderr
    assert "owner ann, 6 messages" in shown.stderr
    assert [line.split()[0] for line in shown.stdout.splitlines()] == ["2", "3"]


async def test_delete_by_owner_forgets_every_session_of_it(ops: Env) -> None:
    await seed(ops)
    done = await ops.vel("sessions", "delete", "--owner", "ann")
    assert done.returncode == 0, done.stderr
    assert "deleted 2 sessions of owner ann" in done.stdout
    for sid in ("a1", "a2"):
        assert await ops.store.load(sid) == []
        assert await ops.store.cold.load(sid) == []
    assert len(await ops.store.load("b1")) == 5
    both = await ops.vel("sessions", "delete", "b1", "--owner", "bob")
    assert both.returncode != 0


async def test_export_and_import_carry_the_owner(ops: Env, tmp_path: Any) -> None:
    await seed(ops)
    out = tmp_path / "export.jsonl"
    exported = await ops.vel("sessions", "export", "--out", str(out))
    assert exported.returncode == 0, exported.stderr
    lines = {e["id"]: e for e in map(json.loads, out.read_text().splitlines())}
    assert (lines["a1"]["owner"], lines["a1"]["metadata"]) == ("ann", {"title": "one"})
    await manager(ops).adelete_owner_sessions("ann")
    imported = await ops.vel("sessions", "import", str(out))
    assert imported.returncode == 0, imported.stderr
    info = await manager(ops).aget_session_info("a1")
    assert info is not None and (info.owner, info.metadata, info.message_count) == (
        "ann",
        {"title": "one"},
        6,
    )


@pytest.mark.parametrize(
    ("argv", "shown"),
    [
        (("sessions", "list", "--limit", "0"), "from 1 to 2147483647"),
        (("sessions", "show", "a1", "--limit", "0"), "from 1 to 1000"),
        (("sessions", "show", "a1", "--limit", "1001"), "from 1 to 1000"),
    ],
)
async def test_a_limit_out_of_range_is_a_usage_error_naming_the_range(
    ops: Env, argv: tuple[str, ...], shown: str
) -> None:
    """docs/operations.md: a numeric option out of its range is a usage error (exit 2) that
    names the range. `--limit 0` ended with exit 1 from the store's own check, and `show`
    took any integer (newuser trial F9)."""
    done = await ops.vel(*argv)
    assert done.returncode == 2, done.stderr
    assert "--limit" in done.stderr and shown in done.stderr, done.stderr
