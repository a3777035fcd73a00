"""One reader of the Redis event stream per replica, fanned out in memory.

The stream (not pub/sub) is used because it keeps history: a watcher that reconnects
with the id of the last event it saw gets what it missed while the stream still holds
it, and cache invalidation survives a short Redis hiccup. The same reader drops cached
node addresses, so a restarted node's new port is used at once on every replica.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from manager.replica.activity import AddressCache
from shared.errors import RedisUnavailable
from shared.models import Event
from shared.store import Store, compare_ids

log = logging.getLogger(__name__)


class Subscription:
    def __init__(self, hub: EventHub, node_id: str | None, manager_id: str | None, maxsize: int = 1000) -> None:
        self.hub = hub
        self.node_id = node_id
        self.manager_id = manager_id
        self.queue: asyncio.Queue[Event] = asyncio.Queue(maxsize)
        self.overflowed = False

    def wants(self, ev: Event) -> bool:
        return (self.node_id is None or ev.node_id == self.node_id) and (
            self.manager_id is None or ev.manager_id == self.manager_id)

    def offer(self, ev: Event) -> None:
        try:
            self.queue.put_nowait(ev)
        except asyncio.QueueFull:
            self.overflowed = True  # the socket closes it; the client resumes by last id

    def close(self) -> None:
        self.hub.subscribers.discard(self)


class EventHub:
    def __init__(self, store: Store, cache: AddressCache,
                 on_event: Callable[[Event], None] | None = None) -> None:
        self.store = store
        self.cache = cache
        self.subscribers: set[Subscription] = set()
        self.on_event = on_event  # sees every event once, after the cache dropped its node

    def subscribe(self, node_id: str | None = None, manager_id: str | None = None) -> Subscription:
        sub = Subscription(self, node_id, manager_id)
        self.subscribers.add(sub)
        return sub

    async def run(self) -> None:
        last: str | None = None
        while True:
            try:
                if last is None:
                    last = await self.store.last_event_id()
                    self.cache.clear()  # events may have been missed while Redis was away
                events = await self.store.read_events(last, block_ms=1000)
                for ev in events:
                    last = ev.id
                    self.cache.invalidate(ev.node_id)
                    if self.on_event is not None:
                        self.on_event(ev)
                    for sub in list(self.subscribers):
                        if sub.wants(ev):
                            sub.offer(ev)
                if not events and compare_ids(await self.store.last_event_id(), last) < 0:
                    last = None  # the stream was reset (FLUSHALL): follow its new end
            except RedisUnavailable:
                last = None
                await asyncio.sleep(1.0)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("event_reader_error")
                # a cancel here is the replica stopping: swallowed, the loop ran on and the
                # shutdown's wait for its tasks never ended
                await asyncio.sleep(1.0)

