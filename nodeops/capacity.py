"""How many live nodes one manager_id may hold: configured, or what its engine's memory holds."""

from __future__ import annotations

from nodeops.context import NodeOps


async def node_cap(ops: NodeOps) -> int:
    """The cap on live nodes of this manager_id; 0 means none."""
    configured = ops.cfg.cluster.max_nodes_per_manager
    if configured != 0:
        cap = max(configured, 0)
    else:
        if ops.derived_cap is None:
            per_node = ops.backend.node_memory_bytes
            total = (await ops.backend.info()).memory_bytes
            # no memory limit on nodes (or an engine that does not say): nothing to derive from
            ops.derived_cap = max(1, total // per_node) if per_node and total else 0
        cap = ops.derived_cap
    return within(cap, ops.backend.max_nodes)


def within(cap: int, engine_max: int) -> int:
    """A cap (0: none) within what the engine holds of one owner's nodes (0: no bound), as Docker's
    bridge of isolated nodes: past it a node would be created and then fail to start ("exchange
    full"); at it a creation is refused with the quota's 429 before anything is made."""
    if not engine_max:
        return cap
    return engine_max if cap <= 0 else min(cap, engine_max)


def client_cap(per_client: int | None, node_cap: int) -> int:
    """Live sessions one client may hold (0: no limit): quota.per_client, or by default a quarter
    of this manager_id's node cap, so one client (an anonymous one included) never takes a host."""
    if per_client is not None:
        return max(per_client, 0)
    return max(1, node_cap // 4) if node_cap > 0 else 0
