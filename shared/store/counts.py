"""Client counts read for the recount (checker/upkeep.py): each client's count with its version,
what its records and reservations say it holds, and a correction that applies only if nothing
wrote the count since it was read. The records are the truth; a count is a cache of them that a
failover or a replica dying between the two steps of a cluster (quotas.py) can leave one off."""

from __future__ import annotations

from collections import Counter
from typing import Any

from shared.keys import is_reservation, reservation_client
from shared.store.base import Part, Script, redis_errors, text

# KEYS: node hashes. Their client fields, in order ('' where none or the record is gone).
READ_CLIENTS = """
local out = {}
for i, key in ipairs(KEYS) do out[i] = redis.call('hget', key, 'client') or '' end
return out
"""

# KEYS[1] count hash, KEYS[2] version hash; ARGV[1] client, ARGV[2] version read, ARGV[3] count read,
# ARGV[4] the count it should be. Sets it only if neither moved since they were read (a creation or a
# release meanwhile: the next recount looks again); a count of 0 leaves no field behind.
SET_COUNT = """
if (redis.call('hget', KEYS[2], ARGV[1]) or '0') ~= ARGV[2] then return 0 end
if (redis.call('hget', KEYS[1], ARGV[1]) or '0') ~= ARGV[3] then return 0 end
if ARGV[4] == '0' then
  redis.call('hdel', KEYS[1], ARGV[1])
  redis.call('hdel', KEYS[2], ARGV[1])
else
  redis.call('hset', KEYS[1], ARGV[1], ARGV[4])
  redis.call('hincrby', KEYS[2], ARGV[1], 1)
end
return 1
"""

COUNT_SUFFIX = ":client_count"


class ClientCounts(Part):
    """Read every client's count and holdings; correct a count that nothing wrote meanwhile."""

    _read_clients = Script(READ_CLIENTS)
    _set_count = Script(SET_COUNT)

    async def client_tallies(self) -> dict[str, tuple[int, int]]:
        """client -> (its count, the count's version: writes so far), for every client with a count."""
        k = self.keys
        with redis_errors():
            if not self.clustered:
                async with self.redis.pipeline(transaction=True) as p:
                    p.hgetall(k.client_count())
                    p.hgetall(k.client_version())
                    counts, versions = await p.execute()
                return _tallies(counts, versions)
            keys = [text(key) async for key in self.redis.scan_iter(match=k.client_count_pattern(), count=1000)]
            out: dict[str, tuple[int, int]] = {}
            for i in range(0, len(keys), 500):
                chunk = keys[i:i + 500]
                async with self.redis.pipeline(transaction=False) as p:
                    for key in chunk:
                        p.hgetall(key)
                        p.hgetall(key[:-len(COUNT_SUFFIX)] + COUNT_SUFFIX + "_v")
                    rows = await p.execute()
                for j in range(len(chunk)):
                    out.update(_tallies(rows[2 * j], rows[2 * j + 1]))
            return out

    async def client_holdings(self) -> dict[str, int]:
        """client -> the sessions (records of any state) and reservations that name it, over every manager_id."""
        held: Counter[str] = Counter()
        mids = await self.manager_ids()
        with redis_errors():
            async with self.redis.pipeline(transaction=False) as p:
                for m in mids:
                    p.smembers(self.keys.manager_nodes(m))
                sets = await p.execute() if mids else []
        ids: list[str] = []
        for members in sets:
            for raw in members:
                m = text(raw)
                if is_reservation(m):
                    client = reservation_client(m)
                    if client:
                        held[client] += 1
                else:
                    ids.append(m)
        for group in self.by_slot([self.keys.node(nid) for nid in ids]):  # one script per slot
            for i in range(0, len(group), 1000):
                keys = [self.keys.node(ids[j]) for j in group[i:i + 1000]]
                with redis_errors():
                    clients = await self._read_clients(keys=keys)
                held.update(c for c in (text(x) for x in clients) if c)
        return dict(held)

    async def set_client_count(self, client: str, version: int, count: int, want: int) -> bool:
        """Set a client's count to want if it is still count at version (else False: it moved)."""
        with redis_errors():
            return bool(await self._set_count(keys=[self.keys.client_count(client), self.keys.client_version(client)],
                                              args=[client, version, count, want]))


def _tallies(counts: dict[Any, Any], versions: dict[Any, Any]) -> dict[str, tuple[int, int]]:
    return {text(c): (int(n), int(versions.get(c, 0))) for c, n in counts.items()}
