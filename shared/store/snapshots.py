"""Snapshot metadata in Redis: one hash each, the set of names, bytes per host and count per client.

A snapshot's name is its client's: the records are keyed by (client, name) (Keys.snapshot_member),
so two clients may each keep "base" and one never reaches the other's by name.

A part of the store (``store.snapshots``); kept atomic by scripts, so parallel snapshots never
overshoot fork.snapshot_bytes or fork.snapshots_per_client.
"""

from __future__ import annotations

import msgspec

from shared.models import Snapshot
from shared.store.base import Part, Script, redis_errors, text

# KEYS[1] snapshot hash, KEYS[2] names set, KEYS[3] bytes per manager hash, KEYS[4] count per client hash
# ARGV[1] member (the name in its client's scope), ARGV[2] manager_id, ARGV[3] client, ARGV[4] bytes, ARGV[5] per-client limit (0 none),
# ARGV[6] bytes limit (0 none), ARGV[7..] the hash's field/value pairs
PUT = """
if redis.call('exists', KEYS[1]) == 1 then return 'exists' end
local climit = tonumber(ARGV[5])
if climit > 0 and tonumber(redis.call('hget', KEYS[4], ARGV[3]) or '0') >= climit then return 'client' end
local blimit = tonumber(ARGV[6])
if blimit > 0 and tonumber(redis.call('hget', KEYS[3], ARGV[2]) or '0') + tonumber(ARGV[4]) > blimit then
  return 'bytes'
end
redis.call('hset', KEYS[1], unpack(ARGV, 7))
redis.call('sadd', KEYS[2], ARGV[1])
redis.call('hincrby', KEYS[3], ARGV[2], ARGV[4])
redis.call('hincrby', KEYS[4], ARGV[3], 1)
return 'ok'
"""

# KEYS as PUT's; ARGV[1] member. Removes the hash and gives back what it counted.
DELETE = """
local h = redis.call('hmget', KEYS[1], 'manager_id', 'client', 'bytes')
if not h[1] then return 0 end
redis.call('del', KEYS[1])
redis.call('srem', KEYS[2], ARGV[1])
redis.call('hincrby', KEYS[3], h[1], -tonumber(h[3] or '0'))
redis.call('hincrby', KEYS[4], h[2] or '', -1)
return 1
"""


class SnapshotStore(Part):
    """Snapshot metadata (``store.snapshots``)."""

    _put = Script(PUT)
    _delete = Script(DELETE)

    def _keys(self, member: str) -> list[str]:
        k = self.keys
        return [k.snapshot(member), k.snapshots(), k.snapshot_bytes(), k.snapshot_count()]

    async def put(self, snap: Snapshot, per_client: int, host_bytes: int) -> str:
        """Record a snapshot within the limits: 'ok', or what refused it ('exists': its client keeps
        one of that name, 'client', 'bytes')."""
        member = self.keys.snapshot_member(snap.client, snap.name)
        fields = [x for k, v in msgspec.structs.asdict(snap).items() for x in (k, str(v))]
        with redis_errors():
            return text(await self._put(keys=self._keys(member),
                                      args=[member, snap.manager_id, snap.client, snap.bytes, per_client,
                                            host_bytes, *fields]))

    async def usage(self, manager_id: str, client: str) -> tuple[int, int]:
        """(bytes of manager_id's snapshots, snapshots client keeps)."""
        with redis_errors():
            b = await self.redis.hget(self.keys.snapshot_bytes(), manager_id)
            n = await self.redis.hget(self.keys.snapshot_count(), client)
        return int(b or 0), int(n or 0)

    async def get(self, client: str, name: str) -> Snapshot | None:
        """client's snapshot name (another client's of the same name is not it)."""
        return (await self._find(client, name))[1]

    async def _find(self, client: str, name: str) -> tuple[str, Snapshot | None]:
        """(the member it is recorded under, the snapshot). One recorded before names were per
        client is under its bare name (a name has no ':'): still client's, never another's."""
        member = self.keys.snapshot_member(client, name)
        snap = await self._get(member)
        if snap is None:
            legacy = await self._get(name)
            if legacy is not None and legacy.client == client:
                return name, legacy
        return member, snap

    async def _get(self, member: str) -> Snapshot | None:
        with redis_errors():
            data = await self.redis.hgetall(self.keys.snapshot(member))
        if not data:
            return None
        return msgspec.convert({text(k): text(v) for k, v in data.items()}, Snapshot, strict=False)

    async def all(self) -> list[Snapshot]:
        """Every client's snapshots, oldest first."""
        with redis_errors():
            members = sorted(text(n) for n in await self.redis.smembers(self.keys.snapshots()))
        out = [s for s in [await self._get(m) for m in members] if s is not None]
        return sorted(out, key=lambda s: s.created_at)

    async def delete(self, client: str, name: str) -> bool:
        """Forget client's snapshot name (its bytes are the backend's to drop); False when there was none."""
        member, _ = await self._find(client, name)
        with redis_errors():
            return bool(await self._delete(keys=self._keys(member), args=[member]))
