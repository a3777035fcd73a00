"""The client library builds its default TLS context once, not per session object."""

from __future__ import annotations

import ssl
import time

import pytest

from toolserver_manager.transport import AsyncBase, tls_context


def _ctx(client: AsyncBase) -> ssl.SSLContext:
    return client._http._transport._pool._ssl_context  # type: ignore[attr-defined,no-any-return]


@pytest.fixture(autouse=True)
def httpx_as_shipped(monkeypatch: pytest.MonkeyPatch) -> None:
    """httpx's own per-client context, not the one the test harness shares (testing/tls_context.py)."""
    import httpx._config
    import httpx._transports.default

    monkeypatch.setattr(httpx._transports.default, "create_ssl_context", httpx._config.create_ssl_context)


def test_session_objects_share_one_verifying_context() -> None:
    a, b = AsyncBase("https://a.example"), AsyncBase("https://b.example")
    assert _ctx(a) is _ctx(b)
    assert _ctx(a).verify_mode == ssl.CERT_REQUIRED and _ctx(a).check_hostname
    t = time.process_time()
    for _ in range(20):
        AsyncBase("https://c.example")
    # each would load the CA bundle again (25-55 ms of CPU here): 20 of them stay far under one
    assert time.process_time() - t < 0.5


def test_other_settings_are_kept_as_given(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    plain = AsyncBase("https://a.example", verify=False)
    assert _ctx(plain).verify_mode == ssl.CERT_NONE and _ctx(plain) is not _ctx(AsyncBase("https://a.example"))
    own = ssl.create_default_context()
    assert tls_context(own, True) is own
    # a CA bundle named in the environment is a context of its own, and ignored without trust_env
    import certifi

    monkeypatch.setenv("SSL_CERT_FILE", certifi.where())
    assert tls_context(True, True) is not tls_context(True, False)
    assert tls_context(True, False) is tls_context(True, False)
