"""Optional client API keys: when any is configured, every route but the open ones wants one.

The key comes in a header (``client_auth.header``) or, for clients that cannot set headers
(a browser's WebSocket), a cookie (``client_auth.cookie``); compared in constant time with each
configured key. /internal and /admin have tokens of their own. Neither the header nor the
cookie is passed on to a node (see Proxy): code in a node never learns a client's key.

Who a client is (for quotas and for binding a session to the key that made it) is one string,
never a key in clear: ``key:<hash of its API key>`` however the key came, else
``hdr:<hash of quota.client_header's value>``, else ``addr:<its address>`` (behind a balancer
listed in quota.trusted_proxies, the address X-Forwarded-For names).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
from http.cookies import SimpleCookie

from starlette.types import Receive, Scope, Send

from shared.config import QuotaConfig
from shared.errors import InvalidNode

OPEN_PATHS = frozenset({"/alive", "/ready", "/metrics"})
# routes with tokens of their own (/ui: the console's login); each is the path itself or below it,
# never a mere prefix: a proxied node path such as /uix or /administer still wants the API key
OWN_TOKEN_ROOTS = ("/internal", "/admin", "/ui")
_OWN_TOKEN_PREFIXES = tuple(root + "/" for root in OWN_TOKEN_ROOTS)
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
                except Exception:
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

    def owner(self, scope: Scope) -> str:
        """The identity a session made by this request is bound to ("" without keys)."""
        return f"key:{self.identity(scope)}" if self.keys else ""

    def check_bound(self, client: str, scope: Scope, node_id: str) -> None:
        """A session made with one API key answers to no other: the same 403 as an unknown session."""
        if self.keys and client.startswith("key:") and not hmac.compare_digest(client, self.owner(scope)):
            raise InvalidNode(node_id)

    def allowed(self, scope: Scope) -> bool:
        path = scope.get("path", "")
        if path in OPEN_PATHS or path in OWN_TOKEN_ROOTS or path.startswith(_OWN_TOKEN_PREFIXES):
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


class ClientIds:
    """Who a request's client is, for quotas: one per app, from the config."""

    def __init__(self, keys: ClientKeys, quota: QuotaConfig) -> None:
        self.keys = keys
        self.header = quota.client_header.lower().encode()
        self.trusted = [ipaddress.ip_network(c, strict=False) for c in quota.trusted_proxies]

    def of(self, scope: Scope) -> str:
        """key:<hash>, hdr:<hash> or addr:<address> (see the module's docstring)."""
        if self.keys:
            return self.keys.owner(scope)
        if self.header:
            for k, v in scope["headers"]:
                if k == self.header and v:
                    return "hdr:" + hashlib.sha256(bytes(v)).hexdigest()[:32]
        return "addr:" + self.address(scope)

    def _is_trusted(self, addr: str) -> bool:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        return any(ip in net for net in self.trusted)

    def address(self, scope: Scope) -> str:
        """The client's address: the peer's, or, when the peer is a trusted proxy, the last address
        in X-Forwarded-For that is not one (a client can prepend anything, never append)."""
        peer = str((scope.get("client") or ("",))[0])
        if not self.trusted or not self._is_trusted(peer):
            return peer
        hops: list[str] = []
        for k, v in scope["headers"]:
            if k == b"x-forwarded-for":
                hops += [h.strip() for h in v.decode("latin-1").split(",") if h.strip()]
        for hop in reversed(hops):
            if not self._is_trusted(hop):
                return hop[:64]
        return peer


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
