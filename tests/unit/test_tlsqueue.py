"""The egress TLS queue's ClientHello reassembly (shared/egress/tlsqueue.py): pure logic over bytes."""

from __future__ import annotations

import ssl
import struct

from shared.egress import sniff
from shared.egress.tlsqueue import Hello, parse, queue_number


def client_hello(sni: str) -> bytes:
    """A real ClientHello (OpenSSL's), as a client would send it first."""
    ctx = ssl.create_default_context()
    inb, outb = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inb, outb, server_hostname=sni)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outb.read()


ISN = 0xFFFFFF00  # near the wrap: sequence arithmetic is modulo 2**32


def test_a_hello_in_one_segment_or_split_gives_its_name() -> None:
    hello = client_hello("api.example.com")
    assert Hello(ISN).feed(ISN + 1, hello) == ("name", "api.example.com")
    h = Hello(ISN)
    assert h.feed(ISN + 1, hello[:100]) == ("more", "")
    assert h.feed((ISN + 101) & 0xFFFFFFFF, hello[100:]) == ("name", "api.example.com")


def test_out_of_order_and_contradicting_bytes_are_refused_same_bytes_again_are_not() -> None:
    hello = client_hello("a.example.com")
    h = Hello(ISN)
    assert h.feed((ISN + 101) & 0xFFFFFFFF, hello[100:]) == ("refuse", "segment out of order")
    h = Hello(ISN)
    assert h.feed(ISN + 1, hello[:200]) == ("more", "")
    assert h.feed(ISN + 1, hello[:200]) == ("dup", "")  # a retransmission: nothing new
    other = hello.replace(b"a.example.com", b"b.example.com")
    assert other != hello
    assert h.feed(ISN + 1, other[:300]) == ("refuse", "retransmitted bytes differ")
    # overlapping but agreeing bytes add what is new
    h = Hello(ISN)
    assert h.feed(ISN + 1, hello[:200]) == ("more", "")
    assert h.feed((ISN + 101) & 0xFFFFFFFF, hello[100:]) == ("name", "a.example.com")


def test_not_tls_no_sni_and_too_long_are_refused() -> None:
    assert Hello(ISN).feed(ISN + 1, b"GET / HTTP/1.1\r\n\r\n") == ("refuse", "not TLS")
    # a handshake record that is not a ClientHello: no name to check
    assert Hello(ISN).feed(ISN + 1, b"\x16\x03\x01\x00\x04\x02\x00\x00\x00") == ("refuse", "no SNI")
    big = b"\x16\x03\x01\xff\xff" + b"\x01" * (sniff.MAX_HEAD + 10)
    h = Hello(ISN)
    assert h.feed(ISN + 1, big[:1000]) == ("more", "")
    assert h.feed(ISN + 1001, big[1000:]) == ("refuse", "ClientHello too long")


def test_parse_reads_an_ipv4_tcp_packet() -> None:
    payload = b"\x16hello"
    tcp = struct.pack("!HHIIBBHHH", 40000, 443, 7, 9, 5 << 4, 0x18, 100, 0, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(payload), 0, 0, 64, 6, 0,
                     bytes([10, 0, 0, 2]), bytes([198, 51, 100, 7]))
    seg = parse(ip + tcp + payload)
    assert seg is not None
    assert (seg.key, seg.seq, seg.syn, seg.payload) == (("10.0.0.2", 40000, "198.51.100.7", 443), 7, False, payload)
    syn = parse(ip[:2] + struct.pack("!H", 40) + ip[4:] + tcp[:13] + b"\x02" + tcp[14:])
    assert syn is not None and syn.syn and syn.payload == b""
    assert parse(b"\x60" + b"\0" * 60) is None  # IPv6: never queued, never let on by this


def test_queue_numbers_are_fixed_by_the_bridge_and_leave_the_low_ones() -> None:
    assert queue_number("tsmoabc") == queue_number("tsmoabc")
    assert all(1024 <= queue_number(f"tsmo{i}") < 65536 for i in range(200))
