"""What every part of the store shares: the client, the key names, the one mapping of Redis's
transport errors to ours, reply decoding, and the (command, key, args) writes of a fenced batch."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
from redis.commands.core import AsyncScript
from redis.crc import key_slot

from shared.errors import RedisUnavailable
from shared.keys import Keys

Op = tuple[str, str, list[Any]]  # (command, key, args): one write of a fenced batch

# The shapes of replies as this client reads them (bytes, no decode_responses): redis-py types a reply
# as the union over every option (withscores, decoding, RESP3), which the options given here narrow.
Scored = list[tuple[bytes, float]]  # a sorted set's members with their scores
Entries = list[tuple[bytes, dict[bytes, bytes]]]  # a stream's entries: (id, fields)


def text(v: Any) -> str:
    """A reply (bytes: this client does not decode) as a str."""
    return v.decode() if isinstance(v, bytes) else str(v)


def as_mapping(fields: dict[str, str]) -> dict[Any, Any]:
    """fields as hset's mapping, whose declared key type (a union) a dict[str, str] does not match."""
    return fields


def queue_ops(p: Any, ops: Sequence[Op]) -> None:
    """Queue ops on a pipeline as plain commands (outside a fenced script)."""
    for name, key, args in ops:
        p.execute_command(name.upper(), key, *args)


def client_count_ops(keys: Keys, client: str, delta: int) -> list[Op]:
    """A client's count changed by delta, with its version (the recount's sign that something wrote it):
    two writes of the client's slot, applied together."""
    return [("hincrby", keys.client_count(client), [client, delta]),
            ("hincrby", keys.client_version(client), [client, 1])]


@contextlib.contextmanager
def redis_errors() -> Iterator[None]:
    """Map transport failures of Redis to RedisUnavailable (503)."""
    try:
        yield
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
        raise RedisUnavailable(type(exc).__name__) from exc
    except (redis.exceptions.ClusterDownError, redis.exceptions.TryAgainError,
            redis.exceptions.SlotNotCoveredError, redis.exceptions.RedisClusterUnreachableError) as exc:
        # a cluster mid-failover (a slot without a primary yet) is a passing fault like a restart
        raise RedisUnavailable(type(exc).__name__) from exc
    except redis.exceptions.BusyLoadingError as exc:  # pragma: no cover - subclass of ConnectionError
        raise RedisUnavailable("loading") from exc


def slot(key: str) -> int:
    """The Redis Cluster slot of a key (its hash tag's when it has one)."""
    return int(key_slot(key.encode()))


class Script:
    """A Lua script as a class constant, registered once per store on the client named by `on`
    (redis-py's Lock keeps its scripts the same way)."""

    def __init__(self, source: str, on: str = "redis") -> None:
        self.source = source
        self.on = on
        self.attr = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.attr = f"_registered{name}"

    def __get__(self, part: Any, owner: type | None = None) -> AsyncScript:
        registered = part.__dict__.get(self.attr)
        if registered is None:
            registered = part.__dict__[self.attr] = getattr(part, self.on).register_script(self.source)
        return registered  # type: ignore[no-any-return]


class Part:
    """One domain of the store: its methods use only the client, the key names and the set of
    manager ids, never another part's, so each module reads on its own."""

    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    @property
    def clustered(self) -> bool:
        """On a Redis Cluster: a script or MULTI may name keys of one slot only."""
        return self.keys.cluster

    def by_slot(self, keys: Sequence[str]) -> list[list[int]]:
        """Indexes of keys grouped by their cluster slot, in order of first appearance (one group
        on one Redis)."""
        if not self.clustered:
            return [list(range(len(keys)))]
        groups: dict[int, list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(slot(key), []).append(i)
        return list(groups.values())

    async def apply(self, ops: Sequence[Op]) -> None:
        """Apply writes atomically: in one MULTI on one Redis; on a cluster, one MULTI per slot, in
        the order their slots first appear (callers list the writes that matter most first)."""
        for group in self.by_slot([key for _, key, _ in ops]):
            async with self.redis.pipeline(transaction=True) as p:
                queue_ops(p, [ops[i] for i in group])
                await p.execute()

    async def manager_ids(self) -> list[str]:
        with redis_errors():
            return sorted(text(m) for m in await self.redis.smembers(self.keys.managers()))
