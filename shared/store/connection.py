"""Clients to Redis: a pool that waits for a free connection, directly or through Sentinel, with the
password from the configuration; and the blocking client of the lease renewer's thread."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.backoff import ExponentialBackoff
from redis.connection import parse_url

from shared.config import Config


class BlockingSentinelPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """The master's pool through Sentinel, waiting for a free connection like the direct one."""


def connect(url: str, socket_timeout: float = 2.0, sentinels: Sequence[str] = (),
            sentinel_master: str = "mymaster", password: str | None = None, max_connections: int = 100,
            pool_timeout: float = 5.0, cluster_nodes: Sequence[str] = ()) -> aioredis.Redis:
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
    if cluster_nodes:
        return cluster_client(url, cluster_nodes, password, socket_timeout, max_connections)  # type: ignore[return-value]
    if sentinels:
        from redis.asyncio.sentinel import Sentinel

        master = {**master_creds(url), **opts, "max_connections": max_connections, "timeout": pool_timeout}
        return Sentinel(sentinel_hosts(sentinels), **opts).master_for(
            sentinel_master, connection_pool_class=BlockingSentinelPool, **master)
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=pool_timeout,
                                                    **opts)
    return aioredis.Redis.from_pool(pool)


def sync_client(cfg: Config) -> redis.Redis:
    """A blocking client of one connection (through Sentinel when configured): the lease renewer's."""
    r = cfg.redis
    opts: dict[str, Any] = {"socket_timeout": r.socket_timeout_seconds, "socket_connect_timeout": r.socket_timeout_seconds,
                            **({"password": cfg.redis_password} if cfg.redis_password else {})}
    if r.cluster_nodes:
        from redis.cluster import ClusterNode, RedisCluster

        creds = {**master_creds(r.url), **opts}
        creds.pop("db", None)
        return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in sentinel_hosts(r.cluster_nodes)],  # type: ignore[return-value]
                            **creds)
    if r.sentinels:
        from redis.sentinel import Sentinel

        return Sentinel(sentinel_hosts(r.sentinels), **opts).master_for(r.sentinel_master,
                                                                        **{**master_creds(r.url), **opts})
    return redis.Redis.from_url(r.url, max_connections=1, **opts)


def sentinel_hosts(sentinels: Sequence[str]) -> list[tuple[str, int]]:
    """("host", port) of each "host:port" (Sentinel's own form)."""
    return [(h.rsplit(":", 1)[0], int(h.rsplit(":", 1)[1])) for h in sentinels]


def master_creds(url: str) -> dict[str, Any]:
    """Through Sentinel, the URL's host is the sentinels' business; its database, user and password
    are the master's (a password_file, given after these, still wins). The sentinels themselves get
    only the socket options (redis-py's default sentinel_kwargs)."""
    return {k: v for k, v in parse_url(url).items() if k in ("db", "username", "password")} if url else {}


def cluster_client(url: str, nodes: Sequence[str], password: str | None, socket_timeout: float,
                   max_connections: int) -> aioredis.RedisCluster:
    """An async Redis Cluster client from seed nodes. A command whose primary died is retried
    (backing off, about 3 s in all) while the cluster promotes a replica and the client reloads the
    slot map, so a failover reads as a slower command, not an error, when it is quick enough."""
    from redis.asyncio.cluster import ClusterNode

    creds = {k: v for k, v in master_creds(url).items() if k != "db"}
    if password:
        creds["password"] = password
    return aioredis.RedisCluster(
        startup_nodes=[ClusterNode(h, p) for h, p in sentinel_hosts(nodes)], **creds,
        socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout, max_connections=max_connections,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 8),
        require_full_coverage=False)
