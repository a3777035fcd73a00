"""Node lifecycle on this replica's own engine: create, stop, pause, release (bringing a
session back, restart included, is nodeops/resume.py; both build on nodeops/primitives.py).

Plain async functions of a NodeOps; the HTTP layer, the internal forwarding endpoints
and the checker's pool refill all call them. Every failure path of a creation removes
what it made.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from nodeops import resume
from nodeops.context import NodeOps
from nodeops.locks import wait_capture
from nodeops.primitives import discard, gone, owned, wait_ready
from shared import metrics, phases
from shared.engines.base import Address, NewNode
from shared.errors import (
    BadRequest,
    ContainerGone,
    EngineError,
    ManagerError,
    NodeNotFound,
    NodeTimeout,
    Unavailable,
)
from shared.models import (
    EventKind,
    NodeRecord,
    NodeStatus,
    Role,
    paused_fields,
    stopped_fields,
)

log = logging.getLogger(__name__)
T = TypeVar("T")




async def create_node(ops: NodeOps, *, role: str = Role.NODE, client: str = "",
                      reservation: str | None = None, seed: str = "") -> NodeRecord:
    """Create a session (its workspace and a node on this engine), record it, return once it answers.

    It first waits for a creation slot (nodeops/admission.py: a full queue raises
    CreationQueueFull); nothing exists of it meanwhile, so a client that leaves while it waits
    leaves nothing behind (its reservation is returned). Then the record is written first,
    naming the workspace and (by the session id) the container before either exists: a replica
    that dies at any step leaves a record in "creating" that says what to remove, and the
    checker removes all of it once that replica's heartbeat has expired. Nothing of a session
    that was never handed out is ever adopted. With a seed (a fork's or a snapshot's saved
    workspace) the workspace starts as a copy of it.
    """
    t0 = time.monotonic()
    with phases.timing() as took:
        outcome = "error"
        started = False
        try:
            async with ops.queue.slot(client, refill=role == Role.POOLED):
                took["queue"] = time.monotonic() - t0
                started = True
                rec = await _create(ops, role, client, reservation, seed, took)
                outcome = "ready"
                return rec
        except NodeTimeout as exc:
            outcome = "timeout" if started and exc.detail == TIMEOUT else outcome
            raise
        except BaseException:
            if not started and reservation:  # refused or left while queued: the slot it held in the quota goes
                await asyncio.shield(_unreserve(ops, reservation, client))
            raise
        finally:
            metrics.NODE_CREATE_SECONDS.labels(outcome).observe(time.monotonic() - t0)
            for name, seconds in took.items():
                metrics.NODE_CREATE_PHASE_SECONDS.labels(name).observe(seconds)


TIMEOUT = "Node creation timeout!"


async def _create(ops: NodeOps, role: str, client: str, reservation: str | None, seed: str,
                  took: dict[str, float]) -> NodeRecord:
    cfg = ops.cfg
    t0 = time.monotonic()
    deadline = t0 + cfg.node.creation_wait_seconds  # from its turn on: the wait for a slot is not the node's
    rec: NodeRecord | None = None
    # the shape of a container id (cookies look as they always did); on a Redis Cluster it starts
    # with the manager's home, so the record shares the slot of the manager's indexes
    session_id = ops.store.keys.new_session_id(ops.manager_id)
    now = time.time()
    new = NewNode(owner=ops.manager_id, role=role, client=client, secret=ops.store.secrets.new(session_id),
                  replica_id=ops.replica.replica_id, created_at=now, session_id=session_id,
                  workspace=ops.backend.workspace_name(session_id), seed=seed)
    try:
        with phases.phase("record"):
            rec = NodeRecord(id=session_id, short_id=session_id[:12], manager_id=ops.manager_id,
                             status=NodeStatus.CREATING, created_at=now, updated_at=now, last_request_at=now,
                             replica_id=ops.replica.replica_id, role=role, client=client, workspace=new.workspace,
                             image=ops.backend.image, secret=new.secret)
            await ops.store.put_node(rec, replace_member=reservation)
            reservation = None
        # the event needs only the record: it goes out while the engine makes the workspace
        told = asyncio.ensure_future(ops.publish(EventKind.CREATED, rec))
        try:
            with phases.phase("workspace"):
                await _whole(ops.backend.create_workspace(new))
        finally:
            await asyncio.shield(told)
        with phases.phase("create"):
            rec.container_id = await _whole(ops.backend.create(new), lambda cid: setattr(rec, "container_id", cid))
        with phases.phase("start"):
            rec.host, rec.port = await ops.backend.start(rec.container_id)
        ops.addresses.put(rec.container_id, rec.id, Address(rec.host, rec.port))  # the engine's own word
        with phases.phase("probe"):
            # status stays "creating" until the node answers: the checker removes records stuck in it;
            # the address is written while the node boots, not before the first probe
            recorded = asyncio.ensure_future(ops.store.update_node(session_id, host=rec.host, port=rec.port,
                                                                   container_id=rec.container_id))
            try:
                ready = await wait_ready(ops, rec, deadline)
            finally:
                await recorded
            if not ready:
                raise NodeTimeout(TIMEOUT)
        with phases.phase("ready_write"):
            # readiness is ours (ready_at); `health` stays Docker's HEALTHCHECK state, synced by the checker
            rec.ready_at = time.time()
            rec.status = NodeStatus.RUNNING
            await ops.store.update_node(session_id, ready_at=rec.ready_at, host=rec.host, port=rec.port,
                                        status=rec.status)
            # the event once the record says running; its idle time starts when it is handed out, not
            # when its creation began: both at once, one round trip instead of two
            await asyncio.gather(ops.publish(EventKind.READY, rec),
                                 ops.store.touch({session_id: (ops.manager_id, rec.ready_at)}))
        log.info("node_ready node_id=%s container=%s manager_id=%s elapsed_s=%.3f phases_ms=%s", session_id[:12],
                 rec.container_id[:12], ops.manager_id, time.monotonic() - t0, phases.describe(took))
        return rec
    except BaseException as exc:
        # includes cancellation (the client went away): never leave a container or record behind
        log.warning("node_create_failed node_id=%s manager_id=%s error=%r", session_id[:12], ops.manager_id, exc)
        await asyncio.shield(_discard(ops, rec, reservation, client))
        if isinstance(exc, ManagerError) or not isinstance(exc, Exception):
            raise
        raise Unavailable(f"Node creation failed: {exc}") from exc


async def _whole(step: Awaitable[T], made: Callable[[T], None] | None = None) -> T:
    """An engine step that makes something, run to its end even when the creation is cancelled
    meanwhile (its client left): the engine's thread would make it anyway, after the clean-up had
    looked for it. made(result) then tells the clean-up what there is to remove."""
    fut = asyncio.ensure_future(step)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            result = await asyncio.shield(fut)
            if made is not None:
                made(result)
        raise


async def _unreserve(ops: NodeOps, reservation: str, client: str) -> None:
    try:
        await ops.store.unreserve(ops.manager_id, reservation, client)
    except ManagerError as exc:  # the checker drops stale reservations
        log.warning("unreserve_failed manager_id=%s error=%s", ops.manager_id, exc.detail)


async def _discard(ops: NodeOps, rec: NodeRecord | None, reservation: str | None, client: str) -> None:
    try:
        if rec is not None:
            await discard(ops, rec)
            await ops.publish(EventKind.RELEASED, rec, "creation failed")
        if reservation:
            await ops.store.unreserve(ops.manager_id, reservation, client)
    except ManagerError as exc:  # the checker removes what is left (stuck creation)
        log.error("node_cleanup_failed node_id=%s error=%s", (rec.id if rec else "-")[:12], exc.detail)





async def stop_node(ops: NodeOps, node_id: str, *, reason: str = "close") -> None:
    """Stop a session's node (XAgent's close); an archived session has nothing left to stop."""
    rec = await owned(ops, node_id)
    if rec.status == NodeStatus.ARCHIVED or not rec.cid:
        return
    await wait_capture(ops.store, node_id, ops.replica.replica_id)
    try:
        await ops.backend.stop(rec.cid, timeout=ops.cfg.node.stop_timeout_seconds)
    except ContainerGone:
        if rec.workspace:
            return  # the checker records it archived
        raise await gone(ops, rec) from None
    await ops.store.update_node(node_id, **stopped_fields(time.time()))
    ops.forget_address(node_id)
    await ops.publish(EventKind.STOPPED, rec, reason)


async def release_node(ops: NodeOps, node_id: str) -> None:
    """Remove a session: its container, its workspace and its record; it never comes back."""
    rec = await ops.store.get_node(node_id)
    if rec is None:
        raise NodeNotFound(node_id)
    # mark first: if removal fails (engine down) the checker finishes it, and proxies refuse it now
    await ops.store.update_node(node_id, status=NodeStatus.RELEASED)
    ops.forget_address(node_id)
    await wait_capture(ops.store, node_id, ops.replica.replica_id)  # a fork's copy finishes first
    existed = False
    try:
        if rec.cid:
            existed = await ops.backend.remove(rec.cid)
        if rec.workspace:
            await ops.backend.remove_workspace(rec.workspace)
            existed = existed or rec.status == NodeStatus.ARCHIVED
    except EngineError as exc:
        log.warning("node_remove_failed node_id=%s error=%s", node_id[:12], exc.detail)
        raise
    await ops.store.delete_node(rec)
    await ops.publish(EventKind.RELEASED, rec)
    if not existed:
        raise NodeNotFound(node_id)


async def node_detail(ops: NodeOps, node_id: str) -> dict[str, Any]:
    """Record, container state and engine stats of one local session (admin inspect)."""
    rec = await owned(ops, node_id)
    out: dict[str, Any] = {"record": rec.public(), "container": None}
    try:
        if rec.cid:
            info = await ops.backend.inspect(rec.cid)
            out["container"] = {"id": info.id, "status": info.status, "health": info.health, "port": info.port,
                                "image": info.image, "labels": info.meta}
            if info.status == NodeStatus.RUNNING:
                out["stats"] = await ops.backend.stats(rec.cid)
    except ContainerGone:
        pass
    return out


async def ensure_running(ops: NodeOps, node_id: str) -> NodeRecord:
    """A local session's node up and answering, from whatever tier it is in."""
    return await resume.resume(ops, await owned(ops, node_id))


async def pause_node(ops: NodeOps, node_id: str) -> None:
    """Freeze a running session's node at an operator's word (memory kept, no CPU); its next
    call thaws it, as after the checker's pause."""
    rec = await owned(ops, node_id)
    if rec.status != NodeStatus.RUNNING or not rec.cid:
        raise BadRequest(f"session {node_id} is {rec.status}: only a running one can be paused")
    await ops.backend.pause(rec.cid)
    await ops.store.update_node(node_id, **paused_fields(time.time()))
    ops.forget_address(node_id)
    await ops.publish(EventKind.PAUSED, rec, "operator")


async def resume_node(ops: NodeOps, node_id: str) -> NodeRecord:
    """Bring a session back from any tier at an operator's word (node.restart_stopped is for
    proxied calls: it does not hold an operator back)."""
    return await resume.resume(ops, await owned(ops, node_id), auto=False)
