"""One reconcile pass as a pure function: desired state from Redis, actual from the
engine, and the list of actions that brings them together (as JupyterHub's
check_routes does for its proxy). No I/O here, so it is unit-tested directly."""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.backend import NodeInfo
from shared.keys import is_reservation, reservation_time
from shared.models import NodeRecord, NodeStatus, Role


@dataclass(frozen=True)
class Limits:
    idle_seconds: float
    idle_grace_seconds: float
    exited_gc_seconds: float
    stuck_creation_seconds: float
    claim_timeout_seconds: float = 30.0
    pool_max_age_seconds: float = 3600.0
    adopt_after_seconds: float = 5.0  # containers younger than this are not adopted
    unwatched_seconds: float | None = None  # stop a node this long after its last event watcher left


@dataclass
class Plan:
    """What one pass will do; each list holds node ids or records."""

    updates: dict[str, dict[str, str]] = field(default_factory=dict)  # node_id -> changed fields
    health_events: list[tuple[str, str]] = field(default_factory=list)  # (node_id, new health)
    forget: list[NodeRecord] = field(default_factory=list)  # record without container: delete record
    remove: list[tuple[NodeRecord, str]] = field(default_factory=list)  # remove container + record, why
    remove_orphans: list[str] = field(default_factory=list)  # containers without record never started
    adopt: list[NodeRecord] = field(default_factory=list)  # containers without record: recreate record
    idle_stop: list[NodeRecord] = field(default_factory=list)
    stale_reservations: list[str] = field(default_factory=list)


def plan(manager_id: str, members: list[str], records: list[NodeRecord], containers: list[NodeInfo],
         idle: set[str], now: float, limits: Limits,
         watchers_left: dict[str, float] | None = None) -> Plan:
    """Compare records (read first) with the engine's containers (listed after) and decide.

    idle: ids whose last request is older than limits.idle_seconds (one range query on the
    last-request sorted set). watchers_left: node id -> when its last event watcher left.
    """
    p = Plan()
    by_id = {c.id: c for c in containers}
    recorded = {r.id for r in records}
    for m in members:
        if is_reservation(m) and now - reservation_time(m) > limits.stuck_creation_seconds:
            p.stale_reservations.append(m)
    for rec in records:
        c = by_id.get(rec.id)
        if c is None:
            p.forget.append(rec)
            continue
        status = c.status
        if rec.status == NodeStatus.RELEASED:
            p.remove.append((rec, "released"))
            continue
        if rec.status == NodeStatus.CREATING and now - rec.created_at > limits.stuck_creation_seconds:
            p.remove.append((rec, "stuck in creation"))
            continue
        if rec.role == Role.CLAIMING and now - rec.claimed_at > limits.claim_timeout_seconds:
            p.remove.append((rec, "claimed from the pool but never delivered"))
            continue
        if rec.role == Role.POOLED and now - rec.created_at > limits.pool_max_age_seconds:
            p.remove.append((rec, "pooled node past its maximum age"))
            continue
        changed: dict[str, str] = {}
        # a record mid-transition (creating, restarting) is the creating flow's to finish; a creation
        # seen between the engine's create and start ("created") must stay "creating", or the
        # stuck-creation rule below could never remove it when its replica dies
        if status != rec.status and rec.status != NodeStatus.CREATING and not (
                rec.status == NodeStatus.RESTARTING and status == NodeStatus.RUNNING):
            changed["status"] = status
            if status == NodeStatus.EXITED:
                changed["stopped_at"] = f"{now:.3f}"
                changed["ready_at"] = "0"
        if c.health != "none" and c.health != rec.health:
            changed["health"] = c.health
            p.health_events.append((rec.id, c.health))
        if c.port and c.port != rec.port:
            changed["port"] = str(c.port)
        if c.port and c.host and c.host != rec.host:  # an address on the node network may change at a restart
            changed["host"] = c.host
        if changed:
            p.updates[rec.id] = changed
        effective = changed.get("status", rec.status)
        if effective == NodeStatus.EXITED:
            stopped = rec.stopped_at or now
            if now - stopped > limits.exited_gc_seconds:
                p.remove.append((rec, "exited too long"))
            continue
        if effective == NodeStatus.RUNNING and rec.role == Role.NODE and rec.ready_at:
            unwatched = limits.unwatched_seconds is not None and rec.id in (watchers_left or {}) and \
                now - (watchers_left or {})[rec.id] > limits.unwatched_seconds
            if (rec.id in idle or unwatched) and now - rec.ready_at > limits.idle_grace_seconds:
                p.idle_stop.append(rec)
    for c in containers:
        if c.id in recorded or c.role == Role.TEST:
            continue
        if c.status == NodeStatus.CREATED:
            if now - c.created > limits.stuck_creation_seconds:
                p.remove_orphans.append(c.id)  # a replica died between create and record
            continue
        if c.status in (NodeStatus.REMOVING, NodeStatus.DEAD) or now - c.created < limits.adopt_after_seconds:
            continue  # a young container may be a creation whose record is being written
        status = c.status
        p.adopt.append(NodeRecord(
            id=c.id, short_id=c.id[:12], manager_id=manager_id, status=status,
            health=c.health if c.health != "none" else "unknown", host=c.host, port=c.port,
            created_at=c.created, ready_at=now if status == NodeStatus.RUNNING else 0.0, updated_at=now,
            last_request_at=now, stopped_at=now if status == NodeStatus.EXITED else 0.0,
            replica_id=c.replica_id, role=Role.NODE if c.role == Role.CLAIMING else c.role,
            client=c.client, image=c.image))
    return p
