"""The admin API: nodes, replicas, leases, drain, engines, events."""

from __future__ import annotations

from typing import Any

import httpx
import msgspec

from toolserver_manager.errors import Unauthorized
from toolserver_manager.events import EventStream
from toolserver_manager.models import DrainState, Engines, Lease, NodeDetail, NodeList, Replica, SnapshotInfo
from toolserver_manager.transport import DEFAULT_URL, AsyncBase


class AsyncAdmin(AsyncBase):
    """The admin API under ``/admin`` (``Authorization: Bearer <token>``)."""

    def __init__(self, url: str = DEFAULT_URL, token: str | None = None, *, timeout: float = 30.0,
                 **kwargs: Any) -> None:
        headers = dict(kwargs.pop("headers", None) or {})
        if token:
            headers["Authorization"] = f"Bearer {token}"
        super().__init__(url, timeout=timeout, headers=headers, **kwargs)
        self._token = token

    async def __aenter__(self) -> AsyncAdmin:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    async def _get(self, path: str, params: dict[str, Any] | None = None) -> httpx.Response:
        p = {k: str(v) for k, v in (params or {}).items() if v is not None}
        return await self._send("GET", path, op="admin", params=p, retry=False)

    async def list_nodes(self, *, manager_id: str | None = None, status: str | None = None,
                         min_idle_seconds: int | None = None, limit: int | None = None,
                         offset: int | None = None) -> NodeList:
        """Node records, filtered and paged."""
        resp = await self._get("/admin/nodes", {"manager_id": manager_id, "status": status,
                                                "min_idle_seconds": min_idle_seconds, "limit": limit,
                                                "offset": offset})
        return msgspec.json.decode(resp.content, type=NodeList, strict=False)

    async def inspect_node(self, node_id: str) -> NodeDetail:
        """One node: record, container state, stats."""
        resp = await self._get(f"/admin/nodes/{node_id}")
        return msgspec.json.decode(resp.content, type=NodeDetail, strict=False)

    async def release_nodes(self, *node_ids: str) -> dict[str, str]:
        """Release nodes; maps each id to ``released`` or the reason it was not."""
        resp = await self._send("POST", "/admin/nodes/release", op="admin", retry=False,
                                json={"node_ids": list(node_ids)})
        return dict(resp.json()["results"])

    async def fork_node(self, node_id: str, count: int = 1) -> list[str]:
        """Copy a session into count new sessions of its client; their ids."""
        resp = await self._send("POST", f"/admin/nodes/{node_id}/fork", op="admin", retry=False,
                                json={"count": count})
        return [str(i) for i in resp.json()["sessions"]]

    async def snapshot_node(self, node_id: str, name: str) -> SnapshotInfo:
        """Save a session's workspace as the snapshot name (of the session's client)."""
        resp = await self._send("POST", f"/admin/nodes/{node_id}/snapshot", op="admin", retry=False,
                                json={"name": name})
        return msgspec.json.decode(resp.content, type=SnapshotInfo, strict=False)

    async def snapshots(self) -> list[SnapshotInfo]:
        """Every snapshot, oldest first."""
        resp = await self._get("/admin/snapshots")
        return msgspec.convert(resp.json()["snapshots"], list[SnapshotInfo], strict=False)

    async def delete_snapshot(self, name: str, client: str | None = None) -> None:
        """Delete a snapshot (sessions made from it keep their files); names are per client, so
        client (a SnapshotInfo's) says whose when several clients keep one of that name."""
        await self._send("DELETE", f"/admin/snapshots/{name}", op="admin", retry=False,
                         params={"client": client} if client else None)

    async def replicas(self) -> list[Replica]:
        """The live manager replicas."""
        resp = await self._get("/admin/replicas")
        return msgspec.convert(resp.json()["replicas"], list[Replica], strict=False)

    async def leases(self) -> list[Lease]:
        """The checker lease of each manager_id."""
        resp = await self._get("/admin/leases")
        return msgspec.convert(resp.json()["leases"], list[Lease], strict=False)

    async def drain(self, manager_id: str, on: bool = True) -> DrainState:
        """Stop placing new nodes on a manager_id (``on=False`` resumes)."""
        resp = await self._send("POST" if on else "DELETE", f"/admin/managers/{manager_id}/drain",
                                op="admin", retry=False)
        return msgspec.json.decode(resp.content, type=DrainState, strict=False)

    async def engines(self) -> Engines:
        """Each live manager_id's engine summary."""
        resp = await self._get("/admin/engines")
        return msgspec.json.decode(resp.content, type=Engines, strict=False)

    async def config(self) -> dict[str, Any]:
        """The answering replica's configuration, secrets redacted."""
        return dict((await self._get("/admin/config")).json())

    def watch_events(self, manager_id: str | None = None, last_event_id: str | None = None, *,
                     ping_interval: float | None = 20.0, resume_attempts: int = 5) -> EventStream:
        """Every node's events (or one manager_id's)."""
        if not self._token:
            raise Unauthorized("missing admin token (Authorization: Bearer <token>)", 401)
        headers = {"Authorization": f"Bearer {self._token}"}
        return EventStream(self, {"manager_id": manager_id or ""}, headers, last_event_id=last_event_id,
                           ping_interval=ping_interval, resume_attempts=resume_attempts)
