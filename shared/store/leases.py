"""Checker leases: one holder per manager_id, each acquisition bumping a fencing token, renewed
from a thread of the checker's own on a client of its own (see LeaseRenewer)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import redis
import redis.asyncio as aioredis

from shared.keys import Keys
from shared.models import LeaseInfo
from shared.store.base import Part, Script, redis_errors, text

# KEYS[1] lease, KEYS[2] fence counter, KEYS[3] lease info hash
# ARGV[1] holder, ARGV[2] ttl ms, ARGV[3] now (unix seconds)
LEASE_ACQUIRE = """
if redis.call('exists', KEYS[1]) == 1 then return 0 end
local token = redis.call('incr', KEYS[2])
redis.call('set', KEYS[1], ARGV[1] .. ':' .. token, 'PX', ARGV[2])
redis.call('hset', KEYS[3], 'holder', ARGV[1], 'token', token, 'since', ARGV[3])
return token
"""

# KEYS[1] lease; ARGV[1] 'holder:token', ARGV[2] ttl ms
LEASE_RENEW = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('pexpire', KEYS[1], ARGV[2])
return 1
"""

# KEYS[1] lease, KEYS[2] lease info; ARGV[1] 'holder:token', ARGV[2] now
LEASE_RELEASE = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('del', KEYS[1])
redis.call('hset', KEYS[2], 'holder', '', 'released_at', ARGV[2])
return 1
"""


class LeaseRenewer:
    """Renews checker leases from a thread of the checker's own, on a blocking connection of its
    own: neither client load on the event loop nor a full pool can delay a renewal."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self._r = client
        self._keys = keys
        self._renew = client.register_script(LEASE_RENEW)

    def renew(self, manager_id: str, value: str, ttl_ms: int) -> bool:
        """True when renewed; False when the lease is no longer value's; RedisUnavailable when Redis
        did not answer."""
        with redis_errors():
            return bool(self._renew(keys=[self._keys.lease(manager_id)], args=[value, ttl_ms]))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._r.close()


class Leases(Part):
    """Acquire, renew, release and show checker leases (``store.leases``)."""

    _acquire = Script(LEASE_ACQUIRE, on="lease_redis")
    _renew = Script(LEASE_RENEW, on="lease_redis")
    _release = Script(LEASE_RELEASE, on="lease_redis")

    def __init__(self, redis: aioredis.Redis, keys: Keys, lease_redis: aioredis.Redis | None = None) -> None:
        super().__init__(redis, keys)
        # the lease's writes on a client of their own: client load filling the main pool must never
        # delay a renewal (3,000 /ws/events sockets once cost the checker its lease 3 times in 2 min)
        self.lease_redis = lease_redis or redis
        # a blocking renewer for a thread of the checker's own (Store.open sets it; None: the caller renews)
        self.renewer: Callable[[], LeaseRenewer] | None = None

    async def acquire(self, manager_id: str, holder: str, ttl_ms: int) -> int:
        """A new fencing token when the lease was free, else 0."""
        k = self.keys
        with redis_errors():
            return int(await self._acquire(keys=[k.lease(manager_id), k.fence(manager_id),
                                                       k.lease_info(manager_id)],
                                                 args=[holder, ttl_ms, f"{time.time():.3f}"]))

    async def renew(self, manager_id: str, value: str, ttl_ms: int) -> bool:
        with redis_errors():
            return bool(await self._renew(keys=[self.keys.lease(manager_id)], args=[value, ttl_ms]))

    async def release(self, manager_id: str, value: str) -> None:
        k = self.keys
        with redis_errors():
            await self._release(keys=[k.lease(manager_id), k.lease_info(manager_id)],
                                      args=[value, f"{time.time():.3f}"])

    async def view(self, manager_id: str) -> LeaseInfo:
        """Who holds a manager_id's lease, its token and since when (admin view)."""
        k = self.keys
        with redis_errors():
            async with self.redis.pipeline(transaction=False) as p:
                p.get(k.lease(manager_id))
                p.pttl(k.lease(manager_id))
                p.hgetall(k.lease_info(manager_id))
                value, pttl, info = await p.execute()
        if not value:
            return LeaseInfo(manager_id=manager_id, holder=None, token=None, since=None, expires_in_ms=None)
        holder, _, token = text(value).rpartition(":")
        since = info.get(b"since") if info and text(info.get(b"holder", b"")) == holder else None
        return LeaseInfo(manager_id=manager_id, holder=holder, token=int(token),
                         since=float(since) if since else None, expires_in_ms=int(pttl))
