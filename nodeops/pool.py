"""The warm pool: ready nodes waiting for a client, claimed atomically by any replica.

The checker (lease holder) keeps a target of pooled nodes per manager_id that follows the
recent arrival rate (nodeops/demand.py) between ``pool.size`` and ``pool.max_size``; every
claim counts one arrival. Refills wait behind client creations in the creation queue
(nodeops/admission.py), so filling the pool never delays a client's own creation. A claim
pops one in a Lua script so two replicas can never hand out the same node. A claimed
node stays marked ``claiming`` until the answer is on its way; the checker releases
nodes left in that state by a replica that died in between.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from nodeops import capacity, lifecycle, primitives
from nodeops.context import NodeOps
from shared import metrics
from shared.models import EventKind, NodeRecord, Role

log = logging.getLogger(__name__)


async def claim(ops: NodeOps, client: str = "") -> NodeRecord | None:
    """A ready pooled node for this client, or None when the pool is off or empty."""
    if not ops.cfg.pool.enabled:
        return None
    store = ops.store
    await store.count_arrival(ops.manager_id)  # a hit or a miss, it is demand
    t0 = time.monotonic()
    # the client's quota holds for pooled nodes too (over it: None, and the reservation says why)
    limit = capacity.client_cap(ops.cfg.quota.per_client, await capacity.node_cap(ops)) if client else 0
    node_id = await store.claim_pooled(ops.manager_id, client, ops.replica.replica_id, limit)
    if not node_id:
        metrics.POOL_CLAIMS.labels("miss").inc()
        return None
    rec = await store.get_node(node_id)
    if rec is None:  # released between pop and read
        metrics.POOL_CLAIMS.labels("miss").inc()
        return None
    await store.touch({node_id: (rec.manager_id, time.time())})
    metrics.POOL_CLAIMS.labels("hit").inc()
    metrics.NODE_CREATE_SECONDS.labels("pool").observe(time.monotonic() - t0)
    await ops.publish(EventKind.READY, rec, "claimed from pool")
    return rec


async def delivered(ops: NodeOps, rec: NodeRecord) -> None:
    """The client has its cookie: the node is an ordinary session from now on."""
    if rec.role == Role.CLAIMING:
        await ops.store.update_node(rec.id, role=Role.NODE)
        rec.role = Role.NODE


async def refill(ops: NodeOps, n: int, allowed: Callable[[], bool],
                 offer: Callable[[NodeRecord], Awaitable[bool]], concurrency: int = 1) -> None:
    """Create n pooled nodes, concurrency at a time, while allowed(); offer(rec) puts each in the
    pool (False: refused).

    A refused node (the lease moved on meanwhile) is removed: nobody would ever hand it out.
    """
    sem = asyncio.Semaphore(max(1, concurrency))
    gauge = metrics.POOL_REFILL_IN_FLIGHT.labels(ops.manager_id)

    async def one() -> None:
        async with sem:
            if not allowed():
                return
            gauge.inc()
            try:
                rec = await lifecycle.create_node(ops, role=Role.POOLED)
            finally:
                gauge.dec()
            if not await offer(rec):
                await primitives.discard(ops, rec)

    results = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            log.warning("pool_fill_failed manager_id=%s error=%r", ops.manager_id, r)
