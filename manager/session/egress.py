"""Egress policy routes: a client's own session (cookie); an admin's are manager/admin/egress.py.

A client may give or change a policy only when egress.client_may_set allows it, and, with
egress.policy_api_keys set, only with one of those API keys; an admin always may.
"""

from __future__ import annotations

import hmac

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from manager.edge.responses import json_response
from manager.replica.runtime import Runtime
from manager.session.resolve import bound_to_key, node_cookie
from nodeops import egress
from shared.egress.policy import EgressPolicy, public
from shared.errors import BadRequest, Forbidden

MAX_BODY = 64 << 10


def may_set(request: Request) -> None:
    """Forbidden unless this client may give its session a policy."""
    cfg = request.app.state.rt.cfg.egress
    if not cfg.client_may_set:
        raise Forbidden("clients may not set egress policies here (egress.client_may_set is false)")
    if cfg.policy_api_keys:
        given = request.app.state.proxy.client_keys._given(request.scope)
        ok = False
        for key in cfg.policy_api_keys:  # every key compared: timing says nothing about which
            ok |= hmac.compare_digest(given, key.encode())
        if not ok:
            raise Forbidden("this API key may not set egress policies (egress.policy_api_keys)")


async def json_body(request: Request) -> object:
    """The request's JSON body (BadRequest when it is not JSON or too big)."""
    body = await request.body()
    if len(body) > MAX_BODY:
        raise BadRequest(f"egress policy body over {MAX_BODY} bytes")
    try:
        return msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise BadRequest(f"egress policy: invalid JSON: {exc}") from None


def answer(node_id: str, pol: EgressPolicy) -> Response:
    return json_response({"node_id": node_id, "egress": public(pol)})


async def client_policy(request: Request) -> Response:
    """GET: the cookie's session's policy; PUT: replace it (validated first; 400 changes nothing)."""
    rt: Runtime = request.app.state.rt
    node_id = node_cookie(request.cookies)
    await bound_to_key(request, rt, node_id)
    if request.method == "GET":
        return answer(str(node_id), await egress.get(rt, node_id))
    may_set(request)
    pol = await egress.put(rt, node_id, await json_body(request), by="client")
    return answer(str(node_id), pol)


def egress_routes() -> list[BaseRoute]:
    return [Route("/egress_policy", client_policy, methods=["GET", "PUT"])]
