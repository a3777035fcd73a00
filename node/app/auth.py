"""The node's secret: every HTTP request and WebSocket handshake must carry it, or gets 401.

The manager generates one secret per node, hands it over as ``NODE_SECRET`` at start and adds it
as the ``X-Node-Secret`` header to everything it forwards; the node's own code (tools, shells) never
sees it in its environment (procs.child_env drops NODE_*). A node started without a secret refuses
every request: an unconfigured node must not run open.
"""

import hmac
import json

HEADER = b"x-node-secret"
_DENIED = json.dumps({"detail": "missing or wrong node secret"}).encode()


class RequireSecret:
    """Pure ASGI middleware: compares the header in constant time before any route runs."""

    def __init__(self, app, secret: str):
        self.app = app
        self.secret = secret.encode()

    def _allowed(self, scope) -> bool:
        if not self.secret:
            return False
        given = b""
        for k, v in scope["headers"]:
            if k == HEADER:
                given = v
                break
        return hmac.compare_digest(given, self.secret)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or self._allowed(scope):
            return await self.app(scope, receive, send)
        start = {"status": 401, "headers": [(b"content-type", b"application/json"),
                                            (b"content-length", str(len(_DENIED)).encode()),
                                            (b"www-authenticate", b"X-Node-Secret")]}
        if scope["type"] == "http":
            await send({"type": "http.response.start", **start})
            await send({"type": "http.response.body", "body": _DENIED})
        elif "websocket.http.response" in scope.get("extensions") or {}:
            await send({"type": "websocket.http.response.start", **start})
            await send({"type": "websocket.http.response.body", "body": _DENIED})
        else:  # a server without the denial-response extension answers 403 to this
            await send({"type": "websocket.close", "code": 1008})
