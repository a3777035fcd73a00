"""The manager's HTTP/1.1 server protocol: uvicorn's httptools protocol with the request head
bounded while it is read, in size and in time.

uvicorn's httptools parser buffers a request head whole before anything can refuse it
(``h11_max_incomplete_event_size`` applies to h11 only) and times out idle keep-alive
connections but not a head arriving a byte at a time. Like nginx's
``large_client_header_buffers`` and ``client_header_timeout``, this counts head bytes as
they arrive and answers 431 past the limit, and 408 when a head is not complete in time;
either way the connection is closed at once.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


class EdgeHttpProtocol(HttpToolsProtocol):
    """One client connection; the limit is uvicorn's h11_max_incomplete_event_size."""

    def __init__(self, config: Any, server_state: Any, app_state: Any, _loop: Any = None,
                 header_timeout: float = 15.0) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._head_limit = config.h11_max_incomplete_event_size or 65536
        self._head_timeout = header_timeout
        self._in_head = True
        self._head_bytes = 0
        self._tail = b""
        self._head_timer: asyncio.TimerHandle | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._in_head:
            if self._head_timer is None:
                self._arm()  # the first byte of a kept-alive connection's next request
            seen = self._tail + data
            crlf, lf = seen.find(b"\r\n\r\n"), seen.find(b"\n\n")
            ends = [i + n for i, n in ((crlf, 4), (lf, 2)) if i >= 0]
            # count only head bytes: what follows the blank line is body or the next request
            self._head_bytes += len(data) if not ends else max(0, min(ends) - len(self._tail))
            if self._head_bytes > self._head_limit:
                self._refuse(431, f"request head too large (over {self._head_limit} bytes)")
                return
            self._tail = seen[-3:]
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self._tail = b""
        self._disarm()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True

    def _arm(self) -> None:
        self._head_timer = self.loop.call_later(self._head_timeout, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._in_head and not self.transport.is_closing():
            self._refuse(408, f"request head not received within {self._head_timeout} s")

    def _refuse(self, status: int, detail: str) -> None:
        """Answer and close, unless a response is under way (then just close after it)."""
        self._disarm()
        self._in_head = False
        self._refused = True
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False
            self.transport.pause_reading()
            return
        body = msgspec.json.encode({"detail": detail})
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n%s" % (status, _REASONS[status], len(body), body))
        self.transport.close()
