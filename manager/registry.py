"""This replica's entry in the replica registry, kept alive by a heartbeat."""

from __future__ import annotations

import asyncio
import logging

from manager.runtime import Runtime
from nodeops import capacity
from shared.errors import EngineUnavailable, RedisUnavailable

log = logging.getLogger(__name__)


async def heartbeat_loop(rt: Runtime) -> None:
    """Keep this replica registered; re-registers by itself after a Redis flush."""
    ttl = rt.cfg.cluster.replica_ttl_seconds
    while not rt.stopping:
        try:
            async with rt.registry_lock:
                if rt.stopping:
                    return
                rt.replica.draining = rt.manager_id in await rt.store.draining()
                if rt.replica.node_cap < 0:
                    try:
                        rt.replica.node_cap = await capacity.node_cap(rt)
                    except EngineUnavailable:  # said at a later beat
                        pass
                await rt.store.heartbeat(rt.replica, ttl)
        except RedisUnavailable as exc:
            log.warning("heartbeat_failed replica_id=%s error=%s", rt.replica.replica_id, exc.detail)
        await asyncio.sleep(rt.cfg.cluster.heartbeat_seconds)
