"""User programs run as real OS processes, timed from ``main()`` returning to the exit.

A user script is plain Python as a user writes it (``asyncio.run(main())``, often without
``aclose()``). It runs through this module's launcher, which changes nothing but this: when
the coroutine given to ``asyncio.run`` returns, the launcher prints
``VEL_MAIN_RETURNED <epoch seconds>`` on stderr and arms :mod:`faulthandler` to dump every
thread's stack and exit with status 1 if the process is still alive ``hang_after`` seconds
later (a hang is then a failure with its stacks, not a stuck test).

Used by ``tests/test_loop_lifecycle.py`` and ``scripts/lifecycle_exit.py``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
MARK = "VEL_MAIN_RETURNED"
_MARK_RE = re.compile(rf"^{MARK} (\d+\.\d+)$", re.M)
# Printed when asyncio.run() returns: its loop has shut down (tasks cancelled, loop-end work
# done, loop closed); the rest of the exit delay is the interpreter's own teardown.
RUN_MARK = "VEL_RUN_RETURNED"
_RUN_MARK_RE = re.compile(rf"^{RUN_MARK} (\d+\.\d+)$", re.M)

# The spec's basic usage (spec/session-management.md), as a script: one turn in whichever
# storage mode VEL_TEST_MODE names, no aclose(). {after} follows the turn inside main().
SPEC_USAGE = """\
import asyncio
import os

from vel import Agent


async def main():
    agent = Agent(
        id='my-agent',
        model={{'provider': 'openai', 'model': 'gpt-4o'}},
        session_storage=os.environ['VEL_TEST_MODE'],
    )
    answer = await agent.run(
        {{'message': 'My name is Alice'}},
        session_id=os.environ['VEL_TEST_SESSION'],
    )
    print(answer, flush=True)
{after}

asyncio.run(main())
"""


# One Agent driven by successive asyncio.run() calls (a worker running each job in a fresh
# loop), two turns per run on a session of its own; prints one JSON line: the sockets the
# process holds after each run (gc'd) and after aclose(), when aclose() returned, and how
# many of the 4 * runs messages Postgres held how many seconds after that (waiting <= 10 s).
MANY_LOOPS = """\
import asyncio
import gc
import json
import os
import sys
import time

from vel import Agent


def sockets():
    count = 0
    for fd in os.listdir('/proc/self/fd'):
        try:
            count += os.readlink(f'/proc/self/fd/{fd}').startswith('socket:')
        except OSError:
            pass
    return count


agent = Agent(
    id='my-agent',
    model={'provider': 'openai', 'model': 'gpt-4o'},
    session_storage=os.environ['VEL_TEST_MODE'],
)
prefix = os.environ['VEL_TEST_SESSION']
runs = int(sys.argv[1]) if len(sys.argv) > 1 else int(os.environ.get('VEL_TEST_RUNS', '10'))
if os.environ.get('VEL_TEST_LOOP_END_DRAIN'):
    # What a loaded machine does to the short loop-end drain: it runs out before a flush.
    import vel.stores.tiered.embedded

    vel.stores.tiered.embedded.LOOP_END_DRAIN = float(os.environ['VEL_TEST_LOOP_END_DRAIN'])
after_run = []
for i in range(runs):
    async def job():
        await agent.run({'message': f'first of job {i}'}, session_id=f'{prefix}-{i}')
        await agent.run({'message': f'second of job {i}'}, session_id=f'{prefix}-{i}')

    asyncio.run(job())
    gc.collect()
    after_run.append(sockets())
asyncio.run(agent.aclose())
closed = time.time()
gc.collect()
after_aclose = sockets()


async def in_postgres():
    import asyncpg

    conn = await asyncpg.connect(os.environ['POSTGRES_DSN'])
    try:
        while True:
            stored = await conn.fetchval(
                'SELECT count(*) FROM vel_messages WHERE session_id LIKE $1', prefix + '-%'
            )
            if stored >= 4 * runs or time.time() > closed + 10:
                return stored, time.time() - closed
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


stored, waited = asyncio.run(in_postgres())
print(json.dumps({
    'after_run': after_run, 'after_aclose': after_aclose, 'closed': closed,
    'stored': stored, 'stored_after': waited,
}))
"""


# Twenty turns started as tasks on five sessions, then aclose() after VEL_TEST_PRE seconds
# (a shutdown hook while requests finish), then one turn more; prints what each ended with and
# how many messages Postgres holds right after aclose() returned.
ACLOSE_IN_FLIGHT = """\
import asyncio
import json
import os
import time

import asyncpg

from vel import Agent, AgentClosedError

agent = Agent(
    id='my-agent',
    model={'provider': 'openai', 'model': 'gpt-4o'},
    session_storage=os.environ['VEL_TEST_MODE'],
)
prefix = os.environ['VEL_TEST_SESSION']


async def main():
    ended = []

    async def turn(i):
        try:
            await agent.run({'message': f'turn {i} [[slow 0.01]]'}, session_id=f'{prefix}-{i % 5}')
            ended.append('ok')
        except Exception as exc:
            ended.append(f'{type(exc).__name__}: {exc}')

    tasks = [asyncio.create_task(turn(i)) for i in range(20)]
    await asyncio.sleep(float(os.environ['VEL_TEST_PRE']))
    began = time.monotonic()
    await agent.aclose()
    took = time.monotonic() - began
    unfinished = sum(not t.done() for t in tasks)
    conn = await asyncpg.connect(os.environ['POSTGRES_DSN'])
    try:
        stored = await conn.fetchval(
            'SELECT count(*) FROM vel_messages WHERE session_id LIKE $1', prefix + '-%'
        )
    finally:
        await conn.close()
    await asyncio.gather(*tasks)
    try:
        await agent.run({'message': 'after'}, session_id=f'{prefix}-after')
        after = 'ok'
    except AgentClosedError:
        after = 'AgentClosedError'
    print(json.dumps({
        'ended': ended, 'unfinished_at_close': unfinished, 'aclose_s': took,
        'stored': stored, 'after': after,
    }))


asyncio.run(main())
"""


# A turn stream the program stops reading and never closes (no aclose(), no aclosing), then
# main() returns: VEL_TEST_HOLDER says what holds the suspended stream then: 'global' (a
# module-level list, so asyncio's shutdown closes it), 'sse' (the same, framed by
# vel.sse.sse_stream) or 'dropped' (nothing: collected as main() returns).
STREAM_LEFT_OPEN = """\
import asyncio
import os

from vel import Agent
from vel.sse import sse_stream

KEEP = []


async def main():
    agent = Agent(
        id='my-agent',
        model={'provider': 'openai', 'model': 'gpt-4o'},
        session_storage=os.environ['VEL_TEST_MODE'],
    )
    stream = agent.run_stream(
        {'message': 'Tell me a long story [[slow 2]]'},
        session_id=os.environ['VEL_TEST_SESSION'],
    )
    holder = os.environ['VEL_TEST_HOLDER']
    if holder == 'sse':
        stream = sse_stream(stream)
    if holder != 'dropped':
        KEEP.append(stream)
    async for event in stream:
        if 'start-step' in (event.decode() if isinstance(event, bytes) else event['type']):
            break
    print('stopped reading', flush=True)


asyncio.run(main())
"""


def spec_usage(after: str = "") -> str:
    """:data:`SPEC_USAGE` with ``after`` (lines of code, unindented) at the end of main()."""
    body = "".join(f"    {line}\n" for line in after.splitlines())
    return SPEC_USAGE.format(after=body.rstrip("\n"))


@dataclass
class Exit:
    """How one user script process ended."""

    returncode: int
    main_returned: float | None  # epoch seconds, None if main() never returned
    exited: float  # epoch seconds
    stdout: str
    stderr: str

    @property
    def delay(self) -> float | None:
        """Seconds from main() returning to the process's exit (None: never returned)."""
        return None if self.main_returned is None else self.exited - self.main_returned

    @property
    def loop_shutdown(self) -> float | None:
        """Seconds from main() returning to asyncio.run() returning (the loop's shutdown)."""
        runs = _RUN_MARK_RE.findall(self.stderr)
        if self.main_returned is None or not runs:
            return None
        return float(runs[-1]) - self.main_returned

    @property
    def hung(self) -> bool:
        """Killed by the launcher's watchdog (or by the caller's timeout)."""
        return self.returncode != 0 and "most recent call first" in self.stderr

    def describe(self) -> str:
        return (
            f"exit status {self.returncode}, delay {self.delay}\n"
            f"stderr tail:\n{self.stderr[-4000:]}\nstdout tail:\n{self.stdout[-1000:]}"
        )


def run_script(
    script: Path,
    env: Mapping[str, str],
    *,
    hang_after: float = 10.0,
    timeout: float = 60.0,
    python: str | None = None,
) -> Exit:
    """Run ``script`` through the launcher in a fresh interpreter and wait for its exit."""
    argv = [python or sys.executable, str(HERE / "userscripts.py"), str(script), str(hang_after)]
    proc = subprocess.Popen(
        argv,
        env=dict(env),
        cwd=str(HERE.parent),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        err += "\n(killed by run_script's timeout; most recent call first: unknown)"
    exited = time.time()
    marks = _MARK_RE.findall(err)
    return Exit(proc.returncode, float(marks[-1]) if marks else None, exited, out, err)


def _launch(script: str, hang_after: float) -> None:
    """Run ``script`` as ``__main__``, timing the coroutine its ``asyncio.run`` runs."""
    import asyncio
    import faulthandler
    import runpy
    from collections.abc import Coroutine
    from typing import Any

    real_run = asyncio.run

    def timed_run(main: Coroutine[Any, Any, Any], **kwargs: Any) -> Any:
        async def timed() -> Any:
            try:
                return await main
            finally:
                print(f"{MARK} {time.time():.6f}", file=sys.stderr, flush=True)
                faulthandler.dump_traceback_later(hang_after, exit=True)

        try:
            return real_run(timed(), **kwargs)
        finally:
            print(f"{RUN_MARK} {time.time():.6f}", file=sys.stderr, flush=True)

    asyncio.run = timed_run  # type: ignore[assignment]
    sys.argv = [script]
    # As `python script.py` would: the script's directory first, not this one's.
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    _launch(sys.argv[1], float(sys.argv[2]))
