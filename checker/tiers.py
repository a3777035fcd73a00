"""The checker's session tier actions: pause, stop, archive and expire idle sessions, remove
released ones, collect duplicate containers and orphaned workspaces. Each engine action is
taken by the lease holder and confirmed by one fenced write carrying its event; a session
about to lose its container is locked against a concurrent bring-back and looked at again first."""

from __future__ import annotations

import contextlib
import logging
import time

from checker.fence import Fence
from nodeops.context import NodeOps
from shared import metrics
from shared.errors import ContainerGone, ManagerError, SessionBusy
from shared.models import (
    EventKind,
    NodeRecord,
    NodeStatus,
    Tier,
    archived_fields,
    paused_fields,
    stopped_fields,
)
from shared.store import Op

log = logging.getLogger(__name__)


class Tiers:
    """What the lease holder does to idle, lost and released sessions, through its fence."""

    def __init__(self, ops: NodeOps, fence: Fence) -> None:
        self.ops = ops
        self.fence = fence
        self.cfg = ops.cfg
        self.store = ops.store
        self.backend = ops.backend
        self.mid = ops.manager_id

    async def still_idle(self, rec: NodeRecord, threshold: float | None) -> bool:
        """Whether the session is still idle past threshold now (activity flushed since the plan counts)."""
        if threshold is None:
            return False
        last = await self.store.last_activity(self.mid, rec.id)
        return last is None or time.time() - last >= threshold

    def _transition(self, tier: str, rec: NodeRecord) -> None:
        metrics.TIER_TRANSITIONS.labels(self.mid, tier).inc()
        metrics.CHECKER_ACTIONS.labels(self.mid, tier).inc()
        log.info("session_%s node_id=%s manager_id=%s", tier, rec.id[:12], self.mid)

    async def pause(self, rec: NodeRecord) -> None:
        """Freeze an idle session's node."""
        self.fence.check_held()
        if not await self.still_idle(rec, self.cfg.node.tiers.pause_after_seconds):
            return
        try:
            await self.backend.pause(rec.cid)
        except ManagerError as exc:  # stopped or gone meanwhile: the next pass sees it
            log.info("session_pause_skipped node_id=%s error=%s", rec.id[:12], exc.detail)
            return
        now = time.time()
        await self.fence.write([self.fence.update(rec.id, paused_fields(now), now),
                                *self.fence.event(EventKind.PAUSED, rec.id, "idle")])
        self._transition(Tier.PAUSED, rec)

    async def idle_stop(self, rec: NodeRecord) -> None:
        """Stop a node idle past node.idling_close_minutes (or unwatched past its bound)."""
        self.fence.check_held()
        n = self.cfg.node
        threshold = n.idling_close_minutes * 60 if n.idling_close_minutes is not None else None
        if threshold is not None and not await self.still_idle(rec, threshold) and \
                self.cfg.events.stop_after_unwatched_seconds is None:
            return  # work arrived since the plan was made
        with contextlib.suppress(ManagerError):
            await self.backend.stop(rec.cid, timeout=self.cfg.node.stop_timeout_seconds)
        now = time.time()
        await self.fence.write([self.fence.update(rec.id, stopped_fields(now, unhealthy=True), now),
                                *self.fence.event(EventKind.IDLE_STOPPED, rec.id)])
        metrics.CHECKER_ACTIONS.labels(self.mid, "idle_stop").inc()
        metrics.TIER_TRANSITIONS.labels(self.mid, "stopped").inc()
        log.info("node_idle_stopped node_id=%s manager_id=%s", rec.id[:12], self.mid)

    async def archive(self, rec: NodeRecord) -> None:
        """Remove an idle session's container; its workspace stays for the next call to come back on."""
        self.fence.check_held()
        try:
            async with self.fence.session_lock(rec.id):
                fresh = await self.store.get_node(rec.id)
                if fresh is None or fresh.cid != rec.cid \
                        or fresh.status in (NodeStatus.RELEASED, NodeStatus.RESTARTING) \
                        or not await self.still_idle(fresh, self.cfg.node.tiers.archive_after_seconds):
                    return
                if fresh.cid:
                    await self.backend.remove(fresh.cid)
                now = time.time()
                await self.fence.write([self.fence.update(rec.id, archived_fields(now), now),
                                        self.store.archived_op(self.mid, rec.id),
                                        *self.fence.event(EventKind.ARCHIVED, rec.id, "idle")])
                self.ops.forget_address(rec.id)  # under the lock: a bring-back's new address stays
                self._transition(Tier.ARCHIVED, rec)
        except SessionBusy:
            return  # being brought back right now: not idle

    async def expire(self, rec: NodeRecord) -> None:
        """Retention: the session, its container and its workspace are removed for good."""
        self.fence.check_held()
        try:
            async with self.fence.session_lock(rec.id):
                fresh = await self.store.get_node(rec.id)
                if fresh is None or not await self.still_idle(fresh, self.cfg.node.tiers.delete_after_seconds):
                    return
                if fresh.cid:
                    await self.backend.remove(fresh.cid)
                if fresh.workspace:
                    await self.backend.remove_workspace(fresh.workspace)
                await self.fence.write([*self.store.delete_ops(fresh), *self.fence.event(EventKind.EXPIRED, rec.id, "retention")])
                self.ops.forget_address(rec.id)
                self._transition("deleted", rec)
        except SessionBusy:
            return

    def lost(self, recs: list[NodeRecord]) -> list[Op]:
        """Fenced writes for sessions whose container vanished behind our back: archived, not lost."""
        now = time.time()
        ops: list[Op] = []
        for rec in recs:
            ops += [self.fence.update(rec.id, archived_fields(now), now), self.store.archived_op(self.mid, rec.id),
                    *self.fence.event(EventKind.ARCHIVED, rec.id, "container gone")]
            self.ops.forget_address(rec.id)
            self._transition(Tier.ARCHIVED, rec)
        return ops

    async def remove(self, rec: NodeRecord, why: str) -> None:
        """Remove a session for good (released, stuck in creation, too old in the pool ...)."""
        self.fence.check_held()
        if rec.cid:
            await self.backend.remove(rec.cid)
        if rec.workspace:
            await self.backend.remove_workspace(rec.workspace)
        await self.fence.write([*self.store.delete_ops(rec), *self.fence.event(EventKind.RELEASED, rec.id, why)])
        metrics.CHECKER_ACTIONS.labels(self.mid, "remove").inc()
        log.info("node_removed node_id=%s manager_id=%s reason=%s", rec.id[:12], self.mid, why.replace(" ", "_"))

    async def remove_duplicate(self, cid: str) -> None:
        """Remove a second container of one session."""
        self.fence.check_held()
        with contextlib.suppress(ContainerGone):
            await self.backend.remove(cid)
        metrics.CHECKER_ACTIONS.labels(self.mid, "remove_duplicate").inc()
        log.info("duplicate_container_removed container=%s manager_id=%s", cid[:12], self.mid)

    async def remove_orphan_workspace(self, name: str) -> None:
        """Remove a workspace no session has had for its grace period."""
        self.fence.check_held()
        await self.backend.remove_workspace(name)
        metrics.CHECKER_ACTIONS.labels(self.mid, "remove_orphan_workspace").inc()
        log.info("orphan_workspace_removed name=%s manager_id=%s", name, self.mid)
