"""The warm pool: ready nodes waiting for a client, claimed atomically by any replica.

The checker (lease holder) keeps ``pool.size`` pooled nodes per manager_id; a claim
pops one in a Lua script so two replicas can never hand out the same node. A claimed
node stays marked ``claiming`` until the answer is on its way; the checker releases
nodes left in that state by a replica that died in between.
"""

from __future__ import annotations

import time

from manager import metrics
from manager.runtime import Runtime
from shared.models import Event, NodeRecord

ROLE_POOLED = "pooled"
ROLE_CLAIMING = "claiming"


async def claim(rt: Runtime, client: str = "") -> NodeRecord | None:
    """A ready pooled node for this client, or None when the pool is off or empty."""
    if rt.cfg.pool.size <= 0:
        return None
    store = rt.store
    t0 = time.monotonic()
    node_id = await store.claim_pooled(rt.manager_id, client)
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
    await store.publish(Event(type="ready", node_id=node_id, manager_id=rec.manager_id,
                              replica_id=rt.replica.replica_id, detail="claimed from pool"))
    return rec


async def delivered(rt: Runtime, rec: NodeRecord) -> None:
    """The client has its cookie: the node is an ordinary session from now on."""
    if rec.role == ROLE_CLAIMING:
        await rt.store.update_node(rec.id, role="node")
        rec.role = "node"
