"""Every route of the Starlette app (proxied paths are served in front of it, manager/entry.py)."""

from __future__ import annotations

from starlette.routing import BaseRoute, Route, WebSocketRoute

from manager.admin import api as admin
from manager.admin import egress as admin_egress
from manager.console import routes as console
from manager.events import ws as events_ws
from manager.forks import routes as forks_api
from manager.mcp import route as mcp_route
from manager.openapi import openapi_endpoint
from manager.proxy import ws_proxy
from manager.session import egress as session_egress
from manager.session import internal, routes
from shared.config import Config


def build_routes(cfg: Config) -> list[BaseRoute]:
    return [
        Route("/alive", routes.alive, methods=["GET"]),
        Route("/ready", routes.ready, methods=["GET"]),
        Route("/metrics", routes.metrics_endpoint, methods=["GET"]),
        Route("/openapi.json", openapi_endpoint, methods=["GET"]),
        Route("/get_cookie", routes.get_cookie, methods=["POST"]),
        Route("/reconnect_session", routes.reconnect_session, methods=["POST"]),
        Route("/close_session", routes.close_session, methods=["POST"]),
        Route("/release_session", routes.release_session, methods=["POST"]),
        *forks_api.fork_routes(),  # before the generic node routes their paths would match
        Route("/internal/nodes", internal.internal_create, methods=["POST"]),
        Route("/internal/nodes/{node_id}/{op}", internal.internal_node_op, methods=["POST"]),
        Route("/internal/nodes/{node_id}", internal.internal_node_detail, methods=["GET"]),
        Route("/internal/nodes/{node_id}/logs", internal.internal_node_logs, methods=["GET"]),
        Route("/internal/nodes/{node_id}/address", internal.internal_node_address, methods=["GET"]),
        Route("/internal/engine", internal.internal_engine, methods=["GET"]),
        WebSocketRoute("/ws/events", events_ws.events_socket),
        *([Route("/mcp", mcp_route.endpoint, methods=["GET", "POST", "DELETE"])] if cfg.mcp.enabled else []),
        *session_egress.egress_routes(),
        *admin_egress.egress_routes(),
        *admin.admin_routes(),
        *console.console_routes(),
        *[WebSocketRoute(path, ws_proxy.proxy_socket) for path in cfg.proxy.websocket_paths],
    ]
