"""Compare what Postgres and Redis hold against the oracle printed by the append workers.

The oracle is the list of acknowledged appends (``{"event": "ack", ...}`` lines of
``workers.py append``): each names its session, writer (proc, task, i), the two contents it
appended and the seq the store returned for the last of them. A history is a list of
:class:`Row` read straight from a tier (no vel code in between). :func:`compare` reports:

- lost: acknowledged contents missing from the history;
- duplicated: contents present more than once;
- unexpected: contents nobody acknowledged (e.g. an append reported failed yet stored);
- gaps: seqs not exactly 1..N;
- misplaced: an append's two messages not at ``seq - 1`` and ``seq`` (not adjacent, or not
  where the store said);
- order: a task's appends not in increasing seq order.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from vel.stores.redis.keys import KeyLayout


@dataclass(frozen=True, slots=True)
class Ack:
    sid: str
    proc: int
    task: int
    i: int
    seq: int
    contents: tuple[str, ...]
    t: float = 0.0
    tag: str = ""

    @property
    def writer(self) -> tuple[str, int, int]:
        """One sequential writer: a task of one worker run (runs differ by their tag)."""
        return (self.tag, self.proc, self.task)


@dataclass(frozen=True, slots=True)
class Row:
    seq: int
    message_id: str
    message: dict[str, Any]

    @property
    def content(self) -> str:
        return str(self.message.get("content"))


def acks_of(lines: Iterable[Mapping[str, Any]]) -> list[Ack]:
    """The acknowledged appends among a worker's JSON lines."""
    return [
        Ack(
            sid=line["sid"],
            proc=int(line["proc"]),
            task=int(line["task"]),
            i=int(line["i"]),
            seq=int(line["seq"]),
            contents=tuple(line["contents"]),
            t=float(line.get("t", 0.0)),
            tag=str(line.get("tag", "")),
        )
        for line in lines
        if line.get("event") == "ack"
    ]


# -- reading the tiers directly ---------------------------------------------------------


async def postgres_rows(dsn: str, schema: str, session_id: str) -> list[Row]:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        records = await conn.fetch(
            f'SELECT seq, message_id, message::text AS message FROM "{schema}".vel_messages '
            "WHERE session_id = $1 ORDER BY seq",
            session_id,
        )
    finally:
        await conn.close()
    return [Row(int(r["seq"]), r["message_id"], json.loads(r["message"])) for r in records]


async def postgres_session(dsn: str, schema: str, session_id: str) -> dict[str, Any] | None:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        record = await conn.fetchrow(
            f'SELECT last_seq, generation FROM "{schema}".vel_session_rows WHERE id = $1',
            session_id,
        )
    finally:
        await conn.close()
    return None if record is None else dict(record)


def redis_client(redis_url: str) -> Any:
    """A plain client of ``redis_url``; a ``redis+cluster://`` URL gives a cluster client."""
    from vel.stores.redis import CLUSTER_SCHEMES, cluster_seeds

    if not redis_url.startswith(CLUSTER_SCHEMES):
        return aioredis.Redis.from_url(redis_url)
    seeds, username, password, tls = cluster_seeds(redis_url)
    return aioredis.RedisCluster(
        startup_nodes=[aioredis.cluster.ClusterNode(h, p) for h, p in seeds],
        username=username,
        password=password,
        ssl=tls,
    )


async def redis_rows(redis_url: str, prefix: str, session_id: str) -> list[Row]:
    keys = KeyLayout(prefix).session(session_id)
    client = redis_client(redis_url)
    try:
        items = await client.lrange(keys.messages, 0, -1)
        base = int(await client.hget(keys.meta, "base") or 0)
    finally:
        await client.aclose()
    rows = []
    # A copy warmed for a window holds seqs base+1 .. seq only.
    for seq, item in enumerate(items, start=base + 1):
        mid, _, text = item.partition(b"\n")
        rows.append(Row(seq, mid.decode(), json.loads(text)))
    return rows


async def redis_meta(redis_url: str, prefix: str, session_id: str) -> dict[str, Any]:
    """The session's meta hash (as ints), its TTL and its dirty-set entries."""
    keys = KeyLayout(prefix).session(session_id)
    client = redis_client(redis_url)
    try:
        raw = await client.hgetall(keys.meta)
        pttl = await client.pttl(keys.meta)
        due = await client.zscore(keys.dirty, session_id)
        since = await client.zscore(keys.dirty_since, session_id)
        backlog = await client.get(keys.backlog)
        conflicted = await client.zscore(keys.conflicts, session_id)
    finally:
        await client.aclose()
    meta: dict[str, Any] = {
        k.decode(): int(v) if v.lstrip(b"-").isdigit() else v.decode() for k, v in raw.items()
    }
    meta.update(
        pttl=pttl,
        due=due,
        dirty_since=since,
        bucket_backlog=int(backlog or 0),
        conflicted=conflicted,
    )
    return meta


# -- comparing ----------------------------------------------------------------------------


@dataclass
class Report:
    where: str
    session_id: str
    acked_messages: int = 0
    stored_messages: int = 0
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    gaps: list[str] = field(default_factory=list)
    misplaced: list[str] = field(default_factory=list)
    order: list[str] = field(default_factory=list)

    @property
    def problems(self) -> dict[str, list[str]]:
        found = {
            "lost": self.lost,
            "duplicated": self.duplicated,
            "unexpected": self.unexpected,
            "gaps": self.gaps,
            "misplaced": self.misplaced,
            "order": self.order,
        }
        return {name: items for name, items in found.items() if items}

    @property
    def ok(self) -> bool:
        return not self.problems and self.acked_messages == self.stored_messages

    def summary(self) -> str:
        head = (
            f"{self.where} session {self.session_id!r}: {self.stored_messages} stored, "
            f"{self.acked_messages} acknowledged"
        )
        parts = [f"{name}={len(items)} e.g. {items[:5]}" for name, items in self.problems.items()]
        return head + ("; " + "; ".join(parts) if parts else "; clean")

    def assert_ok(self) -> None:
        assert self.ok, self.summary()


def compare(
    acks: Iterable[Ack],
    rows: list[Row],
    *,
    where: str,
    session_id: str,
    maybe: Iterable[str] = (),
) -> Report:
    """Check one session's history against the acknowledged appends to it.

    ``maybe`` are contents of appends whose outcome the writer could not know (it got an
    error, the command may still have run): each may be stored once, or not at all.
    """
    mine = [a for a in acks if a.sid == session_id]
    report = Report(where, session_id)
    report.acked_messages = sum(len(a.contents) for a in mine)
    unknown = set(maybe)
    report.stored_messages = len([r for r in rows if r.content not in unknown])

    seqs = [r.seq for r in rows]
    if seqs != list(range(1, len(rows) + 1)):
        expected = set(range(1, (max(seqs) if seqs else 0) + 1))
        missing = sorted(expected - set(seqs))
        repeated = sorted(s for s, n in Counter(seqs).items() if n > 1)
        report.gaps.append(f"seqs are not 1..{len(rows)}: missing {missing[:10]}")
        if repeated:
            report.gaps.append(f"repeated seqs {repeated[:10]}")

    counts = Counter(r.content for r in rows)
    report.duplicated = sorted(c for c, n in counts.items() if n > 1)
    acked = {c for a in mine for c in a.contents}
    report.lost = sorted(acked - counts.keys())
    report.unexpected = sorted(counts.keys() - acked - unknown)

    at = {r.seq: r.content for r in rows}
    for a in mine:
        first = a.seq - len(a.contents) + 1
        found = tuple(at.get(s) for s in range(first, a.seq + 1))
        if found != a.contents:
            report.misplaced.append(f"{a.contents} acked at {first}..{a.seq}, found {found}")

    by_writer: dict[tuple[str, int, int], list[Ack]] = defaultdict(list)
    for a in mine:
        by_writer[a.writer].append(a)
    for writer, writes in by_writer.items():
        writes.sort(key=lambda a: a.i)
        for before, after in itertools.pairwise(writes):
            if not before.seq < after.seq:
                report.order.append(
                    f"writer {writer}: append {before.i} at {before.seq}, {after.i} at {after.seq}"
                )
    return report


def same_history(left: list[Row], right: list[Row]) -> list[str]:
    """Differences between two tiers' copies of one session (seq, id and message)."""
    diffs = []
    if len(left) != len(right):
        diffs.append(f"lengths differ: {len(left)} != {len(right)}")
    for a, b in zip(left, right, strict=False):
        if a != b:
            diffs.append(f"seq {a.seq}: {a} != {b}")
            if len(diffs) > 10:
                break
    return diffs
