"""The warm pool: ready nodes of a manager_id in a list, claimed atomically so that two replicas
never hand out the same node; and the count of creation requests that sizes it."""

from __future__ import annotations

import time

from shared.store.base import Op, Part, Script, redis_errors, text

# KEYS[1] pool list, KEYS[2] client count hash, KEYS[3..] the records of the ids at the pool's head
# ARGV[1] now, ARGV[2] client, ARGV[3] claiming replica, ARGV[4..] those ids in pool order
# (ARGV[i + 1] is the id of KEYS[i]), last ARGV the client's limit (0 none)
# Pops the head while it is the id expected, until one whose record is still pooled, and marks
# it claimed: two replicas can never hand out the same node. 'again' when the head moved since
# it was read or more ids wait than were given.
CLAIM_POOLED = """
local climit = tonumber(ARGV[#KEYS + 2] or '0')
if ARGV[2] ~= '' and climit > 0 and tonumber(redis.call('hget', KEYS[2], ARGV[2]) or '0') >= climit then
  return 'client'
end
for i = 3, #KEYS do
  local id = ARGV[i + 1]
  if redis.call('lindex', KEYS[1], 0) ~= id then return 'again' end
  redis.call('lpop', KEYS[1])
  if redis.call('hget', KEYS[i], 'role') == 'pooled' then
    redis.call('hset', KEYS[i], 'role', 'claiming', 'claimed_at', ARGV[1], 'client', ARGV[2], 'updated_at', ARGV[1],
               'claimed_by', ARGV[3])
    if ARGV[2] ~= '' then redis.call('hincrby', KEYS[2], ARGV[2], 1) end
    return id
  end
end
if redis.call('llen', KEYS[1]) > 0 then return 'again' end
return false
"""

CLAIM_BATCH = 10  # pool ids read ahead per claim attempt


class Pool(Part):
    """Claim pooled nodes and put new ones in the pool."""

    _claim = Script(CLAIM_POOLED)

    async def claim_pooled(self, manager_id: str, client: str = "", claimer: str = "",
                           per_client: int = 0) -> str | None:
        """Atomically take a ready pooled node of manager_id, or None when the pool is empty or
        the client already holds per_client sessions."""
        k = self.keys
        with redis_errors():
            while True:
                ids = [text(i) for i in await self.redis.lrange(k.pool(manager_id), 0, CLAIM_BATCH - 1)]
                if not ids:
                    return None
                got = await self._claim(keys=[k.pool(manager_id), k.client_count(), *[k.node(i) for i in ids]],
                                        args=[time.time(), client, claimer, *ids, per_client])
                if not got or text(got) == "client":
                    return None
                if text(got) != "again":
                    return text(got)

    def pool_push_op(self, manager_id: str, node_id: str) -> Op:
        return ("rpush", self.keys.pool(manager_id), [node_id])

    async def unpool(self, manager_id: str, node_id: str) -> bool:
        """Take a pooled node out of the pool unless a claim took it first; True when this call did."""
        with redis_errors():
            return bool(await self.redis.lrem(self.keys.pool(manager_id), 1, node_id))

    async def count_arrival(self, manager_id: str) -> None:
        """One more creation request for manager_id (what sizes its pool: nodeops/demand.py)."""
        with redis_errors():
            await self.redis.incr(self.keys.arrivals(manager_id))

    async def arrivals(self, manager_id: str) -> int:
        """Creation requests for manager_id so far."""
        with redis_errors():
            return int(await self.redis.get(self.keys.arrivals(manager_id)) or 0)
