"""The proxy's hot-path state: node addresses cached in memory and activity batched.

A proxied request costs no Redis command when its node's address is cached, and
its last-request time is flushed with every other node's in one pipeline a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from shared.errors import RedisUnavailable
from shared.models import NodeRecord
from shared.store import Store

log = logging.getLogger(__name__)


UNKNOWN_LIMIT = 10_000  # unknown ids remembered per replica


class AddressCache:
    """node_id -> NodeRecord for a few seconds; invalidated by lifecycle events."""

    def __init__(self, ttl: float, unknown_ttl: float = 2.0) -> None:
        self.ttl = ttl
        self._entries: dict[str, tuple[float, NodeRecord]] = {}
        # the last record Redis gave for each node, kept past expiry and invalidation: what a call
        # goes on with while Redis does not answer (an event as harmless as a health change drops
        # the entry above, and the next call would need Redis). Safe to use stale: the address is
        # still confirmed with the engine and the key binding never changes; a session that was
        # stopped or removed meanwhile needs Redis to come back, so it fails as it would have
        self._last: dict[str, NodeRecord] = {}
        # ids Redis just said it does not know: a client retrying a stale or made-up cookie is
        # answered without a round trip. Small and short-lived; the id's "created" (or "adopted")
        # event drops it, like every other entry, and nobody can guess a new session's id before
        # it exists
        self.unknown_ttl = unknown_ttl
        self._unknown: dict[str, float] = {}
        self.on_put: Callable[[str], None] | None = None

    def is_unknown(self, node_id: str) -> bool:
        """Redis said recently that it has no record of node_id."""
        until = self._unknown.get(node_id)
        if until is None:
            return False
        if until < time.monotonic():
            del self._unknown[node_id]
            return False
        return True

    def put_unknown(self, node_id: str) -> None:
        self._last.pop(node_id, None)
        if self.unknown_ttl <= 0:
            return
        self._unknown.pop(node_id, None)
        self._unknown[node_id] = time.monotonic() + self.unknown_ttl
        if len(self._unknown) > UNKNOWN_LIMIT:
            del self._unknown[next(iter(self._unknown))]  # the oldest

    def get(self, node_id: str) -> NodeRecord | None:
        hit = self._entries.get(node_id)
        if hit is None:
            return None
        if hit[0] < time.monotonic():
            del self._entries[node_id]
            return None
        return hit[1]

    def put(self, rec: NodeRecord) -> None:
        if len(self._entries) > 100_000:  # bound memory against a scan of bogus cookies
            self._entries.clear()
        if len(self._last) > 100_000:
            self._last.clear()
        self._entries[rec.id] = (time.monotonic() + self.ttl, rec)
        self._last[rec.id] = rec
        if self.on_put is not None:
            self.on_put(rec.manager_id)  # the event hub follows that manager_id's events meanwhile

    def last_known(self, node_id: str) -> NodeRecord | None:
        """The last record Redis gave for node_id, however old: only for while Redis does not answer."""
        return self._last.get(node_id)

    def invalidate(self, node_id: str) -> None:
        self._entries.pop(node_id, None)
        self._unknown.pop(node_id, None)

    def invalidate_manager(self, manager_id: str) -> None:
        """Drop the entries of one manager_id's sessions (its events were not read meanwhile)."""
        for nid in [n for n, (_, rec) in self._entries.items() if rec.manager_id == manager_id]:
            del self._entries[nid]

    def clear(self) -> None:
        self._entries.clear()
        self._unknown.clear()


class ActivityRecorder:
    """Collects activity in memory and flushes it in batches.

    Activity is work in progress: a node with a request in flight or an open WebSocket here is
    flushed as active now at every flush, so it never looks idle however long the work takes;
    its idle time starts when the last one ends. One pipeline a flush, never a write a request.
    """

    def __init__(self, store: Store, interval: float) -> None:
        self.store = store
        self.interval = interval
        self._pending: dict[str, tuple[str, float]] = {}
        self._busy: dict[str, list[Any]] = {}  # node id -> [manager_id, works in progress]
        self._flushed: dict[str, float] = {}  # node id -> when its activity last went out
        self._wake = asyncio.Event()
        # told the manager_id of a node whose work starts after a quiet while (the event hub: its
        # stream must be read while the work lasts, and the hub looks only when told)
        self.on_quiet_work: Callable[[str], None] | None = None

    def record(self, node_id: str, manager_id: str) -> None:
        self._pending[node_id] = (manager_id, time.time())

    def begin(self, node_id: str, manager_id: str) -> None:
        """A request or WebSocket of the node started."""
        busy = self._busy.get(node_id)
        now = time.time()
        if busy is None:
            self._busy[node_id] = [manager_id, 1]
            # work on a node quiet for a while goes out at once, not up to a second later: the
            # checker may be about to pause it on what it last saw
            if now - self._flushed.get(node_id, 0.0) > 2 * self.interval:
                self._wake.set()
                if self.on_quiet_work is not None:
                    self.on_quiet_work(manager_id)
        else:
            busy[1] += 1
        self._pending[node_id] = (manager_id, now)

    def end(self, node_id: str) -> None:
        """One ended; the last to end starts the node's idle time."""
        busy = self._busy.get(node_id)
        if busy is None:
            return
        busy[1] -= 1
        if busy[1] <= 0:
            del self._busy[node_id]
        self._pending[node_id] = (busy[0], time.time())

    def busy(self, node_id: str) -> bool:
        return node_id in self._busy

    def busy_managers(self) -> set[str]:
        """manager_ids of the nodes with work in progress here (their events must reach the thaw)."""
        return {mid for mid, _ in self._busy.values()}

    async def flush(self) -> None:
        now = time.time()
        for node_id, (mid, _) in self._busy.items():
            self._pending[node_id] = (mid, now)
        if not self._pending:
            return
        batch, self._pending = self._pending, {}
        if len(self._flushed) > 100_000:
            self._flushed.clear()
        for node_id in batch:
            self._flushed[node_id] = now
        try:
            await self.store.touch(batch)
        except RedisUnavailable:
            # keep the newest time of each node for the next try; nothing is lost while Redis is down
            for node_id, value in batch.items():
                self._pending.setdefault(node_id, value)
            raise

    async def run(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            # early flushes are batched too: ten a second at most, whatever the request rate
            await asyncio.sleep(self.interval / 10)
            self._wake.clear()
            try:
                await self.flush()
            except RedisUnavailable as exc:
                log.warning("activity_flush_failed error=%s", exc.detail)
