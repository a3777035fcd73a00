"""Which request headers the proxy forwards: framing and hop-by-hop headers are its own."""

from __future__ import annotations

from manager.proxy.http_proxy import _request_headers
from nodeops.forward import VIA_HEADER


def test_framing_and_hop_by_hop_headers_stay_behind() -> None:
    scope = {"headers": [(b"content-length", b"5"), (b"transfer-encoding", b"chunked"), (b"expect", b"100-continue"),
                         (b"connection", b"keep-alive, x-private"), (b"x-private", b"1"), (b"x-node-secret", b"s"),
                         (b"x-kept", b"yes")]}
    assert _request_headers(scope) == ([(b"x-kept", b"yes")], False)
    assert _request_headers({"headers": [(b"content-length", b"5")]}) == ([(b"content-length", b"5")], False)


def test_a_request_through_another_replica_is_told_apart() -> None:
    # the owner's replica never forwards it again (resolver.target): the via header is seen in the same pass
    headers, via = _request_headers({"headers": [(b"x-kept", b"yes"), (VIA_HEADER.encode(), b"r1")]})
    assert via
    assert (b"x-kept", b"yes") in headers
