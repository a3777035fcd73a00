"""The OpenAPI 3.1 description of every route, including the configured proxied paths."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from manager.edge.responses import json_response
from shared.config import Config

_DETAIL = {"type": "object", "properties": {"detail": {"type": "string"}}, "required": ["detail"]}
_STR = {"type": "string"}
COOKIE = {"name": "node_id", "in": "cookie", "required": False, "schema": {"type": "string"},
          "description": "The session's node id, set by /get_cookie."}
FORK_BODY = {"required": False, "content": {"application/json": {"schema": {
    "type": "object", "properties": {"count": {"type": "integer", "minimum": 1}}}}}}
FORK_RESULT = {"type": "object", "properties": {"source": _STR, "sessions": {"type": "array", "items": _STR},
                                                "stall_seconds": {"type": "number"}, "seconds": {"type": "number"}}}
SNAPSHOT_BODY = {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["name"], "properties": {"name": {"type": "string",
                                                                    "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"}}}}}}
SNAPSHOT = {"type": "object", "properties": {"name": _STR, "manager_id": _STR, "source": _STR, "client": _STR,
                                             "bytes": {"type": "integer"}, "created_at": {"type": "number"}}}
ADMIN_SECURITY: list[dict[str, list[str]]] = [{"adminToken": []}]
INTERNAL = {"name": "x-tsm-internal-token", "in": "header", "required": True, "schema": {"type": "string"}}


def _json(schema: dict[str, Any], desc: str) -> dict[str, Any]:
    return {"description": desc, "content": {"application/json": {"schema": schema}}}


def _err(*codes: int) -> dict[str, Any]:
    text = {400: "bad request", 401: "missing token", 403: "invalid token or node_id", 404: "not found",
            409: "conflict", 413: "body too large", 429: "quota exceeded", 431: "headers too large", 502: "the node answered badly",
            503: "unavailable", 504: "the node did not answer in time"}
    return {str(c): _json(_DETAIL, text[c]) for c in codes}


def _op(summary: str, responses: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"summary": summary, "responses": responses, **extra}


def build_spec(cfg: Config) -> dict[str, Any]:
    """Describe the manager's routes for this configuration."""
    session = {"parameters": [COOKIE]}
    paths: dict[str, Any] = {
        "/alive": {"get": _op("Liveness", {"200": _json({"const": "alive"}, "alive")})},
        "/ready": {"get": _op("Readiness: Redis and the engine reachable, the node image on the engine",
                              {"200": _json({"type": "object"}, "ready"), **_err(503)})},
        "/metrics": {"get": _op("Prometheus metrics", {"200": {"description": "text exposition",
                                                               "content": {"text/plain": {"schema": _STR}}}})},
        "/openapi.json": {"get": _op("This document", {"200": _json({"type": "object"}, "OpenAPI")})},
        "/get_cookie": {"post": _op(
            "Create a node for a new session; sets cookie node_id",
            {"200": _json({"type": "object", "properties": {"message": _STR, "version": _STR}}, "node ready"),
             **_err(400, 429, 503)})},
        "/reconnect_session": {"post": _op("Restart the session's node and wait until it answers",
                                           {"200": _json(_STR, "'Reconnect session: <id>' or 'invalid node_id: <id>'"),
                                            **_err(400, 503)}, **session)},
        "/close_session": {"post": _op("Stop the session's node (it can be restarted)",
                                       {"200": _json(_STR, "'Close session: <id>' or 'invalid node_id: <id>'"),
                                        **_err(400, 503)}, **session)},
        "/release_session": {"post": _op("Remove the session's node and its record",
                                         {"200": _json(_STR, "'Release session: <id>' or 'invalid node_id: <id>'"),
                                          **_err(400, 503)}, **session)},
        "/egress_policy": {
            "get": _op("The session's egress policy (egress.default until one is set)",
                       {"200": _json({"type": "object"}, "policy"), **_err(403, 404, 503)}, **session),
            "put": _op("Replace the session's egress policy (egress.client_may_set); 400 changes nothing",
                       {"200": _json({"type": "object"}, "policy"), **_err(400, 403, 404, 503)}, **session)},
        "/fork_session": {"post": _op(
            "Copy the session into count new sessions of the same client (its workspace at one instant)",
            {"200": _json(FORK_RESULT, "the new sessions' ids"), **_err(400, 404, 429, 502, 503)},
            requestBody=FORK_BODY, **session)},
        "/snapshot_session": {"post": _op(
            "Save the session's workspace as a named, immutable snapshot (POST /get_cookie with "
            "{\"snapshot\": name} starts a session from it)", {"200": _json(SNAPSHOT, "the snapshot"),
                                                                **_err(400, 404, 429, 503)},
            requestBody=SNAPSHOT_BODY, **session)},
        "/snapshots": {"get": _op("The calling client's snapshots", {"200": _json({"type": "object"}, "snapshots")})},
        "/snapshots/{name}": {"delete": _op("Delete one of the client's snapshots", {
            "200": _json({"type": "object"}, "deleted"), **_err(400, 404, 503)},
            parameters=[{"name": "name", "in": "path", "required": True, "schema": _STR}])},
        "/ws/events": {"get": _op("WebSocket (upgrade): the session's node lifecycle events; admin token for all",
                                  {"101": {"description": "switching protocols"}}, parameters=[
                                      COOKIE, {"name": "last_event_id", "in": "query", "schema": _STR},
                                      {"name": "manager_id", "in": "query", "schema": _STR},
                                      {"name": "token", "in": "query", "schema": _STR}])},
    }
    if cfg.mcp.enabled:
        rpc = {"type": "object", "properties": {"jsonrpc": {"const": "2.0"}}}
        mcp_errors = {str(c): _json(rpc, f"a JSON-RPC error ({what})") for c, what in (
            (400, "parse error, invalid request or params, header mismatch"), (401, "missing API key"),
            (403, "Origin not allowed"), (404, "unknown or ended session; unknown method (2026-07-28)"),
            (406, "Accept"), (413, "message too large"), (415, "Content-Type"), (503, "unavailable"))}
        mcp_doc = ("MCP Streamable HTTP, revisions 2025-11-25 (Mcp-Session-Id) and 2026-07-28 "
                   "(MCP-Protocol-Version, Mcp-Method, Mcp-Param-Session): see the README")
        paths["/mcp"] = {
            "post": _op("MCP: one JSON-RPC request or notification", {
                "200": {"description": "application/json or text/event-stream"},
                "202": {"description": "notification accepted"}, **mcp_errors}, description=mcp_doc,
                requestBody={"required": True, "content": {"application/json": {"schema": rpc}}}),
            "get": _op("MCP (2025-11-25): the session's SSE stream, or a dropped one resumed with Last-Event-ID",
                       {"200": {"description": "text/event-stream"}, "405": {"description": "2026-07-28"},
                        **mcp_errors}, description=mcp_doc),
            "delete": _op("MCP (2025-11-25): end the session and release its node",
                          {"204": {"description": "ended"}, "405": {"description": "2026-07-28"}, **mcp_errors},
                          description=mcp_doc)}
    proxied = {"200": {"description": "the node's response, passed through (including 404, 422, 450, 500)"},
               **_err(403, 503)}
    for method, plist in (("post", cfg.redirect_to_node_path.post), ("get", cfg.redirect_to_node_path.get)):
        for path in plist:
            body = {"requestBody": {"required": False, "content": {"*/*": {"schema": {}}}}} if method == "post" else {}
            paths.setdefault(path, {})[method] = _op(f"Proxied to the session's node: {method.upper()} {path}",
                                                     proxied, parameters=[COOKIE], **body)
    for path in cfg.proxy.websocket_paths:
        paths.setdefault(path, {})["get"] = _op(f"WebSocket (upgrade) proxied to the session's node: {path}",
                                                {"101": {"description": "switching protocols"}, **_err(403)},
                                                parameters=[COOKIE])
    admin: dict[str, Any] = {
        "/admin/nodes": {"get": _op("List nodes across the cluster", {"200": _json({"type": "object"}, "page"),
                                                                        **_err(400, 401, 403, 404)},
                                    parameters=[{"name": n, "in": "query", "schema": s} for n, s in (
                                        ("manager_id", _STR), ("status", _STR),
                                        ("min_idle_seconds", {"type": "integer", "minimum": 0}),
                                        ("limit", {"type": "integer", "minimum": 1, "maximum": 1000}),
                                        ("offset", {"type": "integer", "minimum": 0}))])},
        "/admin/nodes/release": {"post": _op("Release many nodes", {"200": _json({"type": "object"}, "results"),
                                                                      **_err(400, 401, 403, 404)},
                                             requestBody={"required": True, "content": {"application/json": {
                                                 "schema": {"type": "object", "required": ["node_ids"], "properties": {
                                                     "node_ids": {"type": "array", "items": _STR}}}}}})},
        "/admin/nodes/{node_id}": {
            "get": _op("Inspect one node: record, container, engine stats",
                       {"200": _json({"type": "object"}, "detail"), **_err(401, 403, 404)},
                       parameters=[{"name": "node_id", "in": "path", "required": True, "schema": _STR}]),
            "delete": _op("Release one node", {"200": _json({"type": "object"}, "released"),
                                               **_err(401, 403, 404, 503)},
                          parameters=[{"name": "node_id", "in": "path", "required": True, "schema": _STR}])},
        "/admin/nodes/{node_id}/logs": {"get": _op(
            "A node's output (stdout and stderr): the last tail lines, then with follow=1 live until it stops",
            {"200": {"description": "text/plain, streamed", "content": {"text/plain": {"schema": _STR}}},
             **_err(400, 401, 403, 404, 503)},
            parameters=[{"name": "node_id", "in": "path", "required": True, "schema": _STR},
                        {"name": "tail", "in": "query", "schema": {"type": "integer", "minimum": 0, "maximum": 10000}},
                        {"name": "follow", "in": "query", "schema": {"type": "string", "enum": ["0", "1"]}}])},
        "/admin/nodes/{node_id}/files": {"get": _op(
            "The workspace tree of a running node, as its file-system tool prints it",
            {"200": _json({"type": "object"}, "tree"), **_err(401, 403, 404, 502, 503, 504)},
            parameters=[{"name": "node_id", "in": "path", "required": True, "schema": _STR}])},
        "/admin/secrets": {"get": _op("Names and hosts of the egress secrets (never their values)",
                                      {"200": _json({"type": "object"}, "secrets"), **_err(401, 403, 404, 503)})},
        "/admin/secrets/{name}": {"put": _op(
            "Store an egress secret bound to hosts: sealed at once, never shown again; 400 stores nothing",
            {"200": _json({"type": "object"}, "name and hosts"), **_err(400, 401, 403, 404, 503)},
            parameters=[{"name": "name", "in": "path", "required": True, "schema": _STR}])},
        "/admin/nodes/{node_id}/egress": {
            "get": _op("A session's egress policy", {"200": _json({"type": "object"}, "policy"),
                                                       **_err(401, 403, 404, 503)},
                       parameters=[{"name": "node_id", "in": "path", "required": True, "schema": _STR}]),
            "put": _op("Replace a session's egress policy (applied on its host within 1 s); 400 changes nothing",
                       {"200": _json({"type": "object"}, "policy"), **_err(400, 401, 403, 404, 503)},
                       parameters=[{"name": "node_id", "in": "path", "required": True, "schema": _STR}])},
        "/admin/nodes/{node_id}/fork": {"post": _op(
            "Copy a session into count new sessions of its client", {"200": _json(FORK_RESULT, "the new sessions"),
                                                                     **_err(400, 401, 403, 404, 429, 502, 503)},
            requestBody=FORK_BODY, parameters=[{"name": "node_id", "in": "path", "required": True, "schema": _STR}])},
        "/admin/nodes/{node_id}/snapshot": {"post": _op(
            "Save a session's workspace as a named snapshot of its client", {"200": _json(SNAPSHOT, "the snapshot"),
                                                                             **_err(400, 401, 403, 404, 429, 503)},
            requestBody=SNAPSHOT_BODY, parameters=[{"name": "node_id", "in": "path", "required": True,
                                                    "schema": _STR}])},
        "/admin/snapshots": {"get": _op("Every snapshot", {"200": _json({"type": "object"}, "snapshots"),
                                                           **_err(401, 403, 404)})},
        "/admin/snapshots/{name}": {"delete": _op(
            "Delete a snapshot (names are per client: ?client= says whose; 409 when several keep the name)", {
                "200": _json({"type": "object"}, "deleted"), **_err(400, 401, 403, 404, 409, 503)},
            parameters=[{"name": "name", "in": "path", "required": True, "schema": _STR},
                        {"name": "client", "in": "query", "required": False, "schema": _STR}])},
        "/admin/nodes/{node_id}/{action}": {"post": _op(
            "Act on one session: stop, restart, release, pause (freeze a running node) or resume (from any tier)",
            {"200": _json({"type": "object"}, "done"), **_err(401, 403, 404, 503)},
            parameters=[{"name": "node_id", "in": "path", "required": True, "schema": _STR},
                        {"name": "action", "in": "path", "required": True, "schema": _STR}])},
        "/admin/replicas": {"get": _op("Live replicas", {"200": _json({"type": "object"}, "replicas"),
                                                         **_err(401, 403, 404)})},
        "/admin/leases": {"get": _op("Checker lease holder, token and since when, per manager_id",
                                     {"200": _json({"type": "object"}, "leases"), **_err(401, 403, 404)})},
        "/admin/managers/{manager_id}/drain": {m: _op(
            ("Stop" if m == "post" else "Resume") + " placing new sessions on a manager_id",
            {"200": _json({"type": "object"}, "state"), **_err(401, 403, 404)},
            parameters=[{"name": "manager_id", "in": "path", "required": True, "schema": _STR}])
            for m in ("post", "delete")},
        "/admin/engines": {"get": _op("Per-engine facts, fanned out; partial results with failures named",
                                      {"200": _json({"type": "object"}, "results"), **_err(401, 403, 404)})},
        "/admin/config": {"get": _op("The configuration, secrets redacted",
                                     {"200": _json({"type": "object"}, "config"), **_err(401, 403, 404)})},
    }
    for ops in admin.values():
        for op in ops.values():
            op["security"] = ADMIN_SECURITY
    paths.update(admin)
    console = {"tags": ["console"]}
    paths["/ui/"] = {"get": _op("The operator console, on admin.console_port only (a page; off without an admin token)",
                                {"200": {"description": "text/html"}, **_err(404)}, **console)}
    paths["/ui/login"] = {"post": _op(
        "Log in to the console (admin.console_port): sets an HttpOnly SameSite=Strict cookie; the Origin "
        "must be this host; wrong tokens from one address are limited (429 with Retry-After)",
        {"200": _json({"type": "object"}, "logged in"), **_err(400, 403, 404, 429)},
        requestBody={"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": ["token"], "properties": {"token": _STR}}}}}, **console)}
    paths["/ui/logout"] = {"post": _op("Log out of the console: this login ends on every replica", {"200": _json({"type": "object"}, "ok"),
                                                                   **_err(403, 404)}, **console)}
    paths["/ui/whoami"] = {"get": _op("The console login and the replica serving it",
                                      {"200": _json({"type": "object"}, "login"), **_err(401, 403, 404)}, **console)}
    internal = {"parameters": [INTERNAL], "tags": ["internal"]}
    paths["/internal/nodes"] = {"post": _op("Create a node on this replica's engine (replica to replica)",
                                            {"200": _json({"type": "object"}, "record"), **_err(403, 429, 503)},
                                            **internal)}
    paths["/internal/nodes/{node_id}/{op}"] = {"post": _op(
        "Run restart|stop|release|ensure on a node of this replica's engine",
        {"200": _json({"type": "object"}, "done"), **_err(400, 403, 404, 503)},
        parameters=[INTERNAL, {"name": "node_id", "in": "path", "required": True, "schema": _STR},
                    {"name": "op", "in": "path", "required": True, "schema": _STR}], tags=["internal"])}
    paths["/internal/nodes/{node_id}"] = {"get": _op(
        "Inspect a node of this replica's engine", {"200": _json({"type": "object"}, "detail"), **_err(403, 404)},
        parameters=[INTERNAL, {"name": "node_id", "in": "path", "required": True, "schema": _STR}],
        tags=["internal"])}
    paths["/internal/nodes/{node_id}/address"] = {"get": _op(
        "Where a node of this replica's engine is, as the engine confirms it (before another replica sends it its secret)",
        {"200": _json({"type": "object"}, "address"), **_err(400, 403, 404, 503)},
        parameters=[INTERNAL, {"name": "node_id", "in": "path", "required": True, "schema": _STR}],
        tags=["internal"])}
    paths["/internal/engine"] = {"get": _op("This replica's engine facts", {"200": _json({"type": "object"}, "info"),
                                                                            **_err(403, 503)}, **internal)}
    return {
        "openapi": "3.1.0",
        "info": {"title": "toolserver-manager", "version": cfg.version,
                 "description": "XAgent ToolServerManager-compatible session manager, as a cluster."},
        "paths": paths,
        "components": {"securitySchemes": {"adminToken": {"type": "http", "scheme": "bearer"}}},
    }


async def openapi_endpoint(request: Request) -> Response:
    spec = getattr(request.app.state, "openapi", None)
    if spec is None:
        spec = request.app.state.openapi = build_spec(request.app.state.cfg)
    return json_response(spec)
