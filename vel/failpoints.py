"""Failpoints: named places where fault tests make vel crash, stall or fail.

Off unless ``VEL_FAILPOINTS`` is set, e.g. ``VEL_FAILPOINTS="flush_after_commit=kill"``
(comma separated ``name=action``). Actions: ``kill`` (SIGKILL this process), ``sleep:S``,
``freeze:S`` (block the event loop's thread for S seconds, as a long GC pause or CPU-bound
code does: not even background lease renewals run), ``error`` (raise
StoreUnavailableError). Names: ``flush_after_claim``, ``flush_mid_transaction``,
``flush_after_commit``, ``after_append_script``, ``during_warm``. A ``name=action@N`` form
triggers only on the Nth hit.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

from vel.errors import StoreUnavailableError
from vel.settings import failpoint_spec

_ACTIONS: dict[str, tuple[str, int]] = {}
_HITS: dict[str, int] = {}


def configure(spec: str) -> None:
    """Replace the active failpoints (tests call this; processes read the environment)."""
    _ACTIONS.clear()
    _HITS.clear()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, action = part.partition("=")
        action, _, nth = action.partition("@")
        _ACTIONS[name.strip()] = (action.strip(), int(nth) if nth else 0)


configure(failpoint_spec())


async def hit(name: str) -> None:
    if not _ACTIONS:
        return
    entry = _ACTIONS.get(name)
    if entry is None:
        return
    action, nth = entry
    _HITS[name] = _HITS.get(name, 0) + 1
    if nth and _HITS[name] != nth:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action.startswith("sleep:"):
        await asyncio.sleep(float(action.split(":", 1)[1]))
    elif action.startswith("freeze:"):
        time.sleep(float(action.split(":", 1)[1]))  # noqa: ASYNC251 (blocking is the point)
    elif action == "error":
        raise StoreUnavailableError(f"failpoint {name} injected an error")
