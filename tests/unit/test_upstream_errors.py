"""The proxy path's one upstream error mapping: each way a node's connection fails, its answer, and
the same answer whether the failure met a proxied request (Proxy.handle) or a buffered call
(Proxy.call: MCP tool calls, the admin's workspace listing). The real failures are made on the
real engine by test_http_edge (504, 503), test_hostile_node (502) and test_multihost (503, 502)."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.requests import Request

from manager.edge.errors_http import error_response
from manager.openapi import build_spec
from manager.proxy.http_proxy import Proxy, upstream_error
from manager.proxy.upstream import ConnectFailed, HostLost, ResponseTooLarge, UpstreamError, UpstreamTimeout
from manager.session.resolve import Target
from nodeops.circuit import Circuits
from shared.config import Config, ProxyConfig
from shared.errors import HostUnreachable, ManagerError
from shared.models import NodeRecord, NodeStatus

NODE = "a" * 64
LOST = "host 10.0.0.2 stopped answering"
TOO_LARGE = "the node's response head is over proxy.max_response_head_bytes"
# each upstream failure -> the status and JSON body a client has always been answered
CASES: list[tuple[Exception, int, dict[str, str]]] = [
    (UpstreamTimeout("read timed out"), 504, {"detail": "the node did not answer within 1.5 s"}),
    (HostLost(LOST), 502, {"detail": f"{LOST}; the request may or may not have been carried out"}),
    (ResponseTooLarge(TOO_LARGE), 502, {"detail": TOO_LARGE}),
    (ConnectFailed("connection refused"), 503, {"detail": "node is not responding"}),
    (UpstreamError("connection reset"), 503, {"detail": "node is not responding"}),
    (HostUnreachable("10.0.0.2", "host2", "connect timed out"), 503,
     {"detail": "host 10.0.0.2 is unreachable (nodes of host2): connect timed out"}),
]


def answer(err: ManagerError) -> tuple[int, dict[str, str]]:
    resp = error_response(err)
    return resp.status_code, json.loads(bytes(resp.body))


@pytest.mark.parametrize(("exc", "status", "body"), CASES, ids=[type(c[0]).__name__ for c in CASES])
def test_each_upstream_failure_has_its_answer(exc: Exception, status: int, body: dict[str, str]) -> None:
    assert isinstance(exc, UpstreamError | HostUnreachable)
    assert answer(upstream_error(exc, 1.5)) == (status, body)


class FakeResolver:
    """The node is local and running at 10.0.0.9:31942; a revive finds it at the same place."""

    def __init__(self, manager_id: str) -> None:
        self.rec = NodeRecord(id=NODE, manager_id=manager_id, status=NodeStatus.RUNNING)

    async def record(self, node_id: str | None) -> NodeRecord:
        return self.rec

    async def live(self, node_id: str | None) -> NodeRecord:
        return self.rec

    async def revive(self, rec: NodeRecord) -> NodeRecord:
        return self.rec

    async def target(self, rec: NodeRecord, forwarded: bool) -> Target:
        return Target("http", "10.0.0.9", 31942, False, [])


class Activity:
    def __init__(self) -> None:
        self.open: list[str] = []

    def begin(self, node_id: str, manager_id: str) -> None:
        self.open.append(node_id)

    def end(self, node_id: str) -> None:
        self.open.remove(node_id)


def proxy_failing_with(exc: Exception) -> tuple[Proxy, Activity, list[tuple[str, int]]]:
    cfg = Config(manager_id="m1", proxy=ProxyConfig(path_timeouts={"/execute_tool": 1.5}))
    activity = Activity()
    secrets = SimpleNamespace(of=lambda rec: "s")
    rt: Any = SimpleNamespace(cfg=cfg, manager_id="m1", circuits=Circuits(), activity=activity,
                              store=SimpleNamespace(secrets=secrets))
    proxy = Proxy(rt, FakeResolver("m1"))  # type: ignore[arg-type]
    counted: list[tuple[str, int]] = []
    proxy._count = lambda path, code: counted.append((path, code))  # type: ignore[method-assign]

    async def request(*args: Any) -> Any:
        raise exc

    proxy.pool.request = request  # type: ignore[method-assign]
    return proxy, activity, counted


def proxied_request() -> Request:
    scope = {"type": "http", "method": "POST", "path": "/execute_tool", "raw_path": b"/execute_tool",
             "query_string": b"", "headers": [(b"cookie", b"node_id=" + NODE.encode())]}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    return Request(scope, receive)


@pytest.mark.parametrize(("exc", "status", "body"), CASES, ids=[type(c[0]).__name__ for c in CASES])
def test_a_proxied_request_and_a_call_are_answered_alike(exc: Exception, status: int, body: dict[str, str]) -> None:
    for how in ("handle", "call"):
        proxy, activity, counted = proxy_failing_with(exc)
        with pytest.raises(ManagerError) as info:
            if how == "handle":
                asyncio.run(proxy.handle(proxied_request()))
            else:
                asyncio.run(proxy.call(NODE, "/execute_tool", b"{}"))
        assert answer(info.value) == (status, body), how
        assert counted == [("/execute_tool", status)], how  # counted once, by its answer
        assert activity.open == [], how  # the node is not left busy


def test_the_workspace_listing_documents_every_answer_of_the_mapping() -> None:
    """admin.node_files goes through Proxy.call, so it can answer whatever the mapping does."""
    spec = build_spec(Config())
    listed = set(spec["paths"]["/admin/nodes/{node_id}/files"]["get"]["responses"])
    assert {str(status) for _, status, _ in CASES} <= listed
