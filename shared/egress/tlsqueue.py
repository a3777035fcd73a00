"""The SNI of TLS connections on 443 checked in the kernel's packet queue, not by a second TCP end.

For a deny-by-default session whose TLS needs no terminating (no secret to put in), the firewall
(shared/egress/nft.py) lets the SYN through to an address the node may reach, and hands the
connection's first packets that carry bytes to an NFQUEUE this reads. It holds them, puts the
ClientHello together from in-order segments and runs the proxy's own check on its SNI (the name
allowed, and resolved for this node to this address). Allowed: the held packets go on with a
mark the firewall turns into the connection's mark, and every later packet is forwarded by the
kernel like direct traffic (no second TCP termination: the proxy's splice doubled the kernel's
TCP work a byte). Refused: a TCP reset to the node at once. It fails closed: bytes out of order,
overlapping bytes that differ from those seen (a retransmission that says something else), more
than ``sniff.MAX_HEAD`` bytes, no ClientHello with an SNI, or none within ``HOLD_SECONDS``.

Why fnfqueue: it speaks nfnetlink itself (a manylinux wheel, no libnetfilter_queue to build or
install on the host or in the image), batches its reads, sets no verdict of its own (python-
netfilterqueue accepts what a callback leaves), and gives NF_REPEAT with a mark, which is what
turns "checked" into the connection's mark. The kernel here has no nft ``queue`` statement
(CONFIG_NFT_QUEUE off) while the xtables NFQUEUE target is in: the one queueing rule is iptables'
(mangle FORWARD, between this table's marking chain and its filter: shared/firewall.py).
"""

from __future__ import annotations

import hashlib
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shared import metrics
from shared.egress import sniff
from shared.egress.conntrack import Tuple

log = logging.getLogger(__name__)

# packet mark bits (the firewall's rules name the same): QUEUE "to be checked here" (set by the
# marking chain, cleared by every verdict), OK and NO the verdicts, kept as the connection's mark
MARK_QUEUE = 0x02000000
MARK_OK = 0x04000000
MARK_NO = 0x08000000
HOLD_SECONDS = 10.0  # a ClientHello not whole by then is refused (the proxy's read timeout)
KEEP_SECONDS = 60.0  # a decided connection's state, for its packets still in flight

# (node address, destination address, name or "") -> (allowed, the rule or reason)
Check = Callable[[str, str, str], tuple[bool, str]]
# (node address, destination address, port, name, why)
Refused = Callable[[str, str, int, str, str], None]


def queue_number(bridge: str) -> int:
    """The queue of one bridge: fixed by its name, so a standby that takes over binds the one the
    firewall names (16-bit; 0-1023 left to others)."""
    return 1024 + int(hashlib.sha256(bridge.encode()).hexdigest()[:8], 16) % (65536 - 1024)


@dataclass
class Segment:
    """What the reader needs of one IPv4 TCP packet."""

    src: str
    dst: str
    sport: int
    dport: int
    seq: int
    syn: bool
    payload: bytes

    @property
    def key(self) -> Tuple:
        return (self.src, self.sport, self.dst, self.dport)


def parse(pkt: bytes) -> Segment | None:
    """An IPv4 TCP packet's addresses, ports, sequence number and payload (None: not one)."""
    if len(pkt) < 40 or pkt[0] >> 4 != 4 or pkt[9] != socket.IPPROTO_TCP:
        return None
    ihl = (pkt[0] & 0x0F) * 4
    total = struct.unpack_from("!H", pkt, 2)[0]
    if total > len(pkt) or ihl < 20 or total < ihl + 20:
        return None
    sport, dport, seq = struct.unpack_from("!HHI", pkt, ihl)
    doff = (pkt[ihl + 12] >> 4) * 4
    flags = pkt[ihl + 13]
    if doff < 20 or ihl + doff > total:
        return None
    return Segment(socket.inet_ntoa(pkt[12:16]), socket.inet_ntoa(pkt[16:20]), sport, dport, seq,
                   bool(flags & 0x02) and not flags & 0x10, pkt[ihl + doff:total])


@dataclass
class Hello:
    """One connection's ClientHello as its segments come (in order only)."""

    isn: int
    buf: bytearray = field(default_factory=bytearray)
    since: float = field(default_factory=time.monotonic)

    def feed(self, seq: int, payload: bytes) -> tuple[str, str]:
        """("more", ""), ("dup", "") for bytes already seen, ("name", sni) or ("refuse", why)."""
        rel = (seq - self.isn - 1) & 0xFFFFFFFF
        have = len(self.buf)
        if rel > have:  # a gap: what the server will read there is not known yet
            return "refuse", "segment out of order"
        seen = bytes(self.buf[rel:rel + len(payload)])
        if payload[:len(seen)] != seen:  # two readings of the same bytes: the server's may differ
            return "refuse", "retransmitted bytes differ"
        if rel + len(payload) <= have:
            return "dup", ""
        self.buf += payload[len(seen):]
        if len(self.buf) > sniff.MAX_HEAD:
            return "refuse", "ClientHello too long"
        if self.buf[0] != 0x16:
            return "refuse", "not TLS"
        name = sniff.tls_sni(bytes(self.buf))
        if name == sniff.MORE:
            return "more", ""
        if not name:
            return "refuse", "no SNI"
        return "name", name


@dataclass
class Flow:
    hello: Hello | None
    held: list[Any] = field(default_factory=list)  # packets waiting for the verdict
    decided: str = ""  # "", "ok" or "no"
    name: str = ""
    at: float = field(default_factory=time.monotonic)


class TlsQueue:
    """Reads one NFQUEUE (made and bound by ``open``) in a thread of its own."""

    def __init__(self, check: Check, refused: Refused) -> None:
        self.check = check
        self.refused = refused
        self.flows: dict[Tuple, Flow] = {}
        # connections let on: tuple -> the name they asked for (a narrowed policy cuts them)
        self.open: dict[Tuple, tuple[str, str]] = {}
        self.lock = threading.Lock()
        self.conn: Any = None
        self.thread: threading.Thread | None = None
        self.number = 0

    def open_queue(self, number: int) -> None:
        """Bind queue ``number`` (in the calling thread's network namespace: see netns.made_in);
        OSError if another process holds it or netfilter refuses."""
        import fnfqueue

        conn = fnfqueue.Connection()
        try:
            q = conn.bind(number)
            q.set_mode(fnfqueue.MAX_PAYLOAD, fnfqueue.COPY_PACKET)
            q.set_maxlen(4096)
        except BaseException:
            conn.close()
            raise
        self.conn, self.number = conn, number

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name=f"tlsqueue-{self.number}", daemon=True)
        self.thread.start()

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()

    def _run(self) -> None:
        import fnfqueue

        while True:
            try:
                for pkt in self.conn:
                    try:
                        self._packet(pkt)
                    except Exception:  # one packet's fault never stops the queue: it is refused
                        log.exception("egress_tlsqueue_packet_failed")
                        self._verdict(pkt, MARK_NO)
                return  # closed
            except fnfqueue.BufferOverflowException:
                log.warning("egress_tlsqueue_overflow queue=%d", self.number)  # those packets were dropped
                self.conn.reset()
            except Exception:
                log.exception("egress_tlsqueue_stopped queue=%d", self.number)
                return

    @staticmethod
    def _verdict(pkt: Any, bit: int) -> None:
        """Back to the firewall's chain it came from (NF_REPEAT) without the queue bit, with ``bit``."""
        import fnfqueue

        try:
            mark = pkt.mark
        except fnfqueue.NoSuchAttributeException:
            mark = 0
        pkt.mark = (mark & ~(MARK_QUEUE | MARK_OK | MARK_NO)) | bit
        try:
            pkt.verdict(fnfqueue.REPEAT, fnfqueue.MANGLE_MARK)
        except (OSError, fnfqueue.PacketInvalidException):
            pass  # the queue went (closed) or the packet was already given back

    def _packet(self, pkt: Any) -> None:
        seg = parse(pkt.payload)
        if seg is None:
            self._verdict(pkt, MARK_NO)
            return
        key = seg.key
        with self.lock:
            if seg.syn:  # where the stream starts (a new connection on this tuple starts afresh)
                new = self.flows[key] = Flow(Hello(seg.seq))
                if seg.payload:  # TCP Fast Open: bytes that would reach the server before any check
                    self._decide(new, key, False, "", "data in the SYN", pkt)
                    return
                self._verdict(pkt, 0)
                return
            flow = self.flows.get(key)
            if flow is None:  # no SYN seen (state gone, or opened before the agent): only a range opens it
                ok, why = self.check(seg.src, seg.dst, "")
                flow = self.flows[key] = Flow(None)
                self._decide(flow, key, ok, "", why if not ok else "", pkt)
                return
            if flow.decided:
                self._verdict(pkt, MARK_OK if flow.decided == "ok" else MARK_NO)
                return
            if not seg.payload:
                self._verdict(pkt, 0)
                return
            assert flow.hello is not None
            state, what = flow.hello.feed(seg.seq, seg.payload)
            if state == "dup":
                pkt.drop()  # its bytes are in a held packet already
                return
            if state == "more":
                if not flow.held:
                    flow.at = time.monotonic()  # HOLD_SECONDS from the first byte held
                flow.held.append(pkt)
                return
            if state == "refuse":
                self._decide(flow, key, False, "", what, pkt)
                return
            ok, why = self.check(seg.src, seg.dst, what)
            self._decide(flow, key, ok, what, "" if ok else why, pkt)

    def _decide(self, flow: Flow, key: Tuple, ok: bool, name: str, why: str, pkt: Any) -> None:
        flow.decided, flow.name, flow.at = ("ok" if ok else "no"), name, time.monotonic()
        held, flow.held, flow.hello = [*flow.held, pkt], [], None
        metrics.EGRESS_TLS_CHECKED.labels("allowed" if ok else "refused").inc()
        if ok:
            self.open[key] = (name, key[2])
        else:
            self.refused(key[0], key[2], key[3], name, why)
        for p in held:  # in the order they came: the kernel sends them on in that order
            self._verdict(p, MARK_OK if ok else MARK_NO)

    def sweep(self) -> None:
        """Refuse ClientHellos still not whole after HOLD_SECONDS; forget decided connections."""
        now = time.monotonic()
        with self.lock:
            for key, flow in list(self.flows.items()):
                if not flow.decided and flow.held and now - flow.at > HOLD_SECONDS:
                    self._decide(flow, key, False, "", "no whole ClientHello in time", flow.held.pop())
                elif not flow.decided and now - flow.at > KEEP_SECONDS:
                    del self.flows[key]  # a SYN and nothing since: its first bytes are then refused
                elif flow.decided and now - flow.at > KEEP_SECONDS:
                    del self.flows[key]

    def cut(self, still: Callable[[str, str, str], bool]) -> list[Tuple]:
        """The connections let on whose name the policy no longer allows (forgotten here)."""
        memo: dict[tuple[str, str, str], bool] = {}  # thousands of connections, a few (node, address, name)

        def allowed(node: str, dst: str, name: str) -> bool:
            if (node, dst, name) not in memo:
                memo[node, dst, name] = still(node, dst, name)
            return memo[node, dst, name]

        with self.lock:
            gone = [k for k, (name, dst) in self.open.items() if not allowed(k[0], dst, name)]
            for k in gone:
                del self.open[k]
                self.flows.pop(k, None)
        return gone

    def tracked(self) -> list[Tuple]:
        with self.lock:
            return list(self.open)

    def forget_ended(self, asked: list[Tuple], alive: set[Tuple]) -> None:
        """Forget the connections asked about that the kernel no longer tracks (closed)."""
        with self.lock:
            for k in asked:
                if k not in alive:
                    self.open.pop(k, None)
