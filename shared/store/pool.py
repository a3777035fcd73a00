"""The warm pool: ready nodes of a manager_id in a list, claimed atomically so that two replicas
never hand out the same node; and the count of creation requests that sizes it."""

from __future__ import annotations

import time

from shared.models import NodeRecord
from shared.store.base import Op, Part, Script, client_count_ops, redis_errors, text
from shared.store.quotas import TAKE_CLIENT

# KEYS[1] pool list, KEYS[2] client count hash, KEYS[3] arrivals counter, KEYS[4] last-request set,
# KEYS[5] the client count's version hash, KEYS[6..] the records of the ids at the pool's head
# ARGV[1] now, ARGV[2] client, ARGV[3] claiming replica, ARGV[4..] those ids in pool order
# (ARGV[i] is the id of KEYS[i + 2]), then the client's limit (0 none), then '0' when the client's count
# is not to be touched here (on a cluster it is in another slot: taken before the claim)
# Takes the first of those ids still in the pool whose record is still pooled (stale ids met on
# the way are dropped) and marks it claimed: two replicas can never hand out the same node, and
# claimers that read the same head each take another of its ids instead of all but one retrying
# (a 100-way burst made that a hundred rounds). 'again' when none of them was left and more wait.
# A claim is the whole of the pool's work on a client's path, in this one call: the arrival
# counted (once, on any answer but 'again'), the session's idle time started, and its record
# returned ({id, field, value, ...}).
CLAIM_POOLED = """
local n = #KEYS - 5
local climit = tonumber(ARGV[n + 4] or '0')
if ARGV[2] ~= '' and climit > 0 and tonumber(redis.call('hget', KEYS[2], ARGV[2]) or '0') >= climit then
  redis.call('incr', KEYS[3])
  return 'client'
end
for i = 6, #KEYS do
  local id = ARGV[i - 2]
  if redis.call('lrem', KEYS[1], 1, id) == 1 and redis.call('hget', KEYS[i], 'role') == 'pooled' then
    redis.call('hset', KEYS[i], 'role', 'claiming', 'claimed_at', ARGV[1], 'client', ARGV[2], 'updated_at', ARGV[1],
               'claimed_by', ARGV[3])
    if ARGV[2] ~= '' and ARGV[n + 5] ~= '0' then
      redis.call('hincrby', KEYS[2], ARGV[2], 1)
      redis.call('hincrby', KEYS[5], ARGV[2], 1)
    end
    redis.call('incr', KEYS[3])
    -- XX: a node released meanwhile is not re-added; GT: never back in time
    redis.call('zadd', KEYS[4], 'XX', 'GT', ARGV[1], id)
    local rec = redis.call('hgetall', KEYS[i])
    table.insert(rec, 1, id)
    return rec
  end
end
if redis.call('llen', KEYS[1]) > 0 then return 'again' end
redis.call('incr', KEYS[3])
return false
"""

CLAIM_BATCH = 16  # pool ids read ahead per claim attempt


class Pool(Part):
    """Claim pooled nodes and put new ones in the pool."""

    _claim = Script(CLAIM_POOLED)
    _claim_take = Script(TAKE_CLIENT)

    async def claim_pooled(self, manager_id: str, client: str = "", claimer: str = "",
                           per_client: int = 0) -> str | None:
        """Atomically take a ready pooled node of manager_id, or None when the pool is empty or
        the client already holds per_client sessions; its id."""
        rec = await self.claim_pooled_record(manager_id, client, claimer, per_client)
        return rec.id if rec is not None else None

    async def claim_pooled_record(self, manager_id: str, client: str = "", claimer: str = "",
                                  per_client: int = 0, now: float | None = None) -> NodeRecord | None:
        """claim_pooled in one round trip past the pool's head: the arrival counted, the claimed
        session's idle time started at now, and its record as the claim left it."""
        k = self.keys
        now = time.time() if now is None else now
        if not self.clustered:
            return await self._claim_in(manager_id, (k.client_count(), k.client_version()), client, claimer,
                                        per_client, True, now)
        # on a cluster the client's count is in its own slot: taken first, given back if nothing was claimed
        if client and not await self._claim_client(client, per_client):
            await self.count_arrival(manager_id)  # refused by its quota: still demand
            return None
        got: NodeRecord | None = None
        try:
            got = await self._claim_in(manager_id, (k.arrivals(manager_id),) * 2, client, claimer, 0, False, now)
        finally:
            if client and got is None:
                with redis_errors():
                    await self.apply(client_count_ops(k, client, -1))
        return got

    async def _claim_client(self, client: str, per_client: int) -> bool:
        with redis_errors():
            return bool(await self._claim_take(keys=[self.keys.client_count(client), self.keys.client_version(client)],
                                               args=[client, per_client]))

    async def _claim_in(self, manager_id: str, count_keys: tuple[str, str], client: str, claimer: str, per_client: int,
                        count: bool, now: float) -> NodeRecord | None:
        k = self.keys
        with redis_errors():
            while True:
                ids = [text(i) for i in await self.redis.lrange(k.pool(manager_id), 0, CLAIM_BATCH - 1)]
                if not ids:
                    await self.redis.incr(k.arrivals(manager_id))  # a miss is demand too
                    return None
                # count_keys (the count and its version) are never read when count is False and
                # per_client 0 (then keys of the pool's slot)
                got = await self._claim(keys=[k.pool(manager_id), count_keys[0], k.arrivals(manager_id),
                                              k.last_request(manager_id), count_keys[1], *[k.node(i) for i in ids]],
                                        args=[now, client, claimer, *ids, per_client, "1" if count else "0"])
                if isinstance(got, list):
                    node_id, fields = text(got[0]), got[1:]
                    rec = NodeRecord.from_hash(dict(zip(fields[::2], fields[1::2], strict=True)))
                    if not rec.id:
                        rec.id = node_id
                    return rec
                if not got or text(got) == "client":
                    return None
                # 'again': other claims took every id read; the pool's head is read anew

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
