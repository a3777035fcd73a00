"""Session operations as any replica serves them: local when this replica owns the node's
manager_id, forwarded to a live replica of the owner otherwise."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec

from nodeops import capacity, forks, intents, lifecycle, lost, pool, snapshots
from nodeops.context import NodeOps
from nodeops.forward import RemoteError, forward, owner_replicas, remote_stream
from nodeops.placement import choose_managers
from nodeops.resume import restart_node
from shared import metrics
from shared.errors import (
    ContainerGone,
    HostUnreachable,
    ImageMissing,
    NodeNotFound,
    NoLiveManager,
    NotFound,
)
from shared.models import IntentOp, NodeRecord, NodeStatus

log = logging.getLogger(__name__)


async def create(ops: NodeOps, client: str = "", manager_id: str | None = None, snapshot: str = "") -> NodeRecord:
    """A new ready node for a client, on manager_id or where placement puts it. An engine that
    cannot take it now (no replica of it answers, or it lacks the node image) passes it to the
    next one placement names; the last one's error is the answer. From a snapshot (one of the
    client's), on the host that keeps it."""
    if snapshot:
        snap = await snapshots.find(ops, snapshot, client)
        if manager_id:
            return await _create_on(ops, manager_id, client, snapshot)
        mids = await choose_managers(ops)
        # on the snapshot's own host when placement has it (no copy between hosts), else the best
        return await _create_on(ops, snap.manager_id if snap.manager_id in mids else mids[0], client, snapshot)
    if manager_id:
        return await _create_on(ops, manager_id, client)
    *first, last = await choose_managers(ops)
    for mid in first:
        try:
            return await _create_on(ops, mid, client)
        except (NoLiveManager, ImageMissing) as exc:
            log.warning("placement_next manager_id=%s reason=%r", mid, exc.detail)
    return await _create_on(ops, last, client)


async def _create_on(ops: NodeOps, mid: str, client: str, snapshot: str = "") -> NodeRecord:
    if mid != ops.manager_id:
        body = {"client": client, **({"snapshot": snapshot} if snapshot else {})}
        data = await forward(ops, mid, "POST", "/internal/nodes", body)
        return msgspec.convert(data, NodeRecord)
    return await create_local(ops, client, snapshot)


async def create_local(ops: NodeOps, client: str = "", snapshot: str = "") -> NodeRecord:
    """A node on this engine: from the warm pool when it has one, else a new one within quota
    (waiting its turn in the creation queue). From a snapshot kept here, a pooled node is given a
    copy of it in place of its empty workspace (forks.give), else a new one starts as a copy."""
    snap = await snapshots.find(ops, snapshot, client) if snapshot else None
    claimed = await pool.claim(ops, client) if snap is None or snap.manager_id == ops.manager_id else None
    if claimed is not None and (snap is None or await forks.give(ops, claimed, snap.seed)):
        return claimed
    c = ops.cfg.cluster
    cap = await capacity.node_cap(ops)
    reservation = await ops.store.reserve(ops.manager_id, cap, c.max_nodes_total, client,
                                          capacity.client_cap(ops.cfg.quota.per_client, cap), ops.replica.replica_id)
    if snap is None:
        return await lifecycle.create_node(ops, client=client, reservation=reservation)
    seed, fetched = snap.seed, ""
    try:
        if snap.manager_id != ops.manager_id:  # kept on another host: its bytes are copied here, within quota
            seed = fetched = await snapshots.fetch(ops, snap)
    except BaseException:
        await asyncio.shield(ops.store.unreserve(ops.manager_id, reservation, client))
        raise
    try:
        return await lifecycle.create_node(ops, client=client, reservation=reservation, seed=seed)
    finally:
        if fetched:
            await asyncio.shield(ops.backend.drop_seed(fetched))


async def _dispatch(ops: NodeOps, node_id: str | None, local: Callable[[NodeOps, str], Awaitable[Any]],
                    remote_path: str, durable: IntentOp | None = None) -> Any:
    if not node_id:
        raise NodeNotFound(node_id)
    rec = await ops.store.get_node(node_id)
    if rec is None or rec.status == NodeStatus.RELEASED:
        raise NodeNotFound(node_id)
    if rec.manager_id == ops.manager_id:
        return await local(ops, node_id)
    try:
        return await forward(ops, rec.manager_id, "POST", f"/internal/nodes/{node_id}/{remote_path}")
    except RemoteError as exc:
        if exc.status_code == 404:  # the owner found no such node: same answer as a local miss
            raise NodeNotFound(node_id) from None
        raise
    except NoLiveManager as exc:
        if durable is None:
            raise await _named(ops, rec, exc) from None
        # no replica of the owner could be reached: the call is kept for it, and answered now
        await intents.record(ops, rec, durable)
        return None


async def _named(ops: NodeOps, rec: NodeRecord, exc: NoLiveManager) -> NoLiveManager:
    """The error to answer: past the grace period the owner's host is lost, and named as such."""
    if isinstance(exc, HostUnreachable):
        return exc
    silent = (await lost.lost_managers(ops)).get(rec.manager_id)
    if silent is None:
        return exc
    return HostUnreachable(rec.host or "?", rec.manager_id, f"no replica of it seen for {silent:.0f} s")


async def reconnect(ops: NodeOps, node_id: str | None) -> None:
    await _dispatch(ops, node_id, _restart, "restart")


async def close(ops: NodeOps, node_id: str | None) -> None:
    await _dispatch(ops, node_id, lifecycle.stop_node, "stop", durable=IntentOp.STOP)


async def release(ops: NodeOps, node_id: str | None) -> None:
    await _dispatch(ops, node_id, lifecycle.release_node, "release", durable=IntentOp.RELEASE)


async def _restart(ops: NodeOps, node_id: str) -> Any:
    await intents.supersede_stop(ops, ops.manager_id, node_id)
    return await restart_node(ops, node_id)


async def _ensure(ops: NodeOps, node_id: str) -> Any:
    await intents.supersede_stop(ops, ops.manager_id, node_id)
    return await lifecycle.ensure_running(ops, node_id)


async def _resume(ops: NodeOps, node_id: str) -> Any:
    await intents.supersede_stop(ops, ops.manager_id, node_id)
    return await lifecycle.resume_node(ops, node_id)


async def pause(ops: NodeOps, node_id: str | None) -> None:
    await _dispatch(ops, node_id, lifecycle.pause_node, "pause")


async def resume(ops: NodeOps, node_id: str | None) -> None:
    await _dispatch(ops, node_id, _resume, "resume")


async def ensure_running(ops: NodeOps, node_id: str) -> NodeRecord:
    """Make sure a node is up (restarting a stopped one when allowed); one restart per node at a time."""
    fut = ops.restarting.get(node_id)
    if fut is not None:
        return await asyncio.shield(fut)
    fut = asyncio.get_running_loop().create_future()
    ops.restarting[node_id] = fut
    try:
        rec = await _dispatch(ops, node_id, _ensure, "ensure")
        if isinstance(rec, dict):
            rec = msgspec.convert(rec, NodeRecord)
        fut.set_result(rec)
        return rec
    except BaseException as exc:
        fut.set_exception(exc)
        fut.exception()  # mark retrieved: waiters re-raise it, nobody else must
        raise
    finally:
        ops.restarting.pop(node_id, None)


# the operations another replica may ask this one to run on a node it owns
LOCAL_OPS: dict[str, Callable[[NodeOps, str], Awaitable[Any]]] = {
    "restart": _restart,
    "stop": lifecycle.stop_node,
    "release": lifecycle.release_node,
    "ensure": _ensure,
    "pause": lifecycle.pause_node,
    "resume": _resume,
}


async def logs(ops: NodeOps, node_id: str, tail: int, follow: bool) -> AsyncIterator[bytes]:
    """A node's log from its owner's engine, opened: the last tail lines, then (follow) live."""
    rec = await ops.store.get_node(node_id)
    if rec is None:
        raise NodeNotFound(node_id)
    if rec.status == NodeStatus.ARCHIVED or not rec.cid:
        raise NotFound(f"session {node_id} is archived: its container, and the log with it, are gone")
    if rec.manager_id == ops.manager_id:
        try:
            return await ops.backend.logs(rec.cid, tail, follow)
        except ContainerGone:
            raise NodeNotFound(node_id) from None
    replicas = await owner_replicas(ops, rec.manager_id)
    if not replicas or not ops.cfg.internal_token:
        raise NoLiveManager(rec.manager_id)
    metrics.FORWARDED.labels("logs").inc()  # read from the owner's engine, which may be another host's
    try:
        return await remote_stream(ops, replicas[0], f"/internal/nodes/{node_id}/logs?tail={tail}&follow={int(follow)}")
    except RemoteError as exc:
        if exc.status_code == 404:
            raise NodeNotFound(node_id) from None
        raise
