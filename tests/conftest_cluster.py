"""The session's Redis Cluster (3 masters + 3 replicas on loopback), started on first use.

Loaded from ``conftest.py`` through ``pytest_plugins``. Only tests that ask for
``redis_cluster`` (the cluster kinds of the contract suite, the cluster multi-process and
failover tests) start it; ``redis_cluster_url`` is what vel takes in ``REDIS_URL``. A test
that kills a node must use its own cluster (``RedisClusterServers``), never this one.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from cluster import RedisClusterServers


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterServers]:
    with RedisClusterServers() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def redis_cluster_url(redis_cluster: RedisClusterServers) -> str:
    return redis_cluster.url
