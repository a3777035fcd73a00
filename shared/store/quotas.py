"""Quotas: a creation reserves a slot in one script, so parallel creations never overshoot the
per-manager, total or per-client limits; archived sessions hold no container and do not count."""

from __future__ import annotations

import time
import uuid

from shared.errors import QuotaExceeded
from shared.keys import reservation_client, reservation_member
from shared.store.base import Op, Part, Script, client_count_ops, redis_errors, text

# KEYS[1] manager's node set, KEYS[2] set of manager ids, KEYS[3] client count hash,
# KEYS[4] the manager's archived sessions (members of KEYS[1] that hold no container),
# KEYS[5] the client count's version hash (bumped with the count: checker/upkeep.py),
# KEYS[6..] the node set of every manager id in KEYS[2] (read just before; only for a total limit)
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
  if redis.call('scard', KEYS[2]) ~= #KEYS - 5 then return 'stale' end
  local sum = 0
  for i = 6, #KEYS do sum = sum + redis.call('scard', KEYS[i]) end
  if sum >= total then return 'total' end
end
local climit = tonumber(ARGV[5])
if ARGV[4] ~= '' and climit > 0 then
  if tonumber(redis.call('hget', KEYS[3], ARGV[4]) or '0') >= climit then return 'client' end
end
redis.call('sadd', KEYS[1], ARGV[1])
if ARGV[4] ~= '' then
  redis.call('hincrby', KEYS[3], ARGV[4], 1)
  redis.call('hincrby', KEYS[5], ARGV[4], 1)
end
return 'ok'
"""


# On a Redis Cluster, the manager's half: KEYS[1] manager's node set, KEYS[2] its archived set;
# ARGV[1] member, ARGV[2] per-manager limit, ARGV[3] total limit, ARGV[4] the other managers' nodes
# (counted just before, outside: the total spans slots and is a soft bound there, see the README)
RESERVE_SLOT = """
local per = tonumber(ARGV[2])
if per > 0 and redis.call('scard', KEYS[1]) - redis.call('scard', KEYS[2]) >= per then return 'manager' end
local total = tonumber(ARGV[3])
if total > 0 and redis.call('scard', KEYS[1]) + tonumber(ARGV[4]) >= total then return 'total' end
redis.call('sadd', KEYS[1], ARGV[1])
return 'ok'
"""

# On a Redis Cluster, the client's half: KEYS[1] the client's count hash, KEYS[2] its version hash;
# ARGV[1] client, ARGV[2] limit (0 none). Counts one more session unless the client already holds the limit.
TAKE_CLIENT = """
local climit = tonumber(ARGV[2])
if climit > 0 and tonumber(redis.call('hget', KEYS[1], ARGV[1]) or '0') >= climit then return 0 end
redis.call('hincrby', KEYS[1], ARGV[1], 1)
redis.call('hincrby', KEYS[2], ARGV[1], 1)
return 1
"""


class Quotas(Part):
    """Reserve and give back creation slots; count archived sessions out."""

    _reserve = Script(RESERVE)
    _reserve_slot = Script(RESERVE_SLOT)
    _take_client = Script(TAKE_CLIENT)

    async def take_client(self, client: str, per_client: int) -> bool:
        """On a cluster: count one more session of client within its limit (its own slot)."""
        with redis_errors():
            return bool(await self._take_client(keys=[self.keys.client_count(client), self.keys.client_version(client)],
                                                args=[client, per_client]))

    async def give_client(self, client: str) -> None:
        """On a cluster: give back a client's count taken for a creation that did not happen."""
        with redis_errors():
            await self.apply(client_count_ops(self.keys, client, -1))

    async def reserve(self, manager_id: str, per_manager: int, total: int, client: str = "",
                      per_client: int = 0, replica_id: str = "") -> str:
        """Reserve a creation slot atomically; returns the reservation member or raises QuotaExceeded."""
        member = reservation_member(time.time(), uuid.uuid4().hex[:8], replica_id, client)
        if self.clustered:
            return await self._reserve_clustered(manager_id, member, per_manager, total, client, per_client)
        k = self.keys
        with redis_errors():
            await self.redis.sadd(k.managers(), manager_id)
            res = "stale"
            while res == "stale":
                others = [k.manager_nodes(m) for m in await self.manager_ids()] if total > 0 else []
                res = text(await self._reserve(keys=[k.manager_nodes(manager_id), k.managers(), k.client_count(),
                                                   k.archived(manager_id), k.client_version(), *others],
                                             args=[member, per_manager, total, client, per_client]))
        if res == "manager":
            raise QuotaExceeded(f"quota exceeded: manager {manager_id} already has {per_manager} nodes")
        if res == "total":
            raise QuotaExceeded(f"quota exceeded: the cluster already has {total} nodes")
        if res == "client":
            raise QuotaExceeded(f"quota exceeded: client {client} already has {per_client} nodes")
        return member

    async def _reserve_clustered(self, manager_id: str, member: str, per_manager: int, total: int, client: str,
                                 per_client: int) -> str:
        """The client's count first (its own slot), then the manager's slot; the client's count is
        given back when the manager refuses. A replica dying between the two leaves the client one
        count too high (the client may see a 429 one session early, never more sessions than its limit)."""
        k = self.keys
        if client and not await self.take_client(client, per_client):
            raise QuotaExceeded(f"quota exceeded: client {client} already has {per_client} nodes")
        try:
            with redis_errors():
                await self.redis.sadd(k.managers(), manager_id)
                others = 0
                if total > 0:
                    counts = await self.node_counts()
                    others = sum(n for m, n in counts.items() if m != manager_id)
                res = text(await self._reserve_slot(keys=[k.manager_nodes(manager_id), k.archived(manager_id)],
                                                    args=[member, per_manager, total, others]))
        except BaseException:
            if client:
                await self.give_client(client)
            raise
        if res != "ok" and client:
            await self.give_client(client)
        if res == "manager":
            raise QuotaExceeded(f"quota exceeded: manager {manager_id} already has {per_manager} nodes")
        if res == "total":
            raise QuotaExceeded(f"quota exceeded: the cluster already has {total} nodes")
        return member

    async def unreserve(self, manager_id: str, member: str, client: str = "") -> None:
        """Give a reservation back, and its client's count only if the reservation was still there
        (the checker may have dropped it, giving the count back itself)."""
        with redis_errors():
            gone = await self.redis.srem(self.keys.manager_nodes(manager_id), member)
            if client and gone:
                await self.apply(client_count_ops(self.keys, client, -1))

    def unreserve_op(self, manager_id: str, member: str) -> Op:
        return ("srem", self.keys.manager_nodes(manager_id), [member])

    def stale_reservation_ops(self, manager_id: str, member: str) -> list[Op]:
        """The checker's drop of a reservation whose replica died (or that is stuck): the slot, and
        the count of the client it names, which no one else would give back."""
        ops: list[Op] = [self.unreserve_op(manager_id, member)]
        client = reservation_client(member)
        if client:
            ops += client_count_ops(self.keys, client, -1)
        return ops

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
