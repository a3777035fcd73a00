"""Lost hosts: a manager_id none of whose replicas has sent a heartbeat for
``cluster.lost_after_seconds``. Its nodes show as unreachable in every view and metric
until a replica of it is back (as Nomad and Kubernetes mark a lost node's work unknown)."""

from __future__ import annotations

import time
from typing import Any

from nodeops.context import NodeOps
from shared.models import NodeStatus


async def lost_managers(ops: NodeOps) -> dict[str, float]:
    """manager_id -> seconds since any replica of it was last seen, for those past the grace period."""
    now = time.time()
    grace = ops.cfg.cluster.lost_after_seconds
    return {mid: now - seen for mid, seen in (await ops.store.managers_seen()).items() if now - seen > grace}


def as_seen(row: dict[str, Any], lost: dict[str, float]) -> dict[str, Any]:
    """A node's public record as views show it: unreachable while its owner's host is lost."""
    silent = lost.get(row["manager_id"])
    if silent is not None:
        row["recorded_status"] = row["status"]
        row["status"] = NodeStatus.UNREACHABLE
        row["unreachable_for_seconds"] = round(silent, 1)
    return row
