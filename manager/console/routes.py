"""The operator console under /ui/ on a port of its own (admin.console_port; manager/entry.py
serves /ui only there): a page, its two npm libraries, and the admin API, the events stream and
a node's /ws/shell behind a login cookie. Its own origin keeps every page a node serves through
the proxy port out of reach: such a page is another origin, and a sandboxed one.

The admin token is typed once into the login form and POSTed; the answer is a cookie that
holds no token but an expiry signed with it (HMAC), HttpOnly (page scripts cannot read it),
SameSite=Strict, Path=/ui. Any replica checks it (they share the token), changing the token
ends every login, a logout ends that one login on every replica. SameSite does not cover another port of the same host (a published node
port is same-site), so every state-changing request and every WebSocket upgrade must also
come with an Origin naming this host (or one of admin.console_origins). Off (404) like /admin
when no token is configured.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from pathlib import Path
from urllib.parse import urlsplit

import msgspec
from starlette.requests import HTTPConnection, Request
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route, Router, WebSocketRoute
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from manager.admin import api as admin
from manager.admin import egress as admin_egress
from manager.edge.responses import json_response
from manager.events import ws as events_ws
from manager.forks import routes as fork_routes
from manager.proxy import ws_proxy
from manager.proxy.forwarding import CONSOLE_COOKIE
from manager.replica.runtime import Runtime
from shared.errors import BadRequest, Forbidden, ManagerError, NotFound, Unauthorized

log = logging.getLogger(__name__)

COOKIE = CONSOLE_COOKIE
STATIC_DIR = Path(__file__).parent / "static"
STATIC_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
                ".html": "text/html; charset=utf-8"}
# what the page loads from admin.console_assets_dir (scripts/console-assets.sh installs it)
VENDOR = {
    "xterm.mjs": ("node_modules/@xterm/xterm/lib/xterm.mjs", "text/javascript; charset=utf-8"),
    "xterm.css": ("node_modules/@xterm/xterm/css/xterm.css", "text/css; charset=utf-8"),
    "uplot.js": ("node_modules/uplot/dist/uPlot.iife.min.js", "text/javascript; charset=utf-8"),
    "uplot.css": ("node_modules/uplot/dist/uPlot.min.css", "text/css; charset=utf-8"),
}
# scripts only from here; inline style allowed because xterm.js themes itself with a <style>
CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; connect-src 'self'; "
       "img-src 'self' data:; font-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
PAGE_HEADERS = {"content-security-policy": CSP, "x-content-type-options": "nosniff",
                "referrer-policy": "no-referrer", "cache-control": "no-store", "x-frame-options": "DENY"}
SHELL_PATH = "/ws/shell"
MAX_LOGIN_BODY = 4096


# --- the login cookie ----------------------------------------------------------------------------
def _signature(token: str, expires: int, login_id: str) -> str:
    return hmac.new(token.encode(), f"tsm-console.v2.{expires}.{login_id}".encode(), hashlib.sha256).hexdigest()


def issue_cookie(token: str, minutes: int, now: float | None = None) -> tuple[str, int]:
    """(cookie value, expiry): the expiry and a random login id, HMAC'd under the admin token;
    no token in it. The id is what a logout revokes."""
    expires = int((now or time.time()) + minutes * 60)
    login_id = secrets.token_hex(16)
    return f"{expires}.{login_id}.{_signature(token, expires, login_id)}", expires


def parse_cookie(token: str, value: str | None, now: float | None = None) -> tuple[int, str] | None:
    """(expiry, login id) of a cookie issued with this token and not expired, else None."""
    if not value or not token:
        return None
    exp, _, rest = value.partition(".")
    login_id, _, sig = rest.partition(".")
    if not exp.isdigit() or int(exp) <= (now or time.time()) or len(login_id) != 32:
        return None
    if not hmac.compare_digest(sig.encode(), _signature(token, int(exp), login_id).encode()):
        return None
    return int(exp), login_id


def cookie_valid(token: str, value: str | None, now: float | None = None) -> bool:
    """The cookie was issued with this token and has not expired (revocation aside)."""
    return parse_cookie(token, value, now) is not None


def origin_allowed(conn: HTTPConnection, extra: list[str]) -> bool:
    """Origin present and naming the host this request was sent to (or a configured origin)."""
    origin = conn.headers.get("origin")
    if not origin or origin == "null":
        return False
    if origin.rstrip("/") in {o.rstrip("/") for o in extra}:
        return True
    host = conn.headers.get("host", "")
    return bool(host) and urlsplit(origin).netloc.lower() == host.lower()


# --- guards ----------------------------------------------------------------------------------------
def _enabled(conn: HTTPConnection) -> Runtime:
    rt: Runtime = conn.app.state.rt
    if not rt.cfg.admin_token or not rt.cfg.admin.console:
        raise NotFound("the console is disabled: no admin.token configured")
    return rt


def _check_origin(rt: Runtime, conn: HTTPConnection, required: bool) -> None:
    """Refuse a request from another origin; required: a missing Origin counts as another."""
    if (required or "origin" in conn.headers) and not origin_allowed(conn, rt.cfg.admin.console_origins):
        raise Forbidden("cross-origin request refused: the console acts only for pages it served itself")


async def _logged_in(rt: Runtime, conn: HTTPConnection) -> tuple[int, str]:
    """(expiry, login id) of a valid, unrevoked login cookie; else Unauthorized."""
    got = parse_cookie(rt.cfg.admin_token, conn.cookies.get(COOKIE))
    if got is None:
        raise Unauthorized("not logged in to the console (or the login expired)")
    if await rt.store.console_login_revoked(got[1]):  # a logout on any replica
        raise Unauthorized("this console login was ended by a logout")
    return got


def _page_file(path: Path, media_type: str, cache: str = "no-store") -> Response:
    if not path.is_file():
        raise NotFound(f"{path.name} is missing: run scripts/setup.sh (it installs the console's assets)")
    return FileResponse(path, media_type=media_type, headers={**PAGE_HEADERS, "cache-control": cache})


# --- pages and assets ---------------------------------------------------------------------------
async def root(request: Request) -> Response:
    _enabled(request)
    return RedirectResponse("/ui/", status_code=307)


async def index(request: Request) -> Response:
    _enabled(request)
    return _page_file(STATIC_DIR / "index.html", STATIC_TYPES[".html"])


async def static(request: Request) -> Response:
    _enabled(request)
    name = request.path_params["name"]
    path = STATIC_DIR / name
    # names only (no separators), of the kinds the page is made of
    if "/" in name or name.startswith(".") or path.suffix not in STATIC_TYPES or not path.is_file():
        raise NotFound(f"no console file {name[:80]!r}")
    return _page_file(path, STATIC_TYPES[path.suffix])


async def vendor(request: Request) -> Response:
    rt = _enabled(request)
    entry = VENDOR.get(request.path_params["name"])
    if entry is None:
        raise NotFound(f"no console library {request.path_params['name'][:80]!r}")
    # pinned library versions: a browser may keep them a day
    return _page_file(Path(rt.cfg.admin.console_assets_dir) / entry[0], entry[1], "public, max-age=86400")


# --- login ------------------------------------------------------------------------------------------
class LoginBody(msgspec.Struct, forbid_unknown_fields=True):
    token: str


async def login(request: Request) -> Response:
    rt = _enabled(request)
    _check_origin(rt, request, required=True)
    raw = await request.body()
    if len(raw) > MAX_LOGIN_BODY:
        raise BadRequest("login body too large")
    try:
        body = msgspec.json.decode(raw, type=LoginBody)
    except msgspec.DecodeError as exc:
        raise BadRequest(f"invalid body: {exc}") from exc
    try:
        admin.verify(request, body.token)
    except Unauthorized:
        raise Forbidden("invalid admin token") from None
    value, expires = issue_cookie(rt.cfg.admin_token, rt.cfg.admin.console_session_minutes)
    resp = json_response({"ok": True, "expires_at": expires})
    resp.set_cookie(COOKIE, value, max_age=rt.cfg.admin.console_session_minutes * 60, path="/ui",
                    httponly=True, samesite="strict", secure=_https(request))
    return resp


def _https(request: Request) -> bool:
    return request.url.scheme == "https" or request.headers.get("x-forwarded-proto", "") == "https"


async def logout(request: Request) -> Response:
    """Ends this login on every replica (its id revoked in Redis until it would have expired)."""
    rt = _enabled(request)
    _check_origin(rt, request, required=True)
    got = parse_cookie(rt.cfg.admin_token, request.cookies.get(COOKIE))
    if got is not None:
        await rt.store.revoke_console_login(got[1], got[0] - int(time.time()) + 1)
    resp = json_response({"ok": True})
    resp.delete_cookie(COOKIE, path="/ui", httponly=True, samesite="strict")
    return resp


async def whoami(request: Request) -> Response:
    rt = _enabled(request)
    _check_origin(rt, request, required=False)
    exp, _ = await _logged_in(rt, request)
    return json_response({"ok": True, "expires_at": exp, "replica_id": rt.replica.replica_id,
                          "manager_id": rt.manager_id, "version": rt.cfg.version,
                          "actions": list(admin.NODE_ACTIONS)})


# --- the admin API behind the cookie -----------------------------------------------------------------
class AdminBridge:
    """/ui/api/<path> -> /admin/<path>: the cookie and Origin checked here, the token added
    in-process (it never travels back to the browser), every admin route reused as it is."""

    def __init__(self) -> None:
        # egress: the page reads a session's policy (GET only: /ui/api takes no PUT, so neither a
        # policy nor a secret is set from the page)
        self.router = Router(routes=[*fork_routes.admin_fork_routes(), *admin.admin_routes(),
                                     *admin_egress.egress_routes()])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        rt = _enabled(request)
        _check_origin(rt, request, required=scope["method"] not in ("GET", "HEAD"))
        await _logged_in(rt, request)
        path = "/admin/" + scope["path_params"]["rest"]
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"authorization", b"cookie")]
        headers.append((b"authorization", b"Bearer " + rt.cfg.admin_token.encode()))
        inner = {**scope, "path": path, "raw_path": path.encode(), "headers": headers, "path_params": {}}
        await self.router(inner, receive, send)


# --- WebSockets ----------------------------------------------------------------------------------------
async def _admit(ws: WebSocket) -> Runtime | None:
    """The runtime when the socket may open; else it is refused (403 to the handshake)."""
    try:
        rt = _enabled(ws)
        _check_origin(rt, ws, required=True)
        await _logged_in(rt, ws)
    except ManagerError as exc:
        log.info("console_socket_refused path=%s reason=%s", ws.url.path, exc.detail)
        await ws.close(code=1008)
        return None
    return rt


async def events_socket(ws: WebSocket) -> None:
    """Every event (or one node's, ?node_id=), as /ws/events serves the admin."""
    if await _admit(ws) is None:
        return
    await ws.accept()
    node_id = ws.query_params.get("node_id") or None
    mid = ws.query_params.get("manager_id") or None
    await events_ws.stream_events(ws, node_id, mid, {"scope": "console", "node_id": node_id, "manager_id": mid},
                                  watch=False)


async def shell_socket(ws: WebSocket) -> None:
    """A node's /ws/shell through the manager; no console cookie or header reaches the node."""
    if await _admit(ws) is None:
        return
    try:
        rec = await ws.app.state.resolver.live(ws.path_params["node_id"])
    except ManagerError as exc:
        await ws.close(code=1008, reason=exc.detail[:120])
        return
    await ws_proxy.proxy_to_node(ws, rec, SHELL_PATH, [("user-agent", "toolserver-manager console")], [])


def console_routes() -> list[BaseRoute]:
    return [
        Route("/ui", root, methods=["GET"]),
        Route("/ui/", index, methods=["GET"]),
        Route("/ui/static/{name}", static, methods=["GET"]),
        Route("/ui/vendor/{name}", vendor, methods=["GET"]),
        Route("/ui/login", login, methods=["POST"]),
        Route("/ui/logout", logout, methods=["POST"]),
        Route("/ui/whoami", whoami, methods=["GET"]),
        Route("/ui/api/{rest:path}", AdminBridge(), methods=["GET", "POST", "DELETE"]),
        WebSocketRoute("/ui/ws/events", events_socket),
        WebSocketRoute("/ui/ws/shell/{node_id}", shell_socket),
    ]
