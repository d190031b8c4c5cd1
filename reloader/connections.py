"""uvicorn's httptools protocol with the bounds a server facing the network needs, and JSON errors.

- **A deadline for reading each request.** uvicorn times out idle keep-alive connections, but nothing
  else: a client that connects and sends nothing, or dribbles a header byte every few seconds, or a
  body at a byte a second, holds its connection for good. Here every request (the first from its
  connection's start; each later one from its first byte) must arrive whole, head and body, within
  `server.read_timeout_s`, or it is answered 408 and the connection closed.
- **A cap on connections.** A connection opened while `server.max_connections` are open is answered
  503 with Retry-After and closed, before the app sees it (uvicorn's own `limit_concurrency` does the
  same, but answers in plain text).
- **A bound on a request's head** (request line plus headers): past MAX_HEAD_BYTES, 431.
- **JSON errors.** uvicorn answers a request it cannot parse (a malformed request line, a bad
  Content-Length) with a plain-text 400; here it is `{"error": ...}` like every other error.

The hooks overridden are uvicorn internals; tests/test_uvicorn_contract.py checks they still exist.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from .config import ServerConfig

logger = logging.getLogger("reloader.connections")
MAX_HEAD_BYTES = 64 * 1024  # nginx's large_client_header_buffers is 4 x 8 KiB; a request line plus headers


class _HeadTooLarge(Exception):
    pass


async def _too_many(scope: Any, receive: Any, send: Any) -> None:
    """The app a connection over the cap gets instead of the daemon's: 503, and the connection closes."""
    limit = scope["state"]["max_connections"]
    body = json.dumps({"error": f"too many connections: server.max_connections is {limit}; retry"}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", b"1"),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def bounded_protocol(settings: Callable[[], ServerConfig]) -> type[HttpToolsProtocol]:
    """The protocol class to give uvicorn.Config(http=...); `settings` is read per connection (live config)."""

    class Bounded(HttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self._limits = settings()
            self._deadline: asyncio.TimerHandle | None = None
            self._awaiting = True  # a request is due: its bytes are under the read deadline
            self._head_bytes = 0
            self._head_error: str | None = None
            self._headers_done = False
            super().connection_made(transport)
            self._over_cap = len(self.connections) > self._limits.max_connections
            if self._over_cap:
                open_now, limit = len(self.connections), self._limits.max_connections
                logger.warning("connection refused: %d open, server.max_connections is %d", open_now, limit)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._awaiting and self._deadline is None:
                self._arm()  # bytes of a next request (or stray line ends) after a response
            super().data_received(data)

        # -- parser callbacks ---------------------------------------------------------------------
        def on_message_begin(self) -> None:
            self._awaiting = True
            self._head_bytes = 0
            self._headers_done = False
            super().on_message_begin()
            if self._deadline is None:
                self._arm()

        def on_url(self, url: bytes) -> None:
            self._count(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count(len(name) + len(value) + 4)
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._headers_done = True
            if not self._over_cap:
                super().on_headers_complete()
                return
            app, self.app = self.app, _too_many
            self.scope["state"]["max_connections"] = self._limits.max_connections
            try:
                super().on_headers_complete()
            finally:
                self.app = app

        def on_message_complete(self) -> None:
            self._awaiting = False
            self._disarm()
            super().on_message_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._awaiting = True  # the next request's deadline starts at its first byte (data_received)

        def send_400_response(self, msg: str) -> None:
            if self._head_error is not None:
                self._send_error(431, self._head_error)
            else:
                self._send_error(400, f"invalid HTTP request: {msg.rstrip('.')}")

        # -- bounds --------------------------------------------------------------------------------
        def _count(self, size: int) -> None:
            self._head_bytes += size
            if self._head_bytes > MAX_HEAD_BYTES:
                self._head_error = f"request line and headers exceed {MAX_HEAD_BYTES} bytes"
                raise _HeadTooLarge(self._head_error)  # the parser stops; uvicorn answers through send_400

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(self._limits.read_timeout_s, self._expired)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            cycle = self.cycle if self._headers_done else None  # before its head is whole, a request has none
            if cycle is not None:
                # The app holds this request: it now sees the client as gone, and its answer goes nowhere.
                cycle.disconnected = True
                cycle.message_event.set()
                if cycle.response_started:  # answered before its body arrived (a 413): nothing more to say
                    self.transport.close()
                    return
            timeout = self._limits.read_timeout_s
            self._send_error(408, f"request not received within server.read_timeout_s ({timeout} s)")

        def _send_error(self, status: int, message: str) -> None:
            body = json.dumps({"error": message}).encode()
            head = [STATUS_LINE[status]]
            for name, value in self.server_state.default_headers:
                head.append(name + b": " + value + b"\r\n")
            head += [
                b"content-type: application/json\r\n",
                b"content-length: " + str(len(body)).encode() + b"\r\n",
                b"connection: close\r\n\r\n",
            ]
            self.transport.write(b"".join(head) + body)
            self.transport.close()

    return Bounded
