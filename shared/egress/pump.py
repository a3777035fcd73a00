"""Bytes both ways between two sockets, either of them TLS, from one thread.

OpenSSL forbids using one SSL object from two threads at once, even one reading while the other
writes (openssl/openssl#20446; cpython#151508 crashes on it). The terminating proxy once copied
each direction in its own blocking thread: under load a streamed body's connection closed with
no answer. Here one thread drives both directions without blocking, and waits in select only
when no direction can move.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import ssl
import threading
from collections.abc import Callable

CHUNK = 1 << 16
HIGH_WATER = 4 * CHUNK  # read no more from a side while this much waits for the other
TICK = 0.5  # how often a wait looks at the cut flag


class _Flow:
    """One direction: what was read from src and not yet written to dst."""

    def __init__(self, src: socket.socket, dst: socket.socket, transform: Callable[[bytes], bytes] | None,
                 end: Callable[[], bytes] | None, final: bool) -> None:
        self.src, self.dst, self.final = src, dst, final
        self.transform, self.end = transform, end
        self.buf = bytearray()
        self.tried = 0  # a TLS write that must be retried with the same bytes (OpenSSL's rule)
        self.eof = False
        self.closed = False  # dst told that this direction ended
        self.wait: dict[socket.socket, int] = {}

    def step(self) -> bool:
        """Move what can move now; True if anything did."""
        self.wait = {}
        moved = False
        while not self.eof and len(self.buf) < HIGH_WATER:
            try:
                data = self.src.recv(CHUNK)
            except (ssl.SSLWantReadError, BlockingIOError):
                self.wait[self.src] = selectors.EVENT_READ
                break
            except ssl.SSLWantWriteError:
                self.wait[self.src] = selectors.EVENT_WRITE
                break
            moved = True
            if not data:
                self.eof = True
                if self.end is not None:
                    self.buf += self.end()
                break
            self.buf += self.transform(data) if self.transform is not None else data
        while self.buf:
            n = self.tried or min(len(self.buf), CHUNK)
            try:
                sent = self.dst.send(bytes(self.buf[:n]))
            except (ssl.SSLWantWriteError, BlockingIOError):
                self.tried = n if isinstance(self.dst, ssl.SSLSocket) else 0
                self.wait[self.dst] = self.wait.get(self.dst, 0) | selectors.EVENT_WRITE
                return moved
            except ssl.SSLWantReadError:
                self.tried = n
                self.wait[self.dst] = self.wait.get(self.dst, 0) | selectors.EVENT_READ
                return moved
            self.tried = 0
            del self.buf[:sent]
            moved = True
        if self.eof and not self.closed:
            self.closed = True
            _end_writes(self.dst, self.final)
            moved = True
        return moved

    @property
    def done(self) -> bool:
        return self.closed


def pump(client: socket.socket, server: socket.socket, cut: threading.Event,
         transform: Callable[[bytes], bytes] | None = None, end: Callable[[], bytes] | None = None,
         idle: float | None = None) -> None:
    """Copy client->server (through transform, then end() at the client's end) and server->client
    until the server's answer ended, cut is set, or nothing moved for idle seconds; raises what a
    socket raised.

    The server's end ends the exchange, as an HTTP client expects (a close-delimited answer): the
    client gets it (TLS close_notify) and the caller closes both. A client that ends first only
    half-closes a plain server connection; a TLS server is not sent close_notify then, since
    CPython's shutdown() goes on to read the peer's and OpenSSL drops application data it reads
    after sending its own."""
    for s in (client, server):
        s.setblocking(False)
    ask, answer = _Flow(client, server, transform, end, False), _Flow(server, client, None, None, True)
    flows = (ask, answer)
    quiet = 0.0
    with selectors.DefaultSelector() as sel:
        while not cut.is_set() and not answer.done:
            moved = False
            for f in flows:
                if not f.done:
                    moved = f.step() or moved
            if moved:
                quiet = 0.0
                continue
            want: dict[socket.socket, int] = {}
            for f in flows:
                for s, ev in (f.wait.items() if not f.done else ()):
                    want[s] = want.get(s, 0) | ev
            for s, ev in want.items():
                sel.register(s, ev)
            try:
                if not sel.select(TICK):
                    quiet += TICK
                    if idle is not None and quiet >= idle:
                        raise TimeoutError(f"nothing moved for {idle:.0f} s")
            finally:
                for s in want:
                    sel.unregister(s)


def _end_writes(s: socket.socket, final: bool) -> None:
    """Tell the peer no more bytes come this way (pump() says when TLS gets close_notify)."""
    if isinstance(s, ssl.SSLSocket):
        if not final:
            return
        # non-blocking: close_notify is written, then the wait for the peer's raises WantRead
        with contextlib.suppress(ssl.SSLError, OSError, ValueError):
            s.unwrap()
    with contextlib.suppress(OSError):
        socket.socket.shutdown(s, socket.SHUT_WR)  # the plain half-close: keeps the TLS object
