"""Which manager_id takes a new session."""

from __future__ import annotations

from nodeops import capacity
from nodeops.context import NodeOps
from shared.errors import CapacityExhausted


def rank(own: str, policy: str, live: set[str], counts: dict[str, int], caps: dict[str, int],
         draining: set[str]) -> list[str]:
    """The manager_ids that may take a new session, best first; none that is draining or full.

    ``caps``: each manager_id's cap on live nodes (0: none). ``spread``: fewest nodes first (this
    replica's own manager_id first among equals: no forwarding hop); ``local``: this replica's own
    first, then the others by load.
    """
    def has_room(m: str) -> bool:
        cap = caps.get(m, 0)
        return cap <= 0 or counts.get(m, 0) < cap

    open_ = [m for m in (live | {own}) - draining if has_room(m)]
    by_load = sorted(open_, key=lambda m: (counts.get(m, 0), m != own, m))
    if policy == "local" and own in by_load:
        by_load.remove(own)
        by_load.insert(0, own)
    return by_load


async def choose_managers(ops: NodeOps) -> list[str]:
    """The manager_ids a new session may go to, by cluster.placement, best first (never empty)."""
    own_cap = await capacity.node_cap(ops)
    draining = await ops.store.draining()
    counts = await ops.store.node_counts()
    replicas = await ops.store.live_replicas()
    live = {r.manager_id for r in replicas}
    # each manager_id by the cap its replicas announce (they share one config); by ours when they
    # do not say (-1: an older replica, or its engine did not answer yet)
    said: dict[str, int] = {}
    for r in replicas:
        if r.node_cap >= 0:
            said.setdefault(r.manager_id, r.node_cap)
    caps = {m: said.get(m, own_cap) for m in live}
    caps[ops.manager_id] = own_cap
    ranked = rank(ops.manager_id, ops.cfg.cluster.placement, live, counts, caps, draining)
    if not ranked:
        why = "draining" if ops.manager_id in draining else f"at capacity ({own_cap} nodes)"
        raise CapacityExhausted(f"no manager can take a new session: {ops.manager_id} is {why} and no other "
                                f"live manager_id has room")
    return ranked
