"""Logging setup for vel's processes: plain text or one JSON object per line.

Every log line vel writes about one session carries ``extra={"session_id": ...}``; the JSON
format always has a ``session_id`` field (null for lines about no particular session), so a
log pipeline can filter one conversation's lines across every worker and flusher.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from vel.redaction import RedactingFilter

__all__ = ["JsonFormatter", "configure_logging", "get_logger"]

_REDACTING = RedactingFilter()


def get_logger(name: str) -> logging.Logger:
    """The logger ``name`` (one of vel's), with every record it emits redacted
    (:mod:`vel.redaction`): no vel log line shows a password."""
    logger = logging.getLogger(name)
    if _REDACTING not in logger.filters:
        logger.addFilter(_REDACTING)
    return logger


# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: ts, level, logger, message, session_id, extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "session_id": getattr(record, "session_id", None),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in entry:
                entry[key] = value
        if record.exc_info:
            # exc_text is the redacted traceback when a vel logger made the record.
            entry["exception"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        sid = getattr(record, "session_id", None)
        return text if sid is None else f"{text} [session_id={sid}]"


def configure_logging(level: int = logging.WARNING, fmt: str = "text") -> None:
    """Send vel's (and everything's) log lines to stderr in ``fmt`` (``text`` or ``json``).

    Raises:
        ValueError: an unknown format.
    """
    if fmt not in ("text", "json"):
        raise ValueError(f"log format must be 'text' or 'json', got {fmt!r}")
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter()
        if fmt == "json"
        else _TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
