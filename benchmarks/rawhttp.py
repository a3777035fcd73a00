"""A minimal HTTP/1.1 client on asyncio streams, for benchmarks whose client must cost little.

httpx spends a few milliseconds of CPU a request on this 2-core host (0.9-1.6 CPU s for a 100-way
burst's 200 requests in time_to_interactive): measured beside a manager on the same cores, that
client's work is taken from the manager and its nodes. This one writes the request in one
``write`` and parses only what the benchmarks read: the status, the headers (Content-Length or
chunked framing) and the body. One connection, kept alive between requests, as a client holding
a keep-alive connection to the manager would.
"""

from __future__ import annotations

import asyncio


class HTTPError(Exception):
    """The connection failed or the answer was not HTTP/1.1 as expected."""


class Response:
    """A whole answer: status, headers (lower-cased names, each a list of values) and body."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: dict[str, list[str]], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def cookie(self, name: str) -> str | None:
        """The value a Set-Cookie header of the answer gives the cookie name, if any."""
        for value in self.headers.get("set-cookie", []):
            first = value.split(";", 1)[0]
            k, _, v = first.partition("=")
            if k.strip() == name:
                return v.strip()
        return None


class Connection:
    """One keep-alive connection to host:port; requests one after the other."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> Response:
        """Send one request and read its whole answer; opens (again) the connection when needed."""
        try:
            return await asyncio.wait_for(self._request(method, path, body, headers or {}), self.timeout)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            self.close()
            raise HTTPError(f"{method} {path}: {type(exc).__name__}: {exc}") from exc

    async def _request(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> Response:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        assert self._reader is not None
        head = [f"{method} {path} HTTP/1.1", f"host: {self.host}:{self.port}", f"content-length: {len(body)}"]
        head.extend(f"{k}: {v}" for k, v in headers.items())
        self._writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        status_line = await self._reader.readuntil(b"\r\n")
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise ValueError(f"not an HTTP/1.x status line: {status_line[:80]!r}")
        status = int(parts[1])
        raw = await self._reader.readuntil(b"\r\n\r\n")
        got: dict[str, list[str]] = {}
        for line in raw[:-4].split(b"\r\n"):
            if line:
                k, _, v = line.decode("latin-1").partition(":")
                got.setdefault(k.strip().lower(), []).append(v.strip())
        if "chunked" in ",".join(got.get("transfer-encoding", [])).lower():
            chunks = []
            while True:
                size = int((await self._reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
                if size == 0:
                    await self._trailers()
                    break
                chunks.append(await self._reader.readexactly(size))
                await self._reader.readexactly(2)
            data = b"".join(chunks)
        else:
            data = await self._reader.readexactly(int(got.get("content-length", ["0"])[0]))
        if "close" in ",".join(got.get("connection", [])).lower():
            self.close()
        return Response(status, got, data)

    async def _trailers(self) -> None:
        assert self._reader is not None
        while (await self._reader.readuntil(b"\r\n")) != b"\r\n":
            pass

    def close(self) -> None:
        """Close the connection (the next request opens a new one)."""
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None
