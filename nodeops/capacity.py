"""How many live nodes one manager_id may hold: configured, or what its engine's memory holds."""

from __future__ import annotations

from nodeops.context import NodeOps


async def node_cap(ops: NodeOps) -> int:
    """The cap on live nodes of this manager_id; 0 means none."""
    configured = ops.cfg.cluster.max_nodes_per_manager
    if configured != 0:
        return max(configured, 0)
    if ops.derived_cap is None:
        per_node = ops.backend.node_memory_bytes
        total = (await ops.backend.info()).memory_bytes
        # no memory limit on nodes (or an engine that does not say): nothing to derive from
        ops.derived_cap = max(1, total // per_node) if per_node and total else 0
    return ops.derived_cap


def client_cap(per_client: int | None, node_cap: int) -> int:
    """Live sessions one client may hold (0: no limit): quota.per_client, or by default a quarter
    of this manager_id's node cap, so one client (an anonymous one included) never takes a host."""
    if per_client is not None:
        return max(per_client, 0)
    return max(1, node_cap // 4) if node_cap > 0 else 0
