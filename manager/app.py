"""The app factory: routes, one error handler for the hierarchy, and the lifespan that
owns every long-lived client and background task of a replica."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qsl

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from checker.service import Checker
from manager import admin, events_ws, routes, ws_proxy
from manager.activity import ActivityRecorder, AddressCache
from manager.events_hub import EventHub
from manager.openapi import openapi_endpoint
from manager.proxy import Proxy
from manager.registry import heartbeat_loop
from manager.routes import json_response
from manager.runtime import Runtime
from shared import __version__
from shared.config import Config
from shared.engines import open_backend
from shared.errors import ManagerError
from shared.models import ReplicaInfo
from shared.store import Store

log = logging.getLogger(__name__)


async def on_manager_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ManagerError)
    return json_response({"detail": exc.detail}, status=exc.status_code)


async def on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    detail = exc.detail
    if exc.status_code == 404:
        detail = f"no route for {request.method} {request.url.path}"
    elif exc.status_code == 405:
        detail = f"method {request.method} not allowed on {request.url.path}"
    return json_response({"detail": detail}, status=exc.status_code, headers=exc.headers)


async def on_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled_error path=%s", request.url.path)
    return json_response({"detail": f"internal error: {type(exc).__name__}"}, status=500)


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


class ManagerApp:
    """The ASGI entry: proxied requests skip Starlette's middleware and routing (the hot path
    is one dict lookup); everything else, lifespan included, goes to the Starlette app."""

    def __init__(self, app: Starlette, cfg: Config) -> None:
        self.app = app
        self.state = app.state
        self.limit = cfg.proxy.max_header_bytes
        self.proxied: dict[str, frozenset[str]] = {}
        for method, paths in (("POST", cfg.redirect_to_node_path.post), ("GET", cfg.redirect_to_node_path.get)):
            for path in paths:
                self.proxied[path] = self.proxied.get(path, frozenset()) | {method}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            methods = self.proxied.get(scope["path"])
            if methods is not None and scope["method"] in methods \
                    and sum(len(k) + len(v) for k, v in scope["headers"]) <= self.limit:
                await self._proxy(scope, receive, send)
                return
        if scope["type"] in ("http", "websocket") and _secret_in_query(scope.get("query_string", b"")):
            await _refuse_secret_in_url(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _proxy(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        try:
            response = await self.state.proxy.handle(request)
        except ManagerError as exc:
            response = json_response({"detail": exc.detail}, status=exc.status_code)
        except ClientDisconnect:
            return  # gone mid-body: the node's connection is already dropped, nobody to answer
        except Exception:  # noqa: BLE001 - answer as the Starlette app would, never a bare 500
            log.exception("unhandled_error path=%s", scope["path"])
            response = json_response({"detail": "internal error"}, status=500)
        await response(scope, receive, send)


SECRET_PARAMS = frozenset({"token", "access_token", "api_key"})


def _secret_in_query(qs: bytes) -> bool:
    return bool(qs) and any(k.lower() in SECRET_PARAMS for k, _ in parse_qsl(qs.decode("latin-1"),
                                                                            keep_blank_values=True))


async def _refuse_secret_in_url(scope: Scope, receive: Receive, send: Send) -> None:
    """URLs end up in logs, proxies and browser history: a credential there is refused, never read."""
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})  # before accept: the handshake gets 403
        return
    resp = json_response({"detail": "credentials are not accepted in the URL: send the token in the "
                                    "Authorization header (Bearer) or, for a WebSocket, as the "
                                    "Sec-WebSocket-Protocol bearer.<token>"}, status=400)
    await resp(scope, receive, send)


def build_routes(cfg: Config) -> list[BaseRoute]:
    r: list[BaseRoute] = [
        Route("/alive", routes.alive, methods=["GET"]),
        Route("/ready", routes.ready, methods=["GET"]),
        Route("/metrics", routes.metrics_endpoint, methods=["GET"]),
        Route("/openapi.json", openapi_endpoint, methods=["GET"]),
        Route("/get_cookie", routes.get_cookie, methods=["POST"]),
        Route("/reconnect_session", routes.reconnect_session, methods=["POST"]),
        Route("/close_session", routes.close_session, methods=["POST"]),
        Route("/release_session", routes.release_session, methods=["POST"]),
        Route("/internal/nodes", routes.internal_create, methods=["POST"]),
        Route("/internal/nodes/{node_id}/{op}", routes.internal_node_op, methods=["POST"]),
        Route("/internal/nodes/{node_id}", routes.internal_node_detail, methods=["GET"]),
        Route("/internal/engine", routes.internal_engine, methods=["GET"]),
        WebSocketRoute("/ws/events", events_ws.events_socket),
        *admin.admin_routes(),
    ]
    methods: dict[str, list[str]] = {}
    for path in cfg.redirect_to_node_path.post:
        methods.setdefault(path, []).append("POST")
    for path in cfg.redirect_to_node_path.get:
        methods.setdefault(path, []).append("GET")
    r += [Route(path, routes.proxied, methods=m, name=f"proxy:{path}") for path, m in methods.items()]
    r += [WebSocketRoute(path, ws_proxy.proxy_socket) for path in cfg.proxy.websocket_paths]
    return r


def create_app(cfg: Config) -> ManagerApp:
    """A manager replica as an ASGI app; run it with uvicorn."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        store = Store.open(cfg)
        backend = open_backend(cfg)
        try:
            isolation = await backend.prepare(cfg.manager_id)
        except ManagerError as exc:  # a bad setting: stop here, naming it
            log.error("startup_failed error=%r", exc.detail)
            await backend.close()
            await store.close()
            raise
        limits = httpx.Limits(max_connections=cfg.proxy.max_connections,
                              max_keepalive_connections=cfg.proxy.max_connections, keepalive_expiry=30)
        http = httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(cfg.proxy.timeout_seconds,
                                                                       connect=cfg.proxy.connect_timeout_seconds),
                                 follow_redirects=False, trust_env=False)
        replica = ReplicaInfo(replica_id=cfg.replica_id, manager_id=cfg.manager_id, url=cfg.advertise_url,
                              version=__version__, started_at=time.time())
        rt = Runtime(cfg=cfg, store=store, backend=backend, http=http,
                     cache=AddressCache(cfg.proxy.address_cache_seconds),
                     activity=ActivityRecorder(store, cfg.proxy.activity_flush_seconds), replica=replica)
        rt.isolation = isolation
        app.state.rt = rt
        app.state.proxy = Proxy(rt)
        hub = app.state.hub = EventHub(store, rt.cache)
        checker = (Checker(rt)
                   if cfg.builtin_monitor else None)
        app.state.checker = checker
        tasks = [asyncio.create_task(coro, name=name) for name, coro in (
            ("heartbeat", heartbeat_loop(rt)),
            ("activity", rt.activity.run()),
            ("events", hub.run()),
        )]
        if checker is not None:
            tasks.append(asyncio.create_task(checker.run(), name="checker"))
        log.info("replica_started replica_id=%s manager_id=%s url=%s", cfg.replica_id, cfg.manager_id,
                 cfg.advertise_url)
        try:
            yield
        finally:
            await begin_shutdown(app)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await rt.activity.flush()
            app.state.proxy.close()
            await http.aclose()
            await backend.close()
            await store.close()
            log.info("replica_stopped replica_id=%s", cfg.replica_id)

    app = Starlette(routes=build_routes(cfg), lifespan=lifespan, exception_handlers={
        ManagerError: on_manager_error, HTTPException: on_http_error, Exception: on_unexpected})
    app.state.cfg = cfg
    routes.set_replica_id(cfg.replica_id)
    app.state.shutting_down = False
    app.add_middleware(HeaderLimit, limit=cfg.proxy.max_header_bytes)
    return ManagerApp(app, cfg)


async def begin_shutdown(app: Starlette) -> None:
    """First stage of a graceful stop: leave the registry and hand the lease over at once."""
    if app.state.shutting_down:
        return
    app.state.shutting_down = True
    rt: Runtime | None = getattr(app.state, "rt", None)
    if rt is None:
        return
    async with rt.registry_lock:
        rt.stopping = True
        with contextlib.suppress(ManagerError):
            await rt.store.deregister(rt.replica.replica_id)
    checker: Any = app.state.checker
    if checker is not None:
        await checker.stop()
