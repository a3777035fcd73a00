"""Optional client API keys: when any is configured, every route but the open ones wants one.

The key comes in a header (``client_auth.header``) or, for clients that cannot set headers
(a browser's WebSocket), a cookie (``client_auth.cookie``); compared in constant time with each
configured key. /internal and /admin have tokens of their own. Neither the header nor the
cookie is passed on to a node (see Proxy): code in a node never learns a client's key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from http.cookies import SimpleCookie

from starlette.types import Receive, Scope, Send

OPEN_PATHS = frozenset({"/alive", "/ready", "/metrics"})
OWN_TOKEN_PREFIXES = ("/internal/", "/admin/", "/admin", "/ui")  # /ui: the console's own login
_DENIED = json.dumps({"detail": "missing or invalid API key"}).encode()


class ClientKeys:
    def __init__(self, keys: list[str], header: str, cookie: str) -> None:
        self.keys = [k.encode() for k in keys if k]
        self.header = header.lower().encode()
        self.cookie = cookie

    def __bool__(self) -> bool:
        return bool(self.keys)

    def _given(self, scope: Scope) -> bytes:
        for k, v in scope["headers"]:
            if k == self.header:
                return bytes(v)
        for k, v in scope["headers"]:
            if k == b"cookie" and self.cookie:
                jar: SimpleCookie = SimpleCookie()
                try:
                    jar.load(v.decode("latin-1"))
                except Exception:  # noqa: BLE001 - a malformed cookie header carries no key
                    continue
                if self.cookie in jar:
                    return jar[self.cookie].value.encode("latin-1")
        return b""

    def identity(self, scope: Scope) -> str:
        """Who the request's key says the client is (a hash of the key; "" without keys), so state
        made with one key is never served to another."""
        if not self.keys:
            return ""
        return hashlib.sha256(self._given(scope)).hexdigest()[:32]

    def allowed(self, scope: Scope) -> bool:
        path = scope.get("path", "")
        if path in OPEN_PATHS or path.startswith(OWN_TOKEN_PREFIXES):
            return True
        given = self._given(scope)
        ok = False
        for key in self.keys:  # every key compared, so timing says nothing about which matched
            ok |= hmac.compare_digest(given, key)
        return ok

    def strip(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """The request's headers without the client's key (header, or cookie in the Cookie header)."""
        out = []
        for k, v in headers:
            if k == self.header:
                continue
            if k == b"cookie" and self.cookie and self.cookie.encode() in v:
                kept = [c for c in v.split(b";") if c.strip().split(b"=", 1)[0] != self.cookie.encode()]
                if not kept:
                    continue
                v = b";".join(kept).strip()
            out.append((k, v))
        return out


async def deny(scope: Scope, receive: Receive, send: Send) -> None:
    start = {"status": 401, "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(_DENIED)).encode())]}
    if scope["type"] == "http":
        await send({"type": "http.response.start", **start})
        await send({"type": "http.response.body", "body": _DENIED})
    elif "websocket.http.response" in (scope.get("extensions") or {}):
        await send({"type": "websocket.http.response.start", **start})
        await send({"type": "websocket.http.response.body", "body": _DENIED})
    else:
        await send({"type": "websocket.close", "code": 1008})
