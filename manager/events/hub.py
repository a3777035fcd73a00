"""The event streams a replica follows, read once per replica and fanned out in memory.

Streams (not pub/sub) because they keep history: a watcher that reconnects with the id of the
last event it saw gets what it missed while the stream still holds it, and cache invalidation
survives a short Redis hiccup. The same reader drops cached node addresses, so a restarted
node's new port is used at once on every replica that cached it.

A replica follows only what concerns it, so its reads grow with its own work, not the cluster's:
its manager_id's stream, the broadcast stream (events of no manager_id), the stream of each
manager_id whose session it has cached or has work on (until the cache entry would have expired),
the stream each open socket is served from (a session's manager_id, an admin's ?manager_id=, or
the cluster-wide stream for a view of every session), and the cluster-wide stream while a replica
of a version before the split is live (it writes only there). On a Redis Cluster streams of one
slot are read together, one XREAD per slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from manager.replica.activity import AddressCache
from shared.errors import RedisUnavailable
from shared.models import Event
from shared.store import ALL, BROADCAST, Scope, Store, compare_ids

log = logging.getLogger(__name__)

UNSPLIT_CHECK_SECONDS = 10.0  # how often a replica asks whether a replica before the split is live


class Subscription:
    def __init__(self, hub: EventHub, node_id: str | None, manager_id: str | None, scope: Scope,
                 after: str, maxsize: int = 1000) -> None:
        self.hub = hub
        self.node_id = node_id
        self.manager_id = manager_id
        self.scope = scope  # the stream its events (and their ids) come from
        self.after = after  # events up to this id of that stream are not its own
        self.queue: asyncio.Queue[Event] = asyncio.Queue(maxsize)
        self.overflowed = False

    def wants(self, ev: Event) -> bool:
        return (self.node_id is None or ev.node_id == self.node_id) and (
            self.manager_id is None or ev.manager_id == self.manager_id)

    def offer(self, ev: Event) -> None:
        if compare_ids(ev.id, self.after) <= 0:
            return
        try:
            self.queue.put_nowait(ev)
        except asyncio.QueueFull:
            self.overflowed = True  # the socket closes it; the client resumes by last id

    def close(self) -> None:
        self.hub.subscribers.discard(self)


class EventHub:
    def __init__(self, store: Store, cache: AddressCache, on_event: Callable[[Event], None] | None = None,
                 manager_id: str = "", busy: Callable[[], set[str]] | None = None,
                 replica_ttl: float = 6.0, block_ms: int = 1000,
                 unsplit_check_seconds: float = UNSPLIT_CHECK_SECONDS) -> None:
        self.store = store
        self.cache = cache
        self.subscribers: set[Subscription] = set()
        self.on_event = on_event  # sees each event once, after the cache dropped its node
        self.manager_id = manager_id
        self.busy = busy  # manager_ids of the sessions this replica has work on
        self.replica_ttl = replica_ttl
        self.block_ms = block_ms
        self.unsplit_check_seconds = unsplit_check_seconds
        self.cursors: dict[Scope, str] = {}  # followed stream -> id of the last event read
        self.starts: dict[Scope, str] = {}  # where a socket asked a stream not yet followed to start
        self.remote: dict[str, float] = {}  # manager_id of a cached session -> followed until (monotonic)
        self.linger = cache.ttl + 2.0  # a cache entry lives cache.ttl: its stream is followed as long
        self.unsplit = False
        self.readers: dict[int, asyncio.Task[None]] = {}  # slot group -> its reader
        self.stopped = False
        # what may need a reader it has not (a subscriber, a newly followed stream, a reader ended)
        # wakes the keeper; no change, no wakeup (it looked ten times a second before, issue 26)
        self._changed = asyncio.Event()
        cache.on_put = self.follow

    def follow(self, manager_id: str) -> None:
        """A session of manager_id was cached: follow its stream while the entry may live."""
        if manager_id and manager_id != self.manager_id:
            if manager_id not in self.remote:
                self._changed.set()
            self.remote[manager_id] = time.monotonic() + self.linger

    def work_started(self, manager_id: str) -> None:
        """Work on a node of manager_id started here (ActivityRecorder.on_quiet_work): its stream is
        followed while the work lasts (busy), from now, not from the next look."""
        if manager_id and manager_id not in self.cursors:
            self._changed.set()

    def subscribe(self, node_id: str | None = None, manager_id: str | None = None, scope: Scope = ALL,
                  after: str = "0-0") -> Subscription:
        """Events of scope's stream after `after` (filtered to node_id, manager_id) into a queue."""
        sub = Subscription(self, node_id, manager_id, scope, after)
        if scope not in self.cursors:
            prev = self.starts.get(scope)
            self.starts[scope] = after if prev is None or compare_ids(after, prev) < 0 else prev
        self.subscribers.add(sub)
        self._changed.set()
        return sub

    def interest(self) -> set[Scope]:
        """The streams this replica follows now."""
        now = time.monotonic()
        for mid in [m for m, until in self.remote.items() if until < now]:
            del self.remote[mid]
        scopes: set[Scope] = {BROADCAST, *self.remote, *(s.scope for s in self.subscribers)}
        if self.manager_id:
            scopes.add(self.manager_id)
        if self.busy is not None:
            scopes.update(m for m in self.busy() if m)
        if self.unsplit:
            scopes.add(ALL)
        return scopes

    def _group(self, scope: Scope) -> int:
        """The slot group of a stream (0 on one Redis, where one XREAD reads them all)."""
        return self.store.stream_slot(scope)

    def stop(self) -> None:
        """Stop reading (before the task is cancelled: a cancel that lands as a Redis read times out
        can be lost, as with asyncio.timeout on Python 3.11, and the loops then end at this flag)."""
        self.stopped = True
        self._changed.set()

    async def run(self) -> None:
        """Keep one reader per slot group of the followed streams, and the rolling-upgrade check."""
        next_check = 0.0
        try:
            while not self.stopped:
                self._changed.clear()  # before looking: a change made while it looks is looked at again
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + self.unsplit_check_seconds
                    try:
                        self.unsplit = await self.store.unsplit_readers(self.replica_ttl)
                    except RedisUnavailable:
                        pass
                    except Exception:
                        log.exception("event_unsplit_check_error")
                for g in {self._group(s) for s in self.interest()}:
                    task = self.readers.get(g)
                    if task is None or task.done():
                        task = self.readers[g] = asyncio.create_task(self._read(g), name=f"events-{g}")
                        task.add_done_callback(lambda _: self._changed.set())
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), max(0.0, next_check - time.monotonic()))
        finally:
            self.stopped = True  # the readers end at the flag, one block period later at most
            for task in self.readers.values():
                task.cancel()
            if self.readers:
                await asyncio.wait(self.readers.values(), timeout=self.block_ms / 1000 + 2)

    async def _read(self, group: int) -> None:
        """Read the followed streams of one slot group until none is left in it."""
        idle = 0
        while not self.stopped:
            mine = [s for s in self.interest() if self._group(s) == group]
            for s in [s for s in self.cursors if self._group(s) == group and s not in mine]:
                del self.cursors[s]
            if not mine:
                return
            try:
                for s in mine:
                    if s not in self.cursors:
                        await self._start(s)
                rows = await self.store.read_streams({s: self.cursors[s] for s in mine}, block_ms=self.block_ms)
                for scope, ev, split in rows:
                    if scope in self.cursors:
                        self.cursors[scope] = ev.id
                    self._dispatch(scope, ev, split)
                idle = 0 if rows else idle + 1
                if idle and idle % 5 == 1:
                    await self._check_reset(mine)
            except RedisUnavailable:
                for s in mine:  # events may be missed while Redis is away: start again at its end
                    self.cursors.pop(s, None)
                await asyncio.sleep(1.0)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("event_reader_error")
                await asyncio.sleep(1.0)

    async def _start(self, scope: Scope) -> None:
        """Follow a stream from where a socket asked, or its end; cached entries it may have
        changed before are dropped, since their events were never read here."""
        start = self.starts.pop(scope, None)
        self.cursors[scope] = start if start is not None else await self.store.last_event_id(scope)
        # a socket that asked meanwhile replays from its own start; a start left here would be
        # taken by the next time this stream is followed
        self.starts.pop(scope, None)
        if scope == self.manager_id:
            self.cache.clear()  # the replica's start, or Redis was away: anything may have changed
        elif scope is not ALL and scope != BROADCAST:
            self.cache.invalidate_manager(scope)

    async def _check_reset(self, scopes: list[Scope]) -> None:
        """A stream whose newest id is behind the cursor was reset (FLUSHALL): follow its new end."""
        for s in scopes:
            cur = self.cursors.get(s)
            if cur is not None and compare_ids(await self.store.last_event_id(s), cur) < 0:
                del self.cursors[s]

    def _dispatch(self, scope: Scope, ev: Event, split: bool) -> None:
        if scope is not ALL or not split:
            # a replica's copy of the event (the cluster-wide copy only of what an older replica wrote)
            self.cache.invalidate(ev.node_id)
            if self.on_event is not None:
                self.on_event(ev)
        for sub in list(self.subscribers):
            if sub.scope == scope and sub.wants(ev):
                sub.offer(ev)
