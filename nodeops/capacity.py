"""How many live nodes one manager_id may hold: configured, or what its engine's memory holds."""

from __future__ import annotations

import re

from nodeops.context import NodeOps

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(value: object) -> int:
    """Docker's memory sizes ("512m", "1g", 1073741824) in bytes; 0 when absent or unparsable."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+)\s*([bkmgt]?)b?\s*", str(value or "").lower())
    return int(m.group(1)) * _UNITS[m.group(2)] if m else 0


async def node_cap(ops: NodeOps) -> int:
    """The cap on live nodes of this manager_id; 0 means none."""
    configured = ops.cfg.cluster.max_nodes_per_manager
    if configured != 0:
        return max(configured, 0)
    if ops.derived_cap is None:
        per_node = parse_size(ops.cfg.node.creation_kwargs.get("mem_limit"))
        total = int((await ops.backend.info()).get("MemTotal") or 0)
        # no memory limit on nodes (or an engine that does not say): nothing to derive from
        ops.derived_cap = max(1, total // per_node) if per_node and total else 0
    return ops.derived_cap


def client_cap(per_client: int | None, node_cap: int) -> int:
    """Live sessions one client may hold (0: no limit): quota.per_client, or by default a quarter
    of this manager_id's node cap, so one client (an anonymous one included) never takes a host."""
    if per_client is not None:
        return max(per_client, 0)
    return max(1, node_cap // 4) if node_cap > 0 else 0
