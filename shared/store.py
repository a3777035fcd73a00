"""Everything the project keeps in Redis: node records and their indexes, quotas and the warm
pool, session locks, checker leases, events and watchers, MCP sessions and streams, the replica
registry, intents, draining and console login revocations (key names in shared/keys.py).

Records are hashes written field by field, never overwritten whole, so concurrent
updates of different fields cannot lose each other. Checker writes go through
``fenced`` (a Lua script that checks the lease token) so a deposed checker cannot
overwrite its successor's work.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, cast

import msgspec
import redis
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.backoff import ExponentialBackoff

from shared.config import Config
from shared.errors import QuotaExceeded, RedisUnavailable
from shared.keys import Keys, is_reservation, reservation_member
from shared.models import Event, Intent, LeaseInfo, NodeRecord, ReplicaInfo
from shared.nodesecret import NodeSecrets

# KEYS[1] node hash; ARGV: field, value, field, value...
# Only update a record that still exists: a late write must not resurrect a released node.
HSET_IF_EXISTS = """
if redis.call('exists', KEYS[1]) == 0 then return 0 end
redis.call('hset', KEYS[1], unpack(ARGV))
return 1
"""

# KEYS[1] lease, KEYS[2] fence counter, KEYS[3..] keys the ops name by index
# ARGV[1] holder, ARGV[2] token, ARGV[3] ops as JSON: [[op, key_index, args...], ...]
# Rejects every op unless the caller still holds the lease with the current token.
FENCED = """
local cur = redis.call('get', KEYS[1])
if cur ~= (ARGV[1] .. ':' .. ARGV[2]) then return -1 end
if redis.call('get', KEYS[2]) ~= ARGV[2] then return -1 end
local ops = cjson.decode(ARGV[3])
local n = 0
for _, op in ipairs(ops) do
  local name, key = op[1], KEYS[op[2]]
  local args = {}
  for i = 3, #op do args[#args + 1] = op[i] end
  if name == 'hset_xx' then
    if redis.call('exists', key) == 1 then redis.call('hset', key, unpack(args)); n = n + 1 end
  elseif name == 'hset_nx' then
    if redis.call('exists', key) == 0 then redis.call('hset', key, unpack(args)); n = n + 1 end
  elseif name == 'xadd' then
    redis.call('xadd', key, 'MAXLEN', '~', args[1], '*', unpack(args, 2))
    n = n + 1
  else
    redis.call(name, key, unpack(args))
    n = n + 1
  end
end
return n
"""

# KEYS[1] manager's node set, KEYS[2] set of manager ids, KEYS[3] client count hash,
# KEYS[4] the manager's archived sessions (members of KEYS[1] that hold no container),
# KEYS[5..] the node set of every manager id in KEYS[2] (read just before; only for a total limit)
# ARGV[1] reservation member, ARGV[2] per-manager limit (0 none), ARGV[3] total limit (0 none),
# ARGV[4] client id ('' none), ARGV[5] per-client limit (0 none)
# Check quotas and reserve a slot atomically, so parallel creations never overshoot. The set
# of manager ids only grows, so an unchanged size means the node sets given are all of them;
# 'stale' asks the caller to read it again.
RESERVE = """
local per = tonumber(ARGV[2])
if per > 0 and redis.call('scard', KEYS[1]) - redis.call('scard', KEYS[4]) >= per then return 'manager' end
local total = tonumber(ARGV[3])
if total > 0 then
  if redis.call('scard', KEYS[2]) ~= #KEYS - 4 then return 'stale' end
  local sum = 0
  for i = 5, #KEYS do sum = sum + redis.call('scard', KEYS[i]) end
  if sum >= total then return 'total' end
end
local climit = tonumber(ARGV[5])
if ARGV[4] ~= '' and climit > 0 then
  if tonumber(redis.call('hget', KEYS[3], ARGV[4]) or '0') >= climit then return 'client' end
end
redis.call('sadd', KEYS[1], ARGV[1])
if ARGV[4] ~= '' then redis.call('hincrby', KEYS[3], ARGV[4], 1) end
return 'ok'
"""

# KEYS[1] pool list, KEYS[2] client count hash, KEYS[3..] the records of the ids at the pool's head
# ARGV[1] now, ARGV[2] client, ARGV[3] claiming replica, ARGV[4..] those ids in pool order
# (ARGV[i + 1] is the id of KEYS[i]), last ARGV the client's limit (0 none)
# Pops the head while it is the id expected, until one whose record is still pooled, and marks
# it claimed: two replicas can never hand out the same node. 'again' when the head moved since
# it was read or more ids wait than were given.
CLAIM_POOLED = """
local climit = tonumber(ARGV[#KEYS + 2] or '0')
if ARGV[2] ~= '' and climit > 0 and tonumber(redis.call('hget', KEYS[2], ARGV[2]) or '0') >= climit then
  return 'client'
end
for i = 3, #KEYS do
  local id = ARGV[i + 1]
  if redis.call('lindex', KEYS[1], 0) ~= id then return 'again' end
  redis.call('lpop', KEYS[1])
  if redis.call('hget', KEYS[i], 'role') == 'pooled' then
    redis.call('hset', KEYS[i], 'role', 'claiming', 'claimed_at', ARGV[1], 'client', ARGV[2], 'updated_at', ARGV[1],
               'claimed_by', ARGV[3])
    if ARGV[2] ~= '' then redis.call('hincrby', KEYS[2], ARGV[2], 1) end
    return id
  end
end
if redis.call('llen', KEYS[1]) > 0 then return 'again' end
return false
"""

# KEYS[1] lease, KEYS[2] fence counter, KEYS[3] lease info hash
# ARGV[1] holder, ARGV[2] ttl ms, ARGV[3] now (unix seconds)
LEASE_ACQUIRE = """
if redis.call('exists', KEYS[1]) == 1 then return 0 end
local token = redis.call('incr', KEYS[2])
redis.call('set', KEYS[1], ARGV[1] .. ':' .. token, 'PX', ARGV[2])
redis.call('hset', KEYS[3], 'holder', ARGV[1], 'token', token, 'since', ARGV[3])
return token
"""

# KEYS[1] lease; ARGV[1] 'holder:token', ARGV[2] ttl ms
LEASE_RENEW = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('pexpire', KEYS[1], ARGV[2])
return 1
"""

# KEYS[1] lease, KEYS[2] lease info; ARGV[1] 'holder:token', ARGV[2] now
LEASE_RELEASE = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('del', KEYS[1])
redis.call('hset', KEYS[2], 'holder', '', 'released_at', ARGV[2])
return 1
"""

# KEYS: node hashes; ARGV: names of numeric fields
# Returns the existing records as one JSON array, numbers typed, for one decode on the client.
READ_NODES = """
local num = {}
for _, f in ipairs(ARGV) do num[f] = true end
local out = {}
for _, key in ipairs(KEYS) do
  local h = redis.call('hgetall', key)
  if #h > 0 then
    local t = {}
    for i = 1, #h, 2 do
      if num[h[i]] then t[h[i]] = tonumber(h[i + 1]) or 0 else t[h[i]] = h[i + 1] end
    end
    if t['id'] and t['manager_id'] then out[#out + 1] = cjson.encode(t) end
  end
end
return '[' .. table.concat(out, ',') .. ']'
"""

# KEYS[1] lock; ARGV[1] holder. Deletes the lock only while the caller still holds it.
UNLOCK = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""

# KEYS: node hashes. Returns their updated_at fields joined by newlines ('' where missing).
READ_STAMPS = """
local out = {}
for i, key in ipairs(KEYS) do out[i] = redis.call('hget', key, 'updated_at') or '' end
return table.concat(out, '\\n')
"""

# KEYS[1] node hash, KEYS[2] the owner's intents hash; ARGV[1] node id, ARGV[2] op, ARGV[3] intent JSON,
# ARGV[4] now. Records a stop or release the owner will carry out, and makes the record say so at
# once: a release marks it released (every replica answers 403 for it from now on), a stop marks it
# exited (the next call must restart it through the owner). Nothing for a missing or released record.
RECORD_INTENT = """
if redis.call('exists', KEYS[1]) == 0 then return 0 end
if redis.call('hget', KEYS[1], 'status') == 'released' then return 0 end
if ARGV[2] == 'release' then
  redis.call('hset', KEYS[1], 'status', 'released', 'updated_at', ARGV[4])
else
  redis.call('hset', KEYS[1], 'status', 'exited', 'ready_at', '0', 'stopped_at', ARGV[4], 'updated_at', ARGV[4])
end
local cur = redis.call('hget', KEYS[2], ARGV[1])
if not (cur and string.find(cur, '"op":"release"', 1, true)) then redis.call('hset', KEYS[2], ARGV[1], ARGV[3]) end
return 1
"""

# KEYS[1] intents hash; ARGV[1] node id, ARGV[2] op. Drops the node's intent if it is that op.
DROP_INTENT = """
local cur = redis.call('hget', KEYS[1], ARGV[1])
if cur and string.find(cur, '"op":"' .. ARGV[2] .. '"', 1, true) then return redis.call('hdel', KEYS[1], ARGV[1]) end
return 0
"""

CLAIM_BATCH = 10  # pool ids read ahead per claim attempt
Op = tuple[str, str, list[Any]]  # (command, key, args): one write of a fenced batch


def _d(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


# The shapes of replies as this client reads them (bytes, no decode_responses): redis-py types a reply
# as the union over every option (withscores, decoding, RESP3), which the options given here narrow.
_Scored = list[tuple[bytes, float]]
_Entries = list[tuple[bytes, dict[bytes, bytes]]]


def _mapping(fields: dict[str, str]) -> dict[Any, Any]:
    """fields as hset's mapping, whose declared key type (a union) a dict[str, str] does not match."""
    return fields


class BlockingSentinelPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """The master's pool through Sentinel, waiting for a free connection like the direct one."""


def connect(url: str, socket_timeout: float = 2.0, sentinels: Sequence[str] = (),
            sentinel_master: str = "mymaster", password: str | None = None, max_connections: int = 100,
            pool_timeout: float = 5.0) -> aioredis.Redis:
    """A Redis client from a URL, or through Sentinel when sentinels are configured.

    Its pool waits up to pool_timeout for a free connection rather than failing at once: with a
    fail-fast pool, 1,000 concurrent requests with random cookies made 578 of them (legitimate
    calls too) fail with MaxConnectionsError; waiting, a burst is queued and served."""
    # a pooled connection may be dead after a Redis restart: retry (twice, backing off) on a fresh one
    opts: dict[str, Any] = {**({"password": password} if password else {}),
                            "socket_timeout": socket_timeout, "socket_connect_timeout": socket_timeout,
                            "health_check_interval": 10, "retry_on_timeout": False,
                            "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
                            "retry_on_error": [redis.exceptions.ConnectionError]}
    if sentinels:
        from redis.asyncio.connection import parse_url
        from redis.asyncio.sentinel import Sentinel

        hosts = [(h.rsplit(":", 1)[0], int(h.rsplit(":", 1)[1])) for h in sentinels]
        # the URL's host is the sentinels' business; its database, user and password are the master's
        # (a password_file still wins); the sentinels themselves get only the socket options
        creds = {k: v for k, v in parse_url(url).items() if k in ("db", "username", "password")} if url else {}
        master = {**creds, **opts, "max_connections": max_connections, "timeout": pool_timeout}
        return Sentinel(hosts, **opts).master_for(sentinel_master, connection_pool_class=BlockingSentinelPool, **master)
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=pool_timeout,
                                                    **opts)
    return aioredis.Redis.from_pool(pool)


class LeaseRenewer:
    """Renews checker leases from a thread of the checker's own, on a blocking connection of its
    own: neither client load on the event loop nor a full pool can delay a renewal."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self._r = client
        self._keys = keys
        self._renew = client.register_script(LEASE_RENEW)

    def renew(self, manager_id: str, value: str, ttl_ms: int) -> bool:
        """True when renewed; False when the lease is no longer value's; RedisUnavailable when Redis
        did not answer."""
        with redis_errors():
            return bool(self._renew(keys=[self._keys.lease(manager_id)], args=[value, ttl_ms]))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._r.close()


def _sync_client(cfg: Config) -> redis.Redis:
    r = cfg.redis
    opts: dict[str, Any] = {"socket_timeout": r.socket_timeout_seconds, "socket_connect_timeout": r.socket_timeout_seconds,
                            **({"password": cfg.redis_password} if cfg.redis_password else {})}
    if r.sentinels:
        from redis.connection import parse_url
        from redis.sentinel import Sentinel

        hosts = [(h.rsplit(":", 1)[0], int(h.rsplit(":", 1)[1])) for h in r.sentinels]
        creds = {k: v for k, v in parse_url(r.url).items() if k in ("db", "username", "password")} if r.url else {}
        return Sentinel(hosts, **opts).master_for(r.sentinel_master, **{**creds, **opts})
    return redis.Redis.from_url(r.url, max_connections=1, **opts)


@contextlib.contextmanager
def redis_errors() -> Any:
    """Map transport failures of Redis to RedisUnavailable (503)."""
    try:
        yield
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
        raise RedisUnavailable(type(exc).__name__) from exc
    except redis.exceptions.BusyLoadingError as exc:  # pragma: no cover - subclass of ConnectionError
        raise RedisUnavailable("loading") from exc


class Store:
    """Typed access to everything the project keeps in Redis."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, stream_maxlen: int = 10000,
                 secrets: NodeSecrets | None = None, lease_redis: aioredis.Redis | None = None) -> None:
        self.redis = redis
        # the checker's lease on a client of its own: client load filling the main pool must never
        # delay a renewal (3,000 /ws/events sockets once cost the checker its lease 3 times in 2 min)
        self.lease_redis = lease_redis or redis
        self.lease_renewer: Callable[[], LeaseRenewer] | None = None  # set by open(): a renewer thread's client
        self.keys = keys
        self.secrets = secrets or NodeSecrets()  # a derived secret is never written
        self.stream_maxlen = stream_maxlen
        self._hset_if_exists = redis.register_script(HSET_IF_EXISTS)
        self._fenced = redis.register_script(FENCED)
        self._reserve = redis.register_script(RESERVE)
        self._claim = redis.register_script(CLAIM_POOLED)
        self._read_nodes = redis.register_script(READ_NODES)
        self._read_stamps = redis.register_script(READ_STAMPS)
        self._unlock = redis.register_script(UNLOCK)
        self._lease_acquire = self.lease_redis.register_script(LEASE_ACQUIRE)
        self._lease_renew = self.lease_redis.register_script(LEASE_RENEW)
        self._lease_release = self.lease_redis.register_script(LEASE_RELEASE)
        self._record_intent = redis.register_script(RECORD_INTENT)
        self._drop_intent = redis.register_script(DROP_INTENT)

    @classmethod
    def open(cls, cfg: Config) -> Store:
        """The store of a configuration, on its own client (closed by close())."""
        r = cfg.redis
        password = cfg.redis_password
        main = connect(r.url, r.socket_timeout_seconds, r.sentinels, r.sentinel_master, password,
                       r.max_connections, r.pool_timeout_seconds)
        lease = connect(r.url, r.socket_timeout_seconds, r.sentinels, r.sentinel_master, password, 2,
                        r.socket_timeout_seconds)
        store = cls(main, Keys(r.key_prefix), cfg.events.stream_maxlen, NodeSecrets(cfg.node_secret_key), lease)
        store.lease_renewer = lambda: LeaseRenewer(_sync_client(cfg), store.keys)
        return store

    async def close(self) -> None:
        for client in {id(self.redis): self.redis, id(self.lease_redis): self.lease_redis}.values():
            with contextlib.suppress(Exception):
                await client.aclose()

    async def ping(self) -> None:
        with redis_errors():
            await self.redis.ping()

    # --- node records ---------------------------------------------------------
    async def put_node(self, rec: NodeRecord, replace_member: str | None = None) -> None:
        """Write a whole new record and index it (creation; not for updates)."""
        k = self.keys
        with redis_errors():
            async with self.redis.pipeline(transaction=True) as p:
                p.hset(k.node(rec.id), mapping=_mapping(self._hash(rec)))
                if replace_member:
                    p.srem(k.manager_nodes(rec.manager_id), replace_member)
                _queue(p, self._index_ops(rec, rec.last_request_at or time.time()))
                p.sadd(k.managers(), rec.manager_id)
                await p.execute()

    async def get_node(self, node_id: str) -> NodeRecord | None:
        with redis_errors():
            data = await self.redis.hgetall(self.keys.node(node_id))
        if not data or b"manager_id" not in data:
            return None
        try:
            return NodeRecord.from_hash(data)
        except msgspec.ValidationError:
            return None

    async def get_nodes(self, node_ids: Sequence[str]) -> list[NodeRecord]:
        """Records for many ids, a thousand per round trip; missing ones are skipped.

        One script call returns a chunk as a single JSON array with numbers typed, so the
        client parses one reply and decodes it in one msgspec call: per-reply overhead,
        not Redis, dominated reading 10,000 records one HGETALL at a time.
        """
        out: list[NodeRecord] = []
        for i in range(0, len(node_ids), 1000):
            keys = [self.keys.node(nid) for nid in node_ids[i:i + 1000]]
            with redis_errors():
                blob = await self._read_nodes(keys=keys, args=NodeRecord.numeric_fields())
            try:
                out += msgspec.json.decode(blob, type=list[NodeRecord])
            except msgspec.ValidationError:  # a malformed record: fall back to one by one
                out += [r for r in [await self.get_node(nid) for nid in node_ids[i:i + 1000]] if r]
        return out

    async def node_stamps(self, node_ids: Sequence[str]) -> dict[str, str]:
        """node id -> its updated_at as stored (a version stamp), for the records that exist."""
        out: dict[str, str] = {}
        for i in range(0, len(node_ids), 5000):
            chunk = node_ids[i:i + 5000]
            with redis_errors():
                blob = await self._read_stamps(keys=[self.keys.node(n) for n in chunk])
            for node_id, stamp in zip(chunk, _d(blob).split("\n")):
                if stamp:
                    out[node_id] = stamp
        return out

    def _hash(self, rec: NodeRecord) -> dict[str, str]:
        """The record as written: a derived secret left out (the node's is computed on use)."""
        out = rec.to_hash()
        out["secret"] = self.secrets.stored(rec.id, rec.secret)
        return out

    def _fields(self, node_id: str, fields: dict[str, Any]) -> dict[str, Any]:
        if "secret" in fields:
            fields = {**fields, "secret": self.secrets.stored(node_id, str(fields["secret"]))}
        return fields

    async def update_node(self, node_id: str, **fields: Any) -> bool:
        """Set some fields of an existing record; False when the record is gone."""
        fields = self._fields(node_id, fields)
        args: list[str] = []
        for key, value in fields.items():
            args += [key, str(value)]
        args += ["updated_at", str(time.time())]
        with redis_errors():
            return bool(await self._hset_if_exists(keys=[self.keys.node(node_id)], args=args))

    async def delete_node(self, rec: NodeRecord) -> None:
        """Remove a record and every index entry of it."""
        with redis_errors():
            async with self.redis.pipeline(transaction=True) as p:
                _queue(p, self.delete_ops(rec))
                await p.execute()

    async def manager_node_ids(self, manager_id: str) -> list[str]:
        with redis_errors():
            return [_d(m) for m in await self.redis.smembers(self.keys.manager_nodes(manager_id))]

    async def manager_ids(self) -> list[str]:
        with redis_errors():
            return sorted(_d(m) for m in await self.redis.smembers(self.keys.managers()))

    async def touch(self, activity: dict[str, tuple[str, float]]) -> None:
        """Flush a batch of last-request times (node_id -> (manager_id, ts)) in one round trip."""
        by_mgr: dict[str, dict[str, float]] = {}
        for node_id, (mgr, ts) in activity.items():
            by_mgr.setdefault(mgr, {})[node_id] = ts
        with redis_errors():
            async with self.redis.pipeline(transaction=False) as p:
                for mgr, members in by_mgr.items():
                    # XX: never re-add a node that was released meanwhile; GT: never go back in time
                    p.zadd(self.keys.last_request(mgr), members, xx=True, gt=True)
                await p.execute()

    async def idle_since(self, manager_id: str, older_than: float) -> dict[str, float]:
        """node id -> last activity, for nodes idle since before the timestamp: one range query."""
        with redis_errors():
            rows = cast(_Scored, await self.redis.zrangebyscore(self.keys.last_request(manager_id), "-inf",
                                                                older_than, withscores=True))
        return {_d(m): float(s) for m, s in rows}

    async def last_activity(self, manager_id: str, node_id: str) -> float | None:
        with redis_errors():
            score = await self.redis.zscore(self.keys.last_request(manager_id), node_id)
        return None if score is None else float(score)

    # --- session locks ----------------------------------------------------------------
    async def lock_session(self, session_id: str, holder: str, ttl_ms: int) -> bool:
        """Take the lock that lets one caller at a time bring a session's container back."""
        with redis_errors():
            return bool(await self.redis.set(self.keys.session_lock(session_id), holder, nx=True, px=ttl_ms))

    async def unlock_session(self, session_id: str, holder: str) -> None:
        with redis_errors():
            await self._unlock(keys=[self.keys.session_lock(session_id)], args=[holder])

    async def last_requests(self, manager_id: str) -> dict[str, float]:
        with redis_errors():
            rows = cast(_Scored, await self.redis.zrange(self.keys.last_request(manager_id), 0, -1, withscores=True))
        return {_d(m): float(s) for m, s in rows}

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

    # --- quotas and reservations ---------------------------------------------
    async def reserve(self, manager_id: str, per_manager: int, total: int, client: str = "",
                      per_client: int = 0, replica_id: str = "") -> str:
        """Reserve a creation slot atomically; returns the reservation member or raises QuotaExceeded."""
        member = reservation_member(time.time(), uuid.uuid4().hex[:8], replica_id)
        k = self.keys
        with redis_errors():
            await self.redis.sadd(k.managers(), manager_id)
            res = "stale"
            while res == "stale":
                others = [k.manager_nodes(m) for m in await self.manager_ids()] if total > 0 else []
                res = _d(await self._reserve(keys=[k.manager_nodes(manager_id), k.managers(), k.client_count(),
                                                   k.archived(manager_id), *others],
                                             args=[member, per_manager, total, client, per_client]))
        if res == "manager":
            raise QuotaExceeded(f"quota exceeded: manager {manager_id} already has {per_manager} nodes")
        if res == "total":
            raise QuotaExceeded(f"quota exceeded: the cluster already has {total} nodes")
        if res == "client":
            raise QuotaExceeded(f"quota exceeded: client {client} already has {per_client} nodes")
        return member

    async def unreserve(self, manager_id: str, member: str, client: str = "") -> None:
        with redis_errors():
            async with self.redis.pipeline(transaction=True) as p:
                p.srem(self.keys.manager_nodes(manager_id), member)
                if client:
                    p.hincrby(self.keys.client_count(), client, -1)
                await p.execute()

    async def claim_pooled(self, manager_id: str, client: str = "", claimer: str = "",
                           per_client: int = 0) -> str | None:
        """Atomically take a ready pooled node of manager_id, or None when the pool is empty or
        the client already holds per_client sessions."""
        k = self.keys
        with redis_errors():
            while True:
                ids = [_d(i) for i in await self.redis.lrange(k.pool(manager_id), 0, CLAIM_BATCH - 1)]
                if not ids:
                    return None
                got = await self._claim(keys=[k.pool(manager_id), k.client_count(), *[k.node(i) for i in ids]],
                                        args=[time.time(), client, claimer, *ids, per_client])
                if not got or _d(got) == "client":
                    return None
                if _d(got) != "again":
                    return _d(got)

    async def node_counts(self) -> dict[str, int]:
        """Live nodes (and pending reservations) per manager_id."""
        mids = await self.manager_ids()
        with redis_errors():
            async with self.redis.pipeline(transaction=False) as p:
                for m in mids:
                    p.scard(self.keys.manager_nodes(m))
                    p.scard(self.keys.archived(m))
                counts = await p.execute()
        return {m: int(counts[2 * i]) - int(counts[2 * i + 1]) for i, m in enumerate(mids)}

    # --- fenced writes (checker) ----------------------------------------------
    async def fenced(self, manager_id: str, holder: str, token: int, ops: Sequence[Op]) -> bool:
        """Apply ops [(redis_op, key, args)] atomically iff holder still has the lease with token."""
        # in chunks, each fenced on its own, so a mass change never blocks Redis for long
        for i in range(0, len(ops), 2000):
            if not await self._fenced_chunk(manager_id, holder, token, ops[i:i + 2000]):
                return False
        return True

    async def _fenced_chunk(self, manager_id: str, holder: str, token: int, ops: Sequence[Op]) -> bool:
        keys = [self.keys.lease(manager_id), self.keys.fence(manager_id)]
        index: dict[str, int] = {}
        encoded = []
        for name, key, args in ops:
            if key not in index:
                keys.append(key)
                index[key] = len(keys)
            encoded.append([name, index[key], *[str(a) for a in args]])
        with redis_errors():
            res = await self._fenced(keys=keys, args=[holder, token, msgspec.json.encode(encoded)])
        return int(res) >= 0

    # writes for fenced(): each a (command, key, args) the FENCED script applies
    def update_op(self, node_id: str, fields: dict[str, Any], now: float) -> Op:
        """Set fields of a record that still exists (never resurrects a removed one)."""
        args = [x for kv in self._fields(node_id, fields).items() for x in kv] + ["updated_at", f"{now:.3f}"]
        return ("hset_xx", self.keys.node(node_id), args)

    def adopt_ops(self, rec: NodeRecord, now: float) -> list[Op]:
        """Record and index a node found on the engine; a record written meanwhile is kept."""
        return [("hset_nx", self.keys.node(rec.id), [x for kv in self._hash(rec).items() for x in kv]),
                *self._index_ops(rec, now)]

    def _index_ops(self, rec: NodeRecord, last_request: float) -> list[Op]:
        k = self.keys
        return [("sadd", k.manager_nodes(rec.manager_id), [rec.id]),
                ("zadd", k.last_request(rec.manager_id), [str(last_request), rec.id])]

    def delete_ops(self, rec: NodeRecord) -> list[Op]:
        k = self.keys
        ops: list[Op] = [("del", k.node(rec.id), []), ("del", k.watchers(rec.id), []),
                         ("srem", k.manager_nodes(rec.manager_id), [rec.id]),
                         ("srem", k.archived(rec.manager_id), [rec.id]),
                         ("zrem", k.last_request(rec.manager_id), [rec.id]),
                         ("lrem", k.pool(rec.manager_id), [0, rec.id])]
        if rec.client:
            ops.append(("hincrby", k.client_count(), [rec.client, -1]))
        return ops

    def archived_op(self, manager_id: str, node_id: str, archived: bool = True) -> Op:
        """Count a session as archived (holding no container) or no longer."""
        return ("sadd" if archived else "srem", self.keys.archived(manager_id), [node_id])

    async def unarchived(self, manager_id: str, node_id: str) -> None:
        """A session has a container again: it counts against quotas."""
        with redis_errors():
            await self.redis.srem(self.keys.archived(manager_id), node_id)

    async def mark_archived(self, manager_id: str, node_id: str) -> None:
        """A session stays archived after a failed bring-back (not a checker write: no fence)."""
        with redis_errors():
            await self.redis.sadd(self.keys.archived(manager_id), node_id)

    def pool_push_op(self, manager_id: str, node_id: str) -> Op:
        return ("rpush", self.keys.pool(manager_id), [node_id])

    def unreserve_op(self, manager_id: str, member: str) -> Op:
        return ("srem", self.keys.manager_nodes(manager_id), [member])

    def cycle_count_op(self, manager_id: str, token: int) -> Op:
        return ("hincrby", self.keys.checker_stats(manager_id), [f"cycles:{token}", 1])

    async def checker_cycles(self, manager_id: str) -> dict[str, int]:
        """Reconcile cycles run per lease token (admin view)."""
        with redis_errors():
            stats = await self.redis.hgetall(self.keys.checker_stats(manager_id))
        return {_d(k).split(":", 1)[1]: int(v) for k, v in stats.items() if _d(k).startswith("cycles:")}

    # --- checker lease ----------------------------------------------------------
    async def lease_acquire(self, manager_id: str, holder: str, ttl_ms: int) -> int:
        """A new fencing token when the lease was free, else 0."""
        k = self.keys
        with redis_errors():
            return int(await self._lease_acquire(keys=[k.lease(manager_id), k.fence(manager_id),
                                                       k.lease_info(manager_id)],
                                                 args=[holder, ttl_ms, f"{time.time():.3f}"]))

    async def lease_renew(self, manager_id: str, value: str, ttl_ms: int) -> bool:
        with redis_errors():
            return bool(await self._lease_renew(keys=[self.keys.lease(manager_id)], args=[value, ttl_ms]))

    async def lease_release(self, manager_id: str, value: str) -> None:
        k = self.keys
        with redis_errors():
            await self._lease_release(keys=[k.lease(manager_id), k.lease_info(manager_id)],
                                      args=[value, f"{time.time():.3f}"])

    async def lease_view(self, manager_id: str) -> LeaseInfo:
        """Who holds a manager_id's lease, its token and since when (admin view)."""
        k = self.keys
        with redis_errors():
            async with self.redis.pipeline(transaction=False) as p:
                p.get(k.lease(manager_id))
                p.pttl(k.lease(manager_id))
                p.hgetall(k.lease_info(manager_id))
                value, pttl, info = await p.execute()
        if not value:
            return LeaseInfo(manager_id=manager_id, holder=None, token=None, since=None, expires_in_ms=None)
        holder, _, token = _d(value).rpartition(":")
        since = info.get(b"since") if info and _d(info.get(b"holder", b"")) == holder else None
        return LeaseInfo(manager_id=manager_id, holder=holder, token=int(token),
                         since=float(since) if since else None, expires_in_ms=int(pttl))

    # --- event watchers -----------------------------------------------------------
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

    # --- events -----------------------------------------------------------------
    def event_op(self, ev: Event) -> Op:
        """An XADD for fenced(): the event travels in the same atomic write as the change."""
        return ("xadd", self.keys.events(), [self.stream_maxlen, "e", msgspec.json.encode(ev).decode()])

    async def publish(self, ev: Event) -> str:
        with redis_errors():
            eid = await self.redis.xadd(self.keys.events(), {"e": msgspec.json.encode(ev)},
                                        maxlen=self.stream_maxlen, approximate=True)
        return _d(eid)

    async def read_events(self, last_id: str, block_ms: int | None = 1000, count: int = 500) -> list[Event]:
        """Events after last_id, waiting up to block_ms for the first (None: do not wait)."""
        with redis_errors():
            rows = cast(list[tuple[bytes, _Entries]],
                        await self.redis.xread({self.keys.events(): last_id}, block=block_ms, count=count))
        out: list[Event] = []
        for _stream, entries in rows or []:
            for eid, fields in entries:
                with contextlib.suppress(msgspec.ValidationError, KeyError):
                    ev = msgspec.json.decode(fields[b"e"], type=Event)
                    ev.id = _d(eid)
                    out.append(ev)
        return out

    async def last_event_id(self) -> str:
        with redis_errors():
            rows = await self.redis.xrevrange(self.keys.events(), count=1)
        return _d(rows[0][0]) if rows else "0-0"

    async def events_trimmed_after(self, last_id: str) -> bool:
        """Whether entries newer than last_id were trimmed away (a resume from it is incomplete)."""
        with redis_errors():
            try:
                info = await self.redis.xinfo_stream(self.keys.events())
            except redis.exceptions.ResponseError:  # no stream yet: nothing was trimmed
                return False
        deleted = _d(info.get("max-deleted-entry-id", "0-0"))
        return compare_ids(deleted, last_id) > 0

    # --- MCP sessions and streams ------------------------------------------------
    async def mcp_session_put(self, token_hash: str, fields: dict[str, str], ttl: float) -> None:
        key = self.keys.mcp_session(token_hash)
        with redis_errors():
            async with self.redis.pipeline(transaction=True) as p:
                p.hset(key, mapping=_mapping(fields))
                p.pexpire(key, int(ttl * 1000))
                await p.execute()

    async def mcp_session_get(self, token_hash: str) -> dict[str, str] | None:
        with redis_errors():
            data = await self.redis.hgetall(self.keys.mcp_session(token_hash))
        return {_d(k): _d(v) for k, v in data.items()} if data else None

    async def mcp_session_touch(self, token_hash: str, ttl: float) -> None:
        with redis_errors():
            await self.redis.pexpire(self.keys.mcp_session(token_hash), int(ttl * 1000))

    async def mcp_session_delete(self, token_hash: str) -> bool:
        """Forget an MCP session; False when it was already gone (another replica ended it)."""
        with redis_errors():
            return bool(await self.redis.delete(self.keys.mcp_session(token_hash)))

    async def mcp_stream_add(self, token_hash: str, stream_id: str, data: str, kind: str, ttl: float) -> str:
        """Append one SSE event (kind: a one-letter tag of the caller's) to a stream; its id is the
        entry id, and the stream expires ttl after its last event."""
        key = self.keys.mcp_stream(token_hash, stream_id)
        with redis_errors():
            async with self.redis.pipeline(transaction=True) as p:
                p.xadd(key, {"d": data, "k": kind}, maxlen=10000, approximate=True)
                p.pexpire(key, int(ttl * 1000))
                eid, _ = await p.execute()
        return _d(eid)

    async def mcp_stream_read(self, token_hash: str, stream_id: str, after: str,
                              block_ms: int | None) -> list[tuple[str, str, str]]:
        """Events after an entry id as (id, data, kind); waits up to block_ms for one when given."""
        key = self.keys.mcp_stream(token_hash, stream_id)
        with redis_errors():
            if block_ms is None:
                rows = cast(_Entries, await self.redis.xrange(key, min=f"({after}", max="+"))
            else:
                got = cast(list[tuple[bytes, _Entries]], await self.redis.xread({key: after}, block=block_ms, count=100))
                rows = got[0][1] if got else []
        return [(_d(eid), _d(f.get(b"d", b"")), _d(f.get(b"k", b""))) for eid, f in rows]

    async def mcp_stream_exists(self, token_hash: str, stream_id: str) -> bool:
        with redis_errors():
            return bool(await self.redis.exists(self.keys.mcp_stream(token_hash, stream_id)))

    async def mcp_stream_hold(self, token_hash: str, stream_id: str, replica_id: str, ttl: float) -> None:
        """Say (for ttl) that this replica still runs the stream's call."""
        with redis_errors():
            await self.redis.set(self.keys.mcp_stream_owner(token_hash, stream_id), replica_id,
                                 px=int(ttl * 1000))

    async def mcp_stream_let_go(self, token_hash: str, stream_id: str) -> None:
        with redis_errors():
            await self.redis.delete(self.keys.mcp_stream_owner(token_hash, stream_id))

    async def mcp_stream_held(self, token_hash: str, stream_id: str) -> bool:
        with redis_errors():
            return bool(await self.redis.exists(self.keys.mcp_stream_owner(token_hash, stream_id)))

    async def mcp_cancel(self, token_hash: str, request_id: str, ttl: float) -> None:
        with redis_errors():
            await self.redis.set(self.keys.mcp_cancel(token_hash, request_id), "1", px=int(ttl * 1000))

    async def mcp_cancelled(self, token_hash: str, request_id: str) -> bool:
        with redis_errors():
            return bool(await self.redis.exists(self.keys.mcp_cancel(token_hash, request_id)))

    async def mcp_tools_put(self, image: str, tools_json: str, ttl: float) -> None:
        with redis_errors():
            await self.redis.set(self.keys.mcp_tools(image), tools_json, px=int(ttl * 1000))

    async def mcp_tools_get(self, image: str) -> str | None:
        with redis_errors():
            v = await self.redis.get(self.keys.mcp_tools(image))
        return _d(v) if v is not None else None

    # --- replica registry --------------------------------------------------------
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
                p.sadd(k.managers(), info.manager_id)
                p.zadd(k.manager_seen(), {info.manager_id: info.heartbeat_at}, gt=True)
                await p.execute()

    async def managers_seen(self) -> dict[str, float]:
        """manager_id -> when a replica of it last sent a heartbeat."""
        with redis_errors():
            rows = cast(_Scored, await self.redis.zrange(self.keys.manager_seen(), 0, -1, withscores=True))
        return {_d(m): float(s) for m, s in rows}

    async def deregister(self, replica_id: str) -> None:
        with redis_errors():
            async with self.redis.pipeline(transaction=True) as p:
                p.delete(self.keys.replica(replica_id))
                p.zrem(self.keys.replicas(), replica_id)
                await p.execute()

    async def live_replicas(self, manager_id: str | None = None) -> list[ReplicaInfo]:
        """Replicas whose heartbeat key has not expired; prunes the index of the dead (as rq does)."""
        k = self.keys
        with redis_errors():
            ids = [_d(m) for m in await self.redis.zrange(k.replicas(), 0, -1)]
            if not ids:
                return []
            async with self.redis.pipeline(transaction=False) as p:
                for rid in ids:
                    p.hgetall(k.replica(rid))
                rows = await p.execute()
            dead = [rid for rid, row in zip(ids, rows) if not row]
            if dead:
                await self.redis.zrem(k.replicas(), *dead)
        out = []
        for row in rows:
            if row:
                with contextlib.suppress(msgspec.ValidationError):
                    info = ReplicaInfo.from_hash(row)
                    if manager_id is None or info.manager_id == manager_id:
                        out.append(info)
        return out

    # --- intents: lifecycle calls waiting for their owner -----------------------------
    async def record_intent(self, rec: NodeRecord, intent: Intent) -> bool:
        """Record a stop or release for the node's owner to carry out; False when the record is gone."""
        with redis_errors():
            return bool(await self._record_intent(
                keys=[self.keys.node(rec.id), self.keys.intents(rec.manager_id)],
                args=[rec.id, intent.op, msgspec.json.encode(intent), f"{intent.at:.3f}"]))

    async def intents(self, manager_id: str) -> dict[str, Intent]:
        """node id -> the intent waiting for this manager_id (malformed entries are skipped)."""
        with redis_errors():
            raw = await self.redis.hgetall(self.keys.intents(manager_id))
        out: dict[str, Intent] = {}
        for node_id, blob in raw.items():
            with contextlib.suppress(msgspec.ValidationError, msgspec.DecodeError):
                out[_d(node_id)] = msgspec.json.decode(blob, type=Intent)
        return out

    async def drop_intent(self, manager_id: str, node_id: str, op: str) -> bool:
        """Forget the node's intent if it is op (a later call superseded it)."""
        with redis_errors():
            return bool(await self._drop_intent(keys=[self.keys.intents(manager_id)], args=[node_id, op]))

    def intent_done_op(self, manager_id: str, node_id: str) -> Op:
        """An HDEL for fenced(): the intent goes in the same write that records it carried out."""
        return ("hdel", self.keys.intents(manager_id), [node_id])

    # --- draining -------------------------------------------------------------------
    async def set_draining(self, manager_id: str, draining: bool) -> None:
        with redis_errors():
            if draining:
                await self.redis.sadd(self.keys.draining(), manager_id)
            else:
                await self.redis.srem(self.keys.draining(), manager_id)

    async def draining(self) -> set[str]:
        with redis_errors():
            return {_d(m) for m in await self.redis.smembers(self.keys.draining())}

    # --- console logins ---------------------------------------------------------------
    async def revoke_console_login(self, login_id: str, ttl_seconds: int) -> None:
        """Every replica refuses this console login from now until its cookie would expire."""
        with redis_errors():
            await self.redis.set(self.keys.console_revoked(login_id), b"1", ex=max(1, ttl_seconds))

    async def console_login_revoked(self, login_id: str) -> bool:
        with redis_errors():
            return bool(await self.redis.exists(self.keys.console_revoked(login_id)))

    # --- every record ---------------------------------------------------------------
    async def scan_all_nodes(self) -> AsyncIterator[NodeRecord]:
        """Every record of every manager_id, in batches."""
        for mid in await self.manager_ids():
            ids = [i for i in await self.manager_node_ids(mid) if not is_reservation(i)]
            for i in range(0, len(ids), 500):
                for rec in await self.get_nodes(ids[i:i + 500]):
                    yield rec


def _queue(p: Any, ops: Sequence[Op]) -> None:
    """Queue ops on a pipeline as plain commands (outside a fenced script)."""
    for name, key, args in ops:
        p.execute_command(name.upper(), key, *args)


def compare_ids(a: str, b: str) -> int:
    """Order two stream ids: -1, 0 or 1."""
    pa = tuple(int(x) for x in a.split("-"))
    pb = tuple(int(x) for x in b.split("-"))
    return (pa > pb) - (pa < pb)

