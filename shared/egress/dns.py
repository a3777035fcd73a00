"""The resolver nodes ask: it answers only names their session's policy allows.

Nodes reach it through the engine's embedded DNS, which forwards from inside the node's network
namespace, so a query comes from the node's own address and names its session. A name the policy
does not allow gets NXDOMAIN without leaving the host; an allowed one is asked upstream, and its
A records are opened to that node in the firewall (``learn``) *before* the answer goes back, so
the node never connects before the address is open. Why dnslib: it only reads and writes DNS
messages (no resolver, cache or server of its own that would decide for us), is pure Python,
and is maintained.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Awaitable, Callable

from dnslib import QTYPE, RCODE, DNSRecord

from shared import netns
from shared.egress.policy import EgressPolicy, name_allowed

log = logging.getLogger(__name__)

PolicyOf = Callable[[str], EgressPolicy | None]
Learn = Callable[[str, str, list[tuple[str, int]]], Awaitable[None]]
Refused = Callable[[str, str, str], None]
Unknown = Callable[[str], Awaitable[EgressPolicy | None]]
UPSTREAM_TIMEOUT = 2.0


def upstreams_from(configured: list[str], resolv_conf: str = "/etc/resolv.conf") -> list[tuple[str, int]]:
    """(address, port) of each configured upstream, else the host's resolvers (not loopback ones
    of a local stub only when nothing else is listed)."""
    out: list[tuple[str, int]] = []
    for item in configured:
        host, _, port = item.rpartition(":") if item.count(":") == 1 else (item, "", "53")
        out.append((host or item, int(port or 53)))
    if out:
        return out
    with contextlib.suppress(OSError), open(resolv_conf) as f:
        for line in f:
            words = line.split()
            if len(words) >= 2 and words[0] == "nameserver":
                out.append((words[1], 53))
    return out


class EgressResolver:
    """A UDP and TCP DNS server on one address (the node bridge's), deciding per source address."""

    def __init__(self, *, policy_of: PolicyOf, learn: Learn, refused: Refused,
                 upstream: list[tuple[str, int]], min_ttl: int, max_ttl: int,
                 resolved: Callable[[], None] = lambda: None, unknown: Unknown | None = None) -> None:
        self.policy_of = policy_of
        self.unknown = unknown  # a source not known yet: its policy once the host has looked (None: refused)
        self.resolved = resolved
        self.learn = learn
        self.refused = refused
        self.upstream = upstream
        self.min_ttl, self.max_ttl = min_ttl, max_ttl
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int, netns_pid: int | None = None) -> None:
        """Bind both sockets, in ``netns_pid``'s network namespace when given (OSError when the
        address is taken: another replica serves it)."""
        loop = asyncio.get_running_loop()
        udp, tcp = await asyncio.to_thread(netns.made_in, netns_pid, lambda: _bound(host, port))
        transport, _ = await loop.create_datagram_endpoint(lambda: _Udp(self), sock=udp)
        self._udp = transport  # type: ignore[assignment]
        self._tcp = await asyncio.start_server(self._tcp_client, sock=tcp)

    def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
        for t in self._tasks:
            t.cancel()

    def _spawn(self, data: bytes, addr: tuple[str, int]) -> None:
        task = asyncio.create_task(self._answer_udp(data, addr))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer_udp(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = await self.answer(data, addr[0], udp=True)
        if reply is not None and self._udp is not None:
            self._udp.sendto(reply, addr)

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")[0]
        try:
            while True:
                size = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), 10))[0]
                reply = await self.answer(await asyncio.wait_for(reader.readexactly(size), 10), peer)
                if reply is None:
                    break
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    async def answer(self, data: bytes, source: str, udp: bool = False) -> bytes | None:
        """The reply to one query from ``source`` (None: not a DNS query, dropped)."""
        try:
            req = DNSRecord.parse(data)
        except Exception:
            return None
        reply = req.reply()
        name = str(req.q.qname).rstrip(".").lower()
        pol = self.policy_of(source)
        if pol is None and self.unknown is not None:
            # a node made by another replica can ask before this host has heard of it: look first
            pol = await self.unknown(source)
        if pol is None:  # not a node this host knows: refuse, never guess
            reply.header.rcode = RCODE.REFUSED
            return bytes(reply.pack())
        allowed, rule = name_allowed(pol, name)
        if not allowed:
            self.refused(source, name, rule or f"default {pol.default}")
            reply.header.rcode = RCODE.NXDOMAIN
            return bytes(reply.pack())
        raw = await self._ask_upstream(data)
        if raw is None:
            reply.header.rcode = RCODE.SERVFAIL
            return bytes(reply.pack())
        try:
            up = DNSRecord.parse(raw)
        except Exception:
            reply.header.rcode = RCODE.SERVFAIL
            return bytes(reply.pack())
        # nodes have no IPv6 (their network has none, and IPv6 is off in their kernel; the table
        # refuses any from the bridge): an AAAA record would only send clients to a dead address
        # first, so answers carry none (an AAAA query of an allowed name gets NOERROR, empty)
        up.rr = [rr for rr in up.rr if rr.rtype != QTYPE.AAAA]
        up.ar = [rr for rr in up.ar if rr.rtype != QTYPE.AAAA]
        if udp and len(up.pack()) > _udp_limit(req):
            # too big for the client's UDP: truncated, it asks again over TCP and learns it all
            # then (opening addresses it was not told about would open more than it sees)
            up.rr, up.auth, up.ar = [], [], []
            up.header.tc = 1
            return bytes(up.pack())
        addrs: list[tuple[str, int]] = []
        for rr in up.rr:
            # the node's cache must not outlive the firewall's element: TTLs are held to the bounds
            rr.ttl = max(self.min_ttl, min(self.max_ttl, rr.ttl))
            if rr.rtype == QTYPE.A:
                addrs.append((str(rr.rdata), rr.ttl))
        if addrs:
            await self.learn(source, name, addrs)
        self.resolved()
        return bytes(up.pack())

    async def _ask_upstream(self, data: bytes) -> bytes | None:
        loop = asyncio.get_running_loop()
        for host, port in self.upstream:
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, (host, port))
                await loop.sock_sendall(sock, data)
                raw = await asyncio.wait_for(loop.sock_recv(sock, 65535), UPSTREAM_TIMEOUT)
                # truncated (TC): the whole answer over TCP, else the node would learn (and be
                # opened) only part of it, and a client asking over TCP would get the stub
                if len(raw) > 2 and raw[2] & 0x02:
                    return await asyncio.wait_for(_ask_tcp(host, port, data), UPSTREAM_TIMEOUT)
                return raw
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                log.warning("egress_dns_upstream_failed upstream=%s:%d error=%r", host, port, exc)
            finally:
                sock.close()
        return None


def _bound(host: str, port: int) -> tuple[socket.socket, socket.socket]:
    """The UDP and TCP sockets of the resolver, bound (both or neither)."""
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        udp.bind((host, port))
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind((host, port))
        tcp.listen(128)
    except OSError:
        udp.close()
        tcp.close()
        raise
    udp.setblocking(False)
    tcp.setblocking(False)
    return udp, tcp


def _udp_limit(req: DNSRecord) -> int:
    """The UDP answer size a query allows: 512 bytes, or what its EDNS record says (RFC 6891)."""
    for rr in req.ar:
        if rr.rtype == QTYPE.OPT:
            return max(512, int(rr.rclass))
    return 512


async def _ask_tcp(host: str, port: int, data: bytes) -> bytes:
    """One query over TCP (RFC 7766: a two-byte length before each message)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(struct.pack("!H", len(data)) + data)
        await writer.drain()
        size = struct.unpack("!H", await reader.readexactly(2))[0]
        return await reader.readexactly(size)
    finally:
        writer.close()


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: EgressResolver) -> None:
        self.server = server

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:  # type: ignore[override]
        self.server._spawn(data, addr)
