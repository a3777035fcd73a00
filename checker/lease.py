"""The checker lease: one holder per manager_id, with a fencing token.

Acquire is set-if-absent with an expiry and bumps a counter (the token); renew and
release check holder and token inside a script (in the store), as redis-py's Lock does,
so a lapsed holder can neither extend nor free its successor's lease. The holder treats
itself as leader only until ``renew_sent + ttl - margin`` on the monotonic clock.
"""

from __future__ import annotations

import time

from shared.store import Store


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

    @property
    def held(self) -> bool:
        return self.token is not None and time.monotonic() < self.valid_until

    @property
    def value(self) -> str:
        return f"{self.holder}:{self.token}"

    async def acquire(self) -> bool:
        sent = time.monotonic()
        token = await self.store.lease_acquire(self.manager_id, self.holder, int(self.ttl * 1000))
        if token:
            self.token = token
            self.valid_until = sent + self.ttl - self.margin
            return True
        return False

    async def renew(self) -> bool:
        """Extend the lease; False (and no longer held) when it was lost."""
        if self.token is None:
            return False
        sent = time.monotonic()
        if await self.store.lease_renew(self.manager_id, self.value, int(self.ttl * 1000)):
            self.valid_until = sent + self.ttl - self.margin
            return True
        self.token = None
        return False

    async def release(self) -> None:
        if self.token is None:
            return
        try:
            await self.store.lease_release(self.manager_id, self.value)
        finally:
            self.token = None

    def drop(self) -> None:
        self.token = None
