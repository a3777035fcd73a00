"""The host-side transparent proxy for ports 80 and 443 of nodes under a deny-by-default policy.

The firewall sends it a node's connections to addresses the node may reach (learned from an
allowed name's answer); it reads the name the connection asks for (SNI or Host) and lets it on
only when that name is allowed and resolved, for this node, to this very address (or the address
is in one of the policy's allowed ranges). So an address shared by many names (a CDN) opened for
one allowed name does not open the others, and a made-up SNI or Host does not help. Allowed
connections go to the original destination, bytes spliced both ways; HTTP requests get
``Connection: close`` so every request on them is one whose Host was read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Callable

from shared.egress import sniff

log = logging.getLogger(__name__)

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
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


class EgressProxy:
    def __init__(self, check: Check, refused: Refused) -> None:
        self.check = check
        self.refused = refused
        self.server: asyncio.Server | None = None
        self.conns: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> None:
        self.server = await asyncio.start_server(self._client, host, port, backlog=1024)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock: socket.socket = writer.get_extra_info("socket")
        node = writer.get_extra_info("peername")[0]
        try:
            dst, port = original_dst(sock)
        except OSError:
            writer.close()
            return
        head = b""
        name: str | None = sniff.MORE
        try:
            while name == sniff.MORE and len(head) < sniff.MAX_HEAD:
                chunk = await asyncio.wait_for(reader.read(CHUNK), READ_TIMEOUT)
                if not chunk:
                    break
                head += chunk
                name = sniff.tls_sni(head) if head[:1] == b"\x16" else sniff.http_host(head)
        except (TimeoutError, ConnectionError):
            name = None
        if name == sniff.MORE:
            name = None
        ok, why = self.check(node, dst, name or "")
        if not ok:
            self.refused(node, dst, port, name or "", why)
            _reset(writer)
            return
        try:
            up_r, up_w = await asyncio.wait_for(asyncio.open_connection(dst, port), READ_TIMEOUT)
        except (OSError, TimeoutError):
            _reset(writer)
            return
        if head[:1] != b"\x16" and b"\r\n\r\n" in head:
            head = sniff.close_after(head)
        up_w.write(head)
        await asyncio.gather(_pipe(reader, up_w), _pipe(up_r, writer), return_exceptions=True)
        up_w.close()
        writer.close()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset: the node sees a refusal at once, not a hang nor a clean end."""
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await src.read(CHUNK)
            if not data:
                break
            dst.write(data)
            await dst.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            if dst.can_write_eof():
                dst.write_eof()
            else:
                dst.close()
