"""Session operations as any replica serves them: local when this replica owns the node's
manager_id, forwarded to a live replica of the owner otherwise."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from manager import cluster, lifecycle, metrics, pool
from manager.runtime import Runtime
from shared.errors import NodeNotFound, NodeNotRunning, NodeNotResponding, Unavailable
from shared.models import NodeRecord, NodeStatus

log = logging.getLogger(__name__)


async def create(rt: Runtime, client: str = "", manager_id: str | None = None) -> NodeRecord:
    """A new ready node for a client, placed on this engine or the least-loaded other one."""
    mid = manager_id or await cluster.choose_manager(rt)
    if mid != rt.manager_id:
        data = await cluster.forward(rt, mid, "POST", "/internal/nodes", {"client": client})
        return msgspec.convert(data, NodeRecord)
    return await create_local(rt, client)


async def create_local(rt: Runtime, client: str = "") -> NodeRecord:
    claimed = await pool.claim(rt, client)
    if claimed is not None:
        return claimed
    c = rt.cfg.cluster
    reservation = await rt.store.reserve(rt.manager_id, c.max_nodes_per_manager, c.max_nodes_total, client,
                                         rt.cfg.quota.per_client)
    return await lifecycle.create_node(rt, client=client, reservation=reservation)


async def _dispatch(rt: Runtime, node_id: str | None, local: Callable[[Runtime, str], Awaitable[Any]],
                    remote_path: str) -> Any:
    if not node_id:
        raise NodeNotFound(node_id)
    rec = await rt.store.get_node(node_id)
    if rec is None:
        raise NodeNotFound(node_id)
    if rec.manager_id == rt.manager_id:
        return await local(rt, node_id)
    try:
        return await cluster.forward(rt, rec.manager_id, "POST", f"/internal/nodes/{node_id}/{remote_path}")
    except cluster.RemoteError as exc:
        if exc.status_code == 404:  # the owner found no such node: same answer as a local miss
            raise NodeNotFound(node_id) from None
        raise


async def reconnect(rt: Runtime, node_id: str | None) -> None:
    await _dispatch(rt, node_id, lifecycle.restart_node, "restart")


async def close(rt: Runtime, node_id: str | None) -> None:
    await _dispatch(rt, node_id, lifecycle.stop_node, "stop")


async def release(rt: Runtime, node_id: str | None) -> None:
    await _dispatch(rt, node_id, lifecycle.release_node, "release")


_restarting: dict[str, asyncio.Future[NodeRecord]] = {}


async def ensure_running(rt: Runtime, node_id: str) -> NodeRecord:
    """Make sure a node is up (restarting a stopped one when allowed); one restart per node at a time."""
    fut = _restarting.get(node_id)
    if fut is not None:
        return await asyncio.shield(fut)
    fut = asyncio.get_running_loop().create_future()
    _restarting[node_id] = fut
    try:
        rec = await _dispatch(rt, node_id, ensure_running_local, "ensure")
        if isinstance(rec, dict):
            rec = msgspec.convert(rec, NodeRecord)
        fut.set_result(rec)
        return rec
    except BaseException as exc:
        fut.set_exception(exc)
        fut.exception()  # mark retrieved: waiters re-raise it, nobody else must
        raise
    finally:
        _restarting.pop(node_id, None)


async def ensure_running_local(rt: Runtime, node_id: str) -> NodeRecord:
    rec = await rt.store.get_node(node_id)
    if rec is None or rec.status == NodeStatus.RELEASED:
        raise NodeNotFound(node_id)
    try:
        info = await rt.backend.inspect(node_id)
    except Exception:  # noqa: BLE001 - ContainerGone and engine errors are handled alike below
        info = None
    if info is not None and info.status == "running" and info.port:
        if info.port != rec.port or rec.status != NodeStatus.RUNNING:
            rec.port, rec.status = info.port, NodeStatus.RUNNING
            await rt.store.update_node(node_id, port=info.port, status=NodeStatus.RUNNING)
        if await lifecycle.wait_ready(rt, rec, time.monotonic() + rt.cfg.node.creation_wait_seconds):
            return rec
        raise NodeNotResponding()
    if info is None:
        # gone from the engine: same answer as an unknown id
        raise NodeNotFound(node_id)
    if not rt.cfg.node.restart_stopped:
        raise NodeNotRunning(node_id)
    log.info("node_autorestart node_id=%s status=%s", node_id[:12], info.status)
    metrics.SESSION_OPS.labels("autorestart", "ok").inc()
    try:
        return await lifecycle.restart_node(rt, node_id, reason="proxied request")
    except Unavailable:
        raise NodeNotResponding() from None
