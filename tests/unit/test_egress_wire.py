"""Pure parts of the egress path: reading the name a connection asks for, and secrets' sealing
and substitution (the proxy's and resolver's sockets are tested in tests/test_egress_enforce.py)."""

from __future__ import annotations

import random
import ssl

import pytest
from cryptography.exceptions import InvalidTag

from shared.egress import sniff
from shared.egress.bodies import LONGEST, BodyError, BodyStream, Replacer, as_chunked, is_chunked
from shared.egress.secrets import (
    Secret,
    SecretBox,
    body_length,
    substitute,
    substitute_body,
    with_length,
    without_expect,
)


def client_hello(sni: str) -> bytes:
    """A real ClientHello as Python's ssl writes it, for sni."""
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def test_the_sni_of_a_client_hello_is_read_and_a_partial_one_asks_for_more() -> None:
    hello = client_hello("API.Example.com")
    assert sniff.tls_sni(hello) == "api.example.com"
    assert sniff.tls_sni(hello[:40]) == sniff.MORE
    assert sniff.tls_sni(b"\x17\x03\x03\x00\x05hello") is None  # not a handshake


def test_the_host_of_a_request_head() -> None:
    assert sniff.http_host(b"GET / HTTP/1.1\r\nHost: a.example.com:8080\r\n\r\n") == "a.example.com"
    assert sniff.http_host(b"GET / HTTP/1.1\r\nHost: a.example.com\r\n") == sniff.MORE
    # two Host headers could be read two ways: refused
    assert sniff.http_host(b"GET / HTTP/1.1\r\nHost: a.example.com\r\nHost: b.example.com\r\n\r\n") is None
    assert sniff.http_host(b"GET / HTTP/1.1\r\n\r\n") is None
    head = sniff.close_after(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\n\r\nbody")
    assert head == b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\nbody"


def test_a_sealed_secret_opens_only_under_its_key_and_name() -> None:
    box = SecretBox("key one")
    sealed = box.seal("api", "s3cret")
    assert "s3cret" not in sealed and box.open("api", sealed) == "s3cret"
    with pytest.raises(InvalidTag):
        SecretBox("key two").open("api", sealed)
    with pytest.raises(InvalidTag):
        box.open("other", sealed)  # a sealed value moved to another name does not open


def test_placeholders_are_replaced_only_for_bound_hosts_and_only_in_headers() -> None:
    secrets = {"api": Secret(name="api", value="V1", hosts=("api.example.com", "*.svc.example.com"))}
    head = (b"GET /x?k=tsm-secret:api HTTP/1.1\r\nHost: api.example.com\r\n"
            b"Authorization: Bearer tsm-secret:api\r\nX-Other: tsm-secret:nope\r\n\r\n")
    out, used, unbound = substitute(head, secrets, "api.example.com")
    assert b"Authorization: Bearer V1\r\n" in out and out.startswith(b"GET /x?k=tsm-secret:api ")
    assert used == ["api"] and sorted(unbound) == ["api", "nope"]
    out, used, unbound = substitute(head, secrets, "elsewhere.example.net")
    assert b"V1" not in out and used == [] and "api" in unbound
    assert substitute(head, secrets, "a.svc.example.com")[1] == ["api"]


def test_bodies_are_replaced_only_for_secrets_bound_to_bodies_and_their_length_follows() -> None:
    secrets = {"b": Secret(name="b", value="LONGER-VALUE", hosts=("api.example.com",), body=True),
               "h": Secret(name="h", value="HEADERS-ONLY", hosts=("api.example.com",))}
    body = b'{"a": "tsm-secret:b", "c": "tsm-secret:h"}'
    out, used, unbound = substitute_body(body, secrets, "api.example.com")
    assert out == b'{"a": "LONGER-VALUE", "c": "tsm-secret:h"}' and used == ["b"] and unbound == ["h"]
    out, used, unbound = substitute_body(body, secrets, "other.example.net")
    assert out == body and used == [] and sorted(unbound) == ["b", "h"]
    head = b"POST / HTTP/1.1\r\nHost: api.example.com\r\ncontent-length: 41\r\n\r\n"
    assert body_length(head) == 41
    assert body_length(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n") is None
    assert body_length(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") is None
    assert with_length(head, 50) == b"POST / HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 50\r\n\r\n"
    assert without_expect(b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nHost: x\r\n\r\n") == (
        b"POST / HTTP/1.1\r\nHost: x\r\n\r\n", True)
    assert without_expect(head) == (head, False)


def test_a_box_opens_under_old_keys_and_seals_under_the_current_one() -> None:
    old = SecretBox("key-1").seal("api", "V")
    box = SecretBox("key-2", ["key-1"])
    assert box.open_which("api", old) == ("V", False)
    assert box.open_which("api", box.seal("api", "V")) == ("V", True)
    with pytest.raises(InvalidTag):
        SecretBox("key-2").open("api", old)
    with pytest.raises(InvalidTag):
        SecretBox("key-3", ["key-1"]).open("other", old)  # the name is bound in, under any key


STREAM_SECRETS = {"tok": Secret("tok", "VALUE-123", ("api.example.com",), body=True),
                  "hdr": Secret("hdr", "H", ("api.example.com",))}
# placeholders whole, back to back, of a header-only secret, a bare prefix and a cut-off one
STREAM_BODY = (b"x" * 100 + b"tsm-secret:tok" + b" " + b"y" * 50 + b"tsm-secret:hdr " + b"tsm-secret:tok\n"
               + b"tsm-secret:" + b" tsm-sec" + b" tsm-secret:tok")


def _pieces(data: bytes, rng: random.Random, most: int) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(data)), rng.randint(0, min(most, len(data) - 1))))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def _dechunk(framed: bytes) -> tuple[bytes, bytes]:
    out, i = b"", 0
    while True:
        j = framed.index(b"\r\n", i)
        n, i = int(framed[i:j], 16), j + 2
        if n == 0:
            return out, framed[i:]
        out += framed[i:i + n]
        i += n + 2


def test_a_streamed_body_is_replaced_as_if_read_whole_however_it_is_cut() -> None:
    # a placeholder split across reads or chunks is still replaced; the buffer holds at most one
    rng = random.Random(28)
    want, used, unbound = substitute_body(STREAM_BODY, STREAM_SECRETS, "api.example.com")
    assert used == ["tok", "tok", "tok"] and unbound == ["hdr"]
    for _ in range(500):
        parts = _pieces(STREAM_BODY, rng, 20)
        r = Replacer(STREAM_SECRETS, "api.example.com")
        got = b""
        for p in parts:
            got += r.feed(p)
            assert len(r.held) <= LONGEST
        assert got + r.end() == want and (r.used, r.unbound) == (used, unbound)
        # chunked from the node (extensions, trailers), read in other pieces: chunked on, replaced
        wire = b"".join(b"%x;x=1\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\nX-T: 1\r\n\r\nNEXT"
        stream = BodyStream(Replacer(STREAM_SECRETS, "api.example.com"), None, rechunk=False)
        out = b"".join(stream.feed(p) for p in _pieces(wire, rng, 30))
        assert stream.done and stream.rest == b"NEXT"
        assert _dechunk(out) == (want, b"X-T: 1\r\n\r\n")
        # a known length with a secret bound: chunked on (its length changes)
        stream = BodyStream(Replacer(STREAM_SECRETS, "api.example.com"), len(STREAM_BODY), rechunk=True)
        out = b"".join(stream.feed(p) for p in [*parts, b"NEXT"])
        assert stream.done and stream.rest == b"NEXT" and _dechunk(out) == (want, b"\r\n")
        # another host: every byte as it came, framing kept, the placeholders recorded
        r = Replacer(STREAM_SECRETS, "other.example.net")
        stream = BodyStream(r, len(STREAM_BODY), rechunk=False)
        assert b"".join(stream.feed(p) for p in parts) == STREAM_BODY and stream.done
        assert r.used == [] and r.unbound == ["tok", "hdr", "tok", "tok"]


def test_bad_chunked_framing_is_refused_and_heads_are_reframed() -> None:
    for bad in (b"zz\r\nabc\r\n", b"3\r\nabcX\r\n", b"1" * 5000):
        with pytest.raises(BodyError):
            BodyStream(Replacer({}, "h"), None, rechunk=False).feed(bad)
    head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n"
    assert not is_chunked(head)
    assert as_chunked(head) == b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert is_chunked(as_chunked(head)) and is_chunked(b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n")
