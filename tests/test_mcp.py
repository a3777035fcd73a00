"""The MCP gateway driven by the official `mcp` SDK client, unchanged, through HAProxy over three
replicas with no stickiness: both revisions end to end, a replica killed under an open stream,
bad input (the spec's codes, no 5xx, nothing created), and a 2026-07-28 call cancelled by closing."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
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
        ms = [start_manager(name=n, wait=False, **over) for n in ("a", "b", "c")]
        for m in ms:  # started together: a replica takes seconds to start
            m.wait_alive()
        lbs.append(HAProxy([(m.replica_id, m.port) for m in ms], tmp_path))
        return lbs[-1], ms

    yield start
    for lb in lbs:
        lb.stop()


def admin_nodes(url: str) -> list[dict[str, Any]]:
    r = httpx.get(url + "/admin/nodes", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["nodes"]


# prints "running" while a `sleep 30` runs in the node, "gone" once none does (never matches itself)
SLEEPING = ("python3 -c \"import os\nn = 0\nfor p in filter(str.isdigit, os.listdir('/proc')):\n"
            "    try:\n        n += open('/proc/%s/cmdline' % p, 'rb').read() == b'sleep' + bytes(1) + b'30' + bytes(1)\n"
            "    except OSError:\n        pass\nprint('running' if n else 'gone')\"")


async def sleep_ended(c: Client, args: dict[str, Any]) -> None:
    """Wait until the node runs no `sleep 30`: a cancelled call's shell was killed (else 30 s: a failure)."""
    with anyio.fail_after(20):
        while "gone" not in text(await c.call_tool(SHELL, {**args, "command": SLEEPING})):
            await asyncio.sleep(0.1)


def text(result: Any) -> str:
    return "".join(c.text for c in result.content if getattr(c, "type", "") == "text")


def node_hostname(url: str) -> str:
    """The one session's container's short id (its hostname), from the admin view."""
    nodes = admin_nodes(url)
    assert len(nodes) == 1, nodes
    return str(nodes[0].get("container_id") or nodes[0]["id"])[:12]


async def _exercise(c: Client, lb: HAProxy, args: dict[str, Any]) -> None:
    """What a session does with its tools, either revision (args: the handle for 2026-07-28)."""
    listed = {t.name: t for t in (await c.list_tools()).tools}
    assert {SHELL, READ, "upload_file"} <= set(listed), sorted(listed)
    assert listed[SHELL].input_schema["properties"]["command"]["type"] == "string"

    r = await c.call_tool(SHELL, {**args, "command": "echo hi from $(hostname)"})
    assert not r.is_error, text(r)
    assert f"hi from {node_hostname(lb.url)}" in text(r)  # ran in this session's own node

    payload = "first line\nsecond line ünicode\n"
    r = await c.call_tool("upload_file", {**args, "path": "in/nötes.txt",
                                          "content_base64": base64.b64encode(payload.encode()).decode()})
    assert not r.is_error, text(r)
    r = await c.call_tool(READ, {**args, "filepath": "in/nötes.txt"})
    assert not r.is_error and "second line ünicode" in text(r), text(r)

    r = await c.call_tool(READ, {**args, "filepath": "no/such/file"})
    assert r.is_error and "not found" in text(r)  # the node's error is a tool error, not a protocol one

    progress: list[float] = []

    async def on_progress(p: float, total: float | None, message: str | None) -> None:
        progress.append(p)

    r = await c.call_tool(SHELL, {**args, "command": "sleep 2.6; echo slow done"}, progress_callback=on_progress)
    assert not r.is_error and "slow done" in text(r), text(r)
    assert len(progress) >= 2 and progress == sorted(progress), progress


def test_both_revisions_on_any_replica(cluster) -> None:  # type: ignore[no-untyped-def]
    # a call's SSE answer is closed after 1 s: the client resumes it with Last-Event-ID, wherever
    lb, _ms = cluster(mcp={"stream_close_seconds": 1.0})

    # 2025-11-25: Mcp-Session-Id minted by the manager, kept in Redis
    wire = Wire()

    async def legacy() -> None:
        async with sdk(lb.url, wire, "legacy") as c:
            assert c.protocol_version == "2025-11-25"
            await _exercise(c, lb, {})
            assert len(admin_nodes(lb.url)) == 1  # a normal session: the admin view lists it
            # cancelling (notifications/cancelled, to whichever replica) stops the call where it runs
            with anyio.move_on_after(1.0):
                await c.call_tool(SHELL, {"command": "sleep 30; touch late"})
            await sleep_ended(c, {})
            r = await c.call_tool(SHELL, {"command": "ls late || echo cancelled"})
            assert "cancelled" in text(r), text(r)

    asyncio.run(legacy())
    posts = [s for s in wire.seen if s["method"] == "POST"]
    assert len({s["replica"] for s in posts}) == 3, posts  # no stickiness: every replica served it
    resumed = [s for s in wire.seen if s["resume"]]
    assert resumed and all(s["status"] == 200 for s in resumed), wire.seen
    closing = [s for s in wire.seen if s["method"] == "DELETE"]
    assert [s["status"] for s in closing] == [204], closing
    wait_for(lambda: admin_nodes(lb.url) == [], what="the node released by DELETE")

    # 2026-07-28: server/discover, no sessions, the node handle as a routed tool argument
    wire = Wire()

    async def modern() -> None:
        async with sdk(lb.url, wire, "auto") as c:
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

    asyncio.run(modern())
    assert not any(s["method"] in ("GET", "DELETE") for s in wire.seen)  # no streams, no sessions
    assert any(s["param_session"] for s in wire.seen), "the handle was never mirrored into Mcp-Param-Session"
    assert len({s["replica"] for s in wire.seen}) == 3
    wait_for(lambda: admin_nodes(lb.url) == [], what="the node released by release_session")


def test_replica_killed_under_an_open_stream(cluster, redis_client: redis.Redis, prefix: str) -> None:  # type: ignore[no-untyped-def]
    lb, ms = cluster()
    by_id = {m.replica_id: m for m in ms}
    wire = Wire()
    progress: list[float] = []
    killed: list[ManagerProc] = []

    async def on_progress(p: float, total: float | None, message: str | None) -> None:
        progress.append(p)

    async def run() -> None:
        async with sdk(lb.url, wire, "legacy") as c:
            await c.list_tools()
            call = asyncio.create_task(c.call_tool(SHELL, {"command": "sleep 8; echo never"},
                                                   progress_callback=on_progress))
            while len(progress) < 2:
                await asyncio.sleep(0.05)
            streamed = [s for s in wire.seen if s["method"] == "POST" and "event-stream" in s["ctype"]]
            killed.append(by_id[streamed[-1]["replica"]])
            killed[0].kill()  # SIGKILL with the call's stream open
            t0 = time.monotonic()
            with pytest.raises(MCPError) as err:
                # never a hang: the bound is 10x and more what it takes (the lease's 3 s and a resume:
                # 3.6 s measured, printed below)
                await asyncio.wait_for(call, 40)
            assert "stopped before it answered" in err.value.error.message, err.value.error
            print(f"\nlegacy call ended after its replica's SIGKILL: {time.monotonic() - t0:.2f} s")
            # the survivors serve the session on
            r = await c.call_tool(SHELL, {"command": "echo still here"})
            assert "still here" in text(r)

    asyncio.run(run())
    resumed = [s for s in wire.seen if s["resume"]]
    assert resumed and all(s["replica"] != killed[0].replica_id and s["status"] == 200 for s in resumed), wire.seen
    # every event the dead replica emitted before it died reached the client
    from shared.keys import Keys

    keys = list(redis_client.scan_iter(match=Keys(prefix).mcp_stream("*", "*")))
    assert len(keys) == 1, keys
    emitted = [json.loads(f[b"d"])["params"]["progress"] for _, f in redis_client.xrange(keys[0]) if f[b"k"] == b"m"]
    assert emitted and emitted == progress[:len(emitted)] and len(progress) == len(emitted), (emitted, progress)

    # 2026-07-28 has no resumption: a call whose replica dies ends at once with an error
    wire = Wire()

    async def modern() -> None:
        async with sdk(lb.url, wire, "2026-07-28") as c:
            handle = (await c.call_tool("create_session", {})).structured_content["session"]
            call = asyncio.create_task(c.call_tool(SHELL, {"session": handle, "command": "sleep 8"},
                                                   progress_callback=on_progress))
            while not [s for s in wire.seen if "event-stream" in s["ctype"]]:
                await asyncio.sleep(0.05)
            streamed = [s for s in wire.seen if "event-stream" in s["ctype"]]
            by_id[streamed[-1]["replica"]].kill()
            t0 = time.monotonic()
            with pytest.raises(MCPError):
                await asyncio.wait_for(call, 10)  # ends at once (a dropped connection): 10 s is the hang guard
            print(f"2026-07-28 call ended after its replica's SIGKILL: {time.monotonic() - t0:.2f} s")
            r = await c.call_tool("release_session", {"session": handle})  # the last replica serves on
            assert not r.is_error, text(r)

    asyncio.run(modern())


KEY_A, KEY_B = "key-of-client-a", "key-of-client-b"
MODERN = "2026-07-28"
META = {"io.modelcontextprotocol/protocolVersion": MODERN, "io.modelcontextprotocol/clientCapabilities": {}}


def _post(url: str, body: Any, key: str | None = KEY_A, **headers: str) -> httpx.Response:
    h = {"accept": "application/json, text/event-stream", "content-type": "application/json", **headers}
    if key:
        h["x-api-key"] = key
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(url + "/mcp", content=data, headers=h, timeout=30)


def _modern(url: str, method: str, params: dict[str, Any], key: str = KEY_A, **headers: str) -> httpx.Response:
    h = {"mcp-protocol-version": MODERN, "mcp-method": method, **headers}
    if "name" in params:
        h.setdefault("mcp-name", params["name"])
    return _post(url, {"jsonrpc": "2.0", "id": 7, "method": method, "params": {**params, "_meta": META}}, key, **h)


def _code(r: httpx.Response) -> int:
    return int(r.json()["error"]["code"])


def test_bad_input_gets_the_spec_errors_and_changes_nothing(start_manager, docker_client, manager_id: str,
                                                            redis_client: redis.Redis, prefix: str) -> None:
    m = start_manager(client_auth={"api_keys": [KEY_A, KEY_B]}, mcp={"max_message_bytes": 65536},
                      quota={"client_header": "X-API-Key", "per_client": 2})
    url = m.url
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
    r = _post(url, init)
    assert r.status_code == 200, r.text
    sid = r.headers["mcp-session-id"]
    r = _modern(url, "tools/call", {"name": "create_session", "arguments": {}})
    assert r.status_code == 200 and not r.json()["result"]["isError"], r.text
    handle = r.json()["result"]["structuredContent"]["session"]
    listed = {"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {}}
    shell = {"name": SHELL, "arguments": {"session": handle, "command": "true"}}

    def state() -> tuple[int, int]:
        from shared.keys import Keys

        return (len(docker_client.containers.list(all=True, sparse=True, filters={"label": f"toolserver-manager.manager_id="
                                                                              f"{manager_id}"})),
                len(list(redis_client.scan_iter(match=Keys(prefix).mcp_session("*")))))

    before = state()
    assert before == (2, 2)
    cases: list[tuple[str, httpx.Response, int, int | None]] = [
        ("no API key", _post(url, init, key=None), 401, None),
        ("foreign Origin", _post(url, init, origin="http://evil.example"), 403, -32600),
        ("Accept without SSE", _post(url, init, accept="application/json"), 406, -32600),
        ("not JSON content", _post(url, init, **{"content-type": "text/plain"}), 415, -32600),
        ("malformed JSON", _post(url, b'{"jsonrpc": "2.0", "id": 1, "method": '), 400, -32700),
        ("a batch", _post(url, [init, init]), 400, -32600),
        ("not JSON-RPC 2.0", _post(url, {**init, "jsonrpc": "1.0"}), 400, -32600),
        ("a bool id", _post(url, {**init, "id": True}), 400, -32600),
        ("oversized", _post(url, {**init, "params": {**init["params"], "pad": "x" * 70000}}), 413, -32600),
        ("initialize with bad params", _post(url, {**init, "params": {"capabilities": 3}}), 400, -32602),
        ("no session id", _post(url, listed), 400, -32600),
        ("unknown session id", _post(url, listed, **{"mcp-session-id": "nope" * 10}), 404, -32600),
        ("another client's session id", _post(url, listed, key=KEY_B, **{"mcp-session-id": sid}), 404, -32600),
        ("unknown method", _post(url, {**listed, "method": "tools/explode"}, **{"mcp-session-id": sid}), 200,
         -32601),
        ("tools/call without a name", _post(url, {**listed, "method": "tools/call", "params": {}},
                                            **{"mcp-session-id": sid}), 400, -32602),
        ("bad protocol version", _post(url, listed, **{"mcp-session-id": sid, "mcp-protocol-version": "1999"}),
         400, -32600),
        ("bogus Last-Event-ID", httpx.get(url + "/mcp", headers={
            "accept": "text/event-stream", "x-api-key": KEY_A, "mcp-session-id": sid,
            "last-event-id": "0123456789abcdef_1-0"}, timeout=10), 400, -32600),
        ("DELETE of an unknown session", httpx.delete(url + "/mcp", headers={
            "x-api-key": KEY_A, "mcp-session-id": "x" * 43}, timeout=10), 404, -32600),
        ("2026: GET", httpx.get(url + "/mcp", headers={"x-api-key": KEY_A, "mcp-protocol-version": MODERN,
                                                        "accept": "text/event-stream"}, timeout=10), 405, None),
        ("2026: no _meta", _post(url, {**listed, "params": {}}, **{"mcp-protocol-version": MODERN,
                                                                 "mcp-method": "tools/list"}), 400, -32602),
        ("2026: Mcp-Method disagrees", _modern(url, "tools/list", {}, **{"mcp-method": "tools/call"}), 400, -32020),
        ("2026: Mcp-Name disagrees", _modern(url, "tools/call", shell, **{"mcp-name": "other",
                                                                          "mcp-param-session": handle}), 400, -32020),
        ("2026: Mcp-Param-Session disagrees", _modern(url, "tools/call", shell, **{"mcp-param-session": "other"}),
         400, -32020),
        ("2026: Mcp-Param-Session missing", _modern(url, "tools/call", shell), 400, -32020),
        ("2026: another client's handle", _modern(url, "tools/call", shell, key=KEY_B,
                                                  **{"mcp-param-session": handle}), 400, -32602),
        ("2026: unknown tool", _modern(url, "tools/call", {**shell, "name": "no_such_tool"},
                                       **{"mcp-param-session": handle}), 400, -32602),
        ("2026: unknown method", _modern(url, "tools/explode", {}), 404, -32601),
        ("2026: initialize", _modern(url, "initialize", init["params"]), 404, -32601),
        ("over the client's quota", _post(url, init), 429, -32000),
        ("2026: over the client's quota", _modern(url, "tools/call", {"name": "create_session", "arguments": {}}),
         429, -32000),
    ]
    for what, resp, status, code in cases:
        assert resp.status_code == status, (what, resp.status_code, resp.text)
        if code is not None:
            assert _code(resp) == code, (what, resp.text)
    assert state() == before  # nothing created, nothing lost

    # the right client's calls still work, a stopped node is resumed by the next call, and ending
    # each session releases its node
    r = _modern(url, "tools/call", shell, **{"mcp-param-session": handle, "mcp-param-trace": "for the node"})
    assert r.status_code == 200 and not r.json()["result"]["isError"], r.text  # undeclared Mcp-Param-*: passed on
    node = next(n for n in admin_nodes(url) if n["status"] == "running")["id"]
    r = httpx.post(f"{url}/admin/nodes/{node}/stop", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30)
    assert r.status_code == 200 and {n["id"]: n["status"] for n in admin_nodes(url)}[node] != "running", r.text
    for call in (_post(url, {**listed, "method": "tools/call", "params": {"name": SHELL, "arguments": {}}},
                       **{"mcp-session-id": sid}), _modern(url, "tools/call", shell, **{"mcp-param-session": handle})):
        assert call.status_code == 200 and not call.json()["result"]["isError"], call.text
    assert all(n["status"] == "running" for n in admin_nodes(url))
    assert httpx.delete(url + "/mcp", headers={"x-api-key": KEY_A, "mcp-session-id": sid}, timeout=30).status_code \
        == 204
    assert _post(url, listed, **{"mcp-session-id": sid}).status_code == 404  # ended: the client starts over
    r = _modern(url, "tools/call", {"name": "release_session", "arguments": {"session": handle}},
                **{"mcp-param-session": handle})
    assert r.status_code == 200, r.text
    wait_for(lambda: state() == (0, 0), what="both nodes and sessions gone")


def test_closing_a_2026_request_cancels_the_call(start_manager) -> None:  # type: ignore[no-untyped-def]
    m = start_manager()
    wire = Wire()

    async def run() -> None:
        async with sdk(m.url, wire, MODERN) as c:
            handle = (await c.call_tool("create_session", {})).structured_content["session"]
            with anyio.move_on_after(1.0):  # the client gives up: its POST is closed
                await c.call_tool(SHELL, {"session": handle, "command": "sleep 30; touch late"})
            await sleep_ended(c, {"session": handle})
            r = await c.call_tool(SHELL, {"session": handle, "command": "ls late || echo cancelled"})
            assert "cancelled" in text(r), text(r)
            await c.call_tool("release_session", {"session": handle})

    asyncio.run(run())


def test_a_stopping_replica_hands_its_streams_over_and_finishes_its_calls(cluster) -> None:  # type: ignore[no-untyped-def]
    lb, ms = cluster()
    by_id = {m.replica_id: m for m in ms}
    wire = Wire()
    progress: list[float] = []
    stopped: list[ManagerProc] = []

    async def on_progress(p: float, total: float | None, message: str | None) -> None:
        progress.append(p)

    async def run() -> None:
        async with sdk(lb.url, wire, "legacy") as c:
            await c.list_tools()
            # a call that runs until the test lets it end
            call = asyncio.create_task(c.call_tool(SHELL, {
                "command": "while [ ! -f go ]; do sleep 0.1; done; echo finished"}, progress_callback=on_progress))
            while not progress:
                await asyncio.sleep(0.05)
            streamed = [s for s in wire.seen if s["method"] == "POST" and "event-stream" in s["ctype"]]
            stopped.append(by_id[streamed[-1]["replica"]])
            stopped[0].signal(signal.SIGTERM)  # graceful: its streams close, its running call goes on
            with anyio.fail_after(30):
                while not [s for s in wire.seen if s["resume"] and s["status"] == 200]:
                    await asyncio.sleep(0.05)  # the client resumed the stream on another replica
            assert stopped[0].proc is not None and stopped[0].proc.poll() is None  # still finishing the call
            r = await c.call_tool(SHELL, {"command": "touch go"})  # served by a replica that stays
            assert not r.is_error, text(r)
            r = await asyncio.wait_for(call, 60)
            assert not r.is_error and "finished" in text(r), text(r)

    asyncio.run(run())
    resumed = [s for s in wire.seen if s["resume"]]
    assert resumed and all(s["replica"] != stopped[0].replica_id for s in resumed), wire.seen
    assert stopped[0].proc is not None and stopped[0].proc.wait(30) is not None  # then it exited
    assert "Traceback" not in stopped[0].logs()


def test_allowed_origins_pass_and_the_gateway_can_be_turned_off(start_manager) -> None:
    m = start_manager(mcp={"allowed_origins": ["https://app.example"]})
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
    r = _post(m.url, init, key=None, origin="https://evil.example")
    assert r.status_code == 403 and _code(r) == -32600, r.text
    for origin in ({"origin": "https://app.example"}, {}):  # a listed browser origin, and no Origin at all
        r = _post(m.url, init, key=None, **origin)
        assert r.status_code == 200 and r.json()["result"]["protocolVersion"] == "2025-11-25", r.text
        d = httpx.delete(m.url + "/mcp", headers={"mcp-session-id": r.headers["mcp-session-id"], **origin})
        assert d.status_code in (200, 202, 204), d.text
    assert admin_nodes(m.url) == []
    off = start_manager(name="off", mcp={"enabled": False})
    r = _post(off.url, init, key=None)
    assert r.status_code == 404, r.text
    assert "/mcp" not in httpx.get(off.url + "/openapi.json").json()["paths"]
    assert "/mcp" in httpx.get(m.url + "/openapi.json").json()["paths"]
    c = httpx.Client(base_url=off.url, timeout=60)
    assert c.post("/get_cookie").status_code == 200  # the rest is as before
    assert c.post("/release_session").status_code == 200
