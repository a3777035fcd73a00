"""Public HTTP handlers: parse the request, call one plain function, shape the response."""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from manager.edge.disconnect import unless_client_leaves
from manager.edge.responses import json_response
from manager.replica.runtime import Runtime
from manager.session import egress as egress_routes
from manager.session.resolve import bound_to_key, node_cookie
from nodeops import egress, images, pool, sessions, snapshots
from shared import metrics
from shared.egress import policy as egress_policy
from shared.egress.policy import EgressPolicy
from shared.errors import BadRequest, EngineUnavailable, ManagerError, NodeNotFound, RedisUnavailable
from shared.models import NodeRecord

log = logging.getLogger(__name__)

MAX_IGNORED_BODY = 1 << 20  # routes that take no body ignore small ones (XAgent did), refuse big ones


def rt_of(request: Request) -> Runtime:
    return request.app.state.rt  # type: ignore[no-any-return]


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
    if not failed:  # the image is only known with the engine answering
        try:
            missing: ManagerError | None = await images.problem(rt)
        except EngineUnavailable as exc:
            missing = exc
        checks["image"] = missing.detail if missing else "ok"
        if missing:
            failed.append(missing)
    if failed:
        return json_response({"detail": "; ".join(e.detail for e in failed), **checks,
                              "isolation": rt.isolation}, status=503)
    return json_response({"status": "ready", **checks, "isolation": rt.isolation})


async def metrics_endpoint(request: Request) -> Response:
    body, ctype = metrics.render()
    return Response(body, media_type=ctype)


def _creation_egress(request: Request, data: object) -> EgressPolicy | None:
    """The policy a JSON body's "egress" asks for (checked before anything is made); other bodies
    are ignored as before."""
    if not isinstance(data, dict) or data.get("egress") is None:
        return None
    egress_routes.may_set(request)
    return egress_policy.validate(data["egress"])


def _creation_snapshot(data: object) -> str:
    """The snapshot a JSON body's "snapshot" names ("": none; XAgent's empty body names none)."""
    if not isinstance(data, dict) or data.get("snapshot") is None:
        return ""
    return snapshots.check_name(data["snapshot"])


async def _creation_body(request: Request) -> object:
    """get_cookie's JSON body (None for none, or one that is not JSON: ignored, as XAgent did)."""
    if "json" not in request.headers.get("content-type", ""):
        await _no_body(request)
        return None
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_IGNORED_BODY:
        raise BadRequest(f"{request.url.path} body over {MAX_IGNORED_BODY} bytes")
    body = await request.body()
    if len(body) > MAX_IGNORED_BODY:
        raise BadRequest(f"{request.url.path} body over {MAX_IGNORED_BODY} bytes")
    try:
        data = msgspec.json.decode(body) if body.strip() else None
    except msgspec.DecodeError:
        return None
    return data


async def get_cookie(request: Request) -> Response:
    rt = rt_of(request)
    body = await _creation_body(request)
    pol = _creation_egress(request, body)
    snapshot = _creation_snapshot(body)
    # who the client is, for its quota and its session's binding: never its key in clear
    client = request.app.state.proxy.client_ids.of(request.scope)
    try:
        made, here = await unless_client_leaves(request, sessions.create(rt, client=client, snapshot=snapshot))
    except ManagerError:
        metrics.SESSION_OPS.labels("create", "error").inc()
        raise
    if not here:
        return await client_left(rt, made)
    rec = made
    assert rec is not None
    if pol is not None:
        await egress.put(rt, rec.id, msgspec.to_builtins(pol), by="client")
    await rt.egress_settled(rec)  # the client's policy too, when it gave one
    metrics.SESSION_OPS.labels("create", "ok").inc()
    resp = json_response({"message": "add cookie", "version": rt.cfg.version},
                         headers={"Server": f"ToolServerManager/{rt.cfg.version}"})
    resp.set_cookie("node_id", rec.id, path="/")
    await pool.delivered(rt, rec)
    return resp


async def client_left(rt: Runtime, made: NodeRecord | None) -> Response:
    """The client of a creation went away: what it left undone is not made, what was made is
    released (nobody holds its cookie); the answer reaches no one."""
    metrics.SESSION_OPS.labels("create", "client_left").inc()
    if made is not None:
        try:
            await sessions.release(rt, made.id)
        except NodeNotFound:
            pass
        except ManagerError as exc:  # the checker removes it (an undelivered claim, or by its idle time)
            log.warning("abandoned_release_failed node_id=%s error=%s", made.id[:12], exc.detail)
    log.info("create_abandoned reason=client_left made=%s", made.id[:12] if made else "-")
    return json_response({"detail": "the client closed the request: no session was kept"}, status=499)


def _session_route(op: str, verb: str, fn: Any) -> Any:
    async def handler(request: Request) -> Response:
        rt = rt_of(request)
        await _no_body(request)
        node_id = node_cookie(request.cookies)
        try:
            await bound_to_key(request, rt, node_id)
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
