"""How the fake OpenAI server summarises, and recalls from a summary (pure functions).

A *summarisation request* is one whose first message is a system message starting with
vel's summariser instructions (:data:`vel.summaries.prompt.INSTRUCTIONS`, first sentence).
Its answer is deterministic: the user's name (the last ``my name is NAME`` among the new
user messages, else the one the previous summary states) as ``The user's name is NAME.``,
then one ``The user said: TEXT.`` line per user message, previous ones first, keeping the
last :data:`KEEP` lines.

A question "what is my name" answered from a summary: when no user message of the request
names the user, the name a system message states (``The user's name is NAME``) is used.
"""

from __future__ import annotations

import re
from typing import Any

MARKER = "You keep a running summary of a conversation"
KEEP = 8
_NAME_RE = re.compile(r"my name is (\w+)", re.IGNORECASE)
_STATED_RE = re.compile(r"The user's name is (\w+)\.")
_SAID_RE = re.compile(r"^The user said: .*$", re.MULTILINE)
_LINE_RE = re.compile(r"^user: (.*)$", re.MULTILINE)
_PREVIOUS = "Previous summary:\n"
_NEW = "\n\nNew messages:\n"
_MAX_SAID = 80


def is_summary_request(messages: list[dict[str, Any]], text_of: Any) -> bool:
    if not messages or messages[0].get("role") != "system":
        return False
    return str(text_of(messages[0].get("content"))).startswith(MARKER)


def summarize(messages: list[dict[str, Any]], text_of: Any) -> str:
    body = "".join(text_of(m.get("content")) for m in messages if m.get("role") == "user")
    previous, _, new = body.partition(_NEW)
    previous = previous.removeprefix(_PREVIOUS)
    name: str | None = None
    stated = _STATED_RE.search(previous)
    if stated is not None:
        name = stated.group(1)
    said = [line for line in _SAID_RE.findall(previous)]
    for line in _LINE_RE.findall(new):
        for match in _NAME_RE.finditer(line):
            name = match.group(1)
        said.append(f"The user said: {line.strip()[:_MAX_SAID]}")
    lines = ([f"The user's name is {name}."] if name else []) + said[-KEEP:]
    return "\n".join(lines) if lines else "Nothing to remember yet."


def stated_name(messages: list[dict[str, Any]], text_of: Any) -> str | None:
    """The name a system message (a summary) states, if any: the last one."""
    name: str | None = None
    for message in messages:
        if message.get("role") == "system":
            for match in _STATED_RE.finditer(text_of(message.get("content"))):
                name = match.group(1)
    return name
