"""The range of every number vel takes, and the one check that enforces it.

A number given to vel (a constructor argument, a call argument, an environment variable, a
command option) is checked where it is given, against a :class:`Bound` named after what it
means, so a value no backend can use (``max_history=2**63``, ``VEL_HOT_TTL=nan``) is refused
at once with an error naming the allowed range, instead of failing every later call. Refused
calls touch nothing stored: the check runs before any I/O.

Configuration (constructors, ``Settings``, environment) raises
:class:`~vel.errors.ConfigurationError`; call arguments raise
:class:`~vel.errors.InvalidInputError`; command options become usage errors (exit code 2).

The upper ends keep every value exact in Redis' Lua (numbers are doubles there) and inside
Postgres' ``bigint`` and ``interval`` arithmetic: counts stay below 2**31, durations below
ten years (100 years for ages used to select old sessions).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass

from vel.errors import ConfigurationError, InvalidInputError, VelError

__all__ = [
    "AGE",
    "AGE_HOURS",
    "BATCH",
    "BUCKETS",
    "COUNT",
    "COUNTER",
    "DB_INDEX",
    "DELAY",
    "INTERVAL",
    "LEASE",
    "MAX_COUNT",
    "MAX_STEPS",
    "MAX_UNFLUSHED",
    "POOL",
    "POOL_MIN",
    "PORT",
    "TIMEOUT",
    "TTL",
    "WAIT",
    "Bound",
    "age_arg",
    "cli",
    "limit_arg",
    "wait_arg",
]

MAX_COUNT = 2**31 - 1
_TEN_YEARS = 10 * 365 * 86400.0
_DAY = 86400.0


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


@dataclass(frozen=True, slots=True)
class Bound:
    """An allowed range: ``low <= value <= high`` (``low < value`` when ``open_low``).

    Attributes:
        low, high: the ends of the range.
        integer: only ``int`` values (never ``bool``, never a float, even ``2.0``).
        unit: what the number counts, for messages (``"seconds"``).
        open_low: ``low`` itself is excluded (timeouts must be > 0).
    """

    low: float
    high: float
    integer: bool = False
    unit: str = ""
    open_low: bool = False

    def describe(self) -> str:
        """The range in words, as error messages give it."""
        unit = f" {self.unit}" if self.unit else ""
        if self.integer:
            return f"an integer from {_number(self.low)} to {_number(self.high)}{unit}"
        low = f"> {_number(self.low)}" if self.open_low else f">= {_number(self.low)}"
        what = f"a number of{unit}" if unit else "a number"
        return f"{what} {low} and <= {_number(self.high)}"

    def _fits(self, value: float) -> bool:
        above = value > self.low if self.open_low else value >= self.low
        return above and value <= self.high

    def check(
        self,
        name: str,
        value: object,
        error: type[VelError] = ConfigurationError,
        *,
        optional: bool = False,
    ) -> float:
        """Return ``value`` (an ``int`` for integer bounds, else a ``float``) if it is in range.

        Args:
            name: what the caller called it (the argument or variable name).
            value: the value given.
            error: ConfigurationError for configuration, InvalidInputError for call arguments.
            optional: None is accepted (and returned as is by :meth:`check_optional`).

        Raises:
            ``error``: not a number (bool, str, NaN, infinity...), a float where an integer
                is needed, or out of range; the message names the allowed range.
        """
        # The common cases first, without building the message (a turn checks its window
        # and its timeout); ``type(...) is`` leaves bool (an int subclass) to the checks below.
        if type(value) is int and self._fits(value):
            return value if self.integer else float(value)
        if type(value) is float and not self.integer and math.isfinite(value) and self._fits(value):
            return value
        allowed = self.describe() + (" (or None)" if optional else "")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise error(f"{name} must be {allowed}, got {value!r}")
        if self.integer and not isinstance(value, int):
            raise error(f"{name} must be {allowed}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise error(f"{name} must be {allowed}, got {value!r}")
        if not self._fits(value):
            raise error(f"{name} must be {allowed}, got {value!r}")
        return int(value) if self.integer else float(value)

    def check_int(
        self, name: str, value: object, error: type[VelError] = ConfigurationError
    ) -> int:
        """:meth:`check` for integer bounds, typed as ``int``."""
        assert self.integer
        return int(self.check(name, value, error))

    def check_optional(
        self, name: str, value: object, error: type[VelError] = ConfigurationError
    ) -> float | None:
        """:meth:`check`, letting None through (None means "no limit" or "unset")."""
        return None if value is None else self.check(name, value, error, optional=True)

    def parse(self, name: str, raw: str, error: type[VelError] = ConfigurationError) -> float:
        """Parse text (an environment variable, a command option) and check it.

        Raises:
            ``error``: not a number of the right kind, or out of range.
        """
        text = raw.strip()
        try:
            value: float = int(text) if self.integer else float(text)
            return self.check(name, value, error)
        except (ValueError, VelError):
            raise error(f"{name} must be {self.describe()}, got {raw!r}") from None


# -- the ranges, by meaning --------------------------------------------------------------------

# How many messages or sessions (a window, a listing limit). 0 is allowed: nothing.
COUNT = Bound(0, MAX_COUNT, integer=True)
# Messages or sessions handled per round trip or transaction.
BATCH = Bound(1, 100_000, integer=True)
# Connections per pool (per event loop; per node on a cluster).
POOL = Bound(1, 10_000, integer=True)
POOL_MIN = Bound(0, 10_000, integer=True)
# Hash-slot buckets of the Redis key layout (a cluster has 16384 slots).
BUCKETS = Bound(1, 16384, integer=True)
MAX_UNFLUSHED = Bound(1, 1_000_000_000, integer=True)
MAX_STEPS = Bound(1, 10_000, integer=True)
PORT = Bound(0, 65535, integer=True)
# A generation or seq counter (exact as a double in Lua, fits Postgres' bigint).
COUNTER = Bound(0, 2**53 - 1, integer=True)
DB_INDEX = Bound(0, 1_000_000, integer=True)
# A deadline for one backend call or connection: must leave the call some time.
TIMEOUT = Bound(0, 3600, unit="seconds", open_low=True)
# How long to wait for something (a lock, a backlog, a drain); 0 tries once.
WAIT = Bound(0, _DAY, unit="seconds")
# A delay or period of a background loop; 0 means none.
DELAY = Bound(0, 3600, unit="seconds")
# A period that must be > 0 (refresh intervals, idle sleeps, backoff caps).
INTERVAL = Bound(0, _DAY, unit="seconds", open_low=True)
# A lease renewed by its holder (turn locks, flush claims, warms).
LEASE = Bound(0.1, 3600, unit="seconds")
# How long data lives (hot TTL, retention).
TTL = Bound(0, _TEN_YEARS, unit="seconds", open_low=True)
# An age that selects old sessions (``inactive_for``, ``--older-than``).
AGE = Bound(0, 10 * _TEN_YEARS, unit="seconds")
AGE_HOURS = Bound(0, AGE.high / 3600, unit="hours")


def limit_arg(value: object, name: str = "limit") -> int | None:
    """A call's message or session count (``limit``, a window): None (all) or an int in
    :data:`COUNT`.

    Raises:
        InvalidInputError: anything else.
    """
    checked = COUNT.check_optional(name, value, InvalidInputError)
    return None if checked is None else int(checked)


def age_arg(value: object, name: str = "inactive_for") -> float | None:
    """A call's age in seconds (None: any age), in :data:`AGE`.

    Raises:
        InvalidInputError: anything else.
    """
    return AGE.check_optional(name, value, InvalidInputError)


def wait_arg(value: object, name: str = "timeout") -> float | None:
    """A call's wait in seconds (None: the default), in :data:`WAIT`.

    Raises:
        InvalidInputError: anything else.
    """
    return WAIT.check_optional(name, value, InvalidInputError)


def cli(bound: Bound, name: str) -> Callable[[str], float]:
    """An argparse ``type=`` for ``bound``: a bad value is a usage error naming the range."""

    def parse(raw: str) -> float:
        try:
            return bound.parse(name, raw)
        except ConfigurationError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = bound.describe()  # argparse names the type in some messages
    return parse
