"""A deterministic, OpenAI-compatible chat-completions server for tests, demos and benchmarks.

The server speaks just enough of the OpenAI HTTP API for the real ``openai.AsyncOpenAI``
client to run against it unchanged::

    with FakeOpenAIServer() as srv:
        client = openai.AsyncOpenAI(api_key="test", base_url=srv.base_url)
        ...
        assert srv.requests[-1]["messages"][-1]["content"] == "hello"

Endpoints: ``POST /v1/chat/completions`` (streaming and non-streaming) and
``GET /v1/models``.  Anything else answers 404 with an OpenAI-style error body.

Answers are a pure function of the received ``messages`` (completion ids: of the whole
request, so replaying a conversation gives identical records).  Only the *last* user message
(``last_user``; string content or the joined ``text`` parts of list content) may carry
directives, so replaying an older history gives the same answers:

``[[call NAME {json args}]]``
    Ask for a tool call (repeatable).  Calls are issued one per model step: the k-th
    call is returned while fewer than k+1 assistant messages with ``tool_calls`` follow
    the last user message.  Arguments are passed through as written (``{}`` if omitted).
    Once every call has been made the answer is
    ``"Tool results: " + "; ".join(<tool message contents after the last user message>)``.
``[[parallel]]``
    With ``[[call ...]]``: return all calls at once, in one assistant message.
``[[error STATUS]]``
    Answer with that HTTP status and an OpenAI error body.  (The SDK retries 408, 409,
    429 and 5xx by default; use e.g. 400 for a non-retried failure.)
``[[slow SECONDS]]``
    Sleep SECONDS between streamed chunks (text is cut into at least 5 pieces when
    possible); a non-streaming request sleeps SECONDS once.
``[[echo]]``
    Answer ``"Roles: " + ",".join(<role of every received message>)``.
``[[say TEXT]]``
    Answer exactly TEXT.

Without a directive: if ``last_user`` asks "what is my name" / "what's my name", the
answer is ``"Your name is NAME."`` where NAME comes from the last user message in the
history matching ``my name is (\\w+)``, else the name a summary in a system message states
(:mod:`vel.testing.fake_summary`), else ``"I don't know your name."``.  Otherwise
the answer is ``"You said: " + last_user`` (directives removed, at most 200 characters).

A summarisation request from vel (its system message is vel's summariser instructions) is
answered deterministically by :func:`vel.testing.fake_summary.summarize`, whatever its
last user message holds.

Text is streamed as one delta per word (with its trailing whitespace); tool-call
arguments are streamed in several fragments.  Usage is counted in words: prompt tokens
are the words in all message contents, completion tokens the words in the answer.
``max_completion_tokens`` / ``max_tokens`` (in words) cut text answers short with
``finish_reason="length"``.  Retryable errors (408, 409, 429, 5xx) carry
``retry-after-ms: 10`` so the SDK's own retries are quick.

Command line: ``python -m vel.testing.fake_openai [--host H] [--port P] [--latency S]``
prints ``FAKE_OPENAI_URL=http://H:P/v1`` and serves until SIGTERM / SIGINT.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import re
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType, TracebackType
from typing import Any, Self, cast

from vel.testing import fake_summary

__all__ = ["FakeOpenAIServer", "main"]

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
_RETRYABLE = frozenset({408, 409, 429})


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


def _text_of(content: Any) -> str:
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


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
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


def _plan(body: dict[str, Any]) -> _Plan:
    messages = _messages(body)
    user_index = -1
    for i, message in enumerate(messages):
        if message.get("role") == "user":
            user_index = i
    last_user = _text_of(messages[user_index].get("content")) if user_index >= 0 else ""
    after = messages[user_index + 1 :]

    plan = _Plan()
    if fake_summary.is_summary_request(messages, _text_of):
        plan.text = fake_summary.summarize(messages, _text_of)
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
        results = [_text_of(m.get("content")) for m in after if m.get("role") == "tool"]
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
                for match in _NAME_RE.finditer(_text_of(message.get("content"))):
                    name = match.group(1)
        if name is None:  # recalled through a summary (see vel.testing.fake_summary)
            name = fake_summary.stated_name(messages, _text_of)
        plan.text = f"Your name is {name}." if name else "I don't know your name."
    else:
        plan.text = "You said: " + _strip_directives(last_user, calls)[:_MAX_ECHO_CHARS]
    return plan


def _words(text: str) -> int:
    return len(text.split())


def _prompt_tokens(body: dict[str, Any]) -> int:
    total = 0
    for message in _messages(body):
        total += _words(_text_of(message.get("content")))
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


def _error_body(status: int, message: str | None = None) -> dict[str, Any]:
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


def _completion(body: dict[str, Any], plan: _Plan, model: str) -> dict[str, Any]:
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


def _chunks(body: dict[str, Any], plan: _Plan, model: str) -> Iterator[dict[str, Any]]:
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


class _ClientGone(Exception):
    """The client closed the connection while we were writing."""


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 1024  # listen backlog: benchmarks open many connections at once

    def __init__(self, address: tuple[str, int], fake: FakeOpenAIServer) -> None:
        self.fake = fake
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError | _ClientGone):
            return  # connection reset / closed by the client or by stop()
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeOpenAI/1.0"
    timeout = 300  # idle keep-alive connections are dropped after this many seconds

    @property
    def _srv(self) -> _HTTPServer:
        return cast(_HTTPServer, self.server)

    def setup(self) -> None:
        super().setup()
        # Small writes (headers, SSE chunks) must not wait for delayed ACKs (Nagle).
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._srv.connections_lock:
            self._srv.connections.add(self.connection)

    def finish(self) -> None:
        with self._srv.connections_lock:
            self._srv.connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        if self._srv.fake.verbose:
            super().log_message(format, *args)

    # -- I/O helpers ---------------------------------------------------------------------

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            data = bytearray()
            while True:
                size_line = self.rfile.readline(65537)
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return bytes(data)
                data += self.rfile.read(size)
                self.rfile.readline(65537)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _write(self, data: bytes) -> None:
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except OSError as exc:
            self.close_connection = True
            raise _ClientGone from exc

    def _send_json(
        self, status: int, payload: dict[str, Any], extra: dict[str, str] | None = None
    ) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-request-id", f"req_{uuid.uuid4().hex[:16]}")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        try:
            self.end_headers()
        except OSError as exc:
            self.close_connection = True
            raise _ClientGone from exc
        self._write(data)

    def _send_error(self, status: int, message: str | None = None) -> None:
        extra: dict[str, str] = {}
        retry_ms = self._srv.fake.retry_after_ms
        if retry_ms is not None and (status in _RETRYABLE or status >= 500):
            extra["retry-after-ms"] = str(retry_ms)
        self._send_json(status, _error_body(status, message), extra)

    def _send_stream(self, chunks: Iterator[dict[str, Any]], delay: float) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("x-request-id", f"req_{uuid.uuid4().hex[:16]}")
        try:
            self.end_headers()
        except OSError as exc:
            self.close_connection = True
            raise _ClientGone from exc
        try:
            for i, item in enumerate(chunks):
                if i and delay > 0:
                    time.sleep(delay)
                self._write_chunk(f"data: {json.dumps(item)}\n\n".encode())
            self._write_chunk(b"data: [DONE]\n\n")
            self._write(b"0\r\n\r\n")
        except _ClientGone:
            self._srv.fake._note_aborted_stream()
            raise

    def _write_chunk(self, data: bytes) -> None:
        self._write(f"{len(data):x}\r\n".encode() + data + b"\r\n")

    # -- request handling ----------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch(None, valid=True)

    def do_POST(self) -> None:
        raw = self._read_body()
        try:
            parsed = json.loads(raw) if raw else {}
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            self._dispatch(parsed, valid=True)
        else:
            self._dispatch(None, valid=False)

    def do_DELETE(self) -> None:
        self._read_body()
        self._dispatch(None, valid=True)

    def _dispatch(self, body: dict[str, Any] | None, *, valid: bool) -> None:
        try:
            self._handle(body, valid)
        except _ClientGone:
            self.close_connection = True

    def _handle(self, body: dict[str, Any] | None, valid: bool) -> None:
        fake = self._srv.fake
        headers = {key.lower(): value for key, value in self.headers.items()}
        failure = fake._record(body, headers)
        if fake.latency > 0:
            time.sleep(fake.latency)
        if failure is not None:
            self._send_error(*failure)
            return
        path = self.path.split("?", 1)[0].rstrip("/")
        if self.command == "GET" and path == "/v1/models":
            entry = {"id": DEFAULT_MODEL, "object": "model", "created": 0, "owned_by": "vel"}
            self._send_json(200, {"object": "list", "data": [entry]})
            return
        if self.command != "POST" or path != "/v1/chat/completions":
            self._send_error(404, f"Unknown request URL: {self.command} {self.path}")
            return
        if body is None or not valid:
            self._send_error(400, "We could not parse the JSON body of your request.")
            return
        if not isinstance(body.get("messages"), list):
            self._send_error(400, "Missing required parameter: 'messages'.")
            return
        plan = _plan(body)
        if fake_summary.is_summary_request(_messages(body), _text_of):
            if fake.summary_latency > 0:
                time.sleep(fake.summary_latency)
            status = fake._take_summary_failure()
            if status is not None:
                self._send_error(status, f"Error {status} injected by fail_summaries")
                return
        if plan.error is not None:
            self._send_error(plan.error, f"Error {plan.error} requested by [[error]] directive")
            return
        model = body.get("model")
        if not isinstance(model, str) or not model:
            model = DEFAULT_MODEL
        if body.get("stream") is True:
            self._send_stream(_chunks(body, plan, model), plan.slow)
        else:
            if plan.slow > 0:
                time.sleep(plan.slow)
            self._send_json(200, _completion(body, plan, model))


# ----------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------


class FakeOpenAIServer:
    """An in-process, OpenAI-compatible chat-completions server (see module docstring).

    Attributes:
        requests: every received JSON request body (POST, any path), in arrival order.
        request_headers: the headers of each entry in ``requests`` (lower-cased names).
        latency: seconds slept before answering each request ("model time").
        summary_latency: further seconds slept before answering a summarisation request.
        retry_after_ms: sent as ``retry-after-ms`` on retryable errors (408, 409, 429, 5xx)
            so the SDK's retries are fast; ``None`` to omit the header.
        aborted_streams: streams the client closed before the end.
        verbose: log each request to stderr.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.latency: float = 0.0
        self.summary_latency: float = 0.0
        self.retry_after_ms: int | None = 10
        self.verbose = False
        self.requests: list[dict[str, Any]] = []
        self.request_headers: list[dict[str, str]] = []
        self.aborted_streams = 0
        self._failures: list[tuple[int, str | None]] = []
        self._summary_failures: list[int] = []
        self._lock = threading.Lock()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> Self:
        if self._httpd is not None:
            raise RuntimeError("FakeOpenAIServer is already running")
        httpd = _HTTPServer((self.host, self.port), self)
        self._httpd = httpd
        self.port = int(httpd.server_address[1])
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"fake-openai-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, thread = self._httpd, self._thread
        if httpd is None:
            return
        self._httpd = self._thread = None
        httpd.shutdown()
        httpd.server_close()
        with httpd.connections_lock:
            connections = list(httpd.connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT/v1`` (only meaningful once started)."""
        return f"http://{self.host}:{self.port}/v1"

    # -- test controls -------------------------------------------------------------------

    def clear(self) -> None:
        """Forget recorded requests, pending ``fail_next`` failures and aborted streams."""
        with self._lock:
            self.requests.clear()
            self.request_headers.clear()
            self._failures.clear()
            self._summary_failures.clear()
            self.aborted_streams = 0

    def fail_next(
        self, status: int, count: int = 1, message: str = "Injected failure from FakeOpenAIServer"
    ) -> None:
        """Make the next ``count`` requests (any endpoint) fail with HTTP ``status``."""
        if not 400 <= status <= 599:
            raise ValueError("status must be an HTTP error status (400-599)")
        with self._lock:
            self._failures.extend([(status, message)] * count)

    def fail_summaries(self, status: int, count: int = 1) -> None:
        """Make the next ``count`` summarisation requests (only those) fail with ``status``."""
        if not 400 <= status <= 599:
            raise ValueError("status must be an HTTP error status (400-599)")
        with self._lock:
            self._summary_failures.extend([status] * count)

    def _take_summary_failure(self) -> int | None:
        with self._lock:
            return self._summary_failures.pop(0) if self._summary_failures else None

    # -- internals -----------------------------------------------------------------------

    def _record(
        self, body: dict[str, Any] | None, headers: dict[str, str]
    ) -> tuple[int, str | None] | None:
        with self._lock:
            if body is not None:
                self.requests.append(body)
                self.request_headers.append(headers)
            return self._failures.pop(0) if self._failures else None

    def _note_aborted_stream(self) -> None:
        with self._lock:
            self.aborted_streams += 1


def main(argv: list[str] | None = None) -> int:
    """Run the server until SIGTERM / SIGINT; print its URL as ``FAKE_OPENAI_URL=...``."""
    parser = argparse.ArgumentParser(description="Fake OpenAI chat-completions server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--verbose", action="store_true", help="log requests to stderr")
    args = parser.parse_args(argv)

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server = FakeOpenAIServer(args.host, args.port)
    server.latency = args.latency
    server.verbose = args.verbose
    with server:
        print(f"FAKE_OPENAI_URL={server.base_url}", flush=True)
        while not stop.wait(1.0):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
