"""One benchmark worker process: C asyncio tasks running chat turns against one mode.

The parent starts it as ``python -m benchmarks.workload`` with a JSON spec on stdin; it
connects, prints ``ready``, waits for ``go`` (so process start-up and connecting are not
timed), runs, closes its store (a redis-mode worker drains its flusher), and prints one JSON
line of results. Kinds of run:

- ``throughput``: each task owns some sessions and runs ``turns`` turns on each, round-robin
  (under the turn lock in the ``-lock`` modes and the prototype, as the Agent runs them).
- ``steady``: the same, paced to ``rate`` turns/s per process (open loop), for flush lag.
- ``growth``: one task, one session, ``turns`` turns; every latency is returned in order.
- ``shared``: every task of every process on the same 4 sessions, each turn under the
  session's turn lock; the turns are checked afterwards for loss and interleaving.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from collections.abc import Sequence
from typing import Any

from benchmarks.modes import LOCKED, StoreDriver, base_mode, make_driver
from vel.messages import Message

USER_BYTES = 300
ASSISTANT_BYTES = 800
_FILLER = "The quick brown fox jumps over the lazy dog while the session store keeps up. "


def _text(tag: str, size: int) -> str:
    body = (_FILLER * (size // len(_FILLER) + 1))[: max(0, size - len(tag) - 40)]
    return f"[{tag}] {body}"


def turn_messages(tag: str) -> list[Message]:
    """The two messages a turn commits; ``tag`` identifies the turn inside both."""
    return [
        {"role": "user", "content": _text(tag, USER_BYTES)},
        {"role": "assistant", "content": _text(tag, ASSISTANT_BYTES)},
    ]


def tag_of(message: Message) -> str:
    content = str(message.get("content", ""))
    return content[1 : content.index("]")] if content.startswith("[") else ""


def check_history(history: Sequence[Message], turns: Sequence[tuple[str, str]]) -> dict[str, int]:
    """Check a shared session's history against the turns acknowledged on it.

    ``turns`` holds (turn tag, tag of the last message the turn read before committing).
    Returns counts of lost turns (acknowledged, not stored), duplicated turns, split turns
    (user and assistant of one turn not adjacent) and stale turns (a turn whose window did
    not end with the message just before its own: it ran beside another turn, not after it).
    """
    tags = [tag_of(m) for m in history]
    where: dict[str, int] = {}
    duplicated = split = 0
    for i in range(0, len(tags)):
        if history[i].get("role") != "user":
            continue
        if tags[i] in where:
            duplicated += 1
        where[tags[i]] = i
        if i + 1 >= len(tags) or tags[i + 1] != tags[i] or history[i + 1]["role"] != "assistant":
            split += 1
    lost = stale = 0
    for tag, seen in turns:
        at = where.get(tag)
        if at is None:
            lost += 1
            continue
        before = tags[at - 1] if at > 0 else ""
        if before != seen:
            stale += 1
    if len(tags) % 2:
        split += 1
    return {"lost": lost, "duplicated": duplicated, "split": split, "stale": stale}


class _Recorder:
    """Append acks and flush commits, with wall-clock times (comparable across processes)."""

    def __init__(self) -> None:
        self.acks: list[tuple[str, int, float]] = []
        self.commits: list[tuple[str, int, float]] = []
        self.flush_tx = 0
        self.warm_tx = 0

    def instrument(self, driver: Any) -> None:
        store = driver.store
        cold = store.cold
        apply_flushes = cold.apply_flushes
        take_lease = cold.take_lease

        async def counted_flush(batch: Any, truncations: Any = None, lease: Any = None) -> Any:
            result = await apply_flushes(batch, truncations, lease)
            now = time.time()
            self.flush_tx += 1
            for item in batch:
                sid, rows = (
                    (item[0], item[2])
                    if isinstance(item, tuple)
                    else (
                        item.session_id,
                        item.rows,
                    )
                )
                if rows:
                    self.commits.append((sid, int(rows[-1][0]), now))
            return result

        async def counted_warm(*args: Any) -> Any:
            self.warm_tx += 1
            return await take_lease(*args)

        cold.apply_flushes = counted_flush
        cold.take_lease = counted_warm


async def _run(spec: dict[str, Any]) -> dict[str, Any]:
    mode, kind = spec["mode"], spec["kind"]
    driver = make_driver(mode, spec)
    recorder = _Recorder()
    if base_mode(mode) == "redis":
        recorder.instrument(driver)
    await driver.open()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    await asyncio.to_thread(sys.stdin.readline)

    tasks, turns, limit = int(spec["tasks"]), int(spec["turns"]), int(spec["limit"])
    run, proc = spec["run"], int(spec["proc"])
    latencies: list[float] = []
    shared_turns: dict[str, list[tuple[str, str]]] = {}
    errors: list[str] = []
    track = bool(spec.get("track_acks"))
    locked = mode in LOCKED

    async def owned(task: int) -> None:
        sessions = [f"{run}-p{proc}-s{i}" for i in range(task, int(spec["sessions"]), tasks)]
        period = tasks / float(spec["rate"]) if spec.get("rate") else 0.0
        k = 0
        begin = time.monotonic()
        for n in range(turns):
            for sid in sessions:
                if period:
                    wait = begin + k * period - time.monotonic()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    k += 1
                start = time.perf_counter()
                if locked:
                    await driver.locked_turn(sid, turn_messages(f"{sid}/{n}"), limit)
                    seq = 0
                else:
                    seq = await driver.turn(sid, turn_messages(f"{sid}/{n}"), limit)
                latencies.append(time.perf_counter() - start)
                if track:
                    recorder.acks.append((sid, seq, time.time()))

    async def shared(task: int) -> None:
        for n in range(turns):
            sid = f"{run}-shared-{(task + n) % 4}"
            tag = f"p{proc}t{task}n{n}"
            start = time.perf_counter()
            seen = await driver.locked_turn(sid, turn_messages(tag), limit)
            latencies.append(time.perf_counter() - start)
            shared_turns.setdefault(sid, []).append(
                (tag, seen[1 : seen.index("]")] if seen else "")
            )

    async def guarded(task: int) -> None:
        try:
            await (shared(task) if kind == "shared" else owned(task))
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")

    if kind == "shared":
        # One untimed turn per session first: the sessions are then hot, as in a running
        # service, and the latencies measure turns waiting for each other, not the first
        # warm from Postgres (those turns are checked with the others all the same).
        for i in range(4):
            sid, tag = f"{run}-shared-{i}", f"p{proc}w{i}"
            seen = await driver.locked_turn(sid, turn_messages(tag), limit)
            shared_turns.setdefault(sid, []).append(
                (tag, seen[1 : seen.index("]")] if seen else "")
            )
    started, cpu = time.time(), time.process_time()
    await asyncio.gather(*(guarded(t) for t in range(tasks)))
    ended, cpu = time.time(), time.process_time() - cpu
    shared_check: dict[str, int] | None = None
    if kind == "shared" and mode == "memory" and isinstance(driver, StoreDriver):
        # Memory sessions live in this process only: check them here.
        shared_check = {"lost": 0, "duplicated": 0, "split": 0, "stale": 0}
        for sid, done in shared_turns.items():
            for key, value in check_history(await driver.history(sid), done).items():
                shared_check[key] += value
    closing = time.perf_counter()
    await driver.aclose()
    return {
        "mode": mode,
        "kind": kind,
        "proc": proc,
        "started": started,
        "ended": ended,
        "close_s": time.perf_counter() - closing,
        "cpu_s": cpu,
        "turns": len(latencies),
        "latencies": latencies,
        "errors": errors,
        "rss_mb": peak_rss_mb(),
        "acks": recorder.acks,
        "commits": recorder.commits,
        "flush_tx": recorder.flush_tx,
        "warm_tx": recorder.warm_tx,
        "shared_turns": shared_turns,
        "shared_check": shared_check,
    }


def peak_rss_mb() -> float:
    """This process's peak resident memory. On Linux from ``VmHWM``: ``ru_maxrss`` survives
    ``exec``, so a worker would report its parent's peak at the fork (the bench parent grows
    when it imports the Agents SDK to create the SQLAlchemy peer's tables)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    spec = json.loads(sys.stdin.readline())
    result = asyncio.run(_run(spec))
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
