"""Activity: when each session was last used, per manager_id in a sorted set, so the idle scan is
one range query; proxied requests are batched in memory and flushed here."""

from __future__ import annotations

from typing import cast

from shared.store.base import Part, Scored, redis_errors, text


class Activity(Part):
    """Last-request times of sessions."""

    async def touch(self, activity: dict[str, tuple[str, float]]) -> None:
        """Flush a batch of last-request times (node_id -> (manager_id, ts)) in one round trip."""
        by_mgr: dict[str, dict[str, float]] = {}
        for node_id, (mgr, ts) in activity.items():
            by_mgr.setdefault(mgr, {})[node_id] = ts
        with redis_errors():
            async with self.redis.pipeline(transaction=False) as p:
                for mgr, members in by_mgr.items():
                    # XX: never re-add a node that was released meanwhile; GT: never go back in time
                    p.zadd(self.keys.last_request(mgr), members, xx=True, gt=True)
                await p.execute()

    async def idle_since(self, manager_id: str, older_than: float) -> dict[str, float]:
        """node id -> last activity, for nodes idle since before the timestamp: one range query."""
        with redis_errors():
            rows = cast(Scored, await self.redis.zrangebyscore(self.keys.last_request(manager_id), "-inf",
                                                                older_than, withscores=True))
        return {text(m): float(s) for m, s in rows}

    async def last_activity(self, manager_id: str, node_id: str) -> float | None:
        with redis_errors():
            score = await self.redis.zscore(self.keys.last_request(manager_id), node_id)
        return None if score is None else float(score)

    async def last_requests(self, manager_id: str) -> dict[str, float]:
        with redis_errors():
            rows = cast(Scored, await self.redis.zrange(self.keys.last_request(manager_id), 0, -1, withscores=True))
        return {text(m): float(s) for m, s in rows}
