"""Which manager_id takes a new session."""

from __future__ import annotations

from nodeops import capacity
from nodeops.context import NodeOps
from shared.errors import CapacityExhausted


async def choose_manager(ops: NodeOps) -> str:
    """This replica's own manager_id unless it is full or draining; else the least-loaded live one."""
    # other manager_ids are judged by this one's cap: each enforces its own when it creates
    limit = await capacity.node_cap(ops)
    draining = await ops.store.draining()
    if ops.manager_id not in draining and limit <= 0:
        return ops.manager_id
    counts = await ops.store.node_counts()
    if ops.manager_id not in draining and counts.get(ops.manager_id, 0) < limit:
        return ops.manager_id
    live = {r.manager_id for r in await ops.store.live_replicas()} - draining - {ops.manager_id}
    candidates = sorted((counts.get(m, 0), m) for m in live if limit <= 0 or counts.get(m, 0) < limit)
    if not candidates:
        why = "draining" if ops.manager_id in draining else f"at capacity ({limit} nodes)"
        raise CapacityExhausted(f"no manager can take a new session: {ops.manager_id} is {why} and no other "
                                f"live manager_id has room")
    return candidates[0][1]
