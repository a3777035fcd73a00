"""Quotas: a creation reserves a slot in one script, so parallel creations never overshoot the
per-manager, total or per-client limits; archived sessions hold no container and do not count."""

from __future__ import annotations

import time
import uuid

from shared.errors import QuotaExceeded
from shared.keys import reservation_member
from shared.store.base import Op, Part, Script, redis_errors, text

# KEYS[1] manager's node set, KEYS[2] set of manager ids, KEYS[3] client count hash,
# KEYS[4] the manager's archived sessions (members of KEYS[1] that hold no container),
# KEYS[5..] the node set of every manager id in KEYS[2] (read just before; only for a total limit)
# ARGV[1] reservation member, ARGV[2] per-manager limit (0 none), ARGV[3] total limit (0 none),
# ARGV[4] client id ('' none), ARGV[5] per-client limit (0 none)
# Check quotas and reserve a slot atomically, so parallel creations never overshoot. The set
# of manager ids only grows, so an unchanged size means the node sets given are all of them;
# 'stale' asks the caller to read it again.
RESERVE = """
local per = tonumber(ARGV[2])
if per > 0 and redis.call('scard', KEYS[1]) - redis.call('scard', KEYS[4]) >= per then return 'manager' end
local total = tonumber(ARGV[3])
if total > 0 then
  if redis.call('scard', KEYS[2]) ~= #KEYS - 4 then return 'stale' end
  local sum = 0
  for i = 5, #KEYS do sum = sum + redis.call('scard', KEYS[i]) end
  if sum >= total then return 'total' end
end
local climit = tonumber(ARGV[5])
if ARGV[4] ~= '' and climit > 0 then
  if tonumber(redis.call('hget', KEYS[3], ARGV[4]) or '0') >= climit then return 'client' end
end
redis.call('sadd', KEYS[1], ARGV[1])
if ARGV[4] ~= '' then redis.call('hincrby', KEYS[3], ARGV[4], 1) end
return 'ok'
"""


class Quotas(Part):
    """Reserve and give back creation slots; count archived sessions out."""

    _reserve = Script(RESERVE)

    async def reserve(self, manager_id: str, per_manager: int, total: int, client: str = "",
                      per_client: int = 0, replica_id: str = "") -> str:
        """Reserve a creation slot atomically; returns the reservation member or raises QuotaExceeded."""
        member = reservation_member(time.time(), uuid.uuid4().hex[:8], replica_id)
        k = self.keys
        with redis_errors():
            await self.redis.sadd(k.managers(), manager_id)
            res = "stale"
            while res == "stale":
                others = [k.manager_nodes(m) for m in await self.manager_ids()] if total > 0 else []
                res = text(await self._reserve(keys=[k.manager_nodes(manager_id), k.managers(), k.client_count(),
                                                   k.archived(manager_id), *others],
                                             args=[member, per_manager, total, client, per_client]))
        if res == "manager":
            raise QuotaExceeded(f"quota exceeded: manager {manager_id} already has {per_manager} nodes")
        if res == "total":
            raise QuotaExceeded(f"quota exceeded: the cluster already has {total} nodes")
        if res == "client":
            raise QuotaExceeded(f"quota exceeded: client {client} already has {per_client} nodes")
        return member

    async def unreserve(self, manager_id: str, member: str, client: str = "") -> None:
        with redis_errors():
            async with self.redis.pipeline(transaction=True) as p:
                p.srem(self.keys.manager_nodes(manager_id), member)
                if client:
                    p.hincrby(self.keys.client_count(), client, -1)
                await p.execute()

    def unreserve_op(self, manager_id: str, member: str) -> Op:
        return ("srem", self.keys.manager_nodes(manager_id), [member])

    async def node_counts(self) -> dict[str, int]:
        """Live nodes (and pending reservations) per manager_id."""
        mids = await self.manager_ids()
        with redis_errors():
            async with self.redis.pipeline(transaction=False) as p:
                for m in mids:
                    p.scard(self.keys.manager_nodes(m))
                    p.scard(self.keys.archived(m))
                counts = await p.execute()
        return {m: int(counts[2 * i]) - int(counts[2 * i + 1]) for i, m in enumerate(mids)}

    def archived_op(self, manager_id: str, node_id: str, archived: bool = True) -> Op:
        """Count a session as archived (holding no container) or no longer."""
        return ("sadd" if archived else "srem", self.keys.archived(manager_id), [node_id])

    async def unarchived(self, manager_id: str, node_id: str) -> None:
        """A session has a container again: it counts against quotas."""
        with redis_errors():
            await self.redis.srem(self.keys.archived(manager_id), node_id)

    async def mark_archived(self, manager_id: str, node_id: str) -> None:
        """A session stays archived after a failed bring-back (not a checker write: no fence)."""
        with redis_errors():
            await self.redis.sadd(self.keys.archived(manager_id), node_id)
