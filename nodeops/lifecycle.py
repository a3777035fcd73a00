"""Node lifecycle on this replica's own engine: create, restart, stop, release.

Plain async functions of a NodeOps; the HTTP layer, the internal forwarding endpoints
and the checker's pool refill all call them. Every failure path of a creation removes
what it made.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Any

import httpx

from nodeops.context import NodeOps
from shared import metrics
from shared.backend import NewNode
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
)
from shared.models import NODE_SECRET_HEADER, Event, NodeRecord, NodeStatus, Role

log = logging.getLogger(__name__)


async def probe(ops: NodeOps, rec: NodeRecord, timeout: float = 1.0) -> bool:
    """One HTTP probe of the node's health route, with the node's secret."""
    try:
        resp = await ops.http.get(rec.address + ops.cfg.node.health_path, timeout=timeout,
                                  headers={NODE_SECRET_HEADER: rec.secret})
    except httpx.HTTPError:
        return False
    if resp.status_code in (401, 403):
        # waiting longer cannot help: every proxied request would be refused the same way
        raise NodeTimeout(f"the node refused its probe with {resp.status_code}: the image "
                          f"{rec.image or '?'} does not accept the manager's {NODE_SECRET_HEADER} header")
    return resp.status_code < 500


async def wait_ready(ops: NodeOps, rec: NodeRecord, deadline: float) -> bool:
    """Probe the node every few tens of milliseconds until it answers or the deadline passes.

    Also watches the container now and then, so a node that dies at start fails fast.
    """
    interval = ops.cfg.node.probe_interval_seconds
    next_inspect = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        if await probe(ops, rec, timeout=min(1.0, max(0.05, deadline - time.monotonic()))):
            return True
        if time.monotonic() >= next_inspect:
            next_inspect = time.monotonic() + 0.5
            info = await ops.backend.inspect(rec.id)
            if info.status in (NodeStatus.EXITED, NodeStatus.DEAD):
                raise NodeTimeout(f"Node creation failed: the container {info.status}")
            if info.port and info.address != (rec.host, rec.port):
                rec.host, rec.port = info.address
        await asyncio.sleep(interval)
    return False


async def create_node(ops: NodeOps, *, role: str = Role.NODE, client: str = "",
                      reservation: str | None = None) -> NodeRecord:
    """Create a node on this engine, record it, and return once it answers.

    The container is created before it is started and recorded in between: a replica that
    dies before the record leaves a never-started container, one that dies after leaves a
    record that never became ready; the checker removes both past a deadline.
    """
    cfg = ops.cfg
    t0 = time.monotonic()
    deadline = t0 + cfg.node.creation_wait_seconds
    node_id: str | None = None
    rec: NodeRecord | None = None
    outcome = "error"
    secret = secrets.token_urlsafe(32)
    try:
        node_id = await ops.backend.create(NewNode(owner=ops.manager_id, role=role, client=client, secret=secret,
                                                   replica_id=ops.replica.replica_id, created_at=time.time()))
        now = time.time()
        rec = NodeRecord(id=node_id, short_id=node_id[:12], manager_id=ops.manager_id,
                         status=NodeStatus.CREATING, created_at=now,
                         updated_at=now, last_request_at=now, replica_id=ops.replica.replica_id, role=role,
                         client=client, image=str(cfg.node.creation_kwargs.get("image", "")), secret=secret)
        await ops.store.put_node(rec, replace_member=reservation)
        reservation = None
        await ops.store.publish(Event(type="created", node_id=node_id, manager_id=ops.manager_id,
                                     replica_id=ops.replica.replica_id))
        rec.host, rec.port = await ops.backend.start(node_id)
        # status stays "creating" until the node answers: the checker removes records stuck in it
        await ops.store.update_node(node_id, host=rec.host, port=rec.port)
        if not await wait_ready(ops, rec, deadline):
            outcome = "timeout"
            raise NodeTimeout("Node creation timeout!")
        # readiness is ours (ready_at); `health` stays Docker's HEALTHCHECK state, synced by the checker
        rec.ready_at = time.time()
        rec.status = NodeStatus.RUNNING
        await ops.store.update_node(node_id, ready_at=rec.ready_at, host=rec.host, port=rec.port,
                                    status=rec.status)
        await ops.store.publish(Event(type="ready", node_id=node_id, manager_id=ops.manager_id,
                                     replica_id=ops.replica.replica_id))
        outcome = "ready"
        log.info("node_ready node_id=%s manager_id=%s elapsed_s=%.3f", node_id[:12], ops.manager_id,
                 time.monotonic() - t0)
        return rec
    except BaseException as exc:
        # includes cancellation (the client went away): never leave a container or record behind
        log.warning("node_create_failed node_id=%s manager_id=%s error=%r", (node_id or "-")[:12],
                    ops.manager_id, exc)
        await asyncio.shield(_discard(ops, node_id, rec, reservation, client))
        if isinstance(exc, ManagerError) or not isinstance(exc, Exception):
            raise
        raise Unavailable(f"Node creation failed: {exc}") from exc
    finally:
        metrics.NODE_CREATE_SECONDS.labels(outcome).observe(time.monotonic() - t0)


async def _discard(ops: NodeOps, node_id: str | None, rec: NodeRecord | None, reservation: str | None,
                   client: str) -> None:
    try:
        if node_id:
            await ops.backend.remove(node_id)
        if rec is not None:
            await ops.store.delete_node(rec)
            await ops.store.publish(Event(type="released", node_id=rec.id, manager_id=ops.manager_id,
                                         replica_id=ops.replica.replica_id, detail="creation failed"))
        if reservation:
            await ops.store.unreserve(ops.manager_id, reservation, client)
    except ManagerError as exc:  # the checker removes what is left (stuck creation)
        log.error("node_cleanup_failed node_id=%s error=%s", (node_id or "-")[:12], exc.detail)


async def _owned(ops: NodeOps, node_id: str) -> NodeRecord:
    rec = await ops.store.get_node(node_id)
    if rec is None or rec.status == NodeStatus.RELEASED:
        raise NodeNotFound(node_id)
    return rec


async def _gone(ops: NodeOps, rec: NodeRecord) -> NodeNotFound:
    """The container vanished behind our back: drop the record, answer as for an unknown id."""
    await ops.store.delete_node(rec)
    ops.forget_address(rec.id)
    await ops.store.publish(Event(type="removed", node_id=rec.id, manager_id=rec.manager_id,
                                 replica_id=ops.replica.replica_id, detail="container gone"))
    return NodeNotFound(rec.id)


async def restart_node(ops: NodeOps, node_id: str, *, reason: str = "reconnect") -> NodeRecord:
    """Restart (or start) a node, refresh its address, and wait until it answers."""
    rec = await _owned(ops, node_id)
    t0 = time.monotonic()
    await ops.store.update_node(node_id, status=NodeStatus.RESTARTING, ready_at=0)
    ops.forget_address(node_id)
    try:
        rec.host, rec.port = await ops.backend.restart(node_id, timeout=ops.cfg.node.stop_timeout_seconds)
    except ContainerGone:
        raise await _gone(ops, rec) from None
    rec.status = NodeStatus.RUNNING
    await ops.store.update_node(node_id, status=NodeStatus.RUNNING, host=rec.host, port=rec.port)
    # other replicas drop their cached (old) port at once
    await ops.store.publish(Event(type="restarted", node_id=node_id, manager_id=rec.manager_id,
                                 replica_id=ops.replica.replica_id, detail=reason))
    if not await wait_ready(ops, rec, t0 + ops.cfg.node.creation_wait_seconds):
        raise NodeTimeout("Node restart timeout!")
    rec.ready_at = time.time()
    await ops.store.update_node(node_id, ready_at=rec.ready_at)
    await ops.store.publish(Event(type="ready", node_id=node_id, manager_id=rec.manager_id,
                                 replica_id=ops.replica.replica_id))
    # a restarted node counts as active now, or the idle scan would stop it at once
    await ops.store.touch({node_id: (rec.manager_id, time.time())})
    return rec


async def stop_node(ops: NodeOps, node_id: str, *, reason: str = "close") -> None:
    rec = await _owned(ops, node_id)
    try:
        await ops.backend.stop(node_id, timeout=ops.cfg.node.stop_timeout_seconds)
    except ContainerGone:
        raise await _gone(ops, rec) from None
    await ops.store.update_node(node_id, status=NodeStatus.EXITED, ready_at=0, stopped_at=time.time())
    ops.forget_address(node_id)
    await ops.store.publish(Event(type="stopped", node_id=node_id, manager_id=rec.manager_id,
                                 replica_id=ops.replica.replica_id, detail=reason))


async def release_node(ops: NodeOps, node_id: str) -> None:
    """Kill and remove a node and its record; a released node never comes back."""
    rec = await ops.store.get_node(node_id)
    if rec is None:
        raise NodeNotFound(node_id)
    # mark first: if removal fails (engine down) the checker finishes it, and proxies refuse it now
    await ops.store.update_node(node_id, status=NodeStatus.RELEASED)
    ops.forget_address(node_id)
    try:
        existed = await ops.backend.remove(node_id)
    except EngineError as exc:
        log.warning("node_remove_failed node_id=%s error=%s", node_id[:12], exc.detail)
        raise
    await ops.store.delete_node(rec)
    await ops.store.publish(Event(type="released", node_id=node_id, manager_id=rec.manager_id,
                                 replica_id=ops.replica.replica_id))
    if not existed:
        raise NodeNotFound(node_id)


async def node_detail(ops: NodeOps, node_id: str) -> dict[str, Any]:
    """Record, container state and engine stats of one local node (admin inspect)."""
    rec = await _owned(ops, node_id)
    out: dict[str, Any] = {"record": rec.public()}
    try:
        info = await ops.backend.inspect(node_id)
        out["container"] = {"status": info.status, "health": info.health, "port": info.port,
                            "image": info.image, "labels": info.meta}
        if info.status == NodeStatus.RUNNING:
            out["stats"] = await ops.backend.stats(node_id)
    except ContainerGone:
        out["container"] = None
    return out


async def ensure_running(ops: NodeOps, node_id: str) -> NodeRecord:
    """A local node up and answering: restarted when stopped and node.restart_stopped allows it."""
    rec = await ops.store.get_node(node_id)
    if rec is None or rec.status == NodeStatus.RELEASED:
        raise NodeNotFound(node_id)
    try:
        info = await ops.backend.inspect(node_id)
    except ContainerGone:
        # only the engine's word that the container does not exist ends a session; an engine
        # that cannot be reached (EngineUnavailable) is a passing fault, answered 503
        info = None
    if info is not None and info.status == NodeStatus.RUNNING and info.port:
        if info.address != (rec.host, rec.port) or rec.status != NodeStatus.RUNNING:
            (rec.host, rec.port), rec.status = info.address, NodeStatus.RUNNING
            await ops.store.update_node(node_id, host=rec.host, port=rec.port, status=NodeStatus.RUNNING)
        if await wait_ready(ops, rec, time.monotonic() + ops.cfg.node.creation_wait_seconds):
            return rec
        raise NodeNotResponding()
    if info is None:
        # gone from the engine: same answer as an unknown id
        raise NodeNotFound(node_id)
    if not ops.cfg.node.restart_stopped:
        raise NodeNotRunning(node_id)
    log.info("node_autorestart node_id=%s status=%s", node_id[:12], info.status)
    metrics.SESSION_OPS.labels("autorestart", "ok").inc()
    try:
        return await restart_node(ops, node_id, reason="proxied request")
    except EngineUnavailable:
        raise
    except Unavailable:
        raise NodeNotResponding() from None
