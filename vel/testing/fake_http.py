"""The HTTP side of :class:`~vel.testing.fake_openai.FakeOpenAIServer`: a threaded HTTP/1.1
server and its request handler.

The handler reads request bodies (``Content-Length`` or chunked), routes the OpenAI endpoints,
and writes JSON answers and server-sent event streams; what to answer comes from
:mod:`vel.testing.fake_replies`, and what to record, delay or fail from the
:class:`~vel.testing.fake_openai.FakeOpenAIServer` it serves. A client that goes away mid-answer
ends its connection quietly.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, cast

from vel.testing import fake_summary
from vel.testing.fake_replies import (
    DEFAULT_MODEL,
    RETRYABLE,
    completion,
    error_body,
    messages_of,
    plan_reply,
    stream_chunks,
    text_of,
)

if TYPE_CHECKING:
    from vel.testing.fake_openai import FakeOpenAIServer


class _ClientGone(Exception):
    """The client closed the connection while we were writing."""


class FakeHTTPServer(ThreadingHTTPServer):
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
    def _srv(self) -> FakeHTTPServer:
        return cast(FakeHTTPServer, self.server)

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
        if retry_ms is not None and (status in RETRYABLE or status >= 500):
            extra["retry-after-ms"] = str(retry_ms)
        self._send_json(status, error_body(status, message), extra)

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
        plan = plan_reply(body)
        if fake_summary.is_summary_request(messages_of(body), text_of):
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
            self._send_stream(stream_chunks(body, plan, model), plan.slow)
        else:
            if plan.slow > 0:
                time.sleep(plan.slow)
            self._send_json(200, completion(body, plan, model))
