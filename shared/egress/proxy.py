"""The host-side transparent proxy for port 80 of nodes under a deny-by-default policy, and their
443 while its TLS is terminated here (secrets) or the kernel's queue is not read (else 443 is
checked there: shared/egress/tlsqueue.py).

The firewall sends it a node's connections to addresses the node may reach (learned from an
allowed name's answer); it reads the name the connection asks for (SNI or Host) and lets it on
only when that name is allowed and resolved, for this node, to this very address (or the address
is in one of the policy's allowed ranges). So an address shared by many names (a CDN) opened for
one allowed name does not open the others, and a made-up SNI or Host does not help. Allowed
connections go to the original destination, bytes moved by the kernel (splice); HTTP requests get
``Connection: close`` so every request on them is one whose Host was read. Each open connection
is kept with the name it was let on for, so a narrowed policy cuts those it no longer allows
(``cut``): the node's end is reset, not closed cleanly, so a cut download is never taken for a
whole one.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
import ssl
import struct
import threading
from collections.abc import Callable

from shared import netns
from shared.egress import sniff
from shared.egress.bodies import BodyStream, Replacer, as_chunked, is_chunked
from shared.egress.pump import pump
from shared.egress.secrets import MAX_BODY, CertMint, Secret, body_length, substitute_body, with_length, without_expect
from shared.egress.secrets import substitute as secrets_substitute

log = logging.getLogger(__name__)

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
F_SETPIPE_SZ = 1031  # linux/fcntl.h (fcntl.F_SETPIPE_SZ is Python 3.10+ on Linux, not in every build)
PIPE_BYTES = 1 << 20
READ_TIMEOUT = 10.0
CHUNK = 1 << 16

# (node address, destination address, name or "") -> (allowed, the rule or reason)
Check = Callable[[str, str, str], tuple[bool, str]]
Refused = Callable[[str, str, int, str, str], None]


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """Where the node meant to connect before the firewall redirected it here."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port = struct.unpack("!H", raw[2:4])[0]
    return socket.inet_ntoa(raw[4:8]), port


# (node address, destination address, name) -> whether a connection let on before may go on
StillAllowed = Callable[[str, str, str], bool]
# host -> the secrets bound to it (None: none, the connection is spliced untouched)
SecretsFor = Callable[[str], dict[str, Secret] | None]
# (node address, host, names used, names sent to a host they are not bound to)
SecretUse = Callable[[str, str, list[str], list[str]], None]


class EgressProxy:
    def __init__(self, check: Check, refused: Refused, secrets_for: SecretsFor | None = None,
                 mint: CertMint | None = None, upstream_tls: ssl.SSLContext | None = None,
                 secret_use: SecretUse | None = None) -> None:
        self.check = check
        self.refused = refused
        self.secrets_for = secrets_for
        self.mint = mint
        self.upstream_tls = upstream_tls
        self.secret_use = secret_use
        self.sock: socket.socket | None = None
        self.accepting: asyncio.Task[None] | None = None
        self.conns: set[asyncio.Task[None]] = set()
        # connections let on: (node, destination, name) -> what cuts each
        self.open: dict[int, tuple[tuple[str, str, str], Callable[[], None]]] = {}
        self.open_lock = threading.Lock()

    def _track(self, key: tuple[str, str, str], cut: Callable[[], None]) -> int:
        with self.open_lock:
            handle = id(cut)
            self.open[handle] = (key, cut)
        return handle

    def _untrack(self, handle: int) -> None:
        with self.open_lock:
            self.open.pop(handle, None)

    def cut(self, still: StillAllowed) -> int:
        """Reset the open connections a policy no longer allows; how many were cut."""
        with self.open_lock:
            gone = [(h, c) for h, (key, c) in self.open.items() if not still(*key)]
            for h, _ in gone:
                del self.open[h]
        for _, c in gone:
            c()
        return len(gone)

    async def start(self, host: str, port: int, netns_pid: int | None = None) -> None:
        """Listen on host:port, in ``netns_pid``'s network namespace when given (the node bridge's;
        the connections to the real hosts leave from the manager's own)."""
        self.sock = await asyncio.to_thread(netns.made_in, netns_pid, lambda: _listening(host, port))
        self.accepting = asyncio.create_task(self._accept())

    def close(self) -> None:
        if self.accepting is not None:
            self.accepting.cancel()
        if self.sock is not None:
            self.sock.close()

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.sock is not None
        while True:
            conn, peer = await loop.sock_accept(self.sock)
            conn.setblocking(False)
            task = asyncio.create_task(self._client(conn, peer[0]))
            self.conns.add(task)
            task.add_done_callback(self.conns.discard)

    async def _client(self, conn: socket.socket, node: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            dst, port = original_dst(conn)
        except OSError:
            conn.close()
            return
        # the first bytes are peeked, not taken: a TLS connection is then spliced (or terminated,
        # for a host with secrets) from its very first byte
        head = b""
        name: str | None = sniff.MORE
        try:
            while name == sniff.MORE and len(head) < sniff.MAX_HEAD:
                head = await _peek(conn, len(head))
                if not head:
                    break
                name = sniff.tls_sni(head) if head[:1] == b"\x16" else sniff.http_host(head)
        except (TimeoutError, OSError):
            name = None
        if name == sniff.MORE:
            name = None
        ok, why = self.check(node, dst, name or "")
        if not ok:
            self.refused(node, dst, port, name or "", why)
            _reset(conn)
            return
        tls = head[:1] == b"\x16"
        secrets = self.secrets_for(name) if (tls and name and self.secrets_for and self.mint) else None
        if secrets:
            conn.setblocking(True)
            threading.Thread(target=self._terminate, args=(conn, node, dst, port, str(name), secrets),
                             daemon=True).start()
            return
        up = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        up.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(up, (dst, port)), READ_TIMEOUT)
            if not tls:  # the head is taken now, and goes on with Connection: close
                conn.recv(len(head))
                await loop.sock_sendall(up, sniff.close_after(head) if b"\r\n\r\n" in head else head)
        except (OSError, TimeoutError):
            up.close()
            _reset(conn)
            return
        spliced = _Spliced(conn, up)
        spliced.done = self._untrack
        spliced.handle = self._track((node, dst, name or ""), spliced.cut)
        spliced.start()


    def _terminate(self, conn: socket.socket, node: str, dst: str, port: int, host: str,
                   secrets: dict[str, Secret]) -> None:
        """TLS from the node ended here (a certificate of the cluster CA), the request head's
        placeholders replaced, and on to the real host over TLS verified for ``host``."""
        assert self.mint is not None
        up: socket.socket | None = None
        cut = threading.Event()

        def stop() -> None:  # from the agent's thread: wakes the two copies below
            cut.set()
            _abort(conn)

        handle = self._track((node, dst, host), stop)
        try:
            conn.settimeout(READ_TIMEOUT)
            inner = self.mint.context(host).wrap_socket(conn, server_side=True)
            head = b""
            while b"\r\n\r\n" not in head and len(head) < sniff.MAX_HEAD:
                chunk = inner.recv(CHUNK)
                if not chunk:
                    break
                head += chunk
            if b"\r\n\r\n" not in head:
                inner.close()
                return
            end = head.index(b"\r\n\r\n") + 4
            head, rest = head[:end], head[end:]
            head, used, unbound = secrets_substitute(sniff.close_after(head), secrets, host)
            size = body_length(head)
            in_bodies = any(s.body for s in secrets.values())
            stream: BodyStream | None = None
            if in_bodies and size is not None and size <= MAX_BODY:
                # the whole body, to replace placeholders in it (one request: Connection: close),
                # so that its Content-Length stays exact
                head, expects = without_expect(head)
                if expects and len(rest) < size:
                    inner.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                while len(rest) < size:
                    chunk = inner.recv(min(CHUNK, size - len(rest)))
                    if not chunk:
                        break
                    rest += chunk
                body, more_used, more_unbound = substitute_body(rest[:size], secrets, host)
                head, rest = with_length(head, len(body)), body + rest[size:]
                used, unbound = used + more_used, unbound + more_unbound
            elif in_bodies and (size or is_chunked(head)):
                # chunked, or over MAX_BODY: streamed in bounded memory; chunked on when a secret
                # may be replaced in it (its length is then known only at its end)
                rechunk = any(s.body and s.bound_to(host) for s in secrets.values())
                head, expects = without_expect(head)
                if expects and not rest:
                    inner.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                stream = BodyStream(Replacer(secrets, host), size, rechunk)
                head = (as_chunked(head) if rechunk else head) + stream.feed(rest)
                rest = b""
            head += rest
            if self.secret_use is not None and (used or unbound) and stream is None:
                self.secret_use(node, host, used, unbound)
            ctx = self.upstream_tls or ssl.create_default_context()
            up = ctx.wrap_socket(socket.create_connection((dst, port), READ_TIMEOUT), server_hostname=host)
            up.sendall(head)
            reported = stream is None

            def report() -> None:
                nonlocal reported
                assert stream is not None
                reported = True
                if self.secret_use is not None and (used or stream.r.used or unbound or stream.r.unbound):
                    self.secret_use(node, host, used + stream.r.used, unbound + stream.r.unbound)

            def upward(chunk: bytes) -> bytes:
                """The node's bytes on their way up: the body through its replacer, then as they are."""
                if stream is None or stream.done:
                    return chunk
                out = stream.feed(chunk)
                if stream.done:
                    out, stream.rest = out + stream.rest, b""
                    report()
                return out

            # one thread for both directions: a server may answer before the body's end, and an
            # SSL object must never be read and written from two threads at once (pump.py)
            pump(inner, up, cut, upward if stream is not None else None)
            if not reported:
                report()
        except (OSError, ssl.SSLError, ValueError) as exc:
            if not cut.is_set():
                log.info("egress_proxy_tls_failed node=%s host=%s error=%r", node, host, exc)
        finally:
            self._untrack(handle)
            if up is not None and cut.is_set():
                with contextlib.suppress(OSError):
                    up.shutdown(socket.SHUT_RDWR)
            conn.close()
            if up is not None:
                up.close()


def _listening(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


async def _peek(conn: socket.socket, seen: int) -> bytes:
    """The bytes waiting on conn without taking them, once more than ``seen`` are there."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READ_TIMEOUT
    while True:
        ready: asyncio.Future[None] = loop.create_future()
        loop.add_reader(conn.fileno(), _settle, ready)
        try:
            await asyncio.wait_for(ready, max(0.0, deadline - loop.time()))
        finally:
            loop.remove_reader(conn.fileno())
        data = conn.recv(sniff.MAX_HEAD, socket.MSG_PEEK)
        if len(data) > seen or not data:
            return data
        await asyncio.sleep(0.005)  # nothing new yet (readable stays true while bytes wait)
        if loop.time() > deadline:
            raise TimeoutError


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _abort(sock: socket.socket) -> None:
    """From another thread: the socket's close will be a reset, and a thread blocked reading it
    wakes now (shutdown of the read side sends nothing; the reset goes at close)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RD)


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset: the node sees a refusal at once, not a hang nor a clean end."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class _Spliced:
    """Two sockets joined both ways; both closed once both directions ended."""

    def __init__(self, a: socket.socket, b: socket.socket) -> None:
        self.a, self.b = a, b  # a: the node's end
        self.left = 2
        self.lock = threading.Lock()
        self.was_cut = False
        self.handle = 0
        self.done: Callable[[int], None] = lambda handle: None

    def cut(self) -> None:
        """Both directions end now; the node's end is reset (not a clean end of its stream)."""
        self.was_cut = True
        _abort(self.a)
        with contextlib.suppress(OSError):
            self.b.shutdown(socket.SHUT_RDWR)

    def start(self) -> None:
        for s in (self.a, self.b):
            s.setblocking(True)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        threading.Thread(target=self._run, args=(self.a, self.b), daemon=True).start()
        threading.Thread(target=self._run, args=(self.b, self.a), daemon=True).start()

    def _run(self, src: socket.socket, dst: socket.socket) -> None:
        r, w = os.pipe()
        # a pipe holds 64 KiB by default: one splice each way per 64 KiB; at 1 MiB (the default
        # pipe-max-size) a download moves in 16x fewer system calls and wake-ups
        with contextlib.suppress(OSError):
            fcntl.fcntl(w, F_SETPIPE_SZ, PIPE_BYTES)
        try:
            while True:
                n = os.splice(src.fileno(), w, PIPE_BYTES)
                if n == 0:
                    break
                while n:
                    n -= os.splice(r, dst.fileno(), n)
        except OSError:
            pass
        finally:
            os.close(r)
            os.close(w)
            if not self.was_cut:  # a FIN to the node would end a cut stream as if whole
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
            with self.lock:
                self.left -= 1
                last = self.left == 0
            if last:
                self.done(self.handle)
                self.a.close()
                self.b.close()
