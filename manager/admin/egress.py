"""Egress policy routes for an admin: any session's (admin token); a client's own are manager/session/egress.py."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from manager.admin import api as admin
from manager.session.egress import answer, json_body
from nodeops import egress


async def admin_policy(request: Request) -> Response:
    """GET or PUT any session's policy (admin token)."""
    rt = admin._admin(request)
    node_id = request.path_params["node_id"]
    if request.method == "GET":
        return answer(node_id, await egress.get(rt, node_id))
    return answer(node_id, await egress.put(rt, node_id, await json_body(request), by="admin"))


def egress_routes() -> list[BaseRoute]:
    return [Route("/admin/nodes/{node_id}/egress", admin_policy, methods=["GET", "PUT"])]
