"""Connection tracking entries, re-marked or looked up by their tuple over ctnetlink.

For connections the kernel forwards itself once their name was checked (shared/egress/tlsqueue.py):
a policy narrowed while one is open marks its entry refused, and the firewall resets the node's
next packet on it (an ACK, while a download runs), so the connection is cut as the proxy cuts its
own. Deleting the entry would not do: the server's packets then stop at the host (no address
translation left), the node sends nothing more, and a reading client waits for ever. A few netlink messages over
a raw socket: no library or conntrack binary needed, and the socket is made in the namespace of
the node bridge (shared/netns.py) like the agent's other sockets.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW, IPCTNL_MSG_CT_GET = 0, 1
CTA_MARK, CTA_MARK_MASK = 8, 21
BATCH = 64
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLMSG_ERROR = 2
NLA_F_NESTED = 0x8000
CTA_TUPLE_ORIG, CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST = 1, 2
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3

# (source address, source port, destination address, destination port) of a TCP connection, as
# the node opened it (the original direction)
Tuple = tuple[str, int, str, int]


def _attr(kind: int, data: bytes) -> bytes:
    size = 4 + len(data)
    return struct.pack("=HH", size, kind) + data + b"\0" * (-size % 4)


def _tuple(t: Tuple) -> bytes:
    src, sport, dst, dport = t
    ip = _attr(CTA_TUPLE_IP | NLA_F_NESTED,
               _attr(CTA_IP_V4_SRC, socket.inet_aton(src)) + _attr(CTA_IP_V4_DST, socket.inet_aton(dst)))
    proto = _attr(CTA_TUPLE_PROTO | NLA_F_NESTED,
                  _attr(CTA_PROTO_NUM, bytes([socket.IPPROTO_TCP]))
                  + _attr(CTA_PROTO_SRC_PORT, struct.pack("!H", sport))
                  + _attr(CTA_PROTO_DST_PORT, struct.pack("!H", dport)))
    return _attr(CTA_TUPLE_ORIG | NLA_F_NESTED, ip + proto)


class Conntrack:
    """One ctnetlink socket (made where the caller stands: see shared/netns.made_in)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        self.sock.settimeout(5.0)
        self.seq = 0
        self.lock = threading.Lock()

    def close(self) -> None:
        self.sock.close()

    def _ask(self, msg_type: int, tuples: list[Tuple], extra: bytes = b"") -> dict[Tuple, int]:
        """One request per tuple: tuple -> errno (0: done/found)."""
        out: dict[Tuple, int] = {}
        with self.lock:
            # a batch's answers at a time: thousands sent at once overflow the socket's buffer (ENOBUFS)
            for i in range(0, len(tuples), BATCH):
                self._batch(msg_type, tuples[i:i + BATCH], extra, out)
        return out

    def _batch(self, msg_type: int, tuples: list[Tuple], extra: bytes, out: dict[Tuple, int]) -> None:
        """One request per tuple, all sent, then their answers into ``out``."""
        by_seq: dict[int, Tuple] = {}
        for t in tuples:
            self.seq = (self.seq + 1) & 0xFFFFFFFF
            body = struct.pack("=BBH", socket.AF_INET, 0, 0) + _tuple(t) + extra
            head = struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_CTNETLINK << 8) | msg_type,
                               NLM_F_REQUEST | NLM_F_ACK, self.seq, 0)
            self.sock.send(head + body)
            by_seq[self.seq] = t
        while by_seq:
            data = self.sock.recv(1 << 16)
            p = 0
            while p + 16 <= len(data):
                size, kind, _flags, seq, _pid = struct.unpack_from("=IHHII", data, p)
                if kind == NLMSG_ERROR and seq in by_seq:
                    (err,) = struct.unpack_from("=i", data, p + 16)
                    out[by_seq.pop(seq)] = -err
                elif seq in by_seq and msg_type == IPCTNL_MSG_CT_GET:
                    out.setdefault(by_seq[seq], 0)  # the entry itself; its ACK follows
                p += (size + 3) & ~3
                if size < 16:
                    break

    def set_mark(self, tuples: list[Tuple], bits: int, clear: int) -> int:
        """Set ``bits`` and clear ``clear`` in these connections' marks (an existing entry is changed,
        none is made); how many were there."""
        if not tuples:
            return 0
        keep = 0xFFFFFFFF & ~(bits | clear)  # the kernel's new mark: (old & mask) ^ mark
        res = self._ask(IPCTNL_MSG_CT_NEW, tuples,
                        _attr(CTA_MARK, struct.pack("!I", bits)) + _attr(CTA_MARK_MASK, struct.pack("!I", keep)))
        for t, err in res.items():
            if err not in (0, errno.ENOENT):
                raise OSError(err, f"conntrack mark {t}: {os.strerror(err)}")
        return sum(1 for err in res.values() if err == 0)

    def alive(self, tuples: list[Tuple]) -> set[Tuple]:
        """Which of these connections the kernel still tracks."""
        if not tuples:
            return set()
        return {t for t, err in self._ask(IPCTNL_MSG_CT_GET, tuples).items() if err == 0}
