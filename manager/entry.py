"""The ASGI entry of a replica, in front of the Starlette app.

Proxied requests skip Starlette's middleware and routing (the hot path is one dict
lookup); everything else, lifespan included, goes to the Starlette app. Every HTTP
answer, proxied or not, is stamped here with the replica that served it.

The console has an origin of its own: the same process listens on admin.console_port too,
and a request is told apart by the port it arrived on (the ASGI scope's server address).
That port serves the console (and /metrics, which its charts read) and nothing a node sends;
the proxy port never serves /ui. A node's page, however hostile, is never same-origin with
the console, so the browser keeps it from the console's cookie-bearing API.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request, cookie_parser
from starlette.responses import RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from manager.edge import errors_http, protocol
from manager.edge.client_auth import ClientKeys, deny
from manager.edge.responses import REPLICA_HEADER, json_response
from manager.proxy.forwarding import CONSOLE_COOKIE, HeaderRules
from manager.proxy.http_proxy import Proxy, RawEdge, Reply
from manager.session.resolve import node_cookie
from shared.config import Config

DirectHandler = Callable[[Scope, Receive, Send, Reply], Awaitable[None]]
SECRET_PARAMS = frozenset({"token", "access_token", "api_key"})
CONSOLE_PORT_EXTRAS = frozenset({"/metrics", "/alive"})  # the console's charts read /metrics
_UNSEEN = object()


class HeaderLimit:
    """Refuses requests whose headers exceed the configured size with a JSON 431."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            size = sum(len(k) + len(v) for k, v in scope["headers"])
            if size > self.limit:
                if scope["type"] == "http":
                    resp = json_response({"detail": f"request headers too large ({size} > {self.limit} bytes)"},
                                         status=431)
                    await resp(scope, receive, send)
                else:
                    await send({"type": "websocket.close", "code": 1009})
                return
        await self.app(scope, receive, send)


def _proxied_methods(cfg: Config) -> dict[str, frozenset[str]]:
    out: dict[str, frozenset[str]] = {}
    for method, paths in (("POST", cfg.redirect_to_node_path.post), ("GET", cfg.redirect_to_node_path.get),
                          ("HEAD", cfg.redirect_to_node_path.get)):  # HEAD goes wherever GET does
        for path in paths:
            out[path] = out.get(path, frozenset()) | {method}
    return out


class ManagerApp:
    def __init__(self, app: Starlette, cfg: Config) -> None:
        self.app = app
        self.state = app.state
        self.limit = cfg.proxy.max_header_bytes
        self.proxied = _proxied_methods(cfg)
        self._replica = (REPLICA_HEADER.encode(), cfg.replica_id.encode())
        protocol.set_replica(cfg.replica_id)  # the edge's own answers (408, 431, 503) name it too
        self.client_keys = ClientKeys(cfg.api_keys, cfg.client_auth.header, cfg.client_auth.cookie)
        self.console_port = cfg.admin.console_port
        self.rules = HeaderRules(cfg)
        self.url_secrets = SECRET_PARAMS | {n.lower() for n in (cfg.client_auth.cookie, CONSOLE_COOKIE) if n}
        self._cookie_ids: dict[bytes, str | None] = {}
        self.raw_heads: dict[bytes, protocol.RawHead] = {}  # the edge's memory of heads (its raw path)
        self._the_proxy: Proxy | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and not await self._on_its_port(scope, receive, send):
            return
        if self.client_keys and scope["type"] in ("http", "websocket") and not self.client_keys.allowed(scope):
            await deny(scope, receive, send)
            return
        if scope["type"] != "http":
            if scope["type"] == "websocket" and self._secret_in_query(scope.get("query_string", b"")):
                await send({"type": "websocket.close", "code": 1008})  # before accept: the handshake gets 403
                return
            await self.app(scope, receive, send)
            return
        stamped = self._stamped(send)
        methods = self.proxied.get(scope["path"])
        if self._secret_in_query(scope.get("query_string", b"")):  # proxied routes too: never to a node
            await _refuse_secret_in_url(scope, receive, stamped)
        elif methods is not None and sum(len(k) + len(v) for k, v in scope["headers"]) <= self.limit:
            await self._proxy(scope, receive, stamped, methods)
        else:
            await self.app(scope, receive, stamped)

    def direct(self, scope: Scope) -> DirectHandler | None:
        """The edge's handler for a request that passes every check of __call__ as it stands (a
        proxied route and method on the proxy port, no credential in its query, an allowed client key), run
        without the ASGI stack above (manager/edge/protocol.py); None: __call__ decides. The head's
        size needs no check here: the edge refuses a head over the same limit before it parses it."""
        methods = self.proxied.get(scope["path"])
        if methods is None or scope["method"] not in methods:
            return None
        qs = scope.get("query_string")
        if qs and self._secret_in_query(qs):
            return None  # refused by __call__
        server = scope.get("server")
        if server and server[1] == self.console_port:
            return None
        if self.client_keys and not self.client_keys.allowed(scope):
            return None
        return self._direct

    def fast(self, scope: Scope, reply: Reply) -> bool:
        """A request direct() took, its body all here, sent to its node with no task (the proxy's
        start: everything it needs cached); False: the edge runs the direct handler instead."""
        return self.state.proxy.start(scope, self._cookie_id(scope["headers"]), reply)  # type: ignore[no-any-return]

    def raw(self, edge: RawEdge, head: protocol.RawHead, body: bytes) -> bool:
        """A request the edge parsed itself (a plain head, its whole body here: manager/edge/protocol.py)
        that passes direct()'s checks, sent to its node as fast() sends one; False, with nothing done:
        the edge parses it as any other. Called only on the proxy's port."""
        ok = head.app_ok
        if ok is None:  # the checks read only the head and the config: made once per known head
            ok = head.app_ok = self._raw_ok(head)
            head.node_id = self._cookie_id(head.headers)
        if not ok:
            return False
        proxy = self._the_proxy
        if proxy is None:
            proxy = self._the_proxy = self.state.proxy  # (set at start-up; State's lookup is Python's)
        return proxy.start_raw(head, body, edge)

    def _raw_ok(self, head: protocol.RawHead) -> bool:
        methods = self.proxied.get(head.path)
        if methods is None or head.method not in methods or (head.qs and self._secret_in_query(head.qs)):
            return False
        # a request without a valid key goes the cycle's way, where __call__ answers its 401
        return not (self.client_keys and not self.client_keys.allowed({"path": head.path, "headers": head.headers}))

    def _cookie_id(self, headers: list[tuple[bytes, bytes]]) -> str | None:
        """_node_cookie, remembered by the first Cookie header's bytes: a keep-alive client sends
        the same one with every request (a pure function of them; bounded like the address cache)."""
        for k, v in headers:
            if k == b"cookie":
                found = self._cookie_ids.get(v, _UNSEEN)
                if found is _UNSEEN:
                    if len(self._cookie_ids) >= 10_000:
                        self._cookie_ids.clear()
                    found = self._cookie_ids[v] = _node_cookie([(k, v)])
                return found  # type: ignore[return-value]
        return None

    async def _direct(self, scope: Scope, receive: Receive, send: Send, reply: Reply) -> None:
        try:
            answer = await self.state.proxy.forward(scope, _node_cookie(scope["headers"]), receive, reply.whole_body())
        except ClientDisconnect:
            return  # gone mid-body: the node's connection is already dropped, nobody to answer
        except Exception as exc:
            response = await errors_http.handle(Request(scope, receive), exc)
            await response(scope, receive, self._stamped(send))
            return
        if not await answer.reply_small(scope, reply):
            await answer(scope, receive, self._stamped(send))

    def _stamped(self, send: Send) -> Send:
        replica = self._replica

        async def stamped(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), replica]
            await send(message)

        return stamped

    def _secret_in_query(self, qs: bytes) -> bool:
        """A credential's name, or one of the manager's own tokens as any value, in the query."""
        if not qs:
            return False
        for k, v in parse_qsl(qs.decode("latin-1"), keep_blank_values=True):
            # values are decoded as UTF-8 (percent-escapes included): compared as such
            if k.lower() in self.url_secrets or (len(v) >= 8 and self.rules.is_own_token(v.encode("utf-8", "replace"))):
                return True
        return False

    async def _on_its_port(self, scope: Scope, receive: Receive, send: Send) -> bool:
        """False (and answered) when the request came to the wrong port for its path."""
        server = scope.get("server")
        on_console = bool(server and server[1] == self.console_port)
        path = scope["path"]
        console_path = path == "/ui" or path.startswith("/ui/")
        if on_console == console_path or (on_console and path in CONSOLE_PORT_EXTRAS):
            return True
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return False
        if on_console and path == "/":
            resp: Response = RedirectResponse("/ui/", status_code=307)
        elif on_console:
            resp = json_response({"detail": "this port serves only the operator console (/ui/)"}, status=404)
        else:
            resp = json_response({"detail": "the operator console is served on its own port "
                                            "(admin.console_port), not here"}, status=404)
        await resp(scope, receive, send)
        return False

    async def _proxy(self, scope: Scope, receive: Receive, send: Send, methods: frozenset[str]) -> None:
        request = Request(scope, receive)
        try:
            if scope["method"] not in methods:
                raise HTTPException(405, headers={"Allow": ", ".join(sorted(methods))})
            response: Response = await self.state.proxy.handle(request)
        except ClientDisconnect:
            return  # gone mid-body: the node's connection is already dropped, nobody to answer
        except Exception as exc:
            response = await errors_http.handle(request, exc)
        await response(scope, receive, send)




def _node_cookie(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The node_id cookie as Starlette's request.cookies finds it (the first Cookie header only)."""
    for k, v in headers:
        if k == b"cookie":
            if v.startswith(b"node_id=") and b";" not in v and b'"' not in v and b"\\" not in v:
                # XAgent's whole Cookie header, nothing cookie_parser would split or unquote: what it
                # would make of it, without it
                return node_cookie({"node_id": v[8:].decode("latin-1").strip()})
            return node_cookie(cookie_parser(v.decode("latin-1")))
    return None


async def _refuse_secret_in_url(scope: Scope, receive: Receive, send: Send) -> None:
    """URLs end up in logs, proxies and browser history: a credential there is refused, never read."""
    resp = json_response({"detail": "credentials are not accepted in the URL: send the token in the "
                                    "Authorization header (Bearer) or, for a WebSocket, as the "
                                    "Sec-WebSocket-Protocol bearer.<token>"}, status=400)
    await resp(scope, receive, send)
