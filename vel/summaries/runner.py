"""Background summarisation: off the turn's path, single-flight across processes, resumable.

After a turn's commit the Agent reports the session's new last seq (:meth:`Summaries.observe`,
no I/O). When the summary lags by K messages or more a task is started on the running loop,
unless one runs for that session in this process already. The task takes the session's
summarisation lease (shared by every process: one summariser per session), reads the
uncovered messages, calls the summariser, and stores the new summary only if nothing changed
meanwhile (compare-and-set on the covered seq and on the history itself), so a repeated or
overlapping run is harmless. A worker killed mid-way leaves a lease that runs out; the next
turn on any worker starts the work again from the last stored summary.

Summariser failures never reach a turn: each call is retried with exponential backoff, then
the session is left alone for a growing pause; every failure is logged with the session id
and counted (``summary_failures``).
"""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections import OrderedDict

from vel import _fork, metrics
from vel._lease import LeaseKeeper
from vel._shield import CancelWatch, settle
from vel._sync import in_helper_thread
from vel.errors import VelError
from vel.logs import get_logger
from vel.messages import Message
from vel.summaries import policy as pol
from vel.summaries.base import Summary, SummaryBackend
from vel.summaries.prompt import Summarizer, call

log = get_logger("vel.summaries")

_TRACKED_LAGS = 10_000  # sessions whose last seen lag this process remembers (gauges)


class Summaries:
    """Keeps the summaries of one context manager's sessions up to date.

    Args:
        backend: where summaries and their leases live (the store's mode).
        summarizer: ``(previous, messages) -> text``.
        window: the context manager's ``max_history``.
        policy: thresholds, lease and backoff.
    """

    def __init__(
        self,
        backend: SummaryBackend,
        summarizer: Summarizer,
        window: int,
        policy: pol.SummaryPolicy,
    ) -> None:
        self.backend = backend
        self.summarizer = summarizer
        self.window = window
        self.policy = policy
        self.counters: dict[str, float] = {
            "summary_calls": 0.0,
            "summary_failures": 0.0,
            "summaries_written": 0.0,
            "summary_runs_skipped": 0.0,
        }
        self._lags: OrderedDict[str, int] = OrderedDict()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._pause: dict[str, tuple[int, float]] = {}  # session -> (failed runs, not before)
        metrics.track(self, _Figures(self.counters, self._lags, policy.every), None)
        _fork.forget_in_child(self)

    def _forget_after_fork(self) -> None:
        # The parent's tasks belong to a loop the child does not run: kept, they would make
        # their sessions look busy forever.
        self._tasks = {}

    # -- the turn's side ------------------------------------------------------------------

    async def get(self, session_id: str) -> Summary | None:
        """The summary a turn shows its model; a backend failure only means none this turn."""
        try:
            return await self.backend.get(session_id)
        except VelError as exc:
            log.warning("summary of %r not read: %s", session_id, exc, extra=_extra(session_id))
            return None

    def observe(self, session_id: str, last_seq: int, covered: int) -> None:
        """After a commit: start a background summarisation if the lag reached K."""
        behind = pol.lag(last_seq, self.window, covered)
        self._remember(session_id, behind)
        if behind < self.policy.every or in_helper_thread():
            return
        running = self._tasks.get(session_id)
        if running is not None and not running.done():
            return
        paused = self._pause.get(session_id)
        if paused is not None and time.monotonic() < paused[1]:
            return
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._run(session_id), name=f"vel-summary {session_id}")
        self._tasks[session_id] = task
        task.add_done_callback(functools.partial(self._forget, session_id))

    def _forget(self, session_id: str, task: asyncio.Task[None]) -> None:
        if self._tasks.get(session_id) is task:
            del self._tasks[session_id]

    def _remember(self, session_id: str, behind: int) -> None:
        self._lags[session_id] = behind
        self._lags.move_to_end(session_id)
        while len(self._lags) > _TRACKED_LAGS:
            self._lags.popitem(last=False)

    # -- the background side ---------------------------------------------------------------

    async def _run(self, session_id: str) -> None:
        try:
            await self.run_once(session_id)
        except VelError as exc:
            log.warning(
                "summarisation of %r stopped: %s (retried at a later turn)",
                session_id,
                exc,
                extra=_extra(session_id),
            )
        except Exception:
            log.exception("summarisation of %r failed", session_id, extra=_extra(session_id))

    async def run_once(self, session_id: str) -> int:
        """Bring the session's summary up to date now (the background task's one step).

        Returns the number of summaries written (0: nothing due, another process holds the
        lease, or the summariser failed; failures are counted and logged, not raised).

        Raises:
            StoreError: a backend call failed.
        """
        token = uuid.uuid4().hex
        if not await self.backend.try_lease(session_id, token, self.policy.lease):
            self.counters["summary_runs_skipped"] += 1
            return 0
        keeper = LeaseKeeper(
            lambda: self.backend.renew_lease(session_id, token, self.policy.lease),
            self.policy.lease / 3,
            "summary lease",
            session_id,
        )
        try:
            return await self._catch_up(session_id)
        finally:
            await keeper.stop()
            # Released whatever cancels us (by token: idempotent); a failed release only
            # means the lease runs out on its own. A cancellation is raised after it.
            done = await settle(
                lambda: self.backend.release_lease(session_id, token), 5.0, "summary lease"
            )
            if done.cancel is not None:
                raise done.cancel

    async def _catch_up(self, session_id: str) -> int:
        written = 0
        p = self.policy
        # Stops when cancelled (its loop ending), even if a driver dropped the cancellation.
        watch = CancelWatch()
        while True:
            watch.check()
            previous = await self.backend.get(session_id)
            covered = previous.covered_seq if previous is not None else 0
            # The batch, the window and the tool results that may follow the cut.
            basis = await self.backend.history(session_id, covered, p.batch + self.window + 1)
            behind = pol.lag(basis.last_seq, self.window, covered)
            upto = pol.cut(basis.entries, basis.last_seq, self.window, covered, p.batch)
            if behind < p.every or upto <= covered:
                self._remember(session_id, behind)
                await self.backend.note(session_id, self._due(behind))
                return written
            entries = [e for e in basis.entries if covered < e.seq <= upto]
            if not entries or entries[-1].seq != upto:
                return written  # the history moved under us (cleared, popped): next turn
            text = await self._summarize(session_id, previous, [e.message for e in entries])
            if text is None:
                return written
            summary = Summary(text, upto, entries[-1].message_id, time.time())
            if not await self.backend.put(session_id, summary, previous, basis):
                await self.backend.note(session_id, self._due(behind), calls=1)
                log.info(
                    "summary of %r not stored: the history changed meanwhile",
                    session_id,
                    extra=_extra(session_id),
                )
                return written
            written += 1
            self.counters["summaries_written"] += 1
            self._pause.pop(session_id, None)
            left = pol.lag(basis.last_seq, self.window, upto)
            self._remember(session_id, left)
            await self.backend.note(session_id, self._due(left), calls=1)
            if left < p.every:
                return written  # caught up with what was read (later turns trigger again)

    def _due(self, behind: int) -> int:
        """The lag shared with other processes: only a due summary's (K or more)."""
        return behind if behind >= self.policy.every else 0

    async def _summarize(
        self, session_id: str, previous: Summary | None, messages: list[Message]
    ) -> str | None:
        """The summariser's answer, retried with backoff; None when every attempt failed
        (the session then rests before a later turn tries again)."""
        p = self.policy
        delay = p.backoff
        watch = CancelWatch()
        for attempt in range(1, p.attempts + 1):
            watch.check()
            self.counters["summary_calls"] += 1
            try:
                text = await call(
                    self.summarizer, previous.text if previous is not None else None, messages
                )
            except Exception as exc:  # the summariser is user code or a model: any failure
                # ... but never a cancellation it reworded: that ends the run.
                watch.check()
                self.counters["summary_failures"] += 1
                log.warning(
                    "summariser failed for %r (attempt %d of %d): %s",
                    session_id,
                    attempt,
                    p.attempts,
                    exc,
                    extra=_extra(session_id),
                )
                await self.backend.note(
                    session_id, self._due(self._lags.get(session_id, 0)), calls=1, failures=1
                )
                if attempt < p.attempts:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, p.max_backoff)
                continue
            return text  # its call is noted with the summary it produced
        failed = self._pause.get(session_id, (0, 0.0))[0] + 1
        pause = min(p.backoff * 2 ** (p.attempts + failed - 1), p.max_backoff)
        self._pause[session_id] = (failed, time.monotonic() + pause)
        return None

    # -- lifecycle -------------------------------------------------------------------------

    async def idle(self, timeout: float = 30.0) -> bool:
        """Wait for this loop's running summarisations; True when none is left."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout
        while True:
            tasks = [t for t in self._tasks.values() if t.get_loop() is loop and not t.done()]
            if not tasks:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            await asyncio.wait(tasks, timeout=left)

    async def aclose(self, timeout: float = 5.0) -> None:
        """Let running summarisations finish (bounded), then cancel what is left."""
        if not await self.idle(timeout):
            loop = asyncio.get_running_loop()
            tasks = [t for t in self._tasks.values() if t.get_loop() is loop]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        await self.backend.aclose()

    def figures(self) -> dict[str, float]:
        """This process's counters and the lag of the sessions it served last."""
        return _Figures(self.counters, self._lags, self.policy.every)()


class _Figures:
    # The parts, not the Summaries object, so tracking does not keep it alive.
    def __init__(self, counters: dict[str, float], lags: OrderedDict[str, int], every: int) -> None:
        self.counters = counters
        self.lags = lags
        self.every = every

    def __call__(self) -> dict[str, float]:
        lags = list(self.lags.values())
        return {
            **self.counters,
            "summary_lag_messages": float(sum(lags)),
            "summary_sessions_behind": float(sum(1 for n in lags if n >= self.every)),
        }


def _extra(session_id: str) -> dict[str, str]:
    return {"session_id": session_id}
