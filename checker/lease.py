"""The checker lease: one holder per manager_id, with a fencing token.

Acquire is set-if-absent with an expiry and bumps a counter (the token); renew and
release check holder and token inside a script (in the store), as redis-py's Lock does,
so a lapsed holder can neither extend nor free its successor's lease. The holder treats
itself as leader only until ``renew_sent + ttl - margin`` on the monotonic clock.

Renewals run in a thread of their own on a blocking connection of their own (``keep``): 3,000
client WebSockets lagged a replica's event loop past the lease's margin and cost it the lease
three times in two minutes, though the replica was healthy. A thread renews on time however
busy the loop is, but only while the loop shows life: a loop stalled for ``stall`` seconds (a
wedged process) lets the lease lapse, and another replica takes over.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from shared.errors import RedisUnavailable
from shared.store import LeaseRenewer, Store

log = logging.getLogger(__name__)


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
        self.refused = False  # the keeper's renewal was refused: the lease is someone else's
        self._keeper: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def kept(self) -> bool:
        """Renewals are made by the keeper thread, not the caller."""
        return self._keeper is not None and self._keeper.is_alive()

    def keep(self, alive: Callable[[], float], stall: float) -> bool:
        """Renew from a thread of our own from now on, while alive() (the monotonic time the
        event loop last showed life) is at most stall seconds old; False when the store has
        no renewer (a store built without a config: the caller renews)."""
        factory = self.store.leases.renewer
        if factory is None or self.kept:
            return self.kept
        self._stop.clear()
        self._keeper = threading.Thread(target=self._keep, args=(factory(), alive, stall), daemon=True,
                                        name=f"lease-{self.manager_id}")
        self._keeper.start()
        return True

    def stop_keeping(self) -> None:
        self._stop.set()
        if self._keeper is not None:
            self._keeper.join(timeout=5)
            self._keeper = None

    def _keep(self, renewer: LeaseRenewer, alive: Callable[[], float], stall: float) -> None:
        try:
            while not self._stop.wait(self.ttl / 3):
                token = self.token
                if token is None or self.refused:
                    continue
                if time.monotonic() - alive() > stall:
                    continue  # the loop is wedged: let the lease lapse so that another replica acts
                sent = time.monotonic()
                try:
                    ok = renewer.renew(self.manager_id, f"{self.holder}:{token}", int(self.ttl * 1000))
                except RedisUnavailable:
                    continue  # held until valid_until; the loop steps down if it passes
                if self.token != token:
                    continue  # dropped or re-acquired meanwhile
                if ok:
                    self.valid_until = sent + self.ttl - self.margin
                else:
                    self.refused = True
                    self.valid_until = 0.0
        except Exception:  # pragma: no cover - a bug here must not pass silently
            log.exception("lease_keeper_failed manager_id=%s", self.manager_id)
        finally:
            renewer.close()

    @property
    def held(self) -> bool:
        return self.token is not None and time.monotonic() < self.valid_until

    @property
    def value(self) -> str:
        return f"{self.holder}:{self.token}"

    async def acquire(self) -> bool:
        sent = time.monotonic()
        token = await self.store.leases.acquire(self.manager_id, self.holder, int(self.ttl * 1000))
        if token:
            self.valid_until = sent + self.ttl - self.margin
            self.refused = False
            self.token = token
            return True
        return False

    async def renew(self) -> bool:
        """Extend the lease; False (and no longer held) when it was lost."""
        if self.token is None:
            return False
        sent = time.monotonic()
        if await self.store.leases.renew(self.manager_id, self.value, int(self.ttl * 1000)):
            self.valid_until = sent + self.ttl - self.margin
            return True
        self.token = None
        return False

    async def release(self) -> None:
        self.stop_keeping()
        if self.token is None:
            return
        try:
            await self.store.leases.release(self.manager_id, self.value)
        finally:
            self.token = None

    def drop(self) -> None:
        self.token = None
        self.refused = False
