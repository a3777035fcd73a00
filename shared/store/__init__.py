"""Everything the project keeps in Redis, behind one facade (key names in shared/keys.py).

``Store`` is the sum of the domain parts, one module each: node records and their index
(nodes), activity, quotas and the client counts' recount (counts), the warm pool, the engine-wide creation slots
(creations), fenced checker writes (fenced), session locks,
events and watchers, the replica registry and draining (replicas), intents and console logins.
Checker leases (on a client of their own), MCP's state, snapshots, egress secrets and what the egress agent learned are namespaces of their
own: ``store.leases``, ``store.mcp``, ``store.snapshots``, ``store.egress_secrets``, ``store.egress_learned``. No part calls another's methods: each reads on its own, over the client
and key names of ``base.Part``. Clients are made in connection.py. Nothing outside this
package imports redis.
"""

from __future__ import annotations

import contextlib

import redis.asyncio as aioredis

from shared.config import Config
from shared.keys import Keys
from shared.nodesecret import NodeSecrets
from shared.store.activity import Activity
from shared.store.base import Op, redis_errors
from shared.store.connection import connect, sync_client
from shared.store.console import ConsoleLogins
from shared.store.counts import ClientCounts
from shared.store.creations import CreationSlots
from shared.store.egress_learned import EgressLearnedStore
from shared.store.egress_secrets import EgressSecretStore
from shared.store.events import ALL, BROADCAST, Events, Scope, compare_ids
from shared.store.fenced import Fenced
from shared.store.intents import Intents
from shared.store.leases import LeaseRenewer, Leases
from shared.store.locks import Locks
from shared.store.mcp import McpStore
from shared.store.nodes import NodeRecords
from shared.store.pool import Pool
from shared.store.quotas import Quotas
from shared.store.replicas import Replicas
from shared.store.snapshots import SnapshotStore

__all__ = ["ALL", "BROADCAST", "LeaseRenewer", "Op", "Scope", "Store", "compare_ids", "connect", "redis_errors"]


class Store(NodeRecords, Activity, Quotas, ClientCounts, Pool, CreationSlots, Fenced, Locks, Events, Replicas, Intents,
            ConsoleLogins):
    """Typed access to everything the project keeps in Redis."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, stream_maxlen: int = 10000,
                 secrets: NodeSecrets | None = None, lease_redis: aioredis.Redis | None = None,
                 manager_stream_maxlen: int = 1000) -> None:
        super().__init__(redis, keys)
        self.leases = Leases(redis, keys, lease_redis)
        self.secrets = secrets or NodeSecrets()
        self.stream_maxlen = stream_maxlen
        self.manager_stream_maxlen = manager_stream_maxlen
        self.mcp = McpStore(redis, keys)
        self.snapshots = SnapshotStore(redis, keys)
        self.egress_secrets = EgressSecretStore(redis, keys)
        self.egress_learned = EgressLearnedStore(redis, keys)

    @classmethod
    def open(cls, cfg: Config) -> Store:
        """The store of a configuration, on its own client (closed by close())."""
        r = cfg.redis
        password = cfg.redis_password
        main = connect(r.url, r.socket_timeout_seconds, r.sentinels, r.sentinel_master, password,
                       r.max_connections, r.pool_timeout_seconds, r.cluster_nodes)
        # on a cluster a pool is per node: the lease's few connections on each
        lease = connect(r.url, r.socket_timeout_seconds, r.sentinels, r.sentinel_master, password, 2,
                        r.socket_timeout_seconds, r.cluster_nodes)
        store = cls(main, Keys(r.key_prefix, cluster=bool(r.cluster_nodes)), cfg.events.stream_maxlen,
                    NodeSecrets(cfg.node_secret_key), lease, cfg.events.manager_stream_maxlen)
        store.leases.renewer = lambda: LeaseRenewer(sync_client(cfg), store.keys)
        return store

    async def close(self) -> None:
        for client in {id(self.redis): self.redis, id(self.leases.lease_redis): self.leases.lease_redis}.values():
            with contextlib.suppress(Exception):
                await client.aclose()

    async def ping(self) -> None:
        with redis_errors():
            await self.redis.ping()
