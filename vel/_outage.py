"""Logging a failing background loop by outage, not by retry.

A flusher or drain that retries every few milliseconds while a backend is down, or forever
while a permission is missing, must not write a line per attempt: :class:`Outage` writes one
line when a failure starts (or changes), a reminder at most once a minute while it lasts, and
one line when it ends. :func:`permanent` tells a failure retrying cannot fix (a refused
credential, a missing permission or table, an untrusted certificate): loops then retry only
every :data:`PERMANENT_RETRY` seconds.
"""

from __future__ import annotations

import logging
import time

from vel.errors import ConfigurationError, VelError

__all__ = ["PERMANENT_RETRY", "REMIND_EVERY", "Outage", "permanent"]

PERMANENT_RETRY = 30.0
REMIND_EVERY = 60.0


def permanent(exc: BaseException) -> bool:
    """Whether retrying cannot fix ``exc`` until an operator changes something."""
    return isinstance(exc, ConfigurationError)


class Outage:
    """The log lines of one background loop's failures.

    Args:
        log: the loop's logger.
        what: what fails (``"flush"``), first word of every line.
    """

    def __init__(self, log: logging.Logger, what: str) -> None:
        self._log = log
        self._what = what
        self._current: str | None = None
        self._failures = 0
        self._started = 0.0
        self._reminded = 0.0

    @property
    def ongoing(self) -> bool:
        return self._current is not None

    def failed(self, exc: BaseException, retry_in: float | None) -> None:
        """Record a failure; log it if it starts an outage, changes, or needs a reminder.

        ``retry_in``: seconds until the next try (None: no retry follows).
        """
        now = time.monotonic()
        text = f"{type(exc).__name__}: {exc}"
        self._failures += 1
        then = "not retrying" if retry_in is None else f"retrying in {retry_in:.2f} s"
        if text != self._current:
            if self._current is None:
                self._started = now
            self._current = text
            self._reminded = now
            if permanent(exc):
                self._log.error(
                    "%s failed: %s (%s; this needs a configuration fix, retries are slowed "
                    "to one every %.0f s)",
                    self._what,
                    exc,
                    then,
                    PERMANENT_RETRY,
                )
            elif isinstance(exc, (VelError, OSError)):
                self._log.warning("%s failed (%s): %s", self._what, then, exc)
            else:
                self._log.error("%s failed unexpectedly (%s)", self._what, then, exc_info=exc)
        elif now - self._reminded >= REMIND_EVERY:
            self._reminded = now
            self._log.warning(
                "%s still failing after %d attempts in %.0f s: %s",
                self._what,
                self._failures,
                now - self._started,
                exc,
            )

    def recovered(self) -> None:
        """Record a success; log the end of an outage."""
        if self._current is None:
            return
        self._log.warning(
            "%s works again after %d failed attempts in %.1f s",
            self._what,
            self._failures,
            time.monotonic() - self._started,
        )
        self._current = None
        self._failures = 0
