"""An in-memory engine for fast unit tests of node operations and the checker (engine.kind: fake).

Not a product engine: nothing runs. A node is a few fields in a dict; it "answers" HTTP only
through the transport this backend hands out (``http_transport``), and only while it runs. It
exists to test what sits above the NodeBackend interface without Docker, and to show that an
engine is this module plus its config section (shared/config.py FakeConfig), nothing else.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import msgspec

from shared.config import Config
from shared.engines.base import Address, Changes, EngineInfo, NewNode, NodeBackend, NodeInfo, WorkspaceInfo
from shared.errors import ContainerGone, EngineError
from shared.models import NodeStatus

HOST = "fake-engine.invalid"  # where its nodes "listen": a name that resolves nowhere


class _Node(msgspec.Struct, kw_only=True):
    new: NewNode
    id: str
    status: str = NodeStatus.CREATED
    port: int = 0


class FakeBackend(NodeBackend):
    """Nodes and workspaces in dicts; every change bumps a counter that ``changes`` reports."""

    def __init__(self, cfg: Config) -> None:
        self._cfg = cfg.engine.fake
        self._nodes: dict[str, _Node] = {}
        self._workspaces: dict[str, WorkspaceInfo] = {}
        self._ports = itertools.count(20000)
        self._changed = threading.Condition()
        self._version = 0
        self.calls: list[str] = []  # the interface methods called, in order, for tests to read
        self.saved: dict[str, str] = {}  # seeds (forks, snapshots) -> the workspace saved

    # --- test hooks: what an engine does behind the manager's back ----------------------
    def vanish(self, node_id: str) -> None:
        """The node's container is removed by someone else (its workspace stays)."""
        del self._nodes[node_id]
        self._bump()

    def exit(self, node_id: str) -> None:
        """The node's process ends on its own."""
        self._nodes[node_id].status, self._nodes[node_id].port = NodeStatus.EXITED, 0
        self._bump()

    def http_transport(self) -> httpx.AsyncBaseTransport:
        """An HTTP transport on which running nodes answer 200 to anything; others refuse to connect."""

        def handle(request: httpx.Request) -> httpx.Response:
            for n in self._nodes.values():
                if n.status == NodeStatus.RUNNING and (request.url.host, request.url.port) == (HOST, n.port):
                    return httpx.Response(200, json={"node": n.id})
            raise httpx.ConnectError("connection refused", request=request)

        return httpx.MockTransport(handle)

    def _bump(self) -> None:
        with self._changed:
            self._version += 1
            self._changed.notify_all()

    def _get(self, node_id: str) -> _Node:
        node = self._nodes.get(node_id)
        if node is None:
            raise ContainerGone(f"No such container: {node_id}")
        return node

    def _set(self, node_id: str, status: str) -> Address:
        node = self._get(node_id)
        node.status = status
        if status == NodeStatus.RUNNING and not node.port:
            node.port = next(self._ports)
        elif status == NodeStatus.EXITED:
            node.port = 0
        self._bump()
        return Address(HOST, node.port)

    def _info(self, n: _Node) -> NodeInfo:
        return NodeInfo(id=n.id, owner=n.new.owner, role=n.new.role, status=n.status, health="none",
                        created=n.new.created_at, host=HOST, port=n.port, replica_id=n.new.replica_id,
                        client=n.new.client, image=self.image, session_id=n.new.session_id,
                        workspace=n.new.workspace)

    # --- the interface ----------------------------------------------------------------
    async def ping(self) -> None:
        self.calls.append("ping")

    async def create(self, node: NewNode) -> str:
        self.calls.append("create")
        if node.session_id and any(n.new.session_id == node.session_id for n in self._nodes.values()):
            raise EngineError(f"fake: a node of session {node.session_id} exists")  # as Docker's name conflict
        node_id = uuid.uuid4().hex + uuid.uuid4().hex
        self._nodes[node_id] = _Node(new=node, id=node_id)
        self._bump()
        return node_id

    async def start(self, node_id: str) -> Address:
        self.calls.append("start")
        return self._set(node_id, NodeStatus.RUNNING)

    async def restart(self, node_id: str, timeout: int = 5) -> Address:
        self.calls.append("restart")
        return self._set(node_id, NodeStatus.RUNNING)

    async def stop(self, node_id: str, timeout: int = 5) -> None:
        self.calls.append("stop")
        self._set(node_id, NodeStatus.EXITED)

    async def pause(self, node_id: str) -> None:
        self.calls.append("pause")
        self._set(node_id, NodeStatus.PAUSED)

    async def unpause(self, node_id: str) -> None:
        self.calls.append("unpause")
        self._set(node_id, NodeStatus.RUNNING)

    async def remove(self, node_id: str) -> bool:
        self.calls.append("remove")
        if self._nodes.pop(node_id, None) is None:
            return False
        self._bump()
        return True

    async def inspect(self, node_id: str) -> NodeInfo:
        return self._info(self._get(node_id))

    async def node_secret(self, node_id: str) -> str:
        return self._get(node_id).new.secret

    async def nodes(self, owner: str, role: str | None = None) -> list[NodeInfo]:
        return [self._info(n) for n in self._nodes.values()
                if n.new.owner == owner and (role is None or n.new.role == role)]

    async def stats(self, node_id: str) -> dict[str, Any]:
        self._get(node_id)
        return {"memory_bytes": 0, "memory_limit_bytes": self.node_memory_bytes, "cpu_total_ns": 0, "pids": 1}

    async def logs(self, node_id: str, tail: int, follow: bool) -> AsyncIterator[bytes]:
        self._get(node_id)
        return _no_output()

    async def info(self) -> EngineInfo:
        running = sum(n.status == NodeStatus.RUNNING for n in self._nodes.values())
        return EngineInfo(name="fake", version="0", nodes=len(self._nodes), running=running,
                          stopped=len(self._nodes) - running, cpus=1, memory_bytes=self._cfg.memory_bytes)

    def changes(self, owner: str) -> Changes:
        return _FakeChanges(self)

    async def close(self) -> None:
        self._bump()

    @property
    def image(self) -> str:
        return "fake"

    @property
    def node_memory_bytes(self) -> int:
        return self._cfg.node_memory_bytes

    # --- workspaces ---------------------------------------------------------------------
    def workspace_name(self, session_id: str) -> str:
        return "fake-ws-" + session_id

    async def create_workspace(self, node: NewNode) -> str:
        self.calls.append("create_workspace")
        if node.seed and node.seed not in self.saved:
            raise EngineError(f"fake: no saved workspace {node.seed}")
        name = self.workspace_name(node.session_id)
        self._workspaces[name] = WorkspaceInfo(name=name, session_id=node.session_id, owner=node.owner,
                                               role=node.role, replica_id=node.replica_id,
                                               created=node.created_at or time.time(), client=node.client)
        return name

    async def capture_workspace(self, name: str, seed: str) -> float:
        """A seed names the workspace it was saved from (the fake keeps no files)."""
        self.calls.append("capture_workspace")
        if name not in self._workspaces:
            raise ContainerGone(f"No such volume: {name}")
        self.saved[seed] = name
        return 0.0

    async def drop_seed(self, seed: str) -> None:
        self.saved.pop(seed, None)

    async def ready_workspace(self, name: str) -> None:
        if name not in self._workspaces:
            raise ContainerGone(f"No such volume: {name}")

    async def remove_workspace(self, name: str) -> None:
        self.calls.append("remove_workspace")
        self._workspaces.pop(name, None)

    async def workspaces(self, owner: str) -> list[WorkspaceInfo]:
        return [w for w in self._workspaces.values() if w.owner == owner]


async def _no_output() -> AsyncIterator[bytes]:
    return
    yield b""  # never reached: it makes this an async generator


BACKEND = FakeBackend


class _FakeChanges(Changes):
    """Every change of the fake engine (it keeps no owner per event), woken by its condition."""

    def __init__(self, fake: FakeBackend) -> None:
        self._fake = fake
        self._closed = False

    def __iter__(self) -> Iterator[str | None]:
        changed = self._fake._changed
        with changed:
            seen = self._fake._version
        yield None
        while True:
            with changed:
                while not self._closed and self._fake._version == seen:
                    changed.wait()
                if self._closed:
                    return
                seen = self._fake._version
            yield None

    def close(self) -> None:
        with self._fake._changed:
            self._closed = True
            self._fake._changed.notify_all()
