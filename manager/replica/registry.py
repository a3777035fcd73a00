"""This replica's entry in the replica registry, kept alive by a heartbeat."""

from __future__ import annotations

import asyncio
import logging

from manager.replica.runtime import Runtime
from nodeops import capacity
from shared.errors import EngineUnavailable, RedisUnavailable

log = logging.getLogger(__name__)


async def _beat(rt: Runtime, ttl: float, ask_engine: bool) -> None:
    async with rt.registry_lock:
        if rt.stopping:
            return
        rt.replica.draining = rt.manager_id in await rt.store.draining()
        await rt.store.heartbeat(rt.replica, ttl)
    # the engine is asked after the entry is written, its answer going out at the next beat: a
    # loaded engine took longer than the entry's TTL to answer, the entry lapsed, and the checker
    # took this live replica for dead and removed the node it was creating
    if ask_engine and rt.replica.node_cap < 0:
        try:
            rt.replica.node_cap = await capacity.node_cap(rt)
        except EngineUnavailable:  # said at a later beat
            pass


async def register(rt: Runtime) -> None:
    """The first entry, before the replica serves: without it, a call right after start (a drain of
    this manager_id, say) finds no replica of it. The node cap asks the engine, which a loaded
    machine answers in seconds: it follows at the first beat."""
    try:
        await _beat(rt, rt.cfg.cluster.replica_ttl_seconds, ask_engine=False)
    except RedisUnavailable as exc:  # the heartbeat keeps trying
        log.warning("heartbeat_failed replica_id=%s error=%s", rt.replica.replica_id, exc.detail)


async def heartbeat_loop(rt: Runtime) -> None:
    """Keep this replica registered; re-registers by itself after a Redis flush."""
    ttl = rt.cfg.cluster.replica_ttl_seconds
    while not rt.stopping:
        try:
            await _beat(rt, ttl, ask_engine=True)
        except RedisUnavailable as exc:
            log.warning("heartbeat_failed replica_id=%s error=%s", rt.replica.replica_id, exc.detail)
        await asyncio.sleep(rt.cfg.cluster.heartbeat_seconds)
