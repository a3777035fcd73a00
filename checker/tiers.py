"""The checker's session tier actions: pause, archive and expire idle sessions, collect
duplicate containers and orphaned workspaces. Each engine action is taken by the lease
holder and confirmed by one fenced write carrying its event; a session about to lose its
container is locked against a concurrent bring-back and looked at again first."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING

from shared import metrics
from shared.errors import ContainerGone, ManagerError
from shared.models import Event, NodeRecord, NodeStatus, Tier
from shared.store import Op

if TYPE_CHECKING:
    from checker.service import Checker

log = logging.getLogger(__name__)


def archived_fields(now: float) -> dict[str, object]:
    """A record's fields once its container is gone and its workspace kept."""
    return {"status": NodeStatus.ARCHIVED, "container_id": "", "host": "", "port": 0, "ready_at": 0,
            "paused_at": 0, "archived_at": f"{now:.3f}"}


class TierActions:
    """Mixed into the Checker: what it does to idle sessions."""

    async def _still_idle(self: "Checker", rec: NodeRecord, threshold: float | None) -> bool:
        """Whether the session is still idle past threshold now (activity flushed since the plan counts)."""
        if threshold is None:
            return False
        last = await self.store.last_activity(self.mid, rec.id)
        return last is None or time.time() - last >= threshold

    def _transition(self: "Checker", tier: str, rec: NodeRecord) -> None:
        metrics.TIER_TRANSITIONS.labels(self.mid, tier).inc()
        metrics.CHECKER_ACTIONS.labels(self.mid, tier).inc()
        log.info("session_%s node_id=%s manager_id=%s", tier, rec.id[:12], self.mid)

    def _event(self: "Checker", kind: str, node_id: str, detail: str = "") -> Op:
        return self.store.event_op(Event(type=kind, node_id=node_id, manager_id=self.mid,
                                         replica_id=self.lease.holder, detail=detail))

    async def _act_pause(self: "Checker", rec: NodeRecord) -> None:
        self._check_held()
        if not await self._still_idle(rec, self.cfg.node.tiers.pause_after_seconds):
            return
        try:
            await self.backend.pause(rec.cid)
        except ManagerError as exc:  # stopped or gone meanwhile: the next pass sees it
            log.info("session_pause_skipped node_id=%s error=%s", rec.id[:12], exc.detail)
            return
        now = time.time()
        await self._fenced([self.store.update_op(rec.id, {"status": NodeStatus.PAUSED, "paused_at": f"{now:.3f}"},
                                                 now), self._event("paused", rec.id, "idle")])
        self._transition(Tier.PAUSED, rec)

    async def _with_session_lock(self: "Checker", rec: NodeRecord) -> str | None:
        holder = f"{self.lease.holder}:checker:{self.lease.token}"
        ttl = int((self.cfg.node.creation_wait_seconds + 10) * 1000)
        return holder if await self.store.lock_session(rec.id, holder, ttl) else None

    async def _act_archive(self: "Checker", rec: NodeRecord) -> None:
        """Remove an idle session's container; its workspace stays for the next call to come back on."""
        self._check_held()
        holder = await self._with_session_lock(rec)
        if holder is None:
            return  # being brought back right now: not idle
        try:
            fresh = await self.store.get_node(rec.id)
            if fresh is None or fresh.cid != rec.cid or fresh.status in (NodeStatus.RELEASED, NodeStatus.RESTARTING) \
                    or not await self._still_idle(fresh, self.cfg.node.tiers.archive_after_seconds):
                return
            if fresh.cid:
                await self.backend.remove(fresh.cid)
            now = time.time()
            await self._fenced([self.store.update_op(rec.id, archived_fields(now), now),
                                self.store.archived_op(self.mid, rec.id), self._event("archived", rec.id, "idle")])
            self.ops.forget_address(rec.id)
            self._transition(Tier.ARCHIVED, rec)
        finally:
            with contextlib.suppress(ManagerError):
                await self.store.unlock_session(rec.id, holder)

    async def _act_expire(self: "Checker", rec: NodeRecord) -> None:
        """Retention: the session, its container and its workspace are removed for good."""
        self._check_held()
        holder = await self._with_session_lock(rec)
        if holder is None:
            return
        try:
            fresh = await self.store.get_node(rec.id)
            if fresh is None or not await self._still_idle(fresh, self.cfg.node.tiers.delete_after_seconds):
                return
            if fresh.cid:
                await self.backend.remove(fresh.cid)
            if fresh.workspace:
                await self.backend.remove_workspace(fresh.workspace)
            await self._fenced(self.store.delete_ops(fresh) + [self._event("expired", rec.id, "retention")])
            self.ops.forget_address(rec.id)
            self._transition("deleted", rec)
        finally:
            with contextlib.suppress(ManagerError):
                await self.store.unlock_session(rec.id, holder)

    async def _act_lost(self: "Checker", recs: list[NodeRecord]) -> list[Op]:
        """Fenced writes for sessions whose container vanished behind our back: archived, not lost."""
        now = time.time()
        ops: list[Op] = []
        for rec in recs:
            ops += [self.store.update_op(rec.id, archived_fields(now), now), self.store.archived_op(self.mid, rec.id),
                    self._event("archived", rec.id, "container gone")]
            self.ops.forget_address(rec.id)
            self._transition(Tier.ARCHIVED, rec)
        return ops

    async def _remove_duplicate(self: "Checker", cid: str) -> None:
        self._check_held()
        with contextlib.suppress(ContainerGone):
            await self.backend.remove(cid)
        metrics.CHECKER_ACTIONS.labels(self.mid, "remove_duplicate").inc()
        log.info("duplicate_container_removed container=%s manager_id=%s", cid[:12], self.mid)

    async def _remove_orphan_workspace(self: "Checker", name: str) -> None:
        self._check_held()
        await self.backend.remove_workspace(name)
        metrics.CHECKER_ACTIONS.labels(self.mid, "remove_orphan_workspace").inc()
        log.info("orphan_workspace_removed name=%s manager_id=%s", name, self.mid)
