"""Typed records exchanged through Redis and the HTTP API.

Records read from Redis ignore unknown fields, so old and new replicas read each
other's during a rolling upgrade.
"""

from __future__ import annotations

import enum
import hashlib
import time
from typing import Any

import msgspec

# how a session's client is kept (manager/edge/client_auth.py): hashes and addresses, never a key
CLIENT_KINDS = ("key:", "hdr:", "addr:")
NODE_SECRET_HEADER = "x-node-secret"  # carries a node's secret (shared/nodesecret.py) from the manager to it


class NodeStatus(enum.StrEnum):
    """A node's state: the engine's view (created ... dead), the record's own three and one of views only."""

    CREATING = "creating"  # record only: created by a replica, not yet answering
    RUNNING = "running"
    EXITED = "exited"
    RESTARTING = "restarting"
    PAUSED = "paused"
    DEAD = "dead"
    RELEASED = "released"  # record only: release requested, the container is being removed
    CREATED = "created"  # created, never started
    REMOVING = "removing"
    UNREACHABLE = "unreachable"  # views only: the owner's host is lost (no replica live for a grace period)
    ARCHIVED = "archived"  # record only: the container was removed, the session's workspace is kept


class Tier(enum.StrEnum):
    """Where an idle session sits, cheapest to resume first (see nodeops/resume.py)."""

    RUNNING = "running"
    PAUSED = "paused"  # frozen: memory kept, no CPU
    STOPPED = "stopped"  # memory freed, container kept
    ARCHIVED = "archived"  # container removed, workspace kept


def tier_of(status: str) -> str:
    """The tier a record's status puts its session in ("" while it is made or removed)."""
    if status in (NodeStatus.RUNNING, NodeStatus.RESTARTING):
        return Tier.RUNNING
    if status == NodeStatus.PAUSED:
        return Tier.PAUSED
    if status in (NodeStatus.EXITED, NodeStatus.CREATED, NodeStatus.DEAD):
        return Tier.STOPPED
    if status == NodeStatus.ARCHIVED:
        return Tier.ARCHIVED
    return ""


class Role(enum.StrEnum):
    NODE = "node"  # a client's session
    POOLED = "pooled"  # ready in the warm pool
    CLAIMING = "claiming"  # taken from the pool, cookie not yet delivered
    TEST = "test"  # made by tests; removed when a checker takes the lease


class NodeRecord(msgspec.Struct, kw_only=True):
    """One session as stored in its Redis hash, one field per attribute.

    ``id`` is the session id (the ``node_id`` cookie); the container that serves it is
    ``container_id`` and may be replaced. Records written before sessions had ids of their own
    have no ``container_id``: their id is the container's (see ``cid``).
    """

    id: str
    short_id: str = ""
    manager_id: str
    status: str = NodeStatus.CREATING
    health: str = "unknown"
    host: str = ""
    port: int = 0
    created_at: float = 0.0
    ready_at: float = 0.0  # 0 until the creating flow saw the node answer
    updated_at: float = 0.0
    last_request_at: float = 0.0
    stopped_at: float = 0.0  # when it was last seen exited (for GC)
    claimed_at: float = 0.0  # when a replica claimed it from the pool
    replica_id: str = ""  # the replica that created it
    role: str = Role.NODE
    client: str = ""  # client identity for per-client quotas
    image: str = ""
    # the node's secret in clear: only in records made without cluster.node_secret_key or before
    # it was set; with the key it is "" and derived from the id (shared/nodesecret.py). The
    # container's own config has it too, so the checker rebuilds it when Redis lost the record.
    # Never shown: see public()
    secret: str = ""
    container_id: str = ""  # "" in records older than session ids: the container's id is ``id``
    workspace: str = ""  # the session's own volume; "" when the workspace dies with the container
    paused_at: float = 0.0
    archived_at: float = 0.0
    claimed_by: str = ""  # the replica that claimed it from the pool
    # the session's egress policy as JSON (shared/egress/policy.py); "": egress.default
    egress: str = ""

    @property
    def address(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def cid(self) -> str:
        """The id of the container serving this session ("" when archived)."""
        if self.status == NodeStatus.ARCHIVED:
            return self.container_id
        return self.container_id or self.id

    @property
    def tier(self) -> str:
        return tier_of(self.status)

    @classmethod
    def numeric_fields(cls) -> list[str]:
        """Fields stored as text in Redis that decode to numbers."""
        return [f.name for f in msgspec.structs.fields(cls) if f.type in (int, float)]

    def public(self) -> dict[str, Any]:
        """The record as shown to API clients: everything but the secret."""
        out = msgspec.structs.asdict(self)
        del out["secret"]
        # records older than session ids have the container's id as their own
        out["container_id"] = self.container_id or ("" if self.workspace else self.cid)
        out["tier"] = self.tier
        out["egress"] = msgspec.json.decode(self.egress) if self.egress else None
        if self.client and not self.client.startswith(CLIENT_KINDS):  # a raw value of older replicas: a key
            out["client"] = "hash:" + hashlib.sha256(self.client.encode()).hexdigest()[:16]
        return out

    def to_hash(self) -> dict[str, str]:
        return {k: str(v) for k, v in msgspec.structs.asdict(self).items()}

    @classmethod
    def from_hash(cls, data: dict[Any, Any]) -> NodeRecord:
        clean = {_s(k): _s(v) for k, v in data.items()}
        clean = {k: v for k, v in clean.items() if k in cls.__struct_fields__}
        return msgspec.convert(clean, cls, strict=False)


# --- record transitions: the fields each tier change writes, for every writer (nodeops and the
# checker). Times are the caller's (the checker's fenced writes stamp them as text itself). A
# session that is gone has no fields: its record is deleted (Store.delete_node / delete_ops).


def running_fields(host: str | None = None, port: int | None = None) -> dict[str, Any]:
    """A record whose node runs again (thawed, restarted or given a new container)."""
    fields: dict[str, Any] = {"status": NodeStatus.RUNNING, "paused_at": 0}
    if host is not None:
        fields.update(host=host, port=port)
    return fields


def restarting_fields() -> dict[str, Any]:
    """A record whose node is being (re)started: not ready until it answers again."""
    return {"status": NodeStatus.RESTARTING, "ready_at": 0}


def paused_fields(now: float) -> dict[str, Any]:
    """A record whose node is frozen (memory kept, no CPU)."""
    return {"status": NodeStatus.PAUSED, "paused_at": now}


def stopped_fields(now: float, *, unhealthy: bool = False) -> dict[str, Any]:
    """A record whose node is stopped (memory freed, container kept); unhealthy: stopped as idle."""
    fields: dict[str, Any] = {"status": NodeStatus.EXITED, "ready_at": 0, "paused_at": 0, "stopped_at": now}
    if unhealthy:
        fields["health"] = "unhealthy"
    return fields


def archived_fields(now: float) -> dict[str, Any]:
    """A record whose container is gone and whose workspace is kept."""
    return {"status": NodeStatus.ARCHIVED, "container_id": "", "host": "", "port": 0, "ready_at": 0,
            "paused_at": 0, "archived_at": now}


class IntentOp(enum.StrEnum):
    STOP = "stop"  # close_session
    RELEASE = "release"  # release_session


class Intent(msgspec.Struct, kw_only=True):
    """A lifecycle call accepted for a node whose owner had no reachable replica (durable until done)."""

    op: str
    at: float
    by: str = ""  # the replica that accepted it


class ReplicaInfo(msgspec.Struct, kw_only=True):
    replica_id: str
    manager_id: str
    url: str
    version: str
    started_at: float
    heartbeat_at: float = 0.0
    draining: bool = False
    node_cap: int = -1  # its manager_id's cap on live nodes (0: none; -1: not known yet), for placement

    @classmethod
    def from_hash(cls, data: dict[Any, Any]) -> ReplicaInfo:
        clean: dict[str, Any] = {_s(k): _s(v) for k, v in data.items() if _s(k) in cls.__struct_fields__}
        clean["draining"] = clean.get("draining") in ("1", "True", "true")
        return msgspec.convert(clean, cls, strict=False)


class LeaseInfo(msgspec.Struct, kw_only=True):
    manager_id: str
    holder: str | None
    token: int | None
    since: float | None
    expires_in_ms: int | None


class EventKind(enum.StrEnum):
    """What happened to a node, as an Event's type (watchers and the client's models read these)."""

    CREATED = "created"
    READY = "ready"
    STOPPED = "stopped"
    RESTARTED = "restarted"
    RELEASED = "released"
    IDLE_STOPPED = "idle_stopped"
    HEALTH = "health"  # detail: the engine's health state
    ADOPTED = "adopted"
    REMOVED = "removed"
    PAUSED = "paused"
    ARCHIVED = "archived"
    EXPIRED = "expired"  # retention
    RESUMED = "resumed"  # detail: the tier it left
    EGRESS_POLICY = "egress_policy"  # detail: who changed it (client or admin) and the new policy
    EGRESS_REFUSED = "egress_refused"  # detail: where (dns, proxy), destination, rule; rate-limited per session
    EGRESS_SECRET = "egress_secret"  # detail: set (by an admin), used or unbound (name, host); never a value
    FORKED = "forked"  # a new session copied from another; detail: the source's id
    SNAPSHOTTED = "snapshotted"  # the session's workspace saved; detail: the snapshot's name


class Snapshot(msgspec.Struct, kw_only=True):
    """A session's workspace saved by name: new sessions start from it (its bytes stay on the host
    of manager_id, as the backend's seed)."""

    name: str
    manager_id: str  # whose host keeps the bytes
    seed: str  # the backend's name for the bytes
    source: str  # the session it was taken of
    client: str = ""  # who made it: the only client that may use, list or delete it (admins aside)
    bytes: int = 0  # what it takes on the host's disk (sparse)
    created_at: float = 0.0


class Event(msgspec.Struct, kw_only=True):
    """A node lifecycle event, as pushed to watchers."""

    id: str = ""  # the stream entry id, for resuming
    type: str  # an EventKind (kept a str: events of newer replicas still decode)
    node_id: str
    manager_id: str
    at: float = msgspec.field(default_factory=time.time)
    replica_id: str = ""
    detail: str = ""


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
