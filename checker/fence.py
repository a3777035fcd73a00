"""The checker's fenced actions: what a lease holder may do, handed to the tier and intent code.

Every write of a pass is applied only while this replica still holds the lease with its token
(one script in the store checks both), and carries its event in the same atomic write.
"""

from __future__ import annotations

from typing import Any

from checker.lease import Lease
from nodeops.locks import SessionLock
from shared.models import Event, EventKind
from shared.store import Op, Store


class LeaseLost(Exception):
    """A fenced write was rejected: a newer holder exists."""


class Fence:
    """The lease holder's writes for one manager_id, fenced by the lease's token."""

    def __init__(self, store: Store, lease: Lease, manager_id: str, lock_ttl_seconds: float) -> None:
        self.store = store
        self.lease = lease
        self.manager_id = manager_id
        self.lock_ttl_seconds = lock_ttl_seconds

    def check_held(self) -> None:
        """Raise LeaseLost unless the lease is still ours (before each engine action)."""
        if not self.lease.held:
            raise LeaseLost()

    async def write(self, ops: list[Op]) -> None:
        """Apply ops atomically iff the lease is still ours; LeaseLost if not."""
        if ops and not await self.store.fenced(self.manager_id, self.lease.holder, self.lease.token or 0, ops):
            raise LeaseLost()

    def update(self, node_id: str, fields: dict[str, Any], now: float) -> Op:
        """A record's fields (a transition of shared/models.py); times stored to the millisecond."""
        stamped = {k: f"{v:.3f}" if isinstance(v, float) else v for k, v in fields.items()}
        return self.store.update_op(node_id, stamped, now)

    def event(self, kind: EventKind, node_id: str, detail: str = "") -> list[Op]:
        """A node event's writes (its manager's stream and the cluster-wide one), published by the
        same write as the change it tells of."""
        return self.store.event_op(Event(type=kind, node_id=node_id, manager_id=self.manager_id,
                                         replica_id=self.lease.holder, detail=detail))

    def session_lock(self, node_id: str) -> SessionLock:
        """The session's lock, tried once: a session being brought back right now is not idle."""
        return SessionLock(self.store, node_id, f"{self.lease.holder}:checker:{self.lease.token}",
                           self.lock_ttl_seconds)
