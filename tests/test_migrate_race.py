"""Workers starting together with ``VEL_MIGRATE=1`` on a fresh schema all start (issue 13,
failing input 8): the version is checked under the migration lock. The full count (8 workers,
20 rounds) is ``scripts/migrate-race``."""

from __future__ import annotations

import pytest
from migrate_race import one_round


@pytest.mark.parametrize("namespace", [False, True], ids=["dsn-search-path", "namespace"])
def test_workers_migrating_at_once_all_start(pg_dsn: str, namespace: bool) -> None:
    for _ in range(2):
        result = one_round(pg_dsn, 8, namespace=namespace)
        assert result.failures == []
