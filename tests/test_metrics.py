"""Metrics by the Prometheus conventions, checked with prometheus_client's own parser: every
family of every store kind is typed, counters end in ``_total``, units are in the names,
outcomes are labels, latency histograms fill in as agents work, and the prometheus_client
collector agrees with the text the flusher serves."""

from __future__ import annotations

import gc
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import model_for
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from stores import make_store

from vel import Agent
from vel.metrics import HISTOGRAMS, STATS, process_counters, render, render_store, track
from vel.metrics.prometheus import VelCollector
from vel.testing import FakeOpenAIServer

KINDS = ["memory", "postgres", "redis", "tiered"]
TYPED = {"counter", "gauge", "histogram"}
msg = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def declared(key: str) -> bool:
    return key in STATS or (key.startswith("postgres_") and key[len("postgres_") :] in STATS)


@pytest.fixture(params=KINDS)
async def busy_store(
    request: pytest.FixtureRequest,
    pg_dsn: str,
    migrated_schema: str,
    redis_url: str,
    key_prefix: str,
) -> AsyncIterator[Any]:
    """A store of each kind after some work: appends, a replayed append, reads, a miss."""
    async with make_store(
        request.param,
        pg_dsn=pg_dsn,
        schema=migrated_schema,
        redis_url=redis_url,
        prefix=key_prefix,
    ) as store:
        await store.append("a", msg, ["m1", "m2"])
        await store.append("a", msg, ["m1", "m2"])  # a retry: suppressed
        await store.load("a")
        await store.load("never-written")
        yield store


async def test_every_family_of_every_store_kind_is_typed(busy_store: Any) -> None:
    stats = await busy_store.stats()
    undeclared = [k for k in stats if not declared(k)]
    assert undeclared == [], "stats keys without a declared metric family"
    text = await render_store(busy_store)
    parsed = families(text)
    assert {name: f.type for name, f in parsed.items() if f.type not in TYPED} == {}
    for histogram in HISTOGRAMS:
        assert parsed[f"vel_{histogram.name}"].type == "histogram"
    # Counters end in _total, in the text as Prometheus expects it.
    for name, family in parsed.items():
        if family.type == "counter":
            assert f"# TYPE {name}_total counter" in text, name


async def test_the_documented_worker_recipe_exports_only_typed_families(
    pg_dsn: str, migrated_schema: str, redis_url: str, key_prefix: str
) -> None:
    """Issue 15's case: 13 of 35 families of a two-tier store's stats were untyped."""
    async with make_store(
        "tiered", pg_dsn=pg_dsn, schema=migrated_schema, redis_url=redis_url, prefix=key_prefix
    ) as store:
        await store.append("w", msg)
        assert await store.flush()
        stats = await store.stats()
        text = await render_store(store)
    assert len(stats) >= 35
    parsed = families(text)
    assert all(f.type in TYPED for f in parsed.values())
    names = set(parsed)
    # Units in names, outcomes as labels: none of the old variant names is left.
    assert "vel_oldest_dirty_age_seconds" in names and "vel_oldest_dirty_age" not in names
    for old in ("flush_batches_ok", "warm_loads_ok", "redis_hits", "redis_misses"):
        assert not any(old in n for n in names), old
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in parsed.values()
        for s in f.samples
    }
    assert samples["vel_flush_batches_total", (("outcome", "ok"),)] >= 1
    assert ("vel_flush_batches_total", (("outcome", "failed"),)) in samples
    assert samples["vel_redis_lookups_total", (("result", "miss"),)] == 1
    assert ("vel_redis_lookups_total", (("result", "hit"),)) in samples
    assert samples["vel_warm_loads_total", (("outcome", "ok"),)] == 1
    assert samples["vel_appends_total", (("tier", "redis"),)] == 1
    assert ("vel_appends_total", (("tier", "postgres"),)) in samples
    assert samples["vel_sessions", (("tier", "postgres"),)] >= 1


def test_render_labels_outcomes_and_escapes_label_values() -> None:
    text = render(
        {"flush_batches_ok": 3, "flush_batches_failed": 1, "appends": 5, "sessions": 2},
        tier='we"ird\\',
        histograms=False,
    )
    assert 'vel_flush_batches_total{outcome="failed"} 1\n' in text
    assert 'vel_flush_batches_total{outcome="ok"} 3\n' in text
    assert 'vel_appends_total{tier="we\\"ird\\\\"} 5\n' in text
    parsed = families(text)
    assert parsed["vel_appends"].samples[0].labels == {"tier": 'we"ird\\'}
    assert text.count("# TYPE vel_flush_batches_total counter") == 1


async def test_histograms_fill_in_as_agents_work(srv: FakeOpenAIServer, storage_mode: str) -> None:
    def counts() -> dict[str, float]:
        parsed = families(render({}))
        return {
            name: next(s.value for s in f.samples if s.name.endswith("_count"))
            for name, f in parsed.items()
        }

    before = counts()
    async with Agent(id="m", model=model_for(srv), session_storage=storage_mode) as agent:
        sid = f"h-{uuid.uuid4().hex[:8]}"
        await agent.run({"message": "My name is Alice"}, session_id=sid)
        await agent.run({"message": "What is my name?"}, session_id=sid)
        if storage_mode == "redis":
            assert await agent.store.flush()
    after = counts()
    grew = {name for name in after if after[name] > before.get(name, 0)}
    assert {"vel_turn_duration_seconds", "vel_load_duration_seconds"} <= grew
    assert {"vel_append_duration_seconds", "vel_lock_wait_seconds"} <= grew
    if storage_mode == "redis":
        assert {"vel_flush_duration_seconds", "vel_warm_duration_seconds"} <= grew
    parsed = families(render({}))
    buckets = [s for s in parsed["vel_turn_duration_seconds"].samples if s.name.endswith("_bucket")]
    values = [s.value for s in buckets]
    assert values == sorted(values) and buckets[-1].labels["le"] == "+Inf"


# -- prometheus_client collector --------------------------------------------------------------


async def test_collector_exports_this_process_counters_and_histograms(busy_store: Any) -> None:
    registry = CollectorRegistry()
    registry.register(VelCollector())
    parsed = families(generate_latest(registry).decode())
    assert all(f.type in TYPED for f in parsed.values())
    for histogram in HISTOGRAMS:
        assert parsed[f"vel_{histogram.name}"].type == "histogram"
    totals = process_counters()
    appends = parsed["vel_appends"].samples
    for sample in appends:
        assert sample.value == totals["appends", sample.labels["tier"]]


def test_collector_counters_never_go_down_when_a_store_is_collected() -> None:
    class Owner:
        pass

    owner = Owner()
    counters = {"appends": 7.0}
    tier = f"test-{uuid.uuid4().hex[:6]}"
    track(owner, counters, tier)
    assert process_counters()["appends", tier] == 7.0
    counters["appends"] = 9.0
    del owner
    gc.collect()
    counters["appends"] = 100.0  # no longer counted: the owner is gone
    assert process_counters()["appends", tier] == 9.0


def test_collector_takes_gauges_but_not_counters_from_a_stats_snapshot() -> None:
    registry = CollectorRegistry()
    snapshot = {"unflushed_messages": 4.0, "appends": 1e9}
    registry.register(VelCollector(lambda: snapshot, tier="redis"))
    parsed = families(generate_latest(registry).decode())
    assert parsed["vel_unflushed_messages"].samples[0].value == 4.0
    assert all(
        s.value < 1e9 for s in parsed.get("vel_appends", parsed["vel_unflushed_messages"]).samples
    )


def test_every_declared_family_name_follows_the_conventions() -> None:
    for key, (family, labels) in STATS.items():
        assert re.fullmatch(r"[a-z][a-z0-9_]*", family.name), key
        assert not family.name.endswith("_total"), key  # added when rendered
        assert not re.search(r"_(ok|failed|hits|misses|exists|stale)$", family.name), key
        if re.search(r"(^|_)(age|duration|wait)(_|$)", family.name):
            assert family.name.endswith("_seconds"), key
        assert all(name in ("outcome", "result") for name, _ in labels), key
    for histogram in HISTOGRAMS:
        assert histogram.name.endswith("_seconds")


def test_every_family_the_docs_name_is_exported() -> None:
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    section = text.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    named = {n for n in re.findall(r"`(vel_[a-z_]+)", section)}
    everything = render({key: 1.0 for key in STATS}, tier="redis")
    exported = set(re.findall(r"^# TYPE (\S+) ", everything, re.M))
    assert len(named) >= 25
    assert named <= exported, named - exported
    # ... and every exported family is documented.
    assert exported <= named, exported - named
