"""One verifying TLS context for every httpx client of a test process, built once.

httpx builds a new SSLContext for each Client, and the module-level ``httpx.get`` and ``httpx.post``
make one Client a call: loading the CA bundle costs 25-55 ms of CPU each time on this 2-core
machine, and the tests make thousands of such calls (a replica's start is polled every 50 ms),
nearly all of them plain HTTP to 127.0.0.1. A context is safe to share between clients; one built
with other arguments (``verify=False``, a context of the test's own, a client certificate) is
built as httpx builds it.
"""

from __future__ import annotations

import ssl
from typing import Any

from httpx._transports import default as _transports

from toolserver_manager.transport import tls_context

_build = _transports.create_ssl_context


def _shared(verify: Any = True, cert: Any = None, trust_env: bool = True) -> ssl.SSLContext:
    if verify is True and cert is None:
        return tls_context(True, trust_env)  # the client library's one context per CA setting
    return _build(verify=verify, cert=cert, trust_env=trust_env)


def install() -> None:
    """Every httpx client made after this shares the one default context (idempotent)."""
    _transports.create_ssl_context = _shared  # type: ignore[assignment]
