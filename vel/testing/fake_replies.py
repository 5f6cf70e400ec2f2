"""What the fake OpenAI server answers: a pure function of the request's messages.

The directives, the answers without one, token counting, and the shapes of completions,
stream chunks and error bodies are documented in :mod:`vel.testing.fake_openai`; this module
computes them, :mod:`vel.testing.fake_http` serves them over HTTP.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from vel.testing import fake_summary

DEFAULT_MODEL = "fake-model"
_MAX_ECHO_CHARS = 200
_MIN_SLOW_PIECES = 5

_CALL_RE = re.compile(r"\[\[call\s+([A-Za-z0-9_.:-]+)")
_PARALLEL_RE = re.compile(r"\[\[parallel\]\]")
_ERROR_RE = re.compile(r"\[\[error\s+(\d{3})\s*\]\]")
_SLOW_RE = re.compile(r"\[\[slow\s+(\d+(?:\.\d*)?|\.\d+)\s*\]\]")
_ECHO_RE = re.compile(r"\[\[echo\]\]")
_SAY_RE = re.compile(r"\[\[say\s(.*?)\]\]", re.DOTALL)
_NAME_RE = re.compile(r"my name is (\w+)", re.IGNORECASE)
_ASK_NAME_RE = re.compile(r"what(?:\s+is|['\u2019]s)\s+my\s+name", re.IGNORECASE)
_PIECE_RE = re.compile(r"\S+\s*|\s+")

_ERROR_KINDS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", "permission_denied"),
    404: ("not_found_error", "not_found"),
    408: ("timeout_error", "timeout"),
    409: ("conflict_error", "conflict"),
    422: ("invalid_request_error", "unprocessable_entity"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
}
RETRYABLE = frozenset({408, 409, 429})


# ----------------------------------------------------------------------------------------
# Answer logic (pure functions of the request body)
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Call:
    name: str
    arguments: str
    start: int
    end: int


@dataclass
class _Plan:
    """What to answer: an error, tool calls, or text."""

    error: int | None = None
    calls: list[tuple[str, str, str]] = field(default_factory=list)  # (id, name, arguments)
    text: str = ""
    slow: float = 0.0


def text_of(content: Any) -> str:
    """Text of a message ``content``: a string, a list of parts, or None."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    texts.append(text)
        return "".join(texts)
    return str(content)


def messages_of(body: dict[str, Any]) -> list[dict[str, Any]]:
    raw = body.get("messages")
    if not isinstance(raw, list):
        return []
    return [m for m in raw if isinstance(m, dict)]


def _parse_calls(text: str) -> list[_Call]:
    """Every ``[[call NAME {json}]]`` directive in ``text``, in order."""
    calls: list[_Call] = []
    decoder = json.JSONDecoder()
    pos = 0
    while True:
        match = _CALL_RE.search(text, pos)
        if match is None:
            return calls
        rest_start = match.end()
        while rest_start < len(text) and text[rest_start].isspace():
            rest_start += 1
        if text.startswith("]]", rest_start):
            calls.append(_Call(match.group(1), "{}", match.start(), rest_start + 2))
            pos = rest_start + 2
            continue
        arguments: str | None = None
        end = -1
        try:
            _, json_end = decoder.raw_decode(text, rest_start)
        except ValueError:
            pass
        else:
            close = json_end
            while close < len(text) and text[close].isspace():
                close += 1
            if text.startswith("]]", close):
                arguments = text[rest_start:json_end]
                end = close + 2
        if arguments is None:
            # Not valid JSON: pass the raw text through (lets tests send bad arguments).
            close = text.find("]]", rest_start)
            if close < 0:
                return calls
            arguments = text[rest_start:close].strip() or "{}"
            end = close + 2
        calls.append(_Call(match.group(1), arguments, match.start(), end))
        pos = end


def _strip_directives(text: str, calls: list[_Call]) -> str:
    for call in reversed(calls):
        text = text[: call.start] + text[call.end :]
    for pattern in (_PARALLEL_RE, _ERROR_RE, _SLOW_RE, _ECHO_RE, _SAY_RE):
        text = pattern.sub("", text)
    return " ".join(text.split())


def _call_id(user_index: int, k: int, call: _Call) -> str:
    digest = hashlib.sha256(f"{user_index}\0{k}\0{call.name}\0{call.arguments}".encode())
    return f"call_{k}_{digest.hexdigest()[:16]}"


def plan_reply(body: dict[str, Any]) -> _Plan:
    messages = messages_of(body)
    user_index = -1
    for i, message in enumerate(messages):
        if message.get("role") == "user":
            user_index = i
    last_user = text_of(messages[user_index].get("content")) if user_index >= 0 else ""
    after = messages[user_index + 1 :]

    plan = _Plan()
    if fake_summary.is_summary_request(messages, text_of):
        plan.text = fake_summary.summarize(messages, text_of)
        return plan
    slow = _SLOW_RE.search(last_user)
    if slow is not None:
        plan.slow = float(slow.group(1))
    error = _ERROR_RE.search(last_user)
    if error is not None:
        plan.error = int(error.group(1))
        return plan

    calls = _parse_calls(last_user)
    if calls:
        done = sum(1 for m in after if m.get("role") == "assistant" and m.get("tool_calls"))
        if _PARALLEL_RE.search(last_user):
            if done == 0:
                plan.calls = [
                    (_call_id(user_index, k, c), c.name, c.arguments) for k, c in enumerate(calls)
                ]
                return plan
        elif done < len(calls):
            call = calls[done]
            plan.calls = [(_call_id(user_index, done, call), call.name, call.arguments)]
            return plan
        results = [text_of(m.get("content")) for m in after if m.get("role") == "tool"]
        plan.text = "Tool results: " + "; ".join(results)
        return plan

    say = _SAY_RE.search(last_user)
    if say is not None:
        plan.text = say.group(1)
    elif _ECHO_RE.search(last_user):
        plan.text = "Roles: " + ",".join(str(m.get("role")) for m in messages)
    elif _ASK_NAME_RE.search(last_user):
        name: str | None = None
        for message in messages:
            if message.get("role") == "user":
                for match in _NAME_RE.finditer(text_of(message.get("content"))):
                    name = match.group(1)
        if name is None:  # recalled through a summary (see vel.testing.fake_summary)
            name = fake_summary.stated_name(messages, text_of)
        plan.text = f"Your name is {name}." if name else "I don't know your name."
    else:
        plan.text = "You said: " + _strip_directives(last_user, calls)[:_MAX_ECHO_CHARS]
    return plan


def _words(text: str) -> int:
    return len(text.split())


def _prompt_tokens(body: dict[str, Any]) -> int:
    total = 0
    for message in messages_of(body):
        total += _words(text_of(message.get("content")))
        tool_calls = message.get("tool_calls")
        if isinstance(tool_calls, list):
            for tc in tool_calls:
                fn = tc.get("function") if isinstance(tc, dict) else None
                if isinstance(fn, dict):
                    total += _words(f"{fn.get('name', '')} {fn.get('arguments', '')}")
    return total


def _pieces(text: str, minimum: int = 1) -> list[str]:
    """Split ``text`` into word pieces (each word with its trailing whitespace)."""
    pieces = _PIECE_RE.findall(text)
    if len(pieces) < minimum and len(text) > len(pieces):
        count = min(minimum, len(text))
        size, extra = divmod(len(text), count)
        pieces, pos = [], 0
        for i in range(count):
            step = size + (1 if i < extra else 0)
            pieces.append(text[pos : pos + step])
            pos += step
    return pieces


def _fragments(arguments: str) -> list[str]:
    """Cut tool-call arguments into at least two non-empty fragments (when possible)."""
    if len(arguments) < 2:
        return [arguments]
    count = min(3, len(arguments))
    size = -(-len(arguments) // count)
    return [arguments[i : i + size] for i in range(0, len(arguments), size)]


def error_body(status: int, message: str | None = None) -> dict[str, Any]:
    kind, code = _ERROR_KINDS.get(
        status, ("server_error", "server_error") if status >= 500 else ("api_error", "api_error")
    )
    return {
        "error": {
            "message": message or f"Fake OpenAI error {status}",
            "type": kind,
            "param": None,
            "code": code,
        }
    }


# ----------------------------------------------------------------------------------------
# Response builders
# ----------------------------------------------------------------------------------------


def _completion_id(body: dict[str, Any]) -> str:
    """The same request gets the same completion id, so two clients replaying one conversation
    store identical records (the Agents SDK keeps it as ``response_id``)."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return f"chatcmpl-{hashlib.sha256(canonical.encode()).hexdigest()[:24]}"


def _usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _max_tokens(body: dict[str, Any]) -> int | None:
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _limit_text(text: str, body: dict[str, Any]) -> tuple[str, str]:
    """Apply ``max_(completion_)tokens`` (in words): returns (text, finish_reason)."""
    limit = _max_tokens(body)
    if limit is not None and _words(text) > limit:
        words = _PIECE_RE.findall(text.lstrip())
        return "".join(words[:limit]).rstrip(), "length"
    return text, "stop"


def _completion_tokens(plan: _Plan, text: str) -> int:
    if plan.calls:
        return sum(_words(f"{name} {args}") for _, name, args in plan.calls)
    return _words(text)


def completion(body: dict[str, Any], plan: _Plan, model: str) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None}
    text = ""
    if plan.calls:
        message["tool_calls"] = [
            {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}
            for cid, name, args in plan.calls
        ]
        finish = "tool_calls"
    else:
        text, finish = _limit_text(plan.text, body)
        message["content"] = text
    return {
        "id": _completion_id(body),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "fp_fake",
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
        "usage": _usage(_prompt_tokens(body), _completion_tokens(plan, text)),
    }


def stream_chunks(body: dict[str, Any], plan: _Plan, model: str) -> Iterator[dict[str, Any]]:
    """The ``chat.completion.chunk`` objects of a streamed answer."""
    base: dict[str, Any] = {
        "id": _completion_id(body),
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "fp_fake",
    }
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    if include_usage:
        base["usage"] = None

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {**base, "choices": [choice]}

    text = ""
    if plan.calls:
        for index, (cid, name, args) in enumerate(plan.calls):
            head: dict[str, Any] = {
                "index": index,
                "id": cid,
                "type": "function",
                "function": {"name": name, "arguments": ""},
            }
            if index == 0:
                yield chunk({"role": "assistant", "content": None, "tool_calls": [head]})
            else:
                yield chunk({"tool_calls": [head]})
            for fragment in _fragments(args):
                yield chunk({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]})
        yield chunk({}, "tool_calls")
    else:
        text, finish = _limit_text(plan.text, body)
        yield chunk({"role": "assistant", "content": "", "refusal": None})
        for piece in _pieces(text, _MIN_SLOW_PIECES if plan.slow > 0 else 1):
            yield chunk({"content": piece})
        yield chunk({}, finish)
    if include_usage:
        yield {
            **base,
            "choices": [],
            "usage": _usage(_prompt_tokens(body), _completion_tokens(plan, text)),
        }


# ----------------------------------------------------------------------------------------
# HTTP plumbing
# ----------------------------------------------------------------------------------------
