"""Pure parts of the egress path: reading the name a connection asks for, and secrets' sealing
and substitution (the proxy's and resolver's sockets are tested in tests/test_egress_enforce.py)."""

from __future__ import annotations

import ssl

import pytest
from cryptography.exceptions import InvalidTag

from shared.egress import sniff
from shared.egress.secrets import Secret, SecretBox, substitute


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
