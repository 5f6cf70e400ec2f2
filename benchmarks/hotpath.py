"""Where a turn's client CPU goes: py-spy profiles by category, and micro-measurements.

    python -m benchmarks.hotpath                  # about two minutes
    python -m benchmarks.hotpath --quick          # a smoke run
    python -m benchmarks.hotpath --no-profile     # micro-measurements only (no py-spy)

Profiles: one process, ``--tasks`` asyncio tasks on ``--sessions`` sessions, runs a warm-up
pass (so every session holds a full window), then ``py-spy record`` attaches to
it and it runs the measured pass. Each sample's stack is put in one category
(:data:`CATEGORIES`, the innermost frame that matches decides; anything under the embedded
flusher is the flusher's), and a category's CPU per turn is its share of the samples times
the process's CPU time per turn over the measured pass. Variants: ``vel-redis-lock`` (the
Agent's locked turn on the two-tier store, embedded flusher), the same without the flusher,
``proto-redis`` (the prototype, :mod:`benchmarks.prototype`) and ``ref-redis-2rt`` (raw
redis-py, read then write as two calls). All run on a private ``redis-server``.

Micro-measurements (no I/O, ``timeit`` in this process): decoding the window with the
stdlib, orjson and jiter; vel's encoding and validation; ids; key strings; timeout scopes;
pool checkout; command packing. Prints markdown tables; ``--json FILE`` keeps the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import timeit
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from benchmarks.redis_server import PrivateRedis
from benchmarks.workload import turn_messages

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
VARIANTS = ("vel-redis-lock", "vel-redis-lock-no-flusher", "proto-redis", "ref-redis-2rt")

# (category, frame pattern): a frame is "function (file:line)" as py-spy prints it. Checked
# innermost frame first; the first category with a matching frame takes the sample. The event
# loop's own frames are the fallback: a timer created by a timeout scope is the scope's cost.
CATEGORIES: tuple[tuple[str, str], ...] = (
    (
        "JSON decode of the window",
        r"^(decode_message|\w+\.window(\.<locals>\.<listcomp>)?|decode_window|loads|"
        r"detect_encoding) "
        r"|\(json/decoder\.py",
    ),
    (
        "JSON encode, validation",
        r"^(encode_messages?|validate_message|validate_session_id|_dumps|dumps|"
        r"(\w+\.)?encode|ProtoRedisDriver\.encode_items) \((vel|benchmarks)/|\(json/encoder\.py",
    ),
    (
        "message ids (uuid4)",
        r"^(new_message_ids|check_message_ids|ProtoRedisDriver\._id) |\(uuid\.py",
    ),
    ("key strings", r"\(vel/stores/redis/keys\.py|^ProtoRedisDriver\._keys_of "),
    (
        "pool checkout and health check",
        r"^(\w*ConnectionPool\.\w+|AbstractConnection\.(check_health|connect|"
        r"can_read_destructive)|_AsyncHiredisParser\.can_read|EventDispatcher\.\w+) ",
    ),
    ("timeout scopes", r"\(asyncio/timeouts\.py|^wait_for \(asyncio/tasks\.py"),
    (
        "script call and argument packing",
        r"^(AsyncScript\.__call__|ScriptCommands\.\w+|Client\.queue|"
        r"AbstractConnection\.pack_commands?|Encoder\.encode) ",
    ),
    (
        "redis-py command plumbing",
        r"\(redis/(asyncio/(client|retry)|utils|observability|asyncio/observability)[/.]"
        r"|\(redis/commands/",
    ),
    (
        "socket writes",
        r"^(_SelectorSocketTransport\.write|WriteTransport\.writelines|StreamWriter\.\w+|"
        r"AbstractConnection\.(send_packed_command|_send_packed_command|send_command)) ",
    ),
    (
        "reply reading and parsing",
        r"\(redis/_parsers/|^(AbstractConnection\.\w*read_response\w*|StreamReader\.\w+|"
        r"StreamReaderProtocol\.\w+|_SelectorSocketTransport\._read_ready\w*) ",
    ),
    ("Postgres client (warm reads)", r"\(asyncpg/"),
    (
        "vel turn bookkeeping",
        r"\(vel/(stores/[\w/]+|_lease|_loops|totals|metrics/\w+|instrument|tracing)\.py"
        r"|\(contextlib\.py",
    ),
    (
        "bench driver (makes the turn's messages)",
        r"^(_child\.<locals>\.task|StoreDriver\.\w+|ProtoRedisDriver\.locked_turn|"
        r"RedisReference\.turn|turn_messages|_text) ",
    ),
)
EVENT_LOOP = "event loop and task switching"
FLUSHER = re.compile(r"\(vel/(flusher|stores/tiered/flusher)\.py|^Flusher")
# Samples of the main thread only (the to_thread worker waits on stdin), and not while the
# loop waits in epoll_wait: py-spy's own idle detection misses these here.
MAIN = re.compile(r"^_run_module_as_main ")
IDLE = re.compile(r"^EpollSelector\.select \(selectors\.py")
_COMPILED = [(name, re.compile(pattern)) for name, pattern in CATEGORIES]


def categorise(stack: list[str]) -> str | None:
    """The category of one sample (None: idle or not the main thread); ``stack`` is root
    first, as py-spy's raw format has it."""
    if not stack or not MAIN.search(stack[0]) or IDLE.search(stack[-1]):
        return None
    if any(FLUSHER.search(frame) for frame in stack):
        return "embedded flusher"
    for frame in reversed(stack):
        for name, pattern in _COMPILED:
            if pattern.search(frame):
                return name
    return EVENT_LOOP


def read_raw(path: Path) -> Counter[str]:
    """Samples per category from py-spy's ``--format raw`` (one stack and a count per line)."""
    counts: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        category = categorise(stack.split(";")) if n.isdigit() else None
        if category is not None:
            counts[category] += int(n)
    return counts


# -- the profiled child process ----------------------------------------------------------------


async def _child(spec: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.modes import RedisReference, StoreDriver
    from benchmarks.prototype import ProtoRedisDriver
    from vel.stores.postgres import PostgresStore
    from vel.stores.redis import RedisStore
    from vel.stores.tiered import TieredStore

    variant, url, prefix = spec["variant"], spec["redis_url"], spec["prefix"]
    tasks, sessions, turns, window = spec["tasks"], spec["sessions"], spec["turns"], 20
    driver: Any
    if variant.startswith("vel-redis-lock"):
        driver = StoreDriver(
            TieredStore(
                RedisStore(url, key_prefix=prefix, write_behind=True, pool_max=tasks + 4),
                PostgresStore(spec["dsn"], schema=spec["schema"], pool_max=tasks + 4),
                flusher=variant == "vel-redis-lock",
            )
        )
    elif variant == "proto-redis":
        driver = ProtoRedisDriver(url, prefix, tasks + 4)
    else:
        driver = RedisReference(url, prefix, pipelined=False)
    locked = variant != "ref-redis-2rt"
    await driver.open()

    async def task(i: int, n0: int) -> None:
        for n in range(n0, n0 + turns):
            sid = f"s{(i * 7 + n) % sessions}"
            if locked:
                await driver.locked_turn(sid, turn_messages(f"{sid}/{n}"), window)
            else:
                await driver.turn(sid, turn_messages(f"{sid}/{n}"), window)

    # Warm-up: every session gets a full window (and is warmed from Postgres once).
    await asyncio.gather(*(task(i, 0) for i in range(tasks)))
    sys.stdout.write("warm\n")
    sys.stdout.flush()
    await asyncio.to_thread(sys.stdin.readline)
    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(task(i, turns) for i in range(tasks)))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    closing = time.process_time()
    await driver.aclose()  # the flusher drains what the measured pass left: its work too
    cpu += time.process_time() - closing
    n = tasks * turns
    return {"turns": n, "turns_per_s": round(n / wall, 1), "cpu_us_per_turn": cpu * 1e6 / n}


def child_main() -> None:
    spec = json.loads(sys.stdin.readline())
    result = asyncio.run(_child(spec))
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


# -- profiles ------------------------------------------------------------------------------------


def profile(
    variant: str, args: argparse.Namespace, url: str, dsn: str, schema: str
) -> dict[str, Any]:
    """Run one variant under py-spy; its CPU per turn by category."""
    spec = {
        "variant": variant,
        "redis_url": url,
        "prefix": f"velhot-{uuid.uuid4().hex[:6]}",
        "dsn": dsn,
        "schema": schema,
        "tasks": args.tasks,
        "sessions": args.sessions,
        "turns": args.turns,
    }
    out = Path(tempfile.mkdtemp(prefix="vel-hotpath-")) / "raw.txt"
    child = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.hotpath", "--child"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=ROOT,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    spy: subprocess.Popen[bytes] | None = None
    try:
        child.stdin.write(json.dumps(spec) + "\n")
        child.stdin.flush()
        if child.stdout.readline().strip() != "warm":
            raise RuntimeError(f"hotpath child {variant} failed")
        if args.profile:
            spy = subprocess.Popen(
                [
                    args.py_spy,
                    "record",
                    *("--rate", str(args.rate), "--format", "raw", "--output", str(out)),
                    *("--pid", str(child.pid)),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1.0)  # attached before the measured pass starts
        child.stdin.write("go\n")
        child.stdin.flush()
        result: dict[str, Any] = json.loads(child.stdout.readline())
        child.wait(60)
        if spy is not None:
            spy.wait(60)
            if args.keep_raw:
                Path(args.keep_raw).mkdir(parents=True, exist_ok=True)
                shutil.copy(out, Path(args.keep_raw) / f"{variant}.txt")
            counts = read_raw(out)
            total = sum(counts.values())
            result["samples"] = total
            result["by_category_us"] = {
                name: round(result["cpu_us_per_turn"] * n / total, 1)
                for name, n in counts.most_common()
            }
        result["cpu_us_per_turn"] = round(result["cpu_us_per_turn"], 1)
        return result
    finally:
        for proc in (spy, child):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        shutil.rmtree(out.parent, ignore_errors=True)


# -- micro-measurements -------------------------------------------------------------------------


def _us(fn: Callable[[], object], number: int) -> float:
    """Best of 5 repeats, microseconds per call."""
    return round(min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6, 2)


def micro(url: str, window: int = 20, number: int = 2000) -> list[tuple[str, float, str]]:
    """(what, us per turn, note) for the pieces of a turn's client work, no I/O."""
    import jiter

    from vel.messages import decode_message, encode_messages, new_message_ids
    from vel.stores.redis.keys import KeyLayout

    rows: list[tuple[str, float, str]] = []
    history = [m for n in range(window // 2) for m in turn_messages(f"s/{n}")]
    stored = [f"{uuid.uuid4().hex}\n".encode() + json.dumps(m).encode() for m in history]
    bodies = [item[item.index(b"\n") + 1 :] for item in stored]
    rows.append(
        (
            "decode the window: vel (stdlib json)",
            _us(lambda: [decode_message(b) for b in bodies], number),
            f"{window} messages",
        )
    )
    rows.append(
        (
            "decode the window: jiter",
            _us(lambda: [jiter.from_json(b) for b in bodies], number),
            "comes with openai",
        )
    )
    try:
        import orjson

        rows.append(
            (
                "decode the window: orjson",
                _us(lambda: [orjson.loads(b) for b in bodies], number),
                "an extra dependency",
            )
        )
    except ImportError:
        pass
    msgs = turn_messages("s/0")
    rows.append(
        (
            "encode and validate the 2 messages: vel",
            _us(lambda: encode_messages(msgs), number),
            "json.dumps + checks",
        )
    )
    try:
        import orjson

        rows.append(
            (
                "encode the 2 messages: orjson",
                _us(lambda: [orjson.dumps(m) for m in msgs], number),
                "no checks",
            )
        )
    except ImportError:
        pass
    rows.append(
        ("2 message ids: uuid4().hex", _us(lambda: new_message_ids(2), number), "vel today")
    )
    prefix, counter = os.urandom(6).hex(), iter(range(10**9))
    rows.append(
        (
            "2 message ids: prefix + counter",
            _us(lambda: [f"{prefix}{next(counter):x}" for _ in range(2)], number),
            "per-process random prefix",
        )
    )
    layout = KeyLayout("vel")
    rows.append(
        (
            "session keys: KeyLayout.session, twice",
            _us(lambda: (layout.session("user-42"), layout.session("user-42")), number),
            "vel builds them per call",
        )
    )
    cache: dict[str, Any] = {"user-42": layout.session("user-42")}
    rows.append(
        ("session keys: cached per session", _us(lambda: cache["user-42"], number), "dict lookup")
    )

    rows += asyncio.run(_pool_and_packing(url, stored, number))
    return rows


async def _pool_and_packing(
    url: str, stored: list[bytes], number: int
) -> list[tuple[str, float, str]]:
    """Checking a connection out and back in, and packing the turn's commands."""
    import redis.asyncio as aioredis

    rows: list[tuple[str, float, str]] = []

    async def best_of_5(body: Callable[[], Awaitable[object]]) -> float:
        await body()
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(number):
                await body()
            best = min(best, time.perf_counter() - start)
        return best / number * 1e6

    # The scopes' own cost (timer handle, reschedule, cancel): nothing inside on purpose.
    async def one_scope() -> None:
        async with asyncio.timeout(5):  # noqa: ASYNC100
            pass

    async def nested_scopes() -> None:
        # vel's per-call deadline around redis-py's own socket timeout
        async with asyncio.timeout(6):
            async with asyncio.timeout(5):  # noqa: ASYNC100
                pass

    rows.append(
        ("timeout scopes x2: one per round trip", round(2 * await best_of_5(one_scope), 2), "")
    )
    rows.append(
        (
            "timeout scopes x2: two nested per round trip",
            round(2 * await best_of_5(nested_scopes), 2),
            "vel + redis-py",
        )
    )
    blocking = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=20, timeout=5, socket_timeout=5, health_check_interval=30
    )
    plain = aioredis.ConnectionPool.from_url(url, max_connections=20)
    gate = asyncio.Semaphore(20)

    async def blocking_checkout() -> None:
        conn = await blocking.get_connection()  # type: ignore[no-untyped-call]
        await blocking.release(conn)

    async def gated_checkout() -> None:
        async with gate:
            conn = await plain.get_connection()  # type: ignore[no-untyped-call]
            await plain.release(conn)

    for label, checkout in (
        ("pool checkout x2: BlockingConnectionPool (vel)", blocking_checkout),
        ("pool checkout x2: ConnectionPool + Semaphore", gated_checkout),
    ):
        rows.append((label, round(2 * await best_of_5(checkout), 2), "two round trips per turn"))
    await blocking.disconnect()
    await plain.disconnect()

    conn = aioredis.Connection()
    keys7 = [f"vel:{{3}}:{k}:user-42" for k in "hmrldsb"]
    items = [b"0123456789abcdef0123456789abcdef\n" + stored[0][33:], stored[1]]
    sha = "0" * 40

    def vel_packing() -> None:
        conn.pack_command("EVALSHA", sha, 4, *keys7[:4], 20, 3600000, "1", "tok", 60000)
        conn.pack_command(
            "EVALSHA",
            sha,
            7,
            *keys7,
            1700000000000,
            "wb",
            0,
            50,
            100000,
            "user-42",
            "0123456789abcdef0123456789abcdef",
            "tok",
            *items,
        )

    def raw_packing() -> None:
        conn.pack_command("LRANGE", keys7[1], -20, -1)
        conn.pack_command("RPUSH", keys7[1], *items)

    rows.append(
        (
            "pack the turn's commands: vel (LOCK_LOAD + APPEND)",
            _us(vel_packing, number),
            "4 + 5, then 7 keys + 10 args",
        )
    )
    rows.append(("pack the turn's commands: raw (LRANGE + RPUSH)", _us(raw_packing, number), ""))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.hotpath",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--sessions", type=int, default=64)
    parser.add_argument("--turns", type=int, default=400, help="measured turns per task")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--no-profile", dest="profile", action="store_false")
    parser.add_argument(
        "--py-spy", default=shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument(
        "--keep-raw", metavar="DIR", help="keep py-spy's raw stacks (flamegraph input) here"
    )
    args = parser.parse_args(argv)
    if args.child:
        child_main()
        return 0
    if args.quick:
        args.turns, args.sessions = 40, 32
    results: dict[str, Any] = {"load_before": list(os.getloadavg()), "args": vars(args)}
    server = PrivateRedis().start()
    try:
        results["profiles"] = asyncio.run(profiles(args, server.url))
        results["micro"] = [list(r) for r in micro(server.url)]
    finally:
        server.stop()
    results["load_after"] = list(os.getloadavg())
    print(render(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


async def profiles(args: argparse.Namespace, url: str) -> dict[str, Any]:
    """Every variant's profile, one after another, on a schema of their own."""
    import asyncpg

    from vel.settings import load_settings
    from vel.stores.postgres.migrate import migrate

    dsn = load_settings().postgres_dsn or DEFAULT_DSN
    schema = f"velhot_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(dsn)
    out = {}
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
        await migrate(dsn, schema=schema)
        for variant in [v for v in args.variants.split(",") if v]:
            print(f"[hotpath] {variant}", file=sys.stderr, flush=True)
            out[variant] = await asyncio.to_thread(profile, variant, args, url, dsn, schema)
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()
    return out


def render(results: dict[str, Any]) -> str:
    """Markdown tables of the profiles (us per turn by category) and the micro figures."""
    profiles: dict[str, Any] = results.get("profiles", {})
    lines = []
    if profiles and any("by_category_us" in p for p in profiles.values()):
        names = [n for n, _ in CATEGORIES] + [EVENT_LOOP, "embedded flusher"]
        variants = list(profiles)
        lines.append("| client CPU per turn, us | " + " | ".join(variants) + " |")
        lines.append("|---" * (len(variants) + 1) + "|")
        for name in names:
            cells = [str(profiles[v].get("by_category_us", {}).get(name, "")) for v in variants]
            if any(cells):
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append(
            "| **total (process CPU / turns)** | "
            + " | ".join(f"**{profiles[v]['cpu_us_per_turn']}**" for v in variants)
            + " |"
        )
        lines.append(
            "| turns/s (one process, while profiled) | "
            + " | ".join(str(profiles[v]["turns_per_s"]) for v in variants)
            + " |"
        )
        lines.append("")
    lines.append("| piece of a turn | us per turn | note |")
    lines.append("|---|---|---|")
    lines += [f"| {what} | {us} | {note} |" for what, us, note in results["micro"]]
    lines.append("")
    load = results.get("load_before"), results.get("load_after")
    lines.append(f"Load average before / after: {load[0]} / {load[1]}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
