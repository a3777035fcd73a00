"""Which request headers the proxy forwards: framing and hop-by-hop headers are its own."""

from __future__ import annotations

from manager.proxy.http_proxy import _request_headers


def test_framing_and_hop_by_hop_headers_stay_behind() -> None:
    scope = {"headers": [(b"content-length", b"5"), (b"transfer-encoding", b"chunked"), (b"expect", b"100-continue"),
                         (b"connection", b"keep-alive, x-private"), (b"x-private", b"1"), (b"x-node-secret", b"s"),
                         (b"x-kept", b"yes")]}
    assert _request_headers(scope) == [(b"x-kept", b"yes")]
    assert _request_headers({"headers": [(b"content-length", b"5")]}) == [(b"content-length", b"5")]
