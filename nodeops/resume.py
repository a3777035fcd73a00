"""Bringing a session back from whatever tier it is in: thaw a paused node, start a stopped
one, or give an archived session (container removed, workspace kept) a new container on its
workspace. The client only sees a slower answer.

A new container is made by one caller at a time per session: the session lock
(nodeops/locks.py), and the engine's own refusal of a second container of the same name (a
container is named after its session).
"""

from __future__ import annotations

import contextlib
import logging
import time

from nodeops.context import NodeOps
from nodeops.primitives import gone, in_use, owned, session_lock, wait_ready
from shared import metrics
from shared.engines.base import Address, NewNode
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
from shared.models import (
    EventKind,
    NodeRecord,
    NodeStatus,
    Tier,
    archived_fields,
    restarting_fields,
    running_fields,
)

log = logging.getLogger(__name__)


def observe(from_tier: str, t0: float) -> None:
    """Count a resume and its duration by the tier it left."""
    if from_tier in (Tier.PAUSED, Tier.STOPPED, Tier.ARCHIVED):
        metrics.RESUME_SECONDS.labels(from_tier).observe(time.monotonic() - t0)


async def _thaw(ops: NodeOps, rec: NodeRecord) -> None:
    """Unfreeze a paused node and record it running (its address is unchanged)."""
    await in_use(ops, rec)  # before: or it is idle when thawed
    await ops.backend.unpause(rec.cid)
    rec.status = NodeStatus.RUNNING
    await ops.store.update_node(rec.id, **running_fields())


async def resume(ops: NodeOps, rec: NodeRecord, *, auto: bool = True) -> NodeRecord:
    """The session's node running and answering. auto: a proxied call, which node.restart_stopped
    may forbid to start a stopped or archived node (a paused one is always thawed)."""
    if rec.status == NodeStatus.ARCHIVED or not rec.cid:
        return await bring_back(ops, rec, auto=auto)
    if rec.status == NodeStatus.PAUSED and rec.port:
        # the record says paused: thaw it straight away, one engine call
        t0 = time.monotonic()
        try:
            await _thaw(ops, rec)
        except ContainerGone:
            pass  # gone meanwhile: the way below finds out what is left
        else:
            with contextlib.suppress(NodeTimeout):  # not answering (stopped behind our back?): see below
                if await wait_ready(ops, rec, time.monotonic() + 2.0):
                    await ops.publish(EventKind.RESUMED, rec, Tier.PAUSED)
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
    if info.status == NodeStatus.PAUSED:  # paused behind the record's back
        t0 = time.monotonic()
        await _thaw(ops, rec)
        await ops.publish(EventKind.RESUMED, rec, Tier.PAUSED)
        observe(Tier.PAUSED, t0)
        info.status = NodeStatus.RUNNING
    if info.status == NodeStatus.RUNNING and info.port:
        if info.address != (rec.host, rec.port) or rec.status != NodeStatus.RUNNING:
            (rec.host, rec.port), rec.status = info.address, NodeStatus.RUNNING
            await ops.store.update_node(rec.id, **running_fields(rec.host, rec.port))
        if await wait_ready(ops, rec, time.monotonic() + ops.cfg.node.creation_wait_seconds):
            return rec
        raise NodeNotResponding()
    if auto and not ops.cfg.node.restart_stopped:
        raise NodeNotRunning(rec.id)
    log.info("node_autorestart node_id=%s status=%s", rec.id[:12], info.status)
    metrics.SESSION_OPS.labels("autorestart", "ok").inc()
    try:
        return await restart_node(ops, rec.id, reason="proxied request")
    except (EngineUnavailable, WorkspaceUnavailable, NodeNotFound):
        raise
    except Unavailable:
        raise NodeNotResponding() from None


async def restart_node(ops: NodeOps, node_id: str, *, reason: str = "reconnect") -> NodeRecord:
    """Restart (or start) a session's node and wait until it answers; one whose container is gone
    (archived) gets a new one on its workspace."""
    rec = await owned(ops, node_id)
    t0 = time.monotonic()
    from_tier = rec.tier
    gone_container = False
    await in_use(ops, rec)
    async with session_lock(ops, rec):  # the checker does not archive it meanwhile
        rec = await owned(ops, node_id)
        if rec.status == NodeStatus.ARCHIVED or not rec.cid:
            gone_container = True
        else:
            await ops.store.update_node(node_id, **restarting_fields())
            ops.forget_address(node_id)
            try:
                rec.host, rec.port = await ops.backend.restart(rec.cid, timeout=ops.cfg.node.stop_timeout_seconds)
                ops.addresses.put(rec.cid, rec.id, Address(rec.host, rec.port))
            except ContainerGone:
                gone_container = True
    if gone_container:
        if rec.workspace:
            return await bring_back(ops, rec, auto=False)
        raise await gone(ops, rec)
    rec.status = NodeStatus.RUNNING
    await ops.store.update_node(node_id, **running_fields(rec.host, rec.port))
    # other replicas drop their cached (old) port at once
    await ops.publish(EventKind.RESTARTED, rec, reason)
    if not await wait_ready(ops, rec, t0 + ops.cfg.node.creation_wait_seconds):
        raise NodeTimeout("Node restart timeout!")
    await ops.egress_settled(rec)  # (a restarted container may have another address)
    rec.ready_at = time.time()
    await ops.store.update_node(node_id, ready_at=rec.ready_at)
    await ops.publish(EventKind.READY, rec)
    if from_tier in (Tier.PAUSED, Tier.STOPPED):
        await ops.publish(EventKind.RESUMED, rec, from_tier)
    observe(from_tier, t0)
    # a restarted node counts as active now, or the idle scan would stop it at once
    await in_use(ops, rec)
    return rec


async def bring_back(ops: NodeOps, rec: NodeRecord, *, auto: bool = True) -> NodeRecord:
    """A new container for a session whose container is gone, on the same workspace."""
    if not rec.workspace:  # its workspace went with its container: nothing to bring back
        raise await gone(ops, rec)
    if auto and not ops.cfg.node.restart_stopped:
        raise NodeNotRunning(rec.id)
    store = ops.store
    await in_use(ops, rec)
    async with session_lock(ops, rec):
        rec = await owned(ops, rec.id)
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
        raise await gone(ops, rec) from None
    # the session keeps its secret (derived from its id; without a key its clear one, or a new one
    # for a record rebuilt from a workspace alone)
    new = NewNode(owner=ops.manager_id, role=rec.role, replica_id=ops.replica.replica_id, created_at=time.time(),
                  client=rec.client, secret=ops.store.secrets.new(rec.id, rec.secret), session_id=rec.id,
                  workspace=rec.workspace)
    cid = await ops.backend.create(new)
    await store.unarchived(rec.manager_id, rec.id)
    rec.container_id, rec.secret, rec.ready_at = cid, new.secret, 0.0
    await store.update_node(rec.id, container_id=cid, secret=new.secret, archived_at=0, **restarting_fields())
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
            await store.update_node(rec.id, **archived_fields(time.time()))
            await store.mark_archived(rec.manager_id, rec.id)
        except ManagerError as cleanup:
            log.error("bring_back_cleanup_failed node_id=%s error=%s", rec.id[:12], cleanup.detail)
        raise WorkspaceUnavailable(rec.id, exc.detail) from exc
    rec.status = NodeStatus.RUNNING
    await store.update_node(rec.id, **running_fields(rec.host, rec.port))
    await ops.publish(EventKind.RESUMED, rec, Tier.ARCHIVED)
    if not await wait_ready(ops, rec, t0 + ops.cfg.node.creation_wait_seconds):
        raise NodeTimeout("Node restart timeout!")
    await ops.egress_settled(rec)  # a new container: a new address
    rec.ready_at = time.time()
    await store.update_node(rec.id, ready_at=rec.ready_at)
    await ops.publish(EventKind.READY, rec)
    await in_use(ops, rec)
    observe(Tier.ARCHIVED, t0)
    log.info("node_brought_back node_id=%s container=%s elapsed_s=%.3f", rec.id[:12], cid[:12],
             time.monotonic() - t0)
    return rec
