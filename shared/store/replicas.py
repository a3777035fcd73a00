"""The replica registry: each replica's heartbeat with a TTL, the manager ids seen, and which
manager ids are draining."""

from __future__ import annotations

import contextlib
import time
from typing import cast

import msgspec

from shared.models import ReplicaInfo
from shared.store.base import Part, Scored, redis_errors, text


class Replicas(Part):
    """Register replicas, list the live ones, drain manager ids."""

    async def heartbeat(self, info: ReplicaInfo, ttl: float) -> None:
        """Register or renew this replica (re-creates it after a Redis flush)."""
        k = self.keys
        info.heartbeat_at = time.time()
        data = msgspec.structs.asdict(info)
        data["draining"] = int(info.draining)
        with redis_errors():
            async with self.redis.pipeline(transaction=True) as p:
                p.hset(k.replica(info.replica_id), mapping={kk: str(v) for kk, v in data.items()})
                p.pexpire(k.replica(info.replica_id), int(ttl * 1000))
                p.zadd(k.replicas(), {info.replica_id: info.heartbeat_at})
                p.zadd(k.event_readers(), {info.replica_id: info.heartbeat_at})  # it reads the split streams
                p.sadd(k.managers(), info.manager_id)
                p.zadd(k.manager_seen(), {info.manager_id: info.heartbeat_at}, gt=True)
                await p.execute()

    async def managers_seen(self) -> dict[str, float]:
        """manager_id -> when a replica of it last sent a heartbeat."""
        with redis_errors():
            rows = cast(Scored, await self.redis.zrange(self.keys.manager_seen(), 0, -1, withscores=True))
        return {text(m): float(s) for m, s in rows}

    async def deregister(self, replica_id: str) -> None:
        with redis_errors():
            async with self.redis.pipeline(transaction=True) as p:
                p.delete(self.keys.replica(replica_id))
                p.zrem(self.keys.replicas(), replica_id)
                p.zrem(self.keys.event_readers(), replica_id)
                await p.execute()

    async def live_replicas(self, manager_id: str | None = None) -> list[ReplicaInfo]:
        """Replicas whose heartbeat key has not expired; prunes the index of the dead (as rq does)."""
        k = self.keys
        with redis_errors():
            ids = [text(m) for m in await self.redis.zrange(k.replicas(), 0, -1)]
            if not ids:
                return []
            async with self.redis.pipeline(transaction=False) as p:
                for rid in ids:
                    p.hgetall(k.replica(rid))
                rows = await p.execute()
            dead = [rid for rid, row in zip(ids, rows) if not row]
            if dead:
                await self.redis.zrem(k.replicas(), *dead)
                await self.redis.zrem(k.event_readers(), *dead)
        out = []
        for row in rows:
            if row:
                with contextlib.suppress(msgspec.ValidationError):
                    info = ReplicaInfo.from_hash(row)
                    if manager_id is None or info.manager_id == manager_id:
                        out.append(info)
        return out

    async def set_draining(self, manager_id: str, draining: bool) -> None:
        with redis_errors():
            if draining:
                await self.redis.sadd(self.keys.draining(), manager_id)
            else:
                await self.redis.srem(self.keys.draining(), manager_id)

    async def draining(self) -> set[str]:
        with redis_errors():
            return {text(m) for m in await self.redis.smembers(self.keys.draining())}
