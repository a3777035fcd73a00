"""Node lifecycle on this replica's own engine: create, restart, stop, release.

Plain async functions of a Runtime; the HTTP layer and the internal forwarding
endpoints both call them. Every failure path of a creation removes what it made.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import httpx

from manager import metrics
from manager.runtime import Runtime
from shared.docker_backend import LABEL_CLIENT, LABEL_CREATED, LABEL_MANAGER, LABEL_REPLICA, LABEL_ROLE
from shared.errors import ContainerGone, EngineError, ManagerError, NodeNotFound, NodeTimeout, Unavailable
from shared.models import Event, NodeRecord, NodeStatus

log = logging.getLogger(__name__)


async def probe(rt: Runtime, rec: NodeRecord, timeout: float = 1.0) -> bool:
    """One HTTP probe of the node's health route."""
    try:
        resp = await rt.http.get(rec.address + rt.cfg.node.health_path, timeout=timeout)
    except httpx.HTTPError:
        return False
    return resp.status_code < 500


async def wait_ready(rt: Runtime, rec: NodeRecord, deadline: float) -> bool:
    """Probe the node every few tens of milliseconds until it answers or the deadline passes.

    Also watches the container now and then, so a node that dies at start fails fast.
    """
    interval = rt.cfg.node.probe_interval_seconds
    next_inspect = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        if await probe(rt, rec, timeout=min(1.0, max(0.05, deadline - time.monotonic()))):
            return True
        if time.monotonic() >= next_inspect:
            next_inspect = time.monotonic() + 0.5
            info = await rt.backend.inspect(rec.id)
            if info.status in ("exited", "dead"):
                raise NodeTimeout(f"Node creation failed: the container {info.status}")
            if info.port and info.port != rec.port:
                rec.port = info.port
        await asyncio.sleep(interval)
    return False


def _labels(rt: Runtime, role: str, client: str) -> dict[str, str]:
    labels = {LABEL_MANAGER: rt.manager_id, LABEL_ROLE: role, LABEL_CREATED: f"{time.time():.3f}",
              LABEL_REPLICA: rt.replica.replica_id}
    if client:
        labels[LABEL_CLIENT] = client
    return labels


async def create_node(rt: Runtime, *, role: str = "node", client: str = "", reservation: str | None = None,
                      command: list[str] | None = None) -> NodeRecord:
    """Create a node on this engine, record it, and return once it answers.

    The container is created before it is started and recorded in between: a replica that
    dies before the record leaves a never-started container, one that dies after leaves a
    record that never became ready; the checker removes both past a deadline.
    """
    cfg = rt.cfg
    t0 = time.monotonic()
    deadline = t0 + cfg.node.creation_wait_seconds
    node_id: str | None = None
    rec: NodeRecord | None = None
    outcome = "error"
    try:
        node_id = await rt.backend.create_node(
            cfg.node.creation_kwargs, _labels(rt, role, client), cfg.node.device_requests, command=command,
            read_only_workspace=cfg.node.workspace_path if cfg.node.read_only_root else "")
        now = time.time()
        rec = NodeRecord(id=node_id, short_id=node_id[:12], manager_id=rt.manager_id,
                         status=NodeStatus.CREATING, host=cfg.node.advertise_host, created_at=now,
                         updated_at=now, last_request_at=now, replica_id=rt.replica.replica_id, role=role,
                         client=client, image=str(cfg.node.creation_kwargs.get("image", "")))
        await rt.store.put_node(rec, replace_member=reservation)
        reservation = None
        await rt.store.publish(Event(type="created", node_id=node_id, manager_id=rt.manager_id,
                                     replica_id=rt.replica.replica_id))
        rec.port = await rt.backend.start(node_id)
        # status stays "creating" until the node answers: the checker removes records stuck in it
        await rt.store.update_node(node_id, port=rec.port)
        if not await wait_ready(rt, rec, deadline):
            outcome = "timeout"
            raise NodeTimeout("Node creation timeout!")
        # readiness is ours (ready_at); `health` stays Docker's HEALTHCHECK state, synced by the checker
        rec.ready_at = time.time()
        rec.status = NodeStatus.RUNNING
        await rt.store.update_node(node_id, ready_at=rec.ready_at, port=rec.port, status=rec.status)
        await rt.store.publish(Event(type="ready", node_id=node_id, manager_id=rt.manager_id,
                                     replica_id=rt.replica.replica_id))
        outcome = "ready"
        log.info("node_ready node_id=%s manager_id=%s elapsed_s=%.3f", node_id[:12], rt.manager_id,
                 time.monotonic() - t0)
        return rec
    except BaseException as exc:
        # includes cancellation (the client went away): never leave a container or record behind
        log.warning("node_create_failed node_id=%s manager_id=%s error=%r", (node_id or "-")[:12],
                    rt.manager_id, exc)
        await asyncio.shield(_discard(rt, node_id, rec, reservation, client))
        if isinstance(exc, ManagerError) or not isinstance(exc, Exception):
            raise
        raise Unavailable(f"Node creation failed: {exc}") from exc
    finally:
        metrics.NODE_CREATE_SECONDS.labels(outcome).observe(time.monotonic() - t0)


async def _discard(rt: Runtime, node_id: str | None, rec: NodeRecord | None, reservation: str | None,
                   client: str) -> None:
    try:
        if node_id:
            await rt.backend.remove(node_id)
        if rec is not None:
            await rt.store.delete_node(rec)
            await rt.store.publish(Event(type="released", node_id=rec.id, manager_id=rt.manager_id,
                                         replica_id=rt.replica.replica_id, detail="creation failed"))
        if reservation:
            await rt.store.unreserve(rt.manager_id, reservation, client)
    except ManagerError as exc:  # the checker removes what is left (stuck creation)
        log.error("node_cleanup_failed node_id=%s error=%s", (node_id or "-")[:12], exc.detail)


async def _owned(rt: Runtime, node_id: str) -> NodeRecord:
    rec = await rt.store.get_node(node_id)
    if rec is None or rec.status == NodeStatus.RELEASED:
        raise NodeNotFound(node_id)
    return rec


async def _gone(rt: Runtime, rec: NodeRecord) -> NodeNotFound:
    """The container vanished behind our back: drop the record, answer as for an unknown id."""
    await rt.store.delete_node(rec)
    rt.cache.invalidate(rec.id)
    await rt.store.publish(Event(type="removed", node_id=rec.id, manager_id=rec.manager_id,
                                 replica_id=rt.replica.replica_id, detail="container gone"))
    return NodeNotFound(rec.id)


async def restart_node(rt: Runtime, node_id: str, *, reason: str = "reconnect") -> NodeRecord:
    """Restart (or start) a node, refresh its address, and wait until it answers."""
    rec = await _owned(rt, node_id)
    t0 = time.monotonic()
    await rt.store.update_node(node_id, status=NodeStatus.RESTARTING, ready_at=0)
    rt.cache.invalidate(node_id)
    try:
        rec.port = await rt.backend.restart(node_id, timeout=rt.cfg.node.stop_timeout_seconds)
    except ContainerGone:
        raise await _gone(rt, rec) from None
    rec.status = NodeStatus.RUNNING
    await rt.store.update_node(node_id, status=NodeStatus.RUNNING, port=rec.port)
    # other replicas drop their cached (old) port at once
    await rt.store.publish(Event(type="restarted", node_id=node_id, manager_id=rec.manager_id,
                                 replica_id=rt.replica.replica_id, detail=reason))
    if not await wait_ready(rt, rec, t0 + rt.cfg.node.creation_wait_seconds):
        raise NodeTimeout("Node restart timeout!")
    rec.ready_at = time.time()
    await rt.store.update_node(node_id, ready_at=rec.ready_at)
    await rt.store.publish(Event(type="ready", node_id=node_id, manager_id=rec.manager_id,
                                 replica_id=rt.replica.replica_id))
    # a restarted node counts as active now, or the idle scan would stop it at once
    await rt.store.touch({node_id: (rec.manager_id, time.time())})
    return rec


async def stop_node(rt: Runtime, node_id: str, *, reason: str = "close") -> None:
    rec = await _owned(rt, node_id)
    try:
        await rt.backend.stop(node_id, timeout=rt.cfg.node.stop_timeout_seconds)
    except ContainerGone:
        raise await _gone(rt, rec) from None
    await rt.store.update_node(node_id, status=NodeStatus.EXITED, ready_at=0, stopped_at=time.time())
    rt.cache.invalidate(node_id)
    await rt.store.publish(Event(type="stopped", node_id=node_id, manager_id=rec.manager_id,
                                 replica_id=rt.replica.replica_id, detail=reason))


async def release_node(rt: Runtime, node_id: str) -> None:
    """Kill and remove a node and its record; a released node never comes back."""
    rec = await rt.store.get_node(node_id)
    if rec is None:
        raise NodeNotFound(node_id)
    # mark first: if removal fails (engine down) the checker finishes it, and proxies refuse it now
    await rt.store.update_node(node_id, status=NodeStatus.RELEASED)
    rt.cache.invalidate(node_id)
    try:
        existed = await rt.backend.remove(node_id)
    except EngineError as exc:
        log.warning("node_remove_failed node_id=%s error=%s", node_id[:12], exc.detail)
        raise
    await rt.store.delete_node(rec)
    await rt.store.publish(Event(type="released", node_id=node_id, manager_id=rec.manager_id,
                                 replica_id=rt.replica.replica_id))
    if not existed:
        raise NodeNotFound(node_id)


async def node_detail(rt: Runtime, node_id: str) -> dict[str, Any]:
    """Record, container state and engine stats of one local node (admin inspect)."""
    rec = await _owned(rt, node_id)
    out: dict[str, Any] = {"record": rec}
    try:
        info = await rt.backend.inspect(node_id)
        out["container"] = {"status": info.status, "health": info.health, "port": info.port,
                            "image": info.image, "labels": info.labels}
        if info.status == "running":
            out["stats"] = await rt.backend.stats(node_id)
    except ContainerGone:
        out["container"] = None
    return out
