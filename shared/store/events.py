"""Events: capped streams of node events, one per manager_id (read by the replicas they concern)
plus one cluster-wide (read by views of the whole cluster), and the /ws/events watchers of each
session (XAgent's MainServer marks a watched session alive)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import cast

import msgspec
import redis.exceptions

from shared.models import Event
from shared.store.base import Entries, Op, Part, Script, redis_errors, slot, text

# Where an event goes and is read from (a scope): a manager_id's own stream, BROADCAST for events of
# no manager_id, ALL for the cluster-wide stream every event is also written to.
BROADCAST = ""
ALL = None
Scope = str | None
SPLIT_MARK = b"s"  # a field on the cluster-wide copy of an event written by a replica that splits


# KEYS[1] a manager_id's events stream, KEYS[2] its node set, KEYS[3] its removal mark; ARGV[1] a time (ms)
# Removes the stream of a manager_id that holds no session or reservation and wrote no event since
# ARGV[1]; the mark keeps the last id removed. Its last id, or false when it stays.
REMOVE_STREAM = """
if redis.call('scard', KEYS[2]) > 0 then return false end
local last = redis.call('xrevrange', KEYS[1], '+', '-', 'COUNT', 1)
if #last == 0 then return false end
local id = last[1][1]
if tonumber(string.match(id, '^(%d+)')) > tonumber(ARGV[1]) then return false end
redis.call('del', KEYS[1])
redis.call('set', KEYS[3], id)
return id
"""


class Events(Part):
    """Publish and read node events; track who watches a session.

    Each event is written twice: to its manager_id's stream (BROADCAST's when it has none), which
    replicas read for their own sessions and those they cache or watch, and to the cluster-wide
    stream (events()), which only views of the whole cluster read, and replicas before the split."""

    stream_maxlen: int
    manager_stream_maxlen: int
    _remove_stream = Script(REMOVE_STREAM)

    def stream_key(self, scope: Scope) -> str:
        """The stream of a scope: ALL, BROADCAST or a manager_id."""
        if scope is ALL:
            return self.keys.events()
        return self.keys.manager_events(scope) if scope else self.keys.broadcast_events()

    def event_op(self, ev: Event) -> list[Op]:
        """The XADDs for fenced(): the event travels in the same atomic write as the change (on a
        cluster the manager's stream does; the cluster-wide copy follows, as writes of other slots do)."""
        body = msgspec.json.encode(ev).decode()
        return [("xadd", self.stream_key(ev.manager_id), [self.manager_stream_maxlen, "e", body]),
                ("xadd", self.keys.events(), [self.stream_maxlen, "e", body, SPLIT_MARK.decode(), "1"])]

    async def publish(self, ev: Event) -> str:
        """Write an event to its streams; its id in its manager_id's stream."""
        body = msgspec.json.encode(ev)
        with redis_errors():
            # one round trip, no MULTI (two commands more an event): the copies need no isolation,
            # each stream is read on its own
            async with self.redis.pipeline(transaction=False) as p:
                p.xadd(self.stream_key(ev.manager_id), {"e": body}, maxlen=self.manager_stream_maxlen,
                       approximate=True)
                p.xadd(self.keys.events(), {"e": body, SPLIT_MARK: b"1"}, maxlen=self.stream_maxlen,
                       approximate=True)
                eid, _ = await p.execute()
        return text(eid)

    async def read_events(self, last_id: str, block_ms: int | None = 1000, count: int = 500,
                          scope: Scope = ALL) -> list[Event]:
        """Events of one stream after last_id, waiting up to block_ms for the first (None: do not wait)."""
        return [ev for _scope, ev, _split in await self.read_streams({scope: last_id}, block_ms, count)]

    async def read_streams(self, cursors: dict[Scope, str], block_ms: int | None = 1000,
                           count: int = 500) -> list[tuple[Scope, Event, bool]]:
        """(scope, event, split) after each scope's cursor, in one XREAD (on a cluster the scopes must
        share a slot: stream_groups). split: a cluster-wide copy written by a replica that splits
        (its manager_id's stream has it too); False for what replicas before the split wrote."""
        by_key = {self.stream_key(s): s for s in cursors}
        with redis_errors():
            rows = cast(list[tuple[bytes, Entries]],
                        await self.redis.xread({self.stream_key(s): c for s, c in cursors.items()},
                                               block=block_ms, count=count))
        out: list[tuple[Scope, Event, bool]] = []
        for stream, entries in rows or []:
            scope = by_key[text(stream)]
            for eid, fields in entries:
                with contextlib.suppress(msgspec.ValidationError, KeyError):
                    ev = msgspec.json.decode(fields[b"e"], type=Event)
                    ev.id = text(eid)
                    out.append((scope, ev, scope is not ALL or SPLIT_MARK in fields))
        return out

    def stream_slot(self, scope: Scope) -> int:
        """The cluster slot of a scope's stream: streams of one slot are read by one XREAD (0 for
        every stream on one Redis, where one XREAD reads them all)."""
        return slot(self.stream_key(scope)) if self.clustered else 0

    async def last_event_id(self, scope: Scope = ALL) -> str:
        """The id of a stream's newest event ("0-0" when it has none)."""
        with redis_errors():
            rows = await self.redis.xrevrange(self.stream_key(scope), count=1)
        return text(rows[0][0]) if rows else "0-0"

    async def events_trimmed_after(self, last_id: str, scope: Scope = ALL) -> bool:
        """Whether entries newer than last_id were trimmed away (a resume from it is incomplete)."""
        with redis_errors():
            try:
                info = await self.redis.xinfo_stream(self.stream_key(scope))
            except redis.exceptions.ResponseError:  # no stream yet: nothing was trimmed
                return False
        deleted = text(info.get("max-deleted-entry-id", "0-0"))
        return compare_ids(deleted, last_id) > 0

    async def remove_gone_stream(self, manager_id: str, quiet_since: float) -> str | None:
        """Remove the events stream of a manager_id with no session or reservation left and no event
        since quiet_since (epoch seconds); the last id it held, or None when it stays."""
        k = self.keys
        with redis_errors():
            got = await self._remove_stream(keys=[k.manager_events(manager_id), k.manager_nodes(manager_id),
                                                  k.manager_events_removed(manager_id)],
                                            args=[int(quiet_since * 1000)])
        return text(got) if got else None

    async def stream_removed_after(self, last_id: str, scope: Scope) -> str | None:
        """The last id of a removed stream of scope when events after last_id went with it (else None)."""
        if not scope:  # the cluster-wide and broadcast streams are never removed
            return None
        with redis_errors():
            removed = await self.redis.get(self.keys.manager_events_removed(scope))
        return text(removed) if removed and compare_ids(text(removed), last_id) > 0 else None

    async def unsplit_readers(self, ttl: float) -> bool:
        """Whether a live replica reads only the cluster-wide stream (a version before the split, in
        a rolling upgrade): it also writes only there, so split readers must follow that stream too."""
        now = time.time()
        with redis_errors():
            async with self.redis.pipeline(transaction=False) as p:
                p.zcount(self.keys.replicas(), now - ttl, "+inf")
                p.zcount(self.keys.event_readers(), now - ttl, "+inf")
                live, split = await p.execute()
        return int(live) > int(split)

    async def watch_started(self, node_id: str) -> None:
        """A /ws/events watcher of a session connected (XAgent's MainServer marks it alive)."""
        key = self.keys.watchers(node_id)
        with redis_errors():
            async with self.redis.pipeline(transaction=True) as p:
                p.hset(key, mapping={"status": "alive", "since": time.time()})
                p.hincrby(key, "count", 1)
                await p.execute()

    async def watch_ended(self, node_id: str) -> None:
        """A watcher left; the last one to leave marks the session unwatched since now."""
        key = self.keys.watchers(node_id)
        with redis_errors():
            left = await self.redis.hincrby(key, "count", -1)
            if left <= 0:
                await self.redis.hset(key, mapping={"status": "close", "left_at": time.time(), "count": 0})

    async def watchers_left(self, node_ids: Sequence[str]) -> dict[str, float]:
        """node id -> when its last /ws/events watcher left, for nodes no longer watched."""
        if not node_ids:
            return {}
        with redis_errors():
            async with self.redis.pipeline(transaction=False) as p:
                for nid in node_ids:
                    p.hmget(self.keys.watchers(nid), "status", "left_at")
                rows = await p.execute()
        return {nid: float(left) for nid, (status, left) in zip(node_ids, rows) if status == b"close" and left}


def compare_ids(a: str, b: str) -> int:
    """Order two stream ids: -1, 0 or 1."""
    pa = tuple(int(x) for x in a.split("-"))
    pb = tuple(int(x) for x in b.split("-"))
    return (pa > pb) - (pa < pb)
