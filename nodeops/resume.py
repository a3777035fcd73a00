"""Bringing a session back from whatever tier it is in: thaw a paused node, start a stopped
one, or give an archived session (container removed, workspace kept) a new container on its
workspace. The client only sees a slower answer.

A new container is made by one caller at a time per session: a lock in Redis, and the engine's
own refusal of a second container of the same name (a container is named after its session).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator

from nodeops import lifecycle
from nodeops.context import NodeOps
from shared import metrics
from shared.backend import Address, NewNode
from shared.errors import (
    ContainerGone,
    EngineError,
    EngineUnavailable,
    ManagerError,
    NodeNotFound,
    NodeNotResponding,
    NodeNotRunning,
    NodeTimeout,
    Unavailable,
    WorkspaceUnavailable,
)
from shared.models import Event, NodeRecord, NodeStatus, Tier

log = logging.getLogger(__name__)

LOCK_POLL_SECONDS = 0.05


def observe(from_tier: str, t0: float) -> None:
    """Count a resume and its duration by the tier it left."""
    if from_tier in (Tier.PAUSED, Tier.STOPPED, Tier.ARCHIVED):
        metrics.RESUME_SECONDS.labels(from_tier).observe(time.monotonic() - t0)


async def _resumed(ops: NodeOps, rec: NodeRecord, from_tier: str) -> None:
    await ops.store.publish(Event(type="resumed", node_id=rec.id, manager_id=rec.manager_id,
                                  replica_id=ops.replica.replica_id, detail=from_tier))


async def resume(ops: NodeOps, rec: NodeRecord, *, auto: bool = True) -> NodeRecord:
    """The session's node running and answering. auto: a proxied call, which node.restart_stopped
    may forbid to start a stopped or archived node (a paused one is always thawed)."""
    if rec.status == NodeStatus.ARCHIVED or not rec.cid:
        return await bring_back(ops, rec, auto=auto)
    if rec.status == NodeStatus.PAUSED and rec.port:
        # the record says paused: thaw it straight away, one engine call (its address is unchanged)
        t0 = time.monotonic()
        await ops.store.touch({rec.id: (rec.manager_id, time.time())})  # before: or it is idle when thawed
        try:
            await ops.backend.unpause(rec.cid)
        except ContainerGone:
            pass  # gone meanwhile: the way below finds out what is left
        else:
            rec.status = NodeStatus.RUNNING
            await ops.store.update_node(rec.id, status=NodeStatus.RUNNING, paused_at=0)
            with contextlib.suppress(NodeTimeout):  # not answering (stopped behind our back?): see below
                if await lifecycle.wait_ready(ops, rec, time.monotonic() + 2.0):
                    await _resumed(ops, rec, Tier.PAUSED)
                    observe(Tier.PAUSED, t0)
                    return rec
    try:
        info = await ops.backend.inspect(rec.cid)
    except ContainerGone:
        # only the engine's word that the container does not exist gets here (an engine that cannot
        # be reached is a passing fault, answered 503); the workspace, if the session has one, is not
        if rec.workspace:
            return await bring_back(ops, rec, auto=auto)
        raise NodeNotFound(rec.id) from None
    if info.status == NodeStatus.PAUSED:
        t0 = time.monotonic()
        await ops.store.touch({rec.id: (rec.manager_id, time.time())})  # before: or it is idle when thawed
        await ops.backend.unpause(rec.cid)
        rec.status = NodeStatus.RUNNING
        await ops.store.update_node(rec.id, status=NodeStatus.RUNNING, paused_at=0)
        await _resumed(ops, rec, Tier.PAUSED)
        observe(Tier.PAUSED, t0)
        info.status = NodeStatus.RUNNING
    if info.status == NodeStatus.RUNNING and info.port:
        if info.address != (rec.host, rec.port) or rec.status != NodeStatus.RUNNING:
            (rec.host, rec.port), rec.status = info.address, NodeStatus.RUNNING
            await ops.store.update_node(rec.id, host=rec.host, port=rec.port, status=NodeStatus.RUNNING)
        if await lifecycle.wait_ready(ops, rec, time.monotonic() + ops.cfg.node.creation_wait_seconds):
            return rec
        raise NodeNotResponding()
    if auto and not ops.cfg.node.restart_stopped:
        raise NodeNotRunning(rec.id)
    log.info("node_autorestart node_id=%s status=%s", rec.id[:12], info.status)
    metrics.SESSION_OPS.labels("autorestart", "ok").inc()
    try:
        return await lifecycle.restart_node(ops, rec.id, reason="proxied request")
    except (EngineUnavailable, WorkspaceUnavailable, NodeNotFound):
        raise
    except Unavailable:
        raise NodeNotResponding() from None


@contextlib.asynccontextmanager
async def session_lock(ops: NodeOps, rec: NodeRecord) -> AsyncIterator[None]:
    """Hold the session's lock (waiting for another holder) while its container is made or
    restarted: the checker takes it too before it removes a container."""
    store = ops.store
    await store.touch({rec.id: (rec.manager_id, time.time())})  # in use: no tier action meanwhile
    wait = ops.cfg.node.creation_wait_seconds + 10
    holder = f"{ops.replica.replica_id}:{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + wait
    while not await store.lock_session(rec.id, holder, int(wait * 1000)):
        if time.monotonic() > deadline:
            raise NodeTimeout("Node restart timeout!")
        await asyncio.sleep(LOCK_POLL_SECONDS)
    try:
        yield
    finally:
        with contextlib.suppress(ManagerError):
            await store.unlock_session(rec.id, holder)


async def bring_back(ops: NodeOps, rec: NodeRecord, *, auto: bool = True, reason: str = "") -> NodeRecord:
    """A new container for a session whose container is gone, on the same workspace."""
    if not rec.workspace:  # its workspace went with its container: nothing to bring back
        raise await lifecycle.gone(ops, rec)
    if auto and not ops.cfg.node.restart_stopped:
        raise NodeNotRunning(rec.id)
    store = ops.store
    async with session_lock(ops, rec):
        rec = await lifecycle.owned(ops, rec.id)
        try:
            info = await ops.backend.inspect(rec.id)  # by name: whoever made it
        except ContainerGone:
            return await _recreate(ops, rec)
        # another caller brought it back while we waited for the lock: use its container
        if rec.container_id != info.id or rec.status == NodeStatus.ARCHIVED:
            known = rec.container_id == info.id
            rec.container_id, rec.status = info.id, info.status
            fields: dict[str, object] = {"container_id": info.id, "status": info.status, "archived_at": 0}
            if not known:  # made by a caller that died before recording it: its secret is the engine's
                rec.secret = await ops.backend.node_secret(info.id)
                fields["secret"] = rec.secret
            await store.update_node(rec.id, **fields)
            await store.unarchived(rec.manager_id, rec.id)
    return await resume(ops, rec, auto=False)


async def _recreate(ops: NodeOps, rec: NodeRecord) -> NodeRecord:
    t0 = time.monotonic()
    store = ops.store
    try:
        await ops.backend.ready_workspace(rec.workspace)
    except ContainerGone:  # the engine says the workspace is gone: so is the session
        raise await lifecycle.gone(ops, rec) from None
    # the session keeps its secret (derived from its id; without a key its clear one, or a new one
    # for a record rebuilt from a workspace alone)
    new = NewNode(owner=ops.manager_id, role=rec.role, replica_id=ops.replica.replica_id, created_at=time.time(),
                  client=rec.client, secret=ops.store.secrets.new(rec.id, rec.secret), session_id=rec.id,
                  workspace=rec.workspace)
    cid = await ops.backend.create(new)
    await store.unarchived(rec.manager_id, rec.id)
    rec.container_id, rec.secret, rec.ready_at = cid, new.secret, 0.0
    await store.update_node(rec.id, container_id=cid, secret=new.secret, status=NodeStatus.RESTARTING, ready_at=0,
                            archived_at=0)
    ops.forget_address(rec.id)
    try:
        rec.host, rec.port = await ops.backend.start(cid)
        ops.addresses.put(cid, rec.id, Address(rec.host, rec.port))  # the engine's own word
    except EngineError as exc:
        # the engine would not start it, most likely because the workspace cannot be mounted: the
        # session stays archived, its workspace untouched, and the caller is told why
        log.warning("bring_back_failed node_id=%s error=%s", rec.id[:12], exc.detail)
        try:
            await ops.backend.remove(cid)
            await store.update_node(rec.id, status=NodeStatus.ARCHIVED, container_id="", host="", port=0,
                                    archived_at=time.time())
            await store.mark_archived(rec.manager_id, rec.id)
        except ManagerError as cleanup:
            log.error("bring_back_cleanup_failed node_id=%s error=%s", rec.id[:12], cleanup.detail)
        raise WorkspaceUnavailable(rec.id, exc.detail) from exc
    rec.status = NodeStatus.RUNNING
    await store.update_node(rec.id, status=NodeStatus.RUNNING, host=rec.host, port=rec.port)
    await _resumed(ops, rec, Tier.ARCHIVED)
    if not await lifecycle.wait_ready(ops, rec, t0 + ops.cfg.node.creation_wait_seconds):
        raise NodeTimeout("Node restart timeout!")
    rec.ready_at = time.time()
    await store.update_node(rec.id, ready_at=rec.ready_at)
    await store.publish(Event(type="ready", node_id=rec.id, manager_id=rec.manager_id,
                              replica_id=ops.replica.replica_id))
    await store.touch({rec.id: (rec.manager_id, time.time())})
    observe(Tier.ARCHIVED, t0)
    log.info("node_brought_back node_id=%s container=%s elapsed_s=%.3f", rec.id[:12], cid[:12],
             time.monotonic() - t0)
    return rec
