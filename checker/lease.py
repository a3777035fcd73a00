"""The checker lease: one holder per manager_id, with a fencing token.

Acquire is set-if-absent with an expiry and bumps a counter (the token); renew and
release check holder and token inside a script, as redis-py's Lock does, so a lapsed
holder can neither extend nor free its successor's lease. The holder treats itself as
leader only until ``renew_sent + ttl - margin`` on the monotonic clock.
"""

from __future__ import annotations

import time

from shared.models import LeaseInfo
from shared.store import Store, redis_errors

# KEYS[1] lease, KEYS[2] fence counter, KEYS[3] lease info hash
# ARGV[1] holder, ARGV[2] ttl ms, ARGV[3] now (unix seconds)
ACQUIRE = """
if redis.call('exists', KEYS[1]) == 1 then return 0 end
local token = redis.call('incr', KEYS[2])
redis.call('set', KEYS[1], ARGV[1] .. ':' .. token, 'PX', ARGV[2])
redis.call('hset', KEYS[3], 'holder', ARGV[1], 'token', token, 'since', ARGV[3])
return token
"""

# KEYS[1] lease; ARGV[1] 'holder:token', ARGV[2] ttl ms
RENEW = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('pexpire', KEYS[1], ARGV[2])
return 1
"""

# KEYS[1] lease, KEYS[2] lease info; ARGV[1] 'holder:token'
RELEASE = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('del', KEYS[1])
redis.call('hset', KEYS[2], 'holder', '', 'released_at', ARGV[2])
return 1
"""


class Lease:
    """This process's side of one manager_id's checker lease."""

    def __init__(self, store: Store, manager_id: str, holder: str, ttl: float) -> None:
        self.store = store
        self.manager_id = manager_id
        self.holder = holder
        self.ttl = ttl
        self.margin = min(1.0, ttl / 5)  # stop acting this long before the lease could expire
        self.token: int | None = None
        self.valid_until = 0.0  # monotonic
        self.acquired_at = 0.0
        r = store.redis
        self._acquire = r.register_script(ACQUIRE)
        self._renew = r.register_script(RENEW)
        self._release = r.register_script(RELEASE)

    @property
    def held(self) -> bool:
        return self.token is not None and time.monotonic() < self.valid_until

    @property
    def value(self) -> str:
        return f"{self.holder}:{self.token}"

    async def acquire(self) -> bool:
        k = self.store.keys
        sent = time.monotonic()
        with redis_errors():
            token = int(await self._acquire(keys=[k.lease(self.manager_id), k.fence(self.manager_id),
                                                  k.lease_info(self.manager_id)],
                                            args=[self.holder, int(self.ttl * 1000), f"{time.time():.3f}"]))
        if token:
            self.token = token
            self.valid_until = sent + self.ttl - self.margin
            self.acquired_at = time.time()
            return True
        return False

    async def renew(self) -> bool:
        """Extend the lease; False (and no longer held) when it was lost."""
        if self.token is None:
            return False
        sent = time.monotonic()
        with redis_errors():
            ok = await self._renew(keys=[self.store.keys.lease(self.manager_id)],
                                   args=[self.value, int(self.ttl * 1000)])
        if ok:
            self.valid_until = sent + self.ttl - self.margin
            return True
        self.token = None
        return False

    async def release(self) -> None:
        if self.token is None:
            return
        k = self.store.keys
        try:
            with redis_errors():
                await self._release(keys=[k.lease(self.manager_id), k.lease_info(self.manager_id)],
                                    args=[self.value, f"{time.time():.3f}"])
        finally:
            self.token = None

    def drop(self) -> None:
        self.token = None


async def lease_view(store: Store, manager_id: str) -> LeaseInfo:
    """Who holds a manager_id's lease, its token and since when (admin view)."""
    k = store.keys
    with redis_errors():
        async with store.redis.pipeline(transaction=False) as p:
            p.get(k.lease(manager_id))
            p.pttl(k.lease(manager_id))
            p.hgetall(k.lease_info(manager_id))
            value, pttl, info = await p.execute()
    if not value:
        return LeaseInfo(manager_id=manager_id, holder=None, token=None, since=None, expires_in_ms=None)
    holder, _, token = value.decode().rpartition(":")
    since = info.get(b"since") if info and info.get(b"holder", b"").decode() == holder else None
    return LeaseInfo(manager_id=manager_id, holder=holder, token=int(token),
                     since=float(since) if since else None, expires_in_ms=int(pttl))
