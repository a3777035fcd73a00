"""What every node operation needs: config, store, backend, an HTTP client, who we are."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx

from nodeops.address_cache import ConfirmedAddresses
from nodeops.admission import CreationQueue
from nodeops.circuit import Circuits
from shared.config import Config
from shared.engines.base import NodeBackend
from shared.models import Event, EventKind, NodeRecord, ReplicaInfo
from shared.store import Store

log = logging.getLogger(__name__)


@dataclass
class ImageState:
    """What this replica is doing about a missing node image (nodeops/images.py)."""

    pulling: bool = False
    pull_error: str = ""  # why the last pull failed ("" when none did)


@dataclass(kw_only=True)
class NodeOps:
    """The clients node operations run on; the checker builds one, a manager's Runtime is one."""

    cfg: Config
    store: Store
    backend: NodeBackend
    http: httpx.AsyncClient  # probes nodes and forwards to other replicas
    # for calls that must open a new connection (nodeops/forward.py): made on first use, closed by close_http
    fresh_http: httpx.AsyncClient | None = None
    replica: ReplicaInfo
    # node id -> the restart in progress, so concurrent callers share one restart
    restarting: dict[str, asyncio.Future[NodeRecord]] = field(default_factory=dict)
    isolation: dict[str, str] = field(default_factory=dict)  # what backend.prepare set up, for /ready
    image: ImageState = field(default_factory=ImageState)
    circuits: Circuits = field(default_factory=Circuits)  # by host address: fail fast while one is down
    addresses: ConfirmedAddresses = field(default_factory=ConfirmedAddresses)  # what the engine confirmed
    derived_cap: int | None = None  # nodeops.capacity's cap from the engine's memory, once known
    creations: CreationQueue | None = None  # made from cfg.creation on first use (nodeops/admission.py)
    # the host's egress agent's wait for a session's policy in the firewall (EgressAgent.in_force), where
    # this process runs one (egress.enforce)
    egress_in_force: Callable[[str], Awaitable[bool | None]] | None = None

    @property
    def manager_id(self) -> str:
        return self.cfg.manager_id

    @property
    def queue(self) -> CreationQueue:
        """The engine's creation queue (shared by every process of the manager_id, in Redis): clients'
        creations and the pool's refills take turns in it."""
        if self.creations is None:
            c = self.cfg.creation
            self.creations = CreationQueue(self.store, self.manager_id, c.concurrency, c.queue_size,
                                           lease_seconds=c.lease_seconds)
        return self.creations

    def one_connection_http(self) -> httpx.AsyncClient:
        """A client that keeps no connection alive: each call connects anew."""
        if self.fresh_http is None:
            self.fresh_http = httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0), trust_env=False,
                                                follow_redirects=False)
        return self.fresh_http

    async def close_http(self) -> None:
        """Close the clients made here (the one passed in as http is its maker's to close)."""
        if self.fresh_http is not None:
            await self.fresh_http.aclose()
            self.fresh_http = None

    async def egress_settled(self, rec: NodeRecord) -> None:
        """Before a session of this host is handed out (made, resumed) or its new policy is confirmed:
        wait until its egress policy is in the firewall, or its first call races the agent's sync (a
        connection refused, full run f1)."""
        if self.egress_in_force is None or rec.manager_id != self.manager_id:
            return
        if await self.egress_in_force(rec.id) is False:
            log.warning("egress_not_confirmed node_id=%s (handed out before its policy was seen in force)", rec.id[:12])

    def forget_address(self, node_id: str) -> None:
        """A node's address changed or it is gone: nothing is cached here; a manager's Runtime
        overrides this to drop its cached copy at once."""

    async def publish(self, kind: EventKind, rec: NodeRecord, detail: str = "") -> None:
        """Tell every replica and watcher what just happened to a session (by this replica)."""
        await self.store.publish(Event(type=kind, node_id=rec.id, manager_id=rec.manager_id,
                                       replica_id=self.replica.replica_id, detail=detail))
