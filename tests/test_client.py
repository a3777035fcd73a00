"""The Python client (toolserver_manager) against real manager processes, Redis and Docker."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import tracemalloc
import zipfile
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ADMIN_TOKEN
from toolserver_manager import (
    Admin,
    AsyncAdmin,
    AsyncSession,
    AvailableTools,
    BadArguments,
    ConnectionFailed,
    Event,
    EventStream,
    FileNotFound,
    InvalidSession,
    NodeNotFound,
    Session,
    ToolFailed,
    ToolNotFound,
    ToolResult,
    Unauthorized,
    Unavailable,
)

SHELL = "shell_command_executor"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


async def shell_tool(s: AsyncSession) -> str:
    """The node's shell tool, found by its real name."""
    tools = await s.get_available_tools()
    names = [n for n in tools.available_tools if "shell" in n.lower() or "command" in n.lower()]
    assert names, tools.available_tools
    return SHELL if SHELL in names else names[0]


async def test_session_end_to_end(start_manager, tmp_path: Path) -> None:
    m = start_manager(node={"restart_stopped": False})
    big = tmp_path / "big.bin"
    with open(big, "wb") as fh:
        for _ in range(10):
            fh.write(os.urandom(1 << 20))

    async with AsyncSession(m.url, retries=0) as s:
        node_id = s.node_id
        assert node_id and len(node_id) == 64
        assert s.info is not None and s.info.message == "add cookie" and s.info.server.startswith("ToolServerManager/")

        tools = await s.get_available_tools()
        assert isinstance(tools, AvailableTools) and tools.tools_json and tools.available_envs
        # the client keeps what the node said: every tool, with its schema, in the node's order
        raw = await s.call("/get_available_tools")
        assert tools.available_tools == raw["available_tools"]
        assert [t.name for t in tools.tools_json] == [t["name"] for t in raw["tools_json"]] == tools.available_tools
        shell = await shell_tool(s)
        r = await s.execute_tool(shell, {"command": "echo $((6*7))"})
        assert isinstance(r, ToolResult) and r.tool_name == shell
        assert "42" in str(r.data)

        # the node's statuses become typed errors
        with pytest.raises(ToolNotFound) as nf:
            await s.execute_tool("NoSuchTool", {})
        assert nf.value.status_code == 404 and "NoSuchTool" in str(nf.value.detail)
        with pytest.raises(ToolNotFound):
            await s.execute_tool("read_from_file", {}, env_name="NoSuchEnv")
        with pytest.raises(BadArguments):
            await s.execute_tool(shell, {"no_such_argument": 1})
        with pytest.raises(ToolFailed) as tf:
            await s.execute_tool(shell, {"command": "ls /definitely-missing"})
        assert tf.value.status_code == 500
        with pytest.raises(FileNotFound):
            await s.download_file("missing.bin", tmp_path / "x")

        # ~10 MB up and down, streamed both ways (bounded memory), byte-identical
        tracemalloc.start()
        try:
            assert "Success" in await s.upload_file(big)
            got = await s.download_file("big.bin", f"{tmp_path / 'out'}{os.sep}")  # a folder: keep the name
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 4 * (1 << 20), f"peak {peak} bytes: not streamed"
        assert got.path == str(tmp_path / "out" / "big.bin") and got.size == big.stat().st_size
        assert sha256_file(Path(got.path)) == sha256_file(big)
        buf = io.BytesIO()
        with open(big, "rb") as fh:
            await s.upload_file(fh, "sub/copy.bin")
        info = await s.download_file("sub/copy.bin", buf)
        assert info.path is None and hashlib.sha256(buf.getvalue()).hexdigest() == sha256_file(big)
        ws = await s.download_workspace(tmp_path / "ws.zip")
        with zipfile.ZipFile(ws.path) as z:
            assert any(n.endswith("big.bin") for n in z.namelist())

        # close stops the node; with restart_stopped off the proxy answers 503 "node is not running"
        assert await s.close() == f"Close session: {node_id}"
        with pytest.raises(Unavailable) as un:
            await s.execute_tool(shell, {"command": "true"})
        assert "node is not running" in str(un.value.detail)

        # a second client on the same node restarts it while the first one retries with back-off
        other = AsyncSession(m.url, node_id=node_id, on_exit="keep")
        patient = AsyncSession(m.url, node_id=node_id, on_exit="keep", retries=8, backoff=0.2, max_backoff=1.0)

        refused = asyncio.Event()

        async def saw(resp: Any) -> None:
            if resp.status_code == 503:
                refused.set()

        patient._http.event_hooks["response"].append(saw)

        async def restart_later() -> str:
            await asyncio.wait_for(refused.wait(), 30)  # the patient client was refused and is backing off
            return await other.reconnect()

        r2, restarted = await asyncio.gather(patient.execute_tool(shell, {"command": "echo back"}), restart_later())
        assert "back" in str(r2.data) and restarted == f"Reconnect session: {node_id}"
        await other.shutdown()
        await patient.shutdown()

        assert await s.reconnect() == f"Reconnect session: {node_id}"
        r = await s.download_file("big.bin", tmp_path / "again.bin")  # the workspace survived
        assert r.size == big.stat().st_size
        assert s.node_id == node_id  # the cookie is never replaced

        assert await s.release() == f"Release session: {node_id}"
        with pytest.raises(InvalidSession):
            await s.execute_tool(shell, {"command": "true"})
        with pytest.raises(InvalidSession):
            await s.release()
    # leaving the block after a release is fine (InvalidSession is swallowed)

    with pytest.raises(InvalidSession):
        await AsyncSession(m.url).execute_tool(shell, {})  # never started


async def test_unreachable_and_admin_errors(start_manager) -> None:
    with pytest.raises(ConnectionFailed):
        await AsyncSession.create("http://127.0.0.1:1")
    m = start_manager()
    async with AsyncAdmin(m.url, "wrong") as bad:
        with pytest.raises(Unauthorized) as e:
            await bad.replicas()
        assert e.value.status_code == 403
    async with AsyncAdmin(m.url) as none:
        with pytest.raises(Unauthorized) as e:
            await none.list_nodes()
        assert e.value.status_code == 401
        with pytest.raises(Unauthorized):
            none.watch_events()
    async with AsyncAdmin(m.url, ADMIN_TOKEN) as a:
        with pytest.raises(NodeNotFound):
            await a.inspect_node("0" * 64)
    async with AsyncAdmin(m.url, "wrong") as bad:
        with pytest.raises(Unauthorized):
            async for _ in bad.watch_events():
                pass
    with pytest.raises(InvalidSession):
        async with AsyncSession(m.url, node_id="f" * 64, on_exit="keep") as s:
            async for _ in s.watch_events():
                pass


def test_sync_session(start_manager, tmp_path: Path) -> None:
    m = start_manager()
    data = os.urandom(3 << 20)
    with Session(m.url, on_exit="close") as s:
        node_id = s.node_id
        shell = asyncio.run(_shell_name(m.url, node_id))
        assert "hello" in str(s.execute_tool(shell, {"command": "echo hello"}).data)
        with pytest.raises(ToolNotFound):
            s.execute_tool("NoSuchTool")
        s.upload_file(io.BytesIO(data), "blob.bin")
        out = io.BytesIO()
        assert s.download_file("blob.bin", out).size == len(data) and out.getvalue() == data
        with s.watch_events("0", ping_interval=None) as events:
            kinds = []
            for ev in events:
                if ev.node_id == node_id:
                    kinds.append(ev.event)
                if "ready" in kinds:
                    break
        assert "created" in kinds
    # on_exit="close": the node is stopped, not removed
    with Admin(m.url, ADMIN_TOKEN) as admin:
        detail = admin.inspect_node(node_id)
        assert detail.record.status == "exited"
        assert admin.release_nodes(node_id) == {node_id: "released"}

    # the sync wrapper also works where an event loop is already running
    async def inside_loop() -> str:
        with Session(m.url) as s2:
            return s2.execute_tool(shell, {"command": "echo inside"}).data["display"]

    assert "inside" in asyncio.run(inside_loop())


async def _shell_name(url: str, node_id: str | None) -> str:
    s = AsyncSession(url, node_id=node_id, on_exit="keep")
    try:
        return await shell_tool(s)
    finally:
        await s.shutdown()


async def next_event(stream: EventStream, node_id: str, timeout: float = 20) -> Event:
    while True:
        ev = await asyncio.wait_for(stream.__anext__(), timeout)
        if ev.node_id == node_id:
            return ev


async def test_watch_events_across_replicas(start_manager, manager_id: str) -> None:
    fast = {"events": {"keepalive_seconds": 0.3, "client_timeout_seconds": 1.0}}
    a = start_manager(name="a", **fast)
    b = start_manager(name="b", **fast)
    admin = AsyncAdmin(a.url, ADMIN_TOKEN)
    # ping_interval=None: only the answers to the server's keep-alives keep the socket open
    stream = admin.watch_events(manager_id=manager_id, ping_interval=None)
    await stream.start()  # the socket is open and the handshake read before anything happens
    assert stream.handshake == {"scope": "admin", "manager_id": manager_id}

    s = await AsyncSession.create(b.url)  # driven entirely through replica b
    node_id = s.node_id
    assert node_id
    seen = [await next_event(stream, node_id)]
    while seen[-1].node_id != node_id or seen[-1].event != "ready":
        seen.append(await next_event(stream, node_id))
    kinds = [e.event for e in seen if e.node_id == node_id]
    assert "created" in kinds and kinds.index("created") < kinds.index("ready")
    resume_from = stream.last_event_id
    assert resume_from == seen[-1].id

    await asyncio.sleep(2.5)  # idle past client_timeout_seconds: the keep-alive answers hold the socket
    await s.close()
    while (await next_event(stream, node_id)).event != "stopped":
        pass
    await s.release()
    while (await next_event(stream, node_id)).event != "released":
        pass
    assert stream.connections == 1, "the socket was dropped and resumed"
    await stream.aclose()

    # resuming from an id replays exactly what followed it
    async with admin.watch_events(manager_id=manager_id, last_event_id=resume_from) as again:
        replayed = []
        while not replayed or replayed[-1] != "released":
            replayed.append((await next_event(again, node_id)).event)
    assert "ready" not in replayed and replayed.index("stopped") < replayed.index("released")

    # a session's own watch (cookie scoped) through replica a, replayed from the beginning
    s2 = await AsyncSession.create(b.url)
    on_a = AsyncSession(a.url, node_id=s2.node_id, on_exit="keep")
    async with on_a.watch_events(last_event_id="0") as mine:
        assert mine.handshake["id"] == s2.node_id
        got = []
        while "ready" not in got:
            ev = await asyncio.wait_for(mine.__anext__(), 20)
            if ev.event != "gap":
                assert ev.node_id == s2.node_id
                got.append(ev.event)
    assert "created" in got and got.index("created") < got.index("ready")
    await s2.release()
    await s2.shutdown()
    await on_a.shutdown()
    await s.shutdown()
    await admin.shutdown()
