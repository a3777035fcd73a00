"""Console logins revoked before their cookie expires, seen by every replica."""

from __future__ import annotations

from shared.store.base import Part, redis_errors


class ConsoleLogins(Part):
    """Revoke console logins."""

    async def revoke_console_login(self, login_id: str, ttl_seconds: int) -> None:
        """Every replica refuses this console login from now until its cookie would expire."""
        with redis_errors():
            await self.redis.set(self.keys.console_revoked(login_id), b"1", ex=max(1, ttl_seconds))

    async def console_login_revoked(self, login_id: str) -> bool:
        with redis_errors():
            return bool(await self.redis.exists(self.keys.console_revoked(login_id)))
