"""What the egress agent learned from the answers it gave (node, destination, name, until when),
kept so that a standby replica that takes the resolver over knows it: which names opened the
addresses of connections still open (a narrowing must cut them) and which names an address may
be asked for at the proxy until its answer's TTL runs out. A part of the store
(``store.egress_learned``)."""

from __future__ import annotations

from shared.store.base import Part, redis_errors, text

# the hash outlives no manager_id by long: rewritten at each answer, gone a day after the last
KEEP_SECONDS = 86400


class EgressLearnedStore(Part):
    async def add(self, manager_id: str, node: str, found: list[tuple[str, str, float]]) -> None:
        """(destination, name, until) answered to ``node``."""
        if not found:
            return
        key = self.keys.egress_learned(manager_id)
        with redis_errors():
            async with self.redis.pipeline(transaction=False) as p:
                p.hset(key, mapping={f"{node} {dst} {name}": f"{until:.3f}" for dst, name, until in found})
                p.expire(key, KEEP_SECONDS)
                await p.execute()

    async def forget(self, manager_id: str, items: list[tuple[str, str, str]]) -> None:
        """(node, destination, name) no longer learned."""
        if items:
            with redis_errors():
                await self.redis.hdel(self.keys.egress_learned(manager_id), *(" ".join(i) for i in items))

    async def all(self, manager_id: str) -> list[tuple[str, str, str, float]]:
        """Every (node, destination, name, until) kept."""
        with redis_errors():
            raw = await self.redis.hgetall(self.keys.egress_learned(manager_id))
        out = []
        for k, v in (raw or {}).items():
            parts = text(k).split(" ")
            try:
                out.append((parts[0], parts[1], parts[2], float(text(v))))
            except (IndexError, ValueError):
                continue
        return out
