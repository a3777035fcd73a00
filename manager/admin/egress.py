"""Egress policy routes for an admin: any session's (admin token); a client's own are manager/session/egress.py."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from manager.admin import api as admin
from manager.edge.responses import json_response
from manager.session.egress import answer, json_body
from nodeops import egress


async def admin_policy(request: Request) -> Response:
    """GET or PUT any session's policy (admin token)."""
    rt = admin._admin(request)
    node_id = request.path_params["node_id"]
    if request.method == "GET":
        return answer(node_id, await egress.get(rt, node_id))
    return answer(node_id, await egress.put(rt, node_id, await json_body(request), by="admin"))


async def admin_secret(request: Request) -> Response:
    """PUT a secret (its value sealed at once; the answer never holds it)."""
    rt = admin._admin(request)
    return json_response(await egress.put_secret(rt, request.path_params["name"], await json_body(request)))


async def admin_secrets(request: Request) -> Response:
    """Names and hosts of the stored secrets, never their values."""
    rt = admin._admin(request)
    return json_response({"secrets": await egress.list_secrets(rt)})


async def admin_rotate_secrets(request: Request) -> Response:
    """Seal again under egress.secrets_key every secret sealed under an old key (names only)."""
    rt = admin._admin(request)
    return json_response(await egress.rotate_secrets(rt))


def egress_routes() -> list[BaseRoute]:
    return [Route("/admin/nodes/{node_id}/egress", admin_policy, methods=["GET", "PUT"]),
            Route("/admin/secrets", admin_secrets, methods=["GET"]),
            Route("/admin/secrets/rotate", admin_rotate_secrets, methods=["POST"]),
            Route("/admin/secrets/{name}", admin_secret, methods=["PUT"])]
