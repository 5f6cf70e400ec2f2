"""Redis Cluster specifics: the URL, the connection budget per node, flushers over every shard.

The store contract suite (``test_store_contract.py``, kinds ``redis-cluster`` and
``tiered-cluster``) and the multi-process append test run on the same local cluster.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis
from checker import postgres_rows
from cluster import RedisClusterServers

from vel.errors import ConfigurationError
from vel.settings import load_settings
from vel.stores.postgres import PostgresStore
from vel.stores.redis import RedisStore, cluster_seeds
from vel.stores.tiered import Flusher, TieredStore


def test_cluster_url_gives_seeds_credentials_and_tls() -> None:
    assert cluster_seeds("redis+cluster://10.0.0.1:7000,10.0.0.2:7001") == (
        [("10.0.0.1", 7000), ("10.0.0.2", 7001)],
        None,
        None,
        False,
    )
    assert cluster_seeds("rediss+cluster://app:p%40ss@[::1]:7000/0") == (
        [("::1", 7000)],
        "app",
        "p@ss",
        True,
    )
    assert cluster_seeds("redis+cluster://:secret@h:1")[1:3] == (None, "secret")


def test_cluster_url_takes_tls_options() -> None:
    from vel.stores.redis import parse_redis_url

    url = (
        "rediss+cluster://app:p@ss/w#rd@h1:7000,h2:7001?ssl_ca_certs=/etc/ca.pem"
        "&ssl_cert_reqs=required&ssl_check_hostname=false&ssl_certfile=/c.pem&ssl_keyfile=/k.pem"
    )
    parsed = parse_redis_url(url)
    assert parsed.cluster and parsed.tls and parsed.password == "p@ss/w#rd"
    assert parsed.cluster_kwargs() == {
        "username": "app",
        "password": "p@ss/w#rd",
        "client_name": None,
        "ssl": True,
        "ssl_ca_certs": "/etc/ca.pem",
        "ssl_cert_reqs": "required",
        "ssl_check_hostname": False,
        "ssl_certfile": "/c.pem",
        "ssl_keyfile": "/k.pem",
    }
    with pytest.raises(ConfigurationError, match="needs TLS"):
        parse_redis_url("redis+cluster://h1:7000?ssl_ca_certs=/etc/ca.pem")


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://h",  # no port
        "redis+cluster://h:7000/3",  # cluster mode has db 0 only
        "redis+cluster://h:7000?timeout=1",
        "redis+cluster://h:7000,:7001",
        "redis+cluster://h:99999",
        "cluster://h:7000",
    ],
)
def test_bad_cluster_urls_are_configuration_errors(url: str) -> None:
    with pytest.raises(ConfigurationError):
        RedisStore(url)


def test_bucket_count_is_a_setting() -> None:
    assert load_settings({}).buckets == 16
    assert load_settings({"VEL_BUCKETS": "64"}).buckets == 64
    assert RedisStore(settings=load_settings({"VEL_BUCKETS": "64"})).keys.buckets == 64
    with pytest.raises(ConfigurationError):
        load_settings({"VEL_BUCKETS": "0"})


def test_the_default_buckets_reach_every_master(redis_cluster: RedisClusterServers) -> None:
    store = RedisStore(redis_cluster.url)
    masters = {
        redis_cluster.master_of_key(store.keys.bucket_keys(b)[0]).port
        for b in range(store.keys.buckets)
    }
    assert len(masters) == redis_cluster.masters


async def test_connections_per_node_stay_within_the_pool_budget(
    redis_cluster: RedisClusterServers, key_prefix: str
) -> None:
    budget = 3
    store = RedisStore(redis_cluster.url, key_prefix=key_prefix, pool_max=budget)
    sids = [f"b-{uuid.uuid4().hex[:8]}" for _ in range(60)]
    try:
        await asyncio.gather(
            *(
                store.append(sid, [{"role": "user", "content": str(i)}])
                for i in range(5)
                for sid in sids
            )
        )
        # A burst of plain calls (no retry above them) waits for the budget, never fails.
        keys = [store.keys.session(sid).meta for sid in sids]
        replies = await asyncio.gather(
            *(store.call("hget", lambda c, k=k: c.redis.hget(k, "seq")) for k in keys * 10)
        )
        assert replies == [b"5"] * len(keys) * 10
        peak = 0
        for node in redis_cluster.nodes:
            client = redis.Redis(host="127.0.0.1", port=node.port, client_name="probe")
            try:
                mine = [
                    c
                    for c in client.client_list()
                    if "N" in c["flags"] and c.get("name") != "probe"
                ]
            finally:
                client.close()
            peak = max(peak, len(mine))
        assert 1 <= peak <= budget, peak
        assert [await store.last_seq(sid) for sid in sids] == [5] * len(sids)
    finally:
        await store.aclose()


async def test_three_flushers_cover_every_shard_without_double_work(
    redis_cluster: RedisClusterServers, pg_dsn: str, migrated_schema: str, key_prefix: str
) -> None:
    hot = RedisStore(redis_cluster.url, key_prefix=key_prefix, write_behind=True, flush_delay=0)
    cold = PostgresStore(pg_dsn, schema=migrated_schema)
    tiered = TieredStore(hot, cold, flusher=False)
    sids = [f"f-{uuid.uuid4().hex[:8]}" for _ in range(200)]
    assert {hot.keys.bucket_of(s) for s in sids} == set(range(hot.keys.buckets))
    flushers = [Flusher(hot, cold, batch_sessions=50, sweep_interval=0) for _ in range(3)]

    async def turn(n: int) -> None:
        await asyncio.gather(
            *(tiered.append(sid, [{"role": "user", "content": f"{sid}-{n}"}]) for sid in sids)
        )

    try:
        # One sweep of one flusher reaches every bucket, on every master.
        await turn(0)
        assert await flushers[0].flush_once() == len(sids)
        # Three at once: each message is written once, by exactly one of them.
        await turn(1)
        await turn(2)
        written = await asyncio.gather(*(f.flush_once() for f in flushers))
        assert sum(written) == 2 * len(sids), written
        unflushed, _, dirty = await hot.backlog()
        assert (unflushed, dirty) == (0, 0)
        duplicates = sum(f.counters["flush_duplicates_suppressed"] for f in flushers)
        assert duplicates == 0
        assert all(f.counters["flush_batches_ok"] > 0 for f in flushers)
        for sid in sids[:20]:
            rows = await postgres_rows(pg_dsn, migrated_schema, sid)
            assert [r.content for r in rows] == [f"{sid}-{t}" for t in range(3)]
    finally:
        await tiered.aclose()


async def test_sweep_interval_lets_one_flusher_per_bucket_claim(
    redis_cluster: RedisClusterServers, pg_dsn: str, migrated_schema: str, key_prefix: str
) -> None:
    hot = RedisStore(redis_cluster.url, key_prefix=key_prefix, write_behind=True, flush_delay=0)
    cold = PostgresStore(pg_dsn, schema=migrated_schema)
    tiered = TieredStore(hot, cold, flusher=False)
    sids = [f"g-{uuid.uuid4().hex[:8]}" for _ in range(100)]
    flushers = [Flusher(hot, cold, sweep_interval=30) for _ in range(4)]
    try:
        await asyncio.gather(*(tiered.append(s, [{"role": "user", "content": s}]) for s in sids))
        written = await asyncio.gather(*(f.flush_once() for f in flushers))
        assert sum(written) == len(sids)
        buckets = hot.keys.buckets
        skipped = sum(f.counters["flush_sweeps_skipped"] for f in flushers)
        assert skipped == 3 * buckets, skipped  # each bucket swept once, by one of the four
        assert sum(f.counters["flush_batches_ok"] for f in flushers) <= buckets
        # Within the interval nobody sweeps again.
        await tiered.append(sids[0], [{"role": "user", "content": "later"}])
        assert await flushers[0].flush_once() == 0
    finally:
        await tiered.aclose()
