"""Events: one capped stream of node events that every replica reads, and the /ws/events watchers
of each session (XAgent's MainServer marks a watched session alive)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import cast

import msgspec
import redis.exceptions

from shared.models import Event
from shared.store.base import Entries, Op, Part, redis_errors, text


class Events(Part):
    """Publish and read node events; track who watches a session."""

    stream_maxlen: int

    def event_op(self, ev: Event) -> Op:
        """An XADD for fenced(): the event travels in the same atomic write as the change."""
        return ("xadd", self.keys.events(), [self.stream_maxlen, "e", msgspec.json.encode(ev).decode()])

    async def publish(self, ev: Event) -> str:
        with redis_errors():
            eid = await self.redis.xadd(self.keys.events(), {"e": msgspec.json.encode(ev)},
                                        maxlen=self.stream_maxlen, approximate=True)
        return text(eid)

    async def read_events(self, last_id: str, block_ms: int | None = 1000, count: int = 500) -> list[Event]:
        """Events after last_id, waiting up to block_ms for the first (None: do not wait)."""
        with redis_errors():
            rows = cast(list[tuple[bytes, Entries]],
                        await self.redis.xread({self.keys.events(): last_id}, block=block_ms, count=count))
        out: list[Event] = []
        for _stream, entries in rows or []:
            for eid, fields in entries:
                with contextlib.suppress(msgspec.ValidationError, KeyError):
                    ev = msgspec.json.decode(fields[b"e"], type=Event)
                    ev.id = text(eid)
                    out.append(ev)
        return out

    async def last_event_id(self) -> str:
        with redis_errors():
            rows = await self.redis.xrevrange(self.keys.events(), count=1)
        return text(rows[0][0]) if rows else "0-0"

    async def events_trimmed_after(self, last_id: str) -> bool:
        """Whether entries newer than last_id were trimmed away (a resume from it is incomplete)."""
        with redis_errors():
            try:
                info = await self.redis.xinfo_stream(self.keys.events())
            except redis.exceptions.ResponseError:  # no stream yet: nothing was trimmed
                return False
        deleted = text(info.get("max-deleted-entry-id", "0-0"))
        return compare_ids(deleted, last_id) > 0

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
