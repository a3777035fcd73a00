"""Session locks: one caller at a time brings a session's container back; only the holder can
free the lock (the token is checked in the script, as in redis-py's Lock). And the turn of the
cluster-wide upkeep (checker/upkeep.py), one replica a period."""

from __future__ import annotations

from shared.store.base import Part, Script, redis_errors

# KEYS[1] lock; ARGV[1] holder. Deletes the lock only while the caller still holds it.
UNLOCK = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


class Locks(Part):
    """Take and free session locks."""

    _unlock = Script(UNLOCK)

    async def lock_session(self, session_id: str, holder: str, ttl_ms: int) -> bool:
        """Take the lock that lets one caller at a time bring a session's container back."""
        with redis_errors():
            return bool(await self.redis.set(self.keys.session_lock(session_id), holder, nx=True, px=ttl_ms))

    async def take_upkeep_turn(self, holder: str, ttl_seconds: float) -> bool:
        """Take the cluster-wide upkeep for ttl_seconds (one replica a period does it)."""
        with redis_errors():
            return bool(await self.redis.set(self.keys.upkeep_turn(), holder, nx=True, px=int(ttl_seconds * 1000)))

    async def unlock_session(self, session_id: str, holder: str) -> None:
        with redis_errors():
            await self._unlock(keys=[self.keys.session_lock(session_id)], args=[holder])
