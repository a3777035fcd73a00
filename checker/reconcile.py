"""One reconcile pass as a pure function: desired state from Redis, actual from the
engine, and the list of actions that brings them together (as JupyterHub's
check_routes does for its proxy). No I/O here, so it is unit-tested directly.

A record is a session (its id is the cookie); the engine's containers and workspaces say
which session they serve by label, so a session whose container was replaced, removed or
lost is still matched to what is left of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from shared.engines.base import NodeInfo, WorkspaceInfo
from shared.keys import is_reservation, reservation_replica, reservation_time
from shared.models import NodeRecord, NodeStatus, Role


@dataclass(frozen=True)
class Limits:
    idle_seconds: float | None  # stop (XAgent's idling_close_minutes); None: never
    idle_grace_seconds: float
    exited_gc_seconds: float  # stopped nodes without a workspace of their own are removed after it
    stuck_creation_seconds: float
    claim_timeout_seconds: float = 30.0
    pool_max_age_seconds: float = 3600.0
    adopt_after_seconds: float = 5.0  # containers and workspaces younger than this are not adopted
    unwatched_seconds: float | None = None  # stop a node this long after its last event watcher left
    pause_seconds: float | None = None
    archive_seconds: float | None = None
    delete_seconds: float | None = None  # retention of idle sessions, archived or not
    orphan_workspace_grace_seconds: float = 600.0

    def smallest_idle(self) -> float | None:
        """The shortest idle threshold in force (what the idle range query must cover)."""
        on = [t for t in (self.pause_seconds, self.idle_seconds, self.archive_seconds, self.delete_seconds)
              if t is not None]
        return min(on) if on else None


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
    pause: list[NodeRecord] = field(default_factory=list)
    archive: list[NodeRecord] = field(default_factory=list)  # idle: remove the container, keep the workspace
    lost: list[NodeRecord] = field(default_factory=list)  # container gone behind our back: now archived
    expire: list[NodeRecord] = field(default_factory=list)  # past retention: remove everything
    duplicates: list[str] = field(default_factory=list)  # a second container of one session
    restore: list[NodeRecord] = field(default_factory=list)  # workspaces without record: archived sessions
    orphan_workspaces: list[str] = field(default_factory=list)  # workspaces of no session, past the grace
    orphans_seen: dict[str, float] = field(default_factory=dict)  # workspace -> first seen without a session
    young_workspaces: int = 0  # without a record but too young to judge: a rebuild looks again


def plan(manager_id: str, members: list[str], records: list[NodeRecord], containers: list[NodeInfo],
         idle: Mapping[str, float], now: float, limits: Limits,
         watchers_left: dict[str, float] | None = None, live_replicas: set[str] | None = None,
         workspaces: list[WorkspaceInfo] | None = None, rebuild: bool = False,
         orphans_seen: Mapping[str, float] | None = None) -> Plan:
    """Compare records (read first) with the engine's containers and workspaces (listed after).

    idle: node id -> last activity, for nodes idle past the smallest threshold (one range query).
    watchers_left: node id -> when its last event watcher left. live_replicas: ids of replicas
    whose heartbeat has not expired (None: unknown, nobody is judged dead). workspaces: None when
    not listed this pass. rebuild: the first pass of a new lease holder, which takes workspaces
    without a record for archived sessions whose record was lost; later passes collect them.
    """
    p = Plan()
    by_cid = {c.id: c for c in containers}
    by_session: dict[str, list[NodeInfo]] = {}
    for info in containers:
        by_session.setdefault(info.session, []).append(info)
    recorded = {r.id for r in records}
    used: set[str] = set()

    def dead(replica_id: str) -> bool:
        return live_replicas is not None and bool(replica_id) and replica_id not in live_replicas

    for m in members:
        if is_reservation(m) and (now - reservation_time(m) > limits.stuck_creation_seconds
                                  or dead(reservation_replica(m))):
            p.stale_reservations.append(m)
    for rec in records:
        c: NodeInfo | None = by_cid.get(rec.container_id) if rec.container_id else None
        mine = by_session.get(rec.id, [])
        if c is None and mine:
            c = next((x for x in mine if x.status == NodeStatus.RUNNING), mine[0])
        for x in mine:
            used.add(x.id)
            if x is not c and now - x.created > limits.adopt_after_seconds:
                p.duplicates.append(x.id)
        if c is not None:
            used.add(c.id)
        if rec.status == NodeStatus.RELEASED:
            if now - rec.updated_at > limits.adopt_after_seconds:  # else its release is still under way
                p.remove.append((rec, "released"))
            continue
        if rec.status == NodeStatus.CREATING:
            if dead(rec.replica_id):
                p.remove.append((rec, "its creating replica died"))
            elif now - rec.created_at > limits.stuck_creation_seconds:
                p.remove.append((rec, "stuck in creation"))
            continue  # otherwise the creating flow's to finish, container or not
        if rec.role == Role.CLAIMING and (now - rec.claimed_at > limits.claim_timeout_seconds
                                          or dead(rec.claimed_by)):
            p.remove.append((rec, "claimed from the pool but never delivered"))
            continue
        # a pooled node's age runs from when it answered: a slow creation must not eat its time in the pool
        if rec.role == Role.POOLED and now - (rec.ready_at or rec.created_at) > limits.pool_max_age_seconds:
            p.remove.append((rec, "pooled node past its maximum age"))
            continue
        last = idle.get(rec.id)
        idle_for = now - last if last is not None else 0.0
        if c is None:
            if rec.status == NodeStatus.ARCHIVED:
                if limits.delete_seconds is not None and idle_for >= limits.delete_seconds:
                    p.expire.append(rec)
            elif rec.workspace and rec.role == Role.NODE:
                p.lost.append(rec)
            elif rec.workspace:
                p.remove.append((rec, "pooled node's container gone"))
            else:
                p.forget.append(rec)
            continue
        status = c.status
        changed: dict[str, str] = {}
        if c.id != rec.cid:
            changed["container_id"] = c.id
        # a record mid-transition (restarting) is the resuming flow's to finish
        if status != rec.status and not (rec.status == NodeStatus.RESTARTING and status == NodeStatus.RUNNING):
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
        # pooled nodes, and sessions whose workspace dies with their container, are not archived
        if (rec.role != Role.NODE or not rec.workspace) and effective == NodeStatus.EXITED:
            stopped = rec.stopped_at or now
            if now - stopped > limits.exited_gc_seconds:
                p.remove.append((rec, "exited too long"))
            continue
        if rec.role != Role.NODE:
            continue
        if limits.delete_seconds is not None and idle_for >= limits.delete_seconds:
            p.expire.append(rec)
        elif rec.workspace and limits.archive_seconds is not None and idle_for >= limits.archive_seconds \
                and effective in (NodeStatus.RUNNING, NodeStatus.PAUSED, NodeStatus.EXITED, NodeStatus.CREATED):
            p.archive.append(rec)
        elif effective in (NodeStatus.RUNNING, NodeStatus.PAUSED) and rec.ready_at \
                and now - rec.ready_at > limits.idle_grace_seconds:
            unwatched = limits.unwatched_seconds is not None and rec.id in (watchers_left or {}) and \
                now - (watchers_left or {})[rec.id] > limits.unwatched_seconds
            if (limits.idle_seconds is not None and idle_for >= limits.idle_seconds) or unwatched:
                p.idle_stop.append(rec)
            elif effective == NodeStatus.RUNNING and limits.pause_seconds is not None \
                    and idle_for >= limits.pause_seconds:
                p.pause.append(rec)
    adopted: set[str] = set()
    for c in containers:
        if c.id in used or c.session in recorded or c.role == Role.TEST:
            continue
        if c.status == NodeStatus.CREATED:
            if now - c.created > limits.stuck_creation_seconds or dead(c.replica_id):
                p.remove_orphans.append(c.id)  # a replica died between create and record
            continue
        if c.status in (NodeStatus.REMOVING, NodeStatus.DEAD) or now - c.created < limits.adopt_after_seconds:
            continue  # a young container may be a creation whose record is being written
        if c.session in adopted:
            p.duplicates.append(c.id)
            continue
        adopted.add(c.session)
        status = c.status
        p.adopt.append(NodeRecord(
            id=c.session, short_id=c.session[:12], manager_id=manager_id, status=status,
            health=c.health if c.health != "none" else "unknown", host=c.host, port=c.port,
            created_at=c.created, ready_at=now if status in (NodeStatus.RUNNING, NodeStatus.PAUSED) else 0.0,
            updated_at=now, last_request_at=now, stopped_at=now if status == NodeStatus.EXITED else 0.0,
            replica_id=c.replica_id, role=Role.NODE if c.role == Role.CLAIMING else c.role,
            client=c.client, image=c.image, container_id=c.id if c.session_id else "", workspace=c.workspace))
    if workspaces is not None:
        seen = dict(orphans_seen or {})
        for w in workspaces:
            if not w.session_id or w.session_id in recorded or w.session_id in by_session:
                seen.pop(w.name, None)
                continue
            if now - w.created < limits.adopt_after_seconds:  # may be a creation whose record is on the way
                p.young_workspaces += 1
                continue
            if rebuild and w.role in (Role.NODE, Role.CLAIMING):
                p.restore.append(NodeRecord(
                    id=w.session_id, short_id=w.session_id[:12], manager_id=manager_id, status=NodeStatus.ARCHIVED,
                    created_at=w.created, updated_at=now, last_request_at=now, archived_at=now, ready_at=0.0,
                    replica_id=w.replica_id, role=Role.NODE, client=w.client, workspace=w.name))
                seen.pop(w.name, None)
                continue
            first = seen.setdefault(w.name, now)
            if now - first >= limits.orphan_workspace_grace_seconds:
                p.orphan_workspaces.append(w.name)
                seen.pop(w.name, None)
        p.orphans_seen = seen
    else:
        p.orphans_seen = dict(orphans_seen or {})
    return p
