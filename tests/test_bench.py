"""The benchmark command runs end to end (--quick) and its shared-session check can fail."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.workload import check_history, turn_messages

MODES = ("memory", "database", "redis", "redis-only", "ref-redis", "ref-redis-2rt", "ref-asyncpg")


def test_quick_bench_writes_json_and_markdown_with_whole_shared_turns(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=Path(__file__).resolve().parent.parent,  # benchmarks/ is not installed
    )
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((out / "benchmarks.json").read_text())
    assert set(data["modes"]) == set(MODES)
    for mode in MODES:
        result = data["modes"][mode]
        t = result["throughput"]
        assert t["turns"] == 32 * 4 and t["errors"] == []
        assert t["turns_per_s"] > 0 and 0 < t["p50_ms"] <= t["p95_ms"] <= t["p99_ms"]
        assert t["worker_rss_mb"] > 0
        assert result["growth"]["turns"] == 40
        if not mode.startswith("ref-"):
            check = result["shared"]["check"]
            assert result["shared"]["turns"] == 2 * 8 * 4
            assert (check["lost"], check["duplicated"], check["split"], check["stale"]) == (
                0,
                0,
                0,
                0,
            )
    red = data["modes"]["redis"]
    assert red["throughput"]["flush_lag"]["never_flushed"] == 0
    assert red["throughput"]["flush_lag"]["samples"] == 32 * 4
    assert red["throughput"]["pg_transactions"] > 0
    assert red["steady"]["flush_lag"]["samples"] > 0
    assert red["throughput"]["redis_memory"]["bytes_per_message"] > 0
    assert set(data["agent"]) == {"memory", "database", "redis", "redis, lock in separate calls"}
    assert all(a["overhead_p50_ms"] > 0 for a in data["agent"].values())
    assert {t["target"] for t in data["targets"]} >= {
        "redis turns/s vs raw redis-py pipeline",
        "redis: shared mode lost / interleaved turns",
    }
    markdown = (out / "benchmarks.md").read_text()
    assert "## Throughput and latency" in markdown and "| redis |" in markdown


def history_of(*tags: str) -> list[dict[str, object]]:
    return [m for tag in tags for m in turn_messages(tag)]


def test_check_history_accepts_whole_sequential_turns() -> None:
    history = history_of("a", "b", "c")
    turns = [("a", ""), ("b", "a"), ("c", "b")]
    assert check_history(history, turns) == {"lost": 0, "duplicated": 0, "split": 0, "stale": 0}


def test_check_history_reports_lost_split_stale_and_duplicated_turns() -> None:
    a, b, c = (turn_messages(t) for t in "abc")
    # b's two messages are split by c's user message; c read a window ending at a, not b.
    history = [*a, b[0], c[0], b[1], c[1], *a]
    turns = [("a", ""), ("b", "a"), ("c", "a"), ("d", "c")]
    result = check_history(history, turns)
    assert result["lost"] == 1  # d
    assert result["split"] >= 2  # b and c
    assert result["stale"] >= 1
    assert result["duplicated"] == 1  # a twice
