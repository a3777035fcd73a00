"""Forks: a session's workspace copied at one instant into new sessions of the same client.

The source is held still only while its workspace image is copied once (the backend freezes its
file system: writes wait, reads are served); the copies are then made from that saved image and
booted in parallel, each a whole new session (id, secret, container, address) made by
lifecycle.create_node, so a replica that dies meanwhile leaves records in "creating" that the
checker removes with whatever they name. Quota slots for all copies are taken before anything is
copied: a fork past a quota makes nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from typing import Any

import msgspec

from nodeops import capacity, egress, lifecycle, pool
from nodeops.context import NodeOps
from nodeops.forward import RemoteError, forward
from nodeops.locks import capture_lock
from nodeops.primitives import discard, in_use, owned, session_lock
from shared import metrics
from shared.errors import BadRequest, ForkIncomplete, ManagerError, NodeNotFound, QuotaExceeded, Unavailable
from shared.models import EventKind, NodeRecord

log = logging.getLogger(__name__)


async def fork(ops: NodeOps, node_id: str | None, count: int) -> dict[str, Any]:
    """Fork a session into count new ones, on the engine that holds it; what was made."""
    if not node_id:
        raise NodeNotFound(node_id)
    limit = ops.cfg.fork.max_count
    if not 1 <= count <= limit:
        raise BadRequest(f"count must be between 1 and {limit} (fork.max_count), got {count}")
    rec = await owned(ops, node_id)
    if rec.manager_id == ops.manager_id:
        return await fork_local(ops, node_id, count)
    try:
        data: dict[str, Any] = await forward(ops, rec.manager_id, "POST", f"/internal/nodes/{node_id}/fork",
                                             {"count": count})
    except RemoteError as exc:
        if exc.status_code == 404:
            raise NodeNotFound(node_id) from None
        raise
    return data


def seed_prefix(ops: NodeOps, kind: str = "snap") -> str:
    """How this cluster's seeds of a kind (snap, fork) begin: clusters (key prefixes) sharing a host
    never collect each other's."""
    return f"{kind}-{hashlib.sha256(ops.store.keys.prefix.encode()).hexdigest()[:8]}-"


async def reserve(ops: NodeOps, client: str, count: int) -> list[str]:
    """count creation slots under every quota, or none at all (QuotaExceeded)."""
    cap = await capacity.node_cap(ops)
    per_client = capacity.client_cap(ops.cfg.quota.per_client, cap)
    taken: list[str] = []
    try:
        for _ in range(count):
            taken.append(await ops.store.reserve(ops.manager_id, cap, ops.cfg.cluster.max_nodes_total, client,
                                                 per_client, ops.replica.replica_id))
    except BaseException:
        await asyncio.shield(release_slots(ops, taken, client))
        raise
    return taken


async def release_slots(ops: NodeOps, slots: list[str], client: str) -> None:
    for member in slots:
        try:
            await ops.store.unreserve(ops.manager_id, member, client)
        except ManagerError as exc:  # reservations of a dead replica are dropped by the checker
            log.warning("unreserve_failed member=%s error=%s", member, exc.detail)


async def capture(ops: NodeOps, rec: NodeRecord, seed: str) -> float:
    """Save the session's workspace as seed; the seconds its writes were held.

    Under the session lock (no resume mounts it, the checker archives nothing meanwhile) and the
    capture lock (stop and release wait: an unmount while frozen would leave it frozen)."""
    holder = f"{ops.replica.replica_id}:{uuid.uuid4().hex[:8]}"
    async with session_lock(ops, rec), capture_lock(ops.store, rec.id, holder, wait_seconds=30.0):
        fresh = await owned(ops, rec.id)  # released while we waited: nothing to copy
        if not fresh.workspace:
            raise BadRequest(f"session {rec.id} has no workspace of its own to copy")
        return await ops.backend.capture_workspace(fresh.workspace, seed)


async def give(ops: NodeOps, node: NodeRecord, seed: str) -> bool:
    """Give a claimed pooled node a copy of seed as its workspace, in place; False (the node
    removed: half given, it is nobody's) when that failed."""
    try:
        await ops.backend.adopt_workspace(node.workspace, seed)
        return True
    except Exception as exc:
        log.warning("hand_off_failed node_id=%s error=%r", node.id[:12], exc)
    except BaseException:
        await asyncio.shield(discard(ops, node))
        raise
    await asyncio.shield(discard(ops, node))
    return False


async def hand_off(ops: NodeOps, client: str, seed: str, slots: list[str]) -> list[NodeRecord]:
    """Pooled nodes of this engine (up to one per slot) given a copy of seed in place of their
    empty workspace: running already, so a copy costs a clone and a mount, not a container's
    start and boot. The slot of each one handed is given back (the claim counts the client);
    one that fails is removed, and its slot left for a creation. The copies handed, in order."""
    if not ops.cfg.pool.enabled:
        return []
    claimed: list[NodeRecord] = []
    for _ in slots:
        # no per-client limit here: the slots reserved for the fork already count against it
        try:
            got = await ops.store.claim_pooled_record(ops.manager_id, client, ops.replica.replica_id, 0)
        except ManagerError as exc:  # the creations make the rest
            log.warning("fork_pool_claim_failed error=%s", exc.detail)
            break
        if got is None:
            break
        claimed.append(got)

    async def one(node: NodeRecord) -> NodeRecord:
        if not await give(ops, node, seed):
            raise Unavailable(f"handing a copy to pooled node {node.id[:12]} failed")
        await pool.delivered(ops, node)
        return node

    results = await asyncio.gather(*(one(n) for n in claimed), return_exceptions=True)
    handed = [r for r in results if isinstance(r, NodeRecord)]
    await release_slots(ops, slots[:len(handed)], client)
    return handed


async def fork_local(ops: NodeOps, node_id: str, count: int) -> dict[str, Any]:
    """Fork a session of this engine: quota for all copies, one copy of its workspace, then the
    copies made in parallel; ForkIncomplete (naming the copies made) when some failed."""
    t0 = time.monotonic()
    outcome = "error"
    try:
        rec = await owned(ops, node_id)
        await in_use(ops, rec)  # not idle: no tier action on it while it is copied
        try:
            slots = await reserve(ops, rec.client, count)
        except QuotaExceeded:
            outcome = "quota"
            raise
        seed = f"{seed_prefix(ops, 'fork')}{uuid.uuid4().hex}"
        try:
            try:
                stall = await capture(ops, rec, seed)
            except BaseException:
                await asyncio.shield(release_slots(ops, slots, rec.client))
                raise
            metrics.SOURCE_STALL_SECONDS.labels("fork").observe(stall)
            handed = await hand_off(ops, rec.client, seed, slots)
            left = slots[len(handed):]
            results: list[NodeRecord | BaseException] = [*handed, *await asyncio.gather(
                *(lifecycle.create_node(ops, client=rec.client, reservation=slot, seed=seed) for slot in left),
                return_exceptions=True)]
        finally:
            await asyncio.shield(ops.backend.drop_seed(seed))
        made = [r for r in results if isinstance(r, NodeRecord)]
        for r in made:
            if rec.egress:  # a copy goes where its source may go, no further
                await egress.put(ops, r.id, msgspec.json.decode(rec.egress), by="fork")
            await ops.publish(EventKind.FORKED, r, node_id)
        # the copies are handed out with their policy in the firewall, as a new session is
        await asyncio.gather(*(ops.egress_settled(r) for r in made))
        failed = [r for r in results if not isinstance(r, NodeRecord)]
        elapsed = time.monotonic() - t0
        log.info("session_forked node_id=%s copies=%d from_pool=%d failed=%d stall_s=%.3f elapsed_s=%.3f",
                 node_id[:12], len(made), len(handed), len(failed), stall, elapsed)
        if failed:
            outcome = "partial"
            first = failed[0]
            why = first.detail if isinstance(first, ManagerError) else repr(first)
            raise ForkIncomplete(f"{len(made)} of {count} copies made; the first failure: {why}",
                                 [r.id for r in made])
        outcome = "ok"
        return {"source": node_id, "sessions": [r.id for r in made], "stall_seconds": round(stall, 4),
                "seconds": round(elapsed, 3), "from_pool": len(handed)}
    finally:
        metrics.FORK_SECONDS.labels(outcome).observe(time.monotonic() - t0)
