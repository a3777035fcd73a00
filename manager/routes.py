"""HTTP handlers: parse the request, call one plain function, shape the response."""

from __future__ import annotations

import hmac
import re
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from manager.runtime import Runtime
from nodeops import lifecycle, pool, sessions
from nodeops.forward import TOKEN_HEADER
from shared import metrics
from shared.errors import BadRequest, EngineUnavailable, Forbidden, ManagerError, NodeNotFound, RedisUnavailable

REPLICA_HEADER = "x-tsm-replica"
NODE_ID = re.compile(r"^[0-9a-f]{64}$")
MAX_IGNORED_BODY = 1 << 20  # routes that take no body ignore small ones (XAgent did), refuse big ones


def rt_of(request: Request) -> Runtime:
    return request.app.state.rt  # type: ignore[no-any-return]


def node_cookie(request: Request) -> str | None:
    """The node_id cookie, or None when missing or not a container id (no lookup for junk)."""
    value = request.cookies.get("node_id")
    if value is None:
        return None
    return value if NODE_ID.match(value) else value[:80]


async def _no_body(request: Request) -> None:
    """Ignore a small body, refuse a big one: the same whether its length is announced or chunked."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_IGNORED_BODY:
        raise BadRequest(f"{request.url.path} takes no request body (got {length} bytes)")
    if "transfer-encoding" in request.headers:
        seen = 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > MAX_IGNORED_BODY:
                raise BadRequest(f"{request.url.path} takes no request body (got over {MAX_IGNORED_BODY} bytes)")


_replica_id = ""  # set by create_app: every answer names the replica that served it


def set_replica_id(replica_id: str) -> None:
    global _replica_id
    _replica_id = replica_id


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    resp = Response(msgspec.json.encode(data), status_code=status, media_type="application/json",
                    headers=headers)
    resp.headers[REPLICA_HEADER] = _replica_id
    return resp


async def alive(request: Request) -> Response:
    return json_response("alive")


async def ready(request: Request) -> Response:
    rt = rt_of(request)
    checks: dict[str, str] = {}
    failed: list[ManagerError] = []
    for name, ping, err in (("redis", rt.store.ping, RedisUnavailable), ("engine", rt.backend.ping,
                                                                          EngineUnavailable)):
        try:
            await ping()
            checks[name] = "ok"
        except err as exc:
            checks[name] = exc.detail
            failed.append(exc)
    if failed:
        return json_response({"detail": "; ".join(e.detail for e in failed), **checks,
                              "isolation": rt.isolation}, status=503)
    return json_response({"status": "ready", **checks, "isolation": rt.isolation})


async def metrics_endpoint(request: Request) -> Response:
    body, ctype = metrics.render()
    return Response(body, media_type=ctype)


async def get_cookie(request: Request) -> Response:
    rt = rt_of(request)
    await _no_body(request)
    client = request.headers.get(rt.cfg.quota.client_header, "") if rt.cfg.quota.client_header else ""
    try:
        rec = await sessions.create(rt, client=client[:128])
    except ManagerError:
        metrics.SESSION_OPS.labels("create", "error").inc()
        raise
    metrics.SESSION_OPS.labels("create", "ok").inc()
    resp = json_response({"message": "add cookie", "version": rt.cfg.version},
                         headers={"Server": f"ToolServerManager/{rt.cfg.version}"})
    resp.set_cookie("node_id", rec.id, path="/")
    await pool.delivered(rt, rec)
    return resp


def _session_route(op: str, verb: str, fn: Any) -> Any:
    async def handler(request: Request) -> Response:
        rt = rt_of(request)
        await _no_body(request)
        node_id = node_cookie(request)
        try:
            await fn(rt, node_id)
        except NodeNotFound:
            # XAgent answers 200 with this string and its clients depend on it
            metrics.SESSION_OPS.labels(op, "invalid").inc()
            return json_response(f"invalid node_id: {node_id}")
        except ManagerError:
            metrics.SESSION_OPS.labels(op, "error").inc()
            raise
        metrics.SESSION_OPS.labels(op, "ok").inc()
        return json_response(f"{verb} session: {node_id}")

    handler.__name__ = op
    return handler


reconnect_session = _session_route("reconnect", "Reconnect", sessions.reconnect)
close_session = _session_route("close", "Close", sessions.close)
release_session = _session_route("release", "Release", sessions.release)


async def proxied(request: Request) -> Response:
    return await request.app.state.proxy.handle(request)


# --- internal routes: called by other replicas with the internal token ---------
def check_internal(rt: Runtime, token: str | None) -> None:
    """Accept only requests carrying the cluster's internal token (constant-time compare)."""
    expected = rt.cfg.internal_token
    if not expected:
        raise Forbidden("internal forwarding is disabled: no cluster.internal_token configured")
    if not token or not hmac.compare_digest(token.encode(), expected.encode()):
        raise Forbidden("invalid internal token")


def _internal(request: Request) -> Runtime:
    rt = rt_of(request)
    check_internal(rt, request.headers.get(TOKEN_HEADER))
    return rt


async def internal_create(request: Request) -> Response:
    rt = _internal(request)
    try:
        body = msgspec.json.decode(await request.body() or b"{}", type=dict[str, str])
    except msgspec.DecodeError as exc:
        raise BadRequest(f"invalid body: {exc}") from exc
    rec = await sessions.create_local(rt, client=body.get("client", ""))
    await pool.delivered(rt, rec)
    return json_response(rec)



async def internal_node_op(request: Request) -> Response:
    rt = _internal(request)
    op = request.path_params["op"]
    fn = sessions.LOCAL_OPS.get(op)
    if fn is None:
        raise NodeNotFound(op)
    node_id = request.path_params["node_id"]
    rec = await rt.store.get_node(node_id)
    if rec is None:
        raise NodeNotFound(node_id)
    if rec.manager_id != rt.manager_id:
        raise BadRequest(f"node {node_id} belongs to {rec.manager_id}, not {rt.manager_id}")
    result = await fn(rt, node_id)
    return json_response(result if result is not None else {"ok": True})


async def internal_node_detail(request: Request) -> Response:
    rt = _internal(request)
    return json_response(await lifecycle.node_detail(rt, request.path_params["node_id"]))


async def internal_engine(request: Request) -> Response:
    rt = _internal(request)
    return json_response(await engine_summary(rt))


async def engine_summary(rt: Runtime) -> dict[str, Any]:
    """This replica's engine, as one row of a cluster-wide read."""
    info = await rt.backend.info()
    return {"manager_id": rt.manager_id, "replica_id": rt.replica.replica_id, "engine": info}
