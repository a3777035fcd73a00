"""The long-lived clients one replica shares between requests and background tasks."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from manager.replica.activity import ActivityRecorder, AddressCache
from nodeops.context import NodeOps


@dataclass(kw_only=True)
class Runtime(NodeOps):
    """Node operations plus the HTTP edge's hot-path state."""

    cache: AddressCache
    activity: ActivityRecorder
    stopping: bool = False  # set at the stop signal: the heartbeat must not re-register
    registry_lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # heartbeat vs deregistration

    def forget_address(self, node_id: str) -> None:
        self.cache.invalidate(node_id)
