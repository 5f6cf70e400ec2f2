"""The benchmark command runs end to end (--quick) and its shared-session check can fail."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.hotpath import read_raw
from benchmarks.modes import ALL_MODES
from benchmarks.stats import median_of_rounds
from benchmarks.targets import ratios as paired_ratios
from benchmarks.workload import check_history, turn_messages

ROOT = Path(__file__).resolve().parent.parent


def test_quick_bench_writes_json_and_markdown_with_whole_shared_turns(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=ROOT,  # benchmarks/ is not installed
    )
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((out / "benchmarks.json").read_text())
    # The peers (the OpenAI Agents SDK's sessions) come with the dev and bench extras.
    assert set(data["modes"]) == set(ALL_MODES)
    for mode in ALL_MODES:
        result = data["modes"][mode]
        t = result["throughput"]
        assert t["turns"] == 32 * 4 and t["errors"] == [], (mode, t["errors"])
        assert len(t["rounds"]) == 1
        assert t["turns_per_s"] > 0 and 0 < t["p50_ms"] <= t["p95_ms"] <= t["p99_ms"]
        assert t["worker_rss_mb"] > 0 and t["client_cpu_us_per_turn"] > 0
        assert result["growth"]["turns"] == 40
        if mode in ("memory", "database", "redis", "redis-only"):
            check = result["shared"]["check"]
            assert result["shared"]["turns"] == 2 * 8 * 4
            assert (check["lost"], check["duplicated"], check["split"], check["stale"]) == (
                0,
                0,
                0,
                0,
            )
    # Commands per turn come from the bench's private Redis server, so they are exact: the
    # raw pipeline sends LRANGE and RPUSH, the prototype its six commands.
    cmds = {m: data["modes"][m]["throughput"].get("redis", {}) for m in ALL_MODES}
    assert cmds["ref-redis"]["commands_per_turn"] == 2.0
    assert cmds["ref-redis"]["by_command"] == {"lrange": 1.0, "rpush": 1.0}
    assert cmds["proto-redis"]["commands_per_turn"] == 6.0
    assert (
        cmds["redis-lock"]["commands_per_turn"] > 6 and cmds["sdk-redis"]["commands_per_turn"] > 2
    )
    assert "commands_per_turn" not in cmds["database"]
    red = data["modes"]["redis"]
    assert red["throughput"]["flush_lag"]["never_flushed"] == 0
    assert red["throughput"]["flush_lag"]["samples"] == 32 * 4
    assert red["throughput"]["pg_transactions"] > 0
    assert red["steady"]["flush_lag"]["samples"] > 0
    assert red["throughput"]["redis_memory"]["bytes_per_message"] > 0
    assert set(data["agent"]) == {"memory", "database", "redis", "redis, lock in separate calls"}
    assert all(a["overhead_p50_ms"] > 0 for a in data["agent"].values())
    ratios = {r["ratio"]: r for r in data["ratios"]}
    for pair in (
        "redis-lock / sdk-redis",
        "redis-lock / ref-redis",
        "database-lock / ref-asyncpg",
        "database-lock / sdk-sqlalchemy",
    ):
        assert len(ratios[pair]["rounds"]) == 1 and ratios[pair]["median"] > 0
    assert {t["target"] for t in data["targets"]} >= {
        "turns/s, redis, Agent's locked turn vs SDK RedisSession",
        "redis-lock: Redis commands per turn",
        "redis: shared sessions lost / interleaved turns",
        "redis: shared sessions p99 / p50",
    }
    markdown = (out / "benchmarks.md").read_text()
    assert "## Throughput and latency" in markdown and "| redis-lock |" in markdown
    assert "| `database-lock / sdk-sqlalchemy` |" in markdown


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


def test_rounds_are_summarised_by_medians_and_ratios_pair_modes_within_a_round() -> None:
    rows = [
        {"turns_per_s": 100.0, "p50_ms": 3.0, "redis": {"commands_per_turn": 6}, "errors": ["x"]},
        {"turns_per_s": 300.0, "p50_ms": 1.0, "redis": {"commands_per_turn": 8}, "errors": []},
        {"turns_per_s": 200.0, "p50_ms": 2.0, "redis": {"commands_per_turn": 7}, "errors": []},
    ]
    merged = median_of_rounds(rows)
    assert merged == {
        "turns_per_s": 200.0,
        "p50_ms": 2.0,
        "redis": {"commands_per_turn": 7},
        "errors": ["x"],
    }

    def mode(*per_round: float) -> dict[str, object]:
        return {"throughput": {"turns_per_s": 0, "rounds": [{"turns_per_s": x} for x in per_round]}}

    # A burst of load in round 2 halves both modes: the paired ratio stays 2.0, where the
    # ratio of the medians would say 4.0.
    data = {"modes": {"redis-lock": mode(400, 200, 400), "sdk-redis": mode(200, 100, 100)}}
    (r,) = [r for r in paired_ratios(data) if r["ratio"] == "redis-lock / sdk-redis"]
    assert r["rounds"] == [2.0, 2.0, 4.0] and r["median"] == 2.0 and r["goal"] == 1.5


def test_hotpath_puts_each_py_spy_sample_in_one_category(tmp_path: Path) -> None:
    main = "_run_module_as_main (<frozen runpy>:198);run_forever (asyncio/base_events.py:607)"
    raw = tmp_path / "raw.txt"
    raw.write_text(
        "\n".join(
            [
                f"{main};RedisStore._window (vel/stores/redis.py:456);"
                "JSONDecoder.raw_decode (json/decoder.py:353) 7",
                f"{main};Timeout.reschedule (asyncio/timeouts.py:68);"
                "BaseEventLoop.call_at (asyncio/base_events.py:744) 3",
                f"{main};Flusher.sweep (vel/stores/tiered/flusher.py:120);"
                "_SelectorSocketTransport.write (asyncio/selector_events.py:1057) 2",
                f"{main};EpollSelector.select (selectors.py:468) 50",
                "Thread._bootstrap (threading.py:1002);_worker (concurrent/futures/thread.py:81) 9",
                f"{main};Handle._run (asyncio/events.py:80) 1",
            ]
        )
    )
    assert read_raw(raw) == {
        "JSON decode of the window": 7,
        "timeout scopes": 3,
        "embedded flusher": 2,
        "event loop and task switching": 1,
    }


def test_hotpath_runs_its_variants_and_micro_measurements(tmp_path: Path) -> None:
    out = tmp_path / "hot.json"
    done = subprocess.run(
        [
            *(sys.executable, "-m", "benchmarks.hotpath", "--quick", "--no-profile"),
            *("--variants", "vel-redis-lock,proto-redis", "--json", str(out)),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert set(data["profiles"]) == {"vel-redis-lock", "proto-redis"}
    assert all(p["cpu_us_per_turn"] > 0 for p in data["profiles"].values())
    assert {row[0] for row in data["micro"]} >= {
        "decode the window: vel (stdlib json)",
        "decode the window: jiter",
        "pool checkout x2: BlockingConnectionPool (vel)",
    }


def test_pg_lock_measures_each_option_beside_raw_asyncpg(tmp_path: Path) -> None:
    out = tmp_path / "pg_lock.json"
    done = subprocess.run(
        [
            *(sys.executable, "-m", "benchmarks.pg_lock", "--options"),
            "ref-asyncpg,4rt-logged,3rt-unlogged,2rt-unlogged,2rt-async-commit",
            *("--tasks", "2", "--sessions", "8", "--turns", "3", "--rounds", "1"),
            *("--json", str(out)),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["ref-asyncpg"]["vs_ref_asyncpg"] == 1.0
    for option in ("4rt-logged", "3rt-unlogged", "2rt-unlogged", "2rt-async-commit"):
        assert data[option]["turns_per_s"] > 0 and data[option]["vs_ref_asyncpg"] > 0
