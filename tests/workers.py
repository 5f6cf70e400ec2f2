"""Worker processes for the multi-process and fault tests, and the helpers that run them.

Run as a script, each command is one OS process configured like a real worker, from the
environment (``POSTGRES_DSN``, ``REDIS_URL``, ``VEL_KEY_PREFIX``, ``VEL_FLUSHER``,
``VEL_OP_TIMEOUT``, ``OPENAI_BASE_URL``, ...). Every command prints JSON lines on stdout:

``turn``
    one ``agent.run`` of one session; prints ``{"event": "answer", "answer": ...}``.
``append``
    P asyncio tasks appending two-message "turns" with deterministic contents
    (``{tag}w{proc}-t{task}-{i}-u`` / ``-a``) through the storage mode; every acknowledged
    append is printed as ``{"event": "ack", ...}`` (the oracle the checker compares with),
    every failed one as ``{"event": "error", ...}``.
``agent-turns``
    full Agent turns (turn lock on, the default) against the fake LLM; prints each turn.
``turns``
    T asyncio tasks running Agent turns round the given sessions for D seconds, carrying
    on through backend failures; prints every returned turn as ``{"event": "turn", ...}``
    (the oracle) and every failed one as ``{"event": "error", ...}``.
``read``
    N concurrent loads of one session, started together on a ``go`` line read from stdin
    (so that several processes can be released at once); prints the store's stats.

Imported as a module (the tests do), it gives :class:`Proc` and :func:`worker_env`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MODEL = {"provider": "openai", "model": "fake-model"}


# --------------------------------------------------------------------------------------
# The test side: spawning and collecting worker processes
# --------------------------------------------------------------------------------------


def worker_env(
    *,
    postgres_dsn: str | None = None,
    redis_url: str | None = None,
    key_prefix: str | None = None,
    openai_url: str | None = None,
    **extra: str,
) -> dict[str, str]:
    """The environment of a worker: the test's own, minus any outer VEL_* configuration."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VEL_", "OPENAI_"))}
    env.pop("POSTGRES_DSN", None)
    env.pop("REDIS_URL", None)
    env["PYTHONUNBUFFERED"] = "1"
    env["OPENAI_API_KEY"] = "test-key"
    if postgres_dsn is not None:
        env["POSTGRES_DSN"] = postgres_dsn
    if redis_url is not None:
        env["REDIS_URL"] = redis_url
    if key_prefix is not None:
        env["VEL_KEY_PREFIX"] = key_prefix
    if openai_url is not None:
        env["OPENAI_BASE_URL"] = openai_url
    env.update(extra)
    return env


class Proc:
    """One child process with stdout/stderr in files (a full pipe can never block it).

    Only this object's own pid is ever signalled; :meth:`kill` is for ``finally`` blocks.
    """

    def __init__(
        self,
        argv: list[str],
        env: Mapping[str, str],
        out_dir: Path,
        name: str,
        *,
        stdin: bool = False,
    ) -> None:
        self.name = name
        self.out_path = out_dir / f"{name}.out"
        self.err_path = out_dir / f"{name}.err"
        self.argv = argv
        self.started = time.monotonic()
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.popen = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=dict(env),
                cwd=str(HERE.parent),
            )

    @classmethod
    def worker(
        cls,
        command: str,
        *args: object,
        env: Mapping[str, str],
        out_dir: Path,
        name: str,
        stdin: bool = False,
    ) -> Proc:
        argv = [sys.executable, str(HERE / "workers.py"), command, *map(str, args)]
        return cls(argv, env, out_dir, name, stdin=stdin)

    @classmethod
    def vel(cls, *args: object, env: Mapping[str, str], out_dir: Path, name: str) -> Proc:
        """``python -m vel ...`` (e.g. a standalone flusher)."""
        return cls([sys.executable, "-m", "vel", *map(str, args)], env, out_dir, name)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def send_line(self, text: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(text.encode() + b"\n")
        self.popen.stdin.flush()

    def wait(self, timeout: float) -> int:
        """Wait for the exit; a process still running after ``timeout`` is killed and the
        test fails (a hang is a bug, never a skip)."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"{self.name} (pid {self.pid}) still running after {timeout} s; killed.\n"
                f"stderr tail:\n{self.stderr()[-3000:]}"
            ) from None

    async def wait_async(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.popen.poll() is None:
            if time.monotonic() >= deadline:
                return self.wait(0)
            await asyncio.sleep(0.05)
        return int(self.popen.returncode)

    def kill(self) -> None:
        """SIGKILL (after SIGCONT, in case it was stopped) and reap; for ``finally`` blocks."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGCONT)
                self.popen.send_signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(10)
        if self.popen.stdin is not None:
            with contextlib.suppress(OSError):
                self.popen.stdin.close()

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def lines(self) -> list[dict[str, Any]]:
        """The JSON objects printed so far (non-JSON lines are skipped)."""
        found = []
        for line in self.stdout().splitlines():
            line = line.strip()
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    found.append(json.loads(line))
        return found

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line.get("event") == kind]

    def check(self, rc: int, expected: int = 0) -> None:
        assert rc == expected, (
            f"{self.name} exited with {rc}, expected {expected}\n"
            f"stderr tail:\n{self.stderr()[-3000:]}\nstdout tail:\n{self.stdout()[-1500:]}"
        )


def kill_all(procs: list[Proc]) -> None:
    for proc in procs:
        proc.kill()


def flags(options: Mapping[str, object]) -> list[str]:
    """Keyword options as command-line flags: ``lease=2`` -> ``--lease 2``."""
    argv: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not False and value is not None:
            argv += [flag, str(value)]
    return argv


def with_port(dsn: str, port: int) -> str:
    """``dsn`` pointing at another port of the same host (e.g. a FaultProxy)."""
    parts = urllib.parse.urlsplit(dsn)
    userinfo, _, _ = parts.netloc.rpartition("@")
    netloc = f"{userinfo}@{parts.hostname}:{port}" if userinfo else f"{parts.hostname}:{port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


@dataclass
class Stack:
    """One test's isolated backends (its Postgres schema, its Redis key prefix) and the
    processes it starts; :meth:`close` kills whatever is still running."""

    pg_dsn: str
    schema: str
    redis_url: str
    prefix: str
    out_dir: Path
    procs: list[Proc] = field(default_factory=list)

    @property
    def dsn(self) -> str:
        """The Postgres DSN of the test's schema."""
        from conftest import schema_dsn

        return str(schema_dsn(self.pg_dsn, self.schema))

    def env(self, **extra: str) -> dict[str, str]:
        settings = {
            "postgres_dsn": self.dsn,
            "redis_url": self.redis_url,
            "key_prefix": self.prefix,
            "VEL_PG_POOL_MAX": "4",
        }
        settings.update(extra)
        return worker_env(**settings)

    def worker(
        self,
        command: str,
        *,
        name: str,
        env: Mapping[str, str] | None = None,
        stdin: bool = False,
        **options: object,
    ) -> Proc:
        """``workers.py COMMAND --option value ...`` (``session_id=`` gives ``--session-id``;
        True gives a bare flag)."""
        proc = Proc.worker(
            command,
            *flags(options),
            env=self.env() if env is None else env,
            out_dir=self.out_dir,
            name=name,
            stdin=stdin,
        )
        self.procs.append(proc)
        return proc

    def vel(
        self, command: str, *, name: str, env: Mapping[str, str] | None = None, **options: object
    ) -> Proc:
        """``python -m vel COMMAND --option value ...`` (e.g. a standalone flusher)."""
        env = self.env() if env is None else env
        proc = Proc.vel(command, *flags(options), env=env, out_dir=self.out_dir, name=name)
        self.procs.append(proc)
        return proc

    def tiered(self) -> Any:
        """An in-test TieredStore on the same schema and prefix, without a flusher task
        (``flush()`` drains on demand) and with nothing cached: it reads what the workers
        wrote."""
        from vel.stores.postgres import PostgresStore
        from vel.stores.redis import RedisStore
        from vel.stores.tiered import TieredStore

        return TieredStore(
            RedisStore(self.redis_url, key_prefix=self.prefix, write_behind=True, flush_delay=0),
            PostgresStore(self.pg_dsn, schema=self.schema),
            flusher=False,
        )

    def close(self) -> None:
        kill_all(self.procs)


# --------------------------------------------------------------------------------------
# The worker side
# --------------------------------------------------------------------------------------


def emit(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields, default=str) + "\n")
    sys.stdout.flush()


def _error_fields(exc: BaseException) -> dict[str, Any]:
    return {
        "type": type(exc).__name__,
        "mro": [c.__name__ for c in type(exc).__mro__],
        "message": str(exc)[:500],
    }


def _open_store(storage: str) -> Any:
    from vel.stores import open_store

    return open_store(storage)


async def cmd_turn(args: argparse.Namespace) -> int:
    from vel import Agent

    async with Agent(id="worker", model=MODEL, session_storage=args.storage) as agent:
        answer = await agent.run({"message": args.message}, session_id=args.session)
        emit(event="answer", answer=answer, pid=os.getpid())
    return 0


def contents(tag: str, proc: int, task: int, i: int) -> list[str]:
    base = f"{tag}w{proc}-t{task}-{i}"
    return [f"{base}-u", f"{base}-a"]


async def cmd_append(args: argparse.Namespace) -> int:
    store = _open_store(args.storage)
    sessions = args.session.split(",")
    failed = 0
    stop = asyncio.Event()
    # SIGTERM ends the run early, as a deployment stops a worker: the store still closes.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    # Each task keeps its share of the rate on an absolute schedule (no drift).
    interval = args.tasks / args.rate if args.rate > 0 else 0.0
    start = time.monotonic()

    async def task(t: int) -> None:
        nonlocal failed
        sid = sessions[t % len(sessions)]
        i = 0
        while not stop.is_set():
            if args.duration > 0:
                if time.monotonic() - start >= args.duration:
                    return
            elif i >= args.appends:
                return
            if interval:
                due = start + (i + t / args.tasks) * interval
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            texts = contents(args.tag, args.proc, t, i)
            messages = [
                {"role": "user", "content": texts[0]},
                {"role": "assistant", "content": texts[1]},
            ]
            began = time.time()
            try:
                seq = await store.append(sid, messages)
            except Exception as exc:
                failed += 1
                emit(
                    event="error",
                    sid=sid,
                    proc=args.proc,
                    task=t,
                    i=i,
                    t=began,
                    elapsed=time.time() - began,
                    **_error_fields(exc),
                )
                if args.stop_on_error:
                    stop.set()
                    return
            else:
                emit(
                    event="ack",
                    sid=sid,
                    tag=args.tag,
                    proc=args.proc,
                    task=t,
                    i=i,
                    seq=seq,
                    contents=texts,
                    t=began,
                    latency=round(time.time() - began, 4),
                )
            i += 1

    try:
        await asyncio.gather(*(task(t) for t in range(args.tasks)))
        with contextlib.suppress(Exception):
            emit(event="stats", stats=await store.stats())
    finally:
        closing = time.monotonic()
        await store.aclose()
        emit(event="closed", close_seconds=round(time.monotonic() - closing, 3))
    return 2 if failed else 0


async def cmd_agent_turns(args: argparse.Namespace) -> int:
    from vel import Agent

    async with Agent(id="worker", model=MODEL, session_storage=args.storage) as agent:

        async def task(t: int) -> None:
            for i in range(args.turns):
                message = f"w{args.proc}-t{t}-{i}"
                began = time.time()
                answer = await agent.run({"message": message}, session_id=args.session)
                emit(event="turn", message=message, answer=answer, t0=began, t1=time.time())

        await asyncio.gather(*(task(t) for t in range(args.tasks)))
    return 0


async def cmd_turns(args: argparse.Namespace) -> int:
    from vel import Agent

    sessions = args.session.split(",")
    policies = {"lock_timeout": args.lock_timeout}
    agent = Agent(id="worker", model=MODEL, session_storage=args.storage, policies=policies)
    start = time.monotonic()

    async def task(t: int) -> None:
        i = 0
        while time.monotonic() - start < args.duration:
            sid = sessions[(t + i) % len(sessions)]
            message = f"{args.tag}w{args.proc}-t{t}-{i}"
            began = time.time()
            try:
                answer = await agent.run({"message": message}, session_id=sid)
            except Exception as exc:
                emit(event="error", sid=sid, turn=message, t0=began, t1=time.time(),
                     **_error_fields(exc))  # fmt: skip
                await asyncio.sleep(0.05)
            else:
                emit(event="turn", sid=sid, turn=message, answer=answer, t0=began,
                     t1=time.time())  # fmt: skip
            i += 1

    try:
        await asyncio.gather(*(task(t) for t in range(args.tasks)))
    finally:
        await agent.aclose()
    return 0


async def cmd_read(args: argparse.Namespace) -> int:
    from vel.stores.tiered import TieredStore

    store = _open_store("redis")
    assert isinstance(store, TieredStore), f"expected a TieredStore, got {store!r}"
    try:
        # Connect both tiers first, so the readers race on the session, not on start-up.
        await store.hot.ping()
        await store.cold.open()
        emit(event="ready", pid=os.getpid())
        line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        if line.strip() != "go":
            emit(event="aborted", line=line)
            return 3
        limit = args.limit if args.limit > 0 else None
        results = await asyncio.gather(
            *(store.load(args.session, limit) for _ in range(args.readers)),
            return_exceptions=True,
        )
        errors = [_error_fields(r) for r in results if isinstance(r, BaseException)]
        distinct = sorted({json.dumps(r) for r in results if not isinstance(r, BaseException)})
        emit(
            event="result",
            stats=await store.stats(),
            distinct=[json.loads(d) for d in distinct],
            errors=errors[:5],
            error_count=len(errors),
        )
        return 0 if not errors else 2
    finally:
        await store.aclose()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("turn", help="one agent.run; prints the answer")
    p.add_argument("--storage", required=True, choices=["memory", "database", "redis"])
    p.add_argument("--session", required=True)
    p.add_argument("--message", required=True)
    p.set_defaults(run=cmd_turn)

    p = sub.add_parser("append", help="concurrent two-message appends; prints the oracle")
    p.add_argument("--storage", required=True, choices=["database", "redis"])
    p.add_argument("--session", required=True, help="one id, or several separated by commas")
    p.add_argument("--proc", type=int, default=0, help="this worker's number (in contents)")
    p.add_argument("--tag", default="", help="prefix of every content (distinct per phase)")
    p.add_argument("--tasks", type=int, default=1)
    p.add_argument("--appends", type=int, default=1, help="appends per task")
    p.add_argument("--rate", type=float, default=0.0, help="appends/s of the process (0: max)")
    p.add_argument("--duration", type=float, default=0.0, help="seconds (instead of --appends)")
    p.add_argument("--stop-on-error", action="store_true")
    p.set_defaults(run=cmd_append)

    p = sub.add_parser("agent-turns", help="agent turns with the turn lock against a fake LLM")
    p.add_argument("--storage", required=True, choices=["database", "redis"])
    p.add_argument("--session", required=True)
    p.add_argument("--proc", type=int, default=0)
    p.add_argument("--tasks", type=int, default=1)
    p.add_argument("--turns", type=int, default=1, help="turns per task")
    p.set_defaults(run=cmd_agent_turns)

    p = sub.add_parser("turns", help="agent turns round sessions for a while, through faults")
    p.add_argument("--storage", required=True, choices=["memory", "database", "redis"])
    p.add_argument("--session", required=True, help="session ids separated by commas")
    p.add_argument("--proc", type=int, default=0)
    p.add_argument("--tag", default="")
    p.add_argument("--tasks", type=int, default=1)
    p.add_argument("--duration", type=float, required=True)
    p.add_argument("--lock-timeout", type=float, default=30.0)
    p.set_defaults(run=cmd_turns)

    p = sub.add_parser("read", help="N concurrent loads of one session after a 'go' line")
    p.add_argument("--session", required=True)
    p.add_argument("--readers", type=int, default=100)
    p.add_argument("--limit", type=int, default=0, help="window (0: whole session)")
    p.set_defaults(run=cmd_read)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return int(asyncio.run(args.run(args)))


if __name__ == "__main__":
    sys.exit(main())
