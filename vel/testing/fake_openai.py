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

This module holds the server's lifecycle, its recorded requests and test controls; the HTTP
side is :mod:`vel.testing.fake_http`, the answers :mod:`vel.testing.fake_replies`.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import sys
import threading
from types import FrameType, TracebackType
from typing import Any, Self

from vel.testing.fake_http import FakeHTTPServer

__all__ = ["FakeOpenAIServer", "main"]


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
        self._httpd: FakeHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> Self:
        if self._httpd is not None:
            raise RuntimeError("FakeOpenAIServer is already running")
        httpd = FakeHTTPServer((self.host, self.port), self)
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
