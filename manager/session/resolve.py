"""From a node_id cookie to a live node and where its traffic goes: the one way the proxy,
the WebSocket proxy, the events socket and the session routes read a cookie."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from starlette.requests import Request

from manager.replica.runtime import Runtime
from nodeops import addresses, sessions
from nodeops.forward import TOKEN_HEADER, VIA_HEADER, owner_replicas
from shared import metrics
from shared.errors import (
    ContainerGone,
    InvalidNode,
    ManagerError,
    NodeNotFound,
    NoLiveManager,
    RedisUnavailable,
)
from shared.models import NODE_SECRET_HEADER, NodeRecord, NodeStatus

NODE_ID = re.compile(r"^[0-9a-f]{64}$")


def node_cookie(cookies: Mapping[str, str]) -> str | None:
    """The node_id cookie; one that is not a container id is cut short (it is echoed in errors)."""
    value = cookies.get("node_id")
    if value is None:
        return None
    return value if NODE_ID.match(value) else value[:80]


@dataclass
class Target:
    """Where a node's traffic goes: the node itself, or a replica of its owner."""

    scheme: str
    host: str
    port: int
    via_owner: bool
    headers: list[tuple[str, str]] = field(default_factory=list)  # to add to the forwarded request


class Resolver:
    """Cookie -> record (address cache first) -> a running node -> its target; one per app."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    async def record(self, node_id: str | None) -> NodeRecord:
        """The node's record: cache first, then Redis; 403 for no or unknown cookie."""
        # no Redis round trip for a cookie that cannot be a session id (every id is 64 hex digits:
        # a session's own, or a container's for records older than sessions) or one Redis has
        # just said it does not know
        cache = self.rt.cache
        if not node_id or not NODE_ID.match(node_id) or cache.is_unknown(node_id):
            raise InvalidNode(node_id)
        rec = cache.get(node_id)
        if rec is None:
            try:
                rec = await self.rt.store.get_node(node_id)
            except RedisUnavailable:
                # a session this replica served goes on through a Redis outage (a failover) on
                # its last record, as it would on a cached one (AddressCache._last says why)
                rec = cache.last_known(node_id)
                if rec is None:
                    raise
                return rec
            if rec is None or rec.status == NodeStatus.RELEASED:
                cache.put_unknown(node_id)
                raise InvalidNode(node_id)
            cache.put(rec)
        return rec

    async def live(self, node_id: str | None) -> NodeRecord:
        """The node's record once it runs (a stopped node is restarted when the config allows)."""
        rec = await self.record(node_id)
        return rec if rec.status == NodeStatus.RUNNING else await self.revive(rec)

    async def revive(self, rec: NodeRecord) -> NodeRecord:
        """The node did not answer or is not running: make it run (its owner decides how) or say why not."""
        self.rt.cache.invalidate(rec.id)
        if rec.manager_id != self.rt.manager_id and rec.host:
            self.rt.circuits.check(rec.host)  # its host is known to be down: say so now
        try:
            fresh = await sessions.ensure_running(self.rt, rec.id)
        except NodeNotFound:
            raise InvalidNode(rec.id) from None
        self.rt.cache.put(fresh)
        return fresh

    async def target(self, rec: NodeRecord, forwarded: bool) -> Target:
        """The node itself, or a replica of its owner when the node is not routable from here.

        A node's secret goes only to the address the engine confirms (nodeops/addresses.py),
        never one a Redis record alone names."""
        rt = self.rt
        if (rec.manager_id == rt.manager_id or not rt.cfg.cluster.proxy_through_owner.get(rec.manager_id)
                or forwarded):  # forwarded once already: never loop
            try:
                host, port = await addresses.confirmed(rt, rec)
            except ContainerGone:  # the record is stale: the session comes back, then it is checked again
                rec = await self.revive(rec)
                host, port = await addresses.confirmed(rt, rec)
            return Target("http", host, port, False, [(NODE_SECRET_HEADER, rt.store.secrets.of(rec))])
        replicas = await owner_replicas(rt, rec.manager_id)
        if not replicas:
            raise NoLiveManager(rec.manager_id)
        metrics.FORWARDED.labels("proxy").inc()
        url = urlsplit(replicas[0].url)
        return Target(url.scheme or "http", url.hostname or "127.0.0.1", url.port or 80, True,
                      [(TOKEN_HEADER, rt.cfg.internal_token), (VIA_HEADER, rt.replica.replica_id)])


async def bound_to_key(request: Request, rt: Runtime, node_id: str | None) -> None:
    """With API keys, a session made with another key is answered as an unknown one (NodeNotFound)."""
    keys = request.app.state.proxy.client_keys
    if keys and node_id:
        rec = await rt.store.get_node(node_id)
        if rec is not None:
            try:
                keys.check_bound(rec.client, request.scope, node_id)
            except ManagerError:
                raise NodeNotFound(node_id) from None
