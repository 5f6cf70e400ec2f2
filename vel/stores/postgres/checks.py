"""Argument checks shared by the Postgres tier's parts: settings (``ConfigurationError``) and
call arguments (``InvalidInputError``), each naming the argument and what it accepts."""

from __future__ import annotations

from typing import Any

from vel.errors import ConfigurationError, InvalidInputError


def seconds(name: str, value: float, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError(f"{name} must be a number of seconds, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigurationError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
    return float(value)


def non_negative(name: str, value: object, kind: type[int] | type[float]) -> Any:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float) if kind is float else int)
        or value < 0
    ):
        raise InvalidInputError(f"{name} must be a non-negative {kind.__name__}, got {value!r}")
    return value
