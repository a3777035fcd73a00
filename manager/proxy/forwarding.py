"""What crosses the proxy in each direction besides the body: the headers a node is sent,
and the headers a client is sent back from a node.

A node is as hostile as a client (a session runs code in it), so:
- to the node: no credential of the manager's own goes along: not the client's API key (header
  or cookie), not the console's cookie, not an ``Authorization`` carrying the admin token, the
  internal token or an API key; query-string credentials are refused before this (manager/entry.py);
- from the node: no cookie of the manager's own names (``node_id``, the console's, the API-key
  cookie) can be set, and the page is sandboxed (``Content-Security-Policy: sandbox`` by default,
  ``nosniff``) so whatever HTML or script a node serves runs in an opaque origin.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from uvicorn.protocols.http.httptools_impl import HEADER_RE, HEADER_VALUE_RE

from shared.config import Config

CONSOLE_COOKIE = "tsm_console"
SESSION_COOKIE = "node_id"
_SET_COOKIE = b"set-cookie"
_COOKIE = b"cookie"
_AUTH = b"authorization"
_CSP = b"content-security-policy"
_NOSNIFF = (b"x-content-type-options", b"nosniff")


class HeaderRules:
    """Built once per app from the config: the manager's own cookie names and tokens."""

    def __init__(self, cfg: Config) -> None:
        names = {CONSOLE_COOKIE, SESSION_COOKIE}
        if cfg.client_auth.cookie:
            names.add(cfg.client_auth.cookie)
        self.own_cookies = frozenset(n.encode() for n in names)
        # cookies a client may send that a node must never see (node_id goes along: XAgent's does)
        self.private_cookies = self.own_cookies - {SESSION_COOKIE.encode()}
        self.tokens = [t.encode() for t in (cfg.admin_token, cfg.internal_token, *cfg.api_keys) if t]
        csp = cfg.proxy.response_csp.strip()
        self.added = [(_CSP, csp.encode()), _NOSNIFF] if csp else [_NOSNIFF]
        # what uvicorn checks of every header it sends (its _Direct.send_now too), once for these
        self.added_valid = not any(HEADER_RE.search(k) or HEADER_VALUE_RE.search(v) for k, v in self.added)
        self._lone_cookies: dict[bytes, bool] = {}  # a lone cookie's bytes -> whether it goes on

    def is_own_token(self, value: bytes) -> bool:
        """value (or its credential after a scheme such as Bearer) is one of the manager's tokens."""
        cred = value.split(None, 1)[-1].strip() if b" " in value.strip() else value.strip()
        hit = False
        for t in self.tokens:  # every token compared: timing says nothing about which matched
            hit |= hmac.compare_digest(cred, t) | hmac.compare_digest(value.strip(), t)
        return hit

    def to_node(self, headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """A request's headers as a node may see them (hop-by-hop already removed)."""
        out = []
        for k, v in headers:
            if k == _AUTH and self.is_own_token(v):
                continue
            if k == _COOKIE:
                if b";" not in v:  # one cookie (XAgent's node_id): the same test without the list
                    keep = self._lone_cookies.get(v)
                    if keep is None:
                        if len(self._lone_cookies) >= 10_000:
                            self._lone_cookies.clear()
                        keep = self._lone_cookies[v] = v.split(b"=", 1)[0].strip() not in self.private_cookies
                    if keep:
                        out.append((k, v))
                    continue
                kept = [c for c in v.split(b";") if c.strip().split(b"=", 1)[0].strip() not in self.private_cookies]
                if not kept:
                    continue
                if len(kept) != v.count(b";") + 1:
                    v = b";".join(kept).strip()
            out.append((k, v))
        return out

    def from_node(self, headers: Iterable[tuple[bytes, bytes]],
                  drop: frozenset[bytes] = frozenset()) -> list[tuple[bytes, bytes]]:
        """A node's response headers as a client may see them, without those named in drop (the
        proxy's hop-by-hop ones: one pass over them)."""
        nosniff = _NOSNIFF[0]
        out = [(k, v) for k, v in headers
               if k not in drop and k != nosniff and not (k == _SET_COOKIE and _cookie_name(v) in self.own_cookies)]
        out.extend(self.added)
        return out


def _cookie_name(set_cookie: bytes) -> bytes:
    return set_cookie.split(b";", 1)[0].split(b"=", 1)[0].strip()
