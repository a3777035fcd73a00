"""The MCP gateway driven by the official `mcp` SDK client, unchanged, through HAProxy over three
replicas with no stickiness: both revisions end to end, a replica killed under an open stream,
and bad input (the spec's codes, no 5xx, nothing created)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
import redis
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError

from testing.harness import HAProxy, ManagerProc
from tests.conftest import ADMIN_TOKEN, wait_for

SHELL, READ = "shell_command_executor", "FileSystemEnv_read_from_file"


class Wire:
    """What the SDK client's HTTP requests met: replica, method, status, headers sent."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    async def on_response(self, r: httpx2.Response) -> None:
        self.seen.append({"method": r.request.method, "status": r.status_code,
                          "replica": r.headers.get("x-tsm-replica"),
                          "resume": "last-event-id" in r.request.headers,
                          "param_session": r.request.headers.get("mcp-param-session"),
                          "ctype": r.headers.get("content-type", "")})

    def client(self, api_key: str | None = None) -> httpx2.AsyncClient:
        hc = create_mcp_http_client(headers={"X-API-Key": api_key} if api_key else None)
        hc.event_hooks["response"].append(self.on_response)
        return hc


def sdk(url: str, wire: Wire, mode: str) -> Client:
    return Client(streamable_http_client(url + "/mcp", http_client=wire.client()), mode=mode,
                  read_timeout_seconds=60)


@pytest.fixture
def cluster(start_manager, tmp_path: Path) -> Iterator[Any]:  # type: ignore[no-untyped-def]
    """start(**over): three replicas behind a round-robin HAProxy; returns (balancer, replicas)."""
    lbs: list[HAProxy] = []

    def start(**over: Any) -> tuple[HAProxy, list[ManagerProc]]:
        ms = [start_manager(name=n, **over) for n in ("a", "b", "c")]
        lbs.append(HAProxy([(m.replica_id, m.port) for m in ms], tmp_path))
        return lbs[-1], ms

    yield start
    for lb in lbs:
        lb.stop()


def admin_nodes(url: str) -> list[dict[str, Any]]:
    r = httpx.get(url + "/admin/nodes", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["nodes"]


def text(result: Any) -> str:
    return "".join(c.text for c in result.content if getattr(c, "type", "") == "text")


def node_hostname(url: str) -> str:
    """The one node's short id (its hostname inside the container), from the admin view."""
    nodes = admin_nodes(url)
    assert len(nodes) == 1, nodes
    return nodes[0]["id"][:12]


async def _exercise(c: Client, lb: HAProxy, args: dict[str, Any]) -> None:
    """What a session does with its tools, either revision (args: the handle for 2026-07-28)."""
    listed = {t.name: t for t in (await c.list_tools()).tools}
    assert {SHELL, READ, "upload_file"} <= set(listed), sorted(listed)
    assert listed[SHELL].input_schema["properties"]["command"]["type"] == "string"

    r = await c.call_tool(SHELL, {**args, "command": "echo hi from $(hostname)"})
    assert not r.is_error, text(r)
    assert f"hi from {node_hostname(lb.url)}" in text(r)  # ran in this session's own node

    payload = "first line\nsecond line ünicode\n"
    r = await c.call_tool("upload_file", {**args, "path": "in/notes.txt",
                                          "content_base64": base64.b64encode(payload.encode()).decode()})
    assert not r.is_error, text(r)
    r = await c.call_tool(READ, {**args, "filepath": "in/notes.txt"})
    assert not r.is_error and "second line ünicode" in text(r), text(r)

    r = await c.call_tool(READ, {**args, "filepath": "no/such/file"})
    assert r.is_error and "not found" in text(r)  # the node's error is a tool error, not a protocol one

    progress: list[float] = []

    async def on_progress(p: float, total: float | None, message: str | None) -> None:
        progress.append(p)

    r = await c.call_tool(SHELL, {**args, "command": "sleep 2.6; echo slow done"}, progress_callback=on_progress)
    assert not r.is_error and "slow done" in text(r), text(r)
    assert len(progress) >= 2 and progress == sorted(progress), progress


def test_sessions_of_2025_11_25_on_any_replica(cluster) -> None:  # type: ignore[no-untyped-def]
    # a call's SSE answer is closed after 1 s: the client resumes it with Last-Event-ID, wherever
    lb, ms = cluster(mcp={"stream_close_seconds": 1.0})
    wire = Wire()

    async def run() -> None:
        async with sdk(lb.url, wire, "legacy") as c:
            assert c.protocol_version == "2025-11-25"
            await _exercise(c, lb, {})
            assert len(admin_nodes(lb.url)) == 1  # a normal session: the admin view lists it

    asyncio.run(run())
    posts = [s for s in wire.seen if s["method"] == "POST"]
    assert len({s["replica"] for s in posts}) == 3, posts  # no stickiness: every replica served it
    resumed = [s for s in wire.seen if s["resume"]]
    assert resumed and all(s["status"] == 200 for s in resumed), wire.seen
    closing = [s for s in wire.seen if s["method"] == "DELETE"]
    assert [s["status"] for s in closing] == [204], closing
    wait_for(lambda: admin_nodes(lb.url) == [], what="the node released by DELETE")


def test_stateless_2026_07_28_with_handles(cluster) -> None:  # type: ignore[no-untyped-def]
    lb, ms = cluster()
    wire = Wire()

    async def run() -> None:
        async with sdk(lb.url, wire, "auto") as c:  # server/discover, then the stateless revision
            assert c.protocol_version == "2026-07-28"
            made = await c.call_tool("create_session", {})
            handle = made.structured_content["session"]
            assert len(admin_nodes(lb.url)) == 1
            schema = {t.name: t for t in (await c.list_tools()).tools}[SHELL].input_schema
            assert schema["properties"]["session"]["x-mcp-header"] == "Session"
            await _exercise(c, lb, {"session": handle})
            r = await c.call_tool("release_session", {"session": handle})
            assert not r.is_error, text(r)
            with pytest.raises(MCPError) as err:  # a released handle names nothing
                await c.call_tool(SHELL, {"session": handle, "command": "true"})
            assert err.value.code == -32602

    asyncio.run(run())
    assert not any(s["method"] in ("GET", "DELETE") for s in wire.seen)  # no streams, no sessions
    calls = [s for s in wire.seen if s["param_session"]]
    assert calls, "the handle was never mirrored into Mcp-Param-Session"
    assert len({s["replica"] for s in wire.seen}) == 3
    wait_for(lambda: admin_nodes(lb.url) == [], what="the node released by release_session")
