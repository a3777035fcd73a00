"""The checker: contends for its manager_id's lease and, while it holds it, reconciles
the engine with Redis, stops idle nodes, collects garbage and keeps the warm pool.

Runs inside every manager (only the lease holder acts) or alone (checker.main).
Renewal and the reconcile cycle are separate tasks, so a slow engine call cannot
make the holder miss a renewal; every write of a cycle is fenced by the token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time

from checker import intents, reconcile
from checker.fence import Fence, LeaseLost
from checker.lease import Lease
from checker.tiers import Tiers
from checker.upkeep import Upkeep
from nodeops import capacity, demand, lost, pool, snapshots
from nodeops.context import NodeOps
from shared import metrics
from shared.errors import EngineUnavailable, ManagerError, RedisUnavailable
from shared.keys import is_reservation
from shared.models import EventKind, NodeRecord, NodeStatus, ReplicaInfo, Role, stopped_fields
from shared.store import Op

log = logging.getLogger(__name__)


STORAGE_GC_CYCLES = 30  # one volume listing every 30 passes is enough for leftovers
# an engine event brings a pass at once and one more this long after the last event: the engine
# reports some changes before its listing shows them (dockerd 20.10 sends a kill's "die" while the
# container still lists as running)
EVENT_SETTLE_SECONDS = 1.0


class Checker:
    """One manager_id's checker: the lease loop and the reconcile pass; its actions go through
    its fence (checker/fence.py) and its tier actions (checker/tiers.py)."""

    def __init__(self, ops: NodeOps) -> None:
        self.ops = ops
        self.cfg = cfg = ops.cfg
        self.store = ops.store
        self.backend = ops.backend
        self.mid = cfg.manager_id
        self.lease = Lease(ops.store, cfg.manager_id, ops.replica.replica_id, cfg.checker.lease_ttl_seconds)
        self.fence = Fence(ops.store, self.lease, cfg.manager_id, cfg.node.creation_wait_seconds + 10)
        self.tiers = Tiers(ops, self.fence)
        self.upkeep = Upkeep(ops.store, cfg)
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self._recheck_at: float | None = None  # the pass due after the engine's last event (monotonic)
        self._was_leader = False
        self._alive_at = time.monotonic()  # the lease loop's last turn: the keeper renews while it is recent
        self._filling = False
        self.demand = demand.ArrivalRate(cfg.pool.demand_half_life_seconds)  # creations/s of this manager_id
        self.burst = demand.BurstPeak(cfg.pool.burst_memory_seconds)  # its largest recent burst
        self._fill_task: asyncio.Task[None] | None = None  # held so the loop does not collect it mid-run
        self.cycles = 0
        self._cache: dict[str, tuple[NodeRecord, str]] = {}  # node id -> (record, its updated_at)
        self._rebuild = True  # the first pass of a lease holder takes ownerless workspaces for sessions
        self._orphans: dict[str, float] = {}  # workspace -> when first seen without a session
        self._seen_live: dict[str, float] = {}  # replica id -> when this lease holder last saw it registered
        self._judging_since = 0.0  # when this process took the lease (monotonic)

    # --- leadership -------------------------------------------------------------
    async def run(self) -> None:
        """Contend for the lease until stopped; act only while holding it."""
        # staggered start: replicas booted together do not stampede the lease
        await self._sleep(random.random() * self.cfg.checker.start_jitter_seconds)
        tasks = [asyncio.create_task(self._lease_loop(), name="checker-lease"),
                 asyncio.create_task(self._cycle_loop(), name="checker-cycle")]
        if self.cfg.checker.use_events:
            tasks.append(asyncio.create_task(self._engine_events(), name="checker-events"))
        if self.cfg.checker.upkeep_seconds > 0:
            tasks.append(asyncio.create_task(self._upkeep_loop(), name="checker-upkeep"))
        try:
            await self._stopping.wait()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _lease_loop(self) -> None:
        ttl = self.cfg.checker.lease_ttl_seconds
        # renewals from a thread of the lease's own (checker/lease.py), while this loop shows life
        self.lease.keep(lambda: self._alive_at, max(self.cfg.checker.loop_stall_seconds, ttl))
        while not self._stopping.is_set():
            self._alive_at = time.monotonic()
            try:
                if self.lease.token is not None and self.lease.refused:
                    self._step_down("renewal refused")
                if self.lease.token is None:
                    if await self.lease.acquire():
                        self._became_leader()
                elif self.lease.kept:
                    pass  # the keeper renews; the cycle loop steps down if the lease could have expired
                elif not await self.lease.renew():
                    self._step_down("renewal refused")
            except RedisUnavailable as exc:
                if self.lease.token is not None and not self.lease.held:
                    self._step_down(f"cannot renew: {exc.detail}")
            await self._sleep(ttl / 3 if self.lease.token is not None else min(1.0, ttl / 3))

    async def _upkeep_loop(self) -> None:
        """The cluster-wide upkeep (checker/upkeep.py): a lease holder takes its turn once a period,
        so one replica of the whole cluster does it, whichever manager_id's checker it is."""
        every = self.cfg.checker.upkeep_seconds
        while not self._stopping.is_set():
            await self._sleep(every * (0.5 + random.random() / 2))
            if not self.lease.held:
                continue
            try:
                if await self.store.take_upkeep_turn(self.ops.replica.replica_id, every * 0.9):
                    await self.upkeep.run()
            except ManagerError as exc:
                log.warning("upkeep_failed manager_id=%s error=%s", self.mid, exc.detail)
            except Exception:
                log.exception("upkeep_crashed manager_id=%s", self.mid)

    def _became_leader(self) -> None:
        log.info("lease_acquired manager_id=%s replica_id=%s token=%s", self.mid, self.lease.holder,
                 self.lease.token)
        metrics.LEASE_TRANSITIONS.labels(self.mid, "acquired").inc()
        metrics.LEADER.labels(self.mid).set(1)
        self._was_leader = False  # the cycle loop runs the leader-start work first
        self._wake.set()

    def _step_down(self, why: str) -> None:
        if self.lease.token is None and not self._was_leader:
            return
        log.warning("lease_lost manager_id=%s replica_id=%s reason=%s", self.mid, self.lease.holder, why)
        self.lease.drop()
        self._was_leader = False
        metrics.LEASE_TRANSITIONS.labels(self.mid, "lost").inc()
        metrics.LEADER.labels(self.mid).set(0)
        _clear_leader_gauges(self.mid)

    async def _cycle_loop(self) -> None:
        interval = self.cfg.checker.interval_seconds
        while not self._stopping.is_set():
            # cleared before the pass, not after: a change the engine reports during a pass brings
            # another pass, not the next interval's
            self._wake.clear()
            if self._recheck_at is not None and self._recheck_at <= time.monotonic():
                self._recheck_at = None  # this pass is the one due after the events
            if self.lease.token is not None and not self.lease.held:
                self._step_down("lease could have expired before renewal")
            if self.lease.held:
                try:
                    if not self._was_leader:
                        await self.on_leader_start()
                        self._was_leader = True
                    await self.cycle()
                except LeaseLost:
                    self._step_down("a fenced write was rejected")
                except EngineUnavailable as exc:
                    log.warning("checker_engine_unavailable manager_id=%s error=%s", self.mid, exc.detail)
                except RedisUnavailable as exc:
                    log.warning("checker_redis_unavailable manager_id=%s error=%s", self.mid, exc.detail)
                except ManagerError as exc:
                    log.warning("checker_cycle_failed manager_id=%s error=%s", self.mid, exc.detail)
                except Exception:
                    log.exception("checker_cycle_crashed manager_id=%s", self.mid)
            wait = interval
            if self._recheck_at is not None:
                wait = min(wait, max(0.0, self._recheck_at - time.monotonic()))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    async def _engine_events(self) -> None:
        """Wake the cycle early when the engine reports a change to one of our containers.

        The feed blocks in a thread of its own for as long as the checker runs (one stream held
        open, no wakeup while nothing changes); the stop closes it, which ends the thread at once.
        """
        loop = asyncio.get_running_loop()
        feed = self.backend.changes(self.mid)
        ended = loop.create_future()

        def pump() -> None:
            try:
                while not self._stopping.is_set():
                    try:
                        for _ in feed:
                            loop.call_soon_threadsafe(self._engine_changed)
                        return  # closed
                    except Exception:  # the feed retries the engine itself: this is a bug, not an outage
                        log.exception("engine_events_crashed manager_id=%s", self.mid)
                        time.sleep(2.0)
            finally:
                with contextlib.suppress(RuntimeError):  # the loop already closed
                    loop.call_soon_threadsafe(_resolve, ended)

        threading.Thread(target=pump, name=f"engine-events-{self.mid}", daemon=True).start()
        try:
            await self._stopping.wait()
        finally:
            feed.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(ended), 10)

    def _engine_changed(self) -> None:
        self._recheck_at = time.monotonic() + EVENT_SETTLE_SECONDS
        self._wake.set()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def stop(self) -> None:
        """Release the lease at once (takeover is immediate) and optionally stop our nodes."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        was_holder = self.lease.token is not None
        with contextlib.suppress(ManagerError):
            await self.lease.release()
        if was_holder:
            metrics.LEADER.labels(self.mid).set(0)
            _clear_leader_gauges(self.mid)
            log.info("lease_released manager_id=%s replica_id=%s", self.mid, self.lease.holder)
        if self.cfg.checker.stop_after_exit:
            with contextlib.suppress(ManagerError):
                await self._stop_all_if_last()

    async def _stop_all_if_last(self) -> None:
        others = [r for r in await self.store.live_replicas(self.mid) if r.replica_id != self.lease.holder]
        if others:
            log.info("stop_after_exit_skipped manager_id=%s live_replicas=%d", self.mid, len(others))
            return
        for c in await self.backend.nodes(self.mid):
            if c.status == NodeStatus.RUNNING:
                with contextlib.suppress(ManagerError):
                    await self.backend.stop(c.id, timeout=self.cfg.node.stop_timeout_seconds)
                    await self.store.update_node(c.session, **stopped_fields(time.time(), unhealthy=True))
        log.info("stop_after_exit manager_id=%s", self.mid)

    # --- acting (lease holder only) -------------------------------------------
    async def on_leader_start(self) -> None:
        """Remove test nodes of this manager_id (XAgent's later manager did this at election)."""
        # Redis may have lost records (a flush ends every lease): the first pass rebuilds
        # archived sessions from their workspaces before any workspace is judged an orphan
        self._rebuild = True
        self._orphans = {}
        self._seen_live = {}
        self._judging_since = time.monotonic()
        for c in await self.backend.nodes(self.mid, Role.TEST):
            await self.backend.remove(c.id)
            metrics.CHECKER_ACTIONS.labels(self.mid, "remove_test").inc()
            log.info("test_node_removed node_id=%s manager_id=%s", c.id[:12], self.mid)

    def limits(self) -> reconcile.Limits:
        n = self.cfg.node
        t = n.tiers
        return reconcile.Limits(
            idle_seconds=n.idling_close_minutes * 60 if n.idling_close_minutes is not None else None,
            idle_grace_seconds=n.idle_grace_seconds, pause_seconds=t.pause_after_seconds,
            archive_seconds=t.archive_after_seconds, delete_seconds=t.delete_after_seconds,
            orphan_workspace_grace_seconds=t.orphan_workspace_grace_seconds,
            exited_gc_seconds=n.exited_gc_minutes * 60,
            stuck_creation_seconds=max(self.cfg.checker.stuck_creation_seconds, n.creation_wait_seconds + 5),
            pool_max_age_seconds=self.cfg.pool.max_age_seconds,
            claim_timeout_seconds=self.cfg.pool.claim_timeout_seconds,
            unwatched_seconds=self.cfg.events.stop_after_unwatched_seconds)

    def _live(self, registered: set[str]) -> set[str] | None:
        """The registered replicas, and those registered a moment ago: one lapsed entry is not a death
        (None: too soon to call any replica dead).

        A live replica whose beat was late (its event loop or Redis slow for a few seconds) lost its
        entry, and the checker removed the node it was creating under its client (a 503 "its
        container was removed" right after a two-pod install). Dead is absent for one more TTL after
        the entry expired. A new lease holder has seen nobody yet, so it judges nobody for one TTL:
        a pod whose first beats failed (the bundled Redis still starting) was never registered, and
        the new holder removed the node it was creating (test_kubernetes, full run s8).
        """
        now = time.monotonic()
        for rid in registered:
            self._seen_live[rid] = now
        grace = self.cfg.cluster.replica_ttl_seconds
        self._seen_live = {rid: t for rid, t in self._seen_live.items() if now - t <= grace}
        if now - self._judging_since <= grace:
            return None
        return set(self._seen_live)

    async def cycle(self) -> reconcile.Plan:
        """One reconcile pass: records first, then one label-filtered list of the engine."""
        t0 = time.perf_counter()
        await intents.carry_out(self.ops, self.fence)  # first: the pass below must see what clients asked meanwhile
        members = await self.store.manager_node_ids(self.mid)
        records = await self._records([m for m in members if not is_reservation(m)])
        limits = self.limits()
        smallest = limits.smallest_idle()
        idle = await self.store.idle_since(self.mid, time.time() - smallest) if smallest is not None else {}
        watchers = (await self.store.watchers_left([r.id for r in records if r.status == NodeStatus.RUNNING])
                    if self.cfg.events.stop_after_unwatched_seconds is not None else None)
        # a creating or claiming replica not in here is dead: what it had not handed out goes
        replicas = await self.store.live_replicas()  # read once a pass: the gauges below count them too
        live = self._live({r.replica_id for r in replicas} | {self.lease.holder})
        containers = await self.backend.nodes(self.mid)
        rebuild = self._rebuild
        # listed now and then, and every pass while some workspace is on its way to being collected
        workspaces = (await self.backend.workspaces(self.mid)
                      if rebuild or self._orphans or self.cycles % STORAGE_GC_CYCLES == 0 else None)
        now = time.time()
        p = reconcile.plan(self.mid, members, records, containers, idle, now, limits, watchers, live_replicas=live,
                           workspaces=workspaces, rebuild=rebuild, orphans_seen=self._orphans)
        store, ev = self.store, self.fence.event
        ops: list[Op] = []
        for node_id, fields in p.updates.items():
            ops.append(store.update_op(node_id, fields, now))
            if "container_id" in fields:  # an archived session found with a container again
                ops.append(store.archived_op(self.mid, node_id, False))
            if fields.get("status") == NodeStatus.EXITED:
                ops.extend(ev(EventKind.STOPPED, node_id, "seen exited"))
            elif fields.get("status") == NodeStatus.PAUSED:  # paused behind our back: proxies must thaw it
                ops.extend(ev(EventKind.PAUSED, node_id, "seen paused"))
        for node_id, health in p.health_events:
            ops.extend(ev(EventKind.HEALTH, node_id, health))
        for rec in p.forget:
            ops += store.delete_ops(rec)
            ops.extend(ev(EventKind.REMOVED, rec.id, "container gone"))
        for rec in p.adopt:
            # the secret lives in the container's own config: a record rebuilt after Redis lost it
            # must carry it, or the proxy could no longer reach the node
            with contextlib.suppress(ManagerError):
                rec.secret = await self.backend.node_secret(rec.cid)
        for rec in p.adopt:
            ops += store.adopt_ops(rec, now)
            ops.extend(ev(EventKind.ADOPTED, rec.id))
            if rec.role == Role.POOLED and rec.status == NodeStatus.RUNNING:
                ops.append(store.pool_push_op(self.mid, rec.id))
        for rec in p.restore:
            ops += [*store.adopt_ops(rec, now), store.archived_op(self.mid, rec.id)]
            ops.extend(ev(EventKind.ADOPTED, rec.id, "archived, from its workspace"))
        ops += self.tiers.lost(p.lost)
        for m in p.stale_reservations:
            ops += store.stale_reservation_ops(self.mid, m)
        ops.append(store.cycle_count_op(self.mid, self.lease.token or 0))
        await self.fence.write(ops)
        self._rebuild = self._rebuild and (not rebuild or p.young_workspaces > 0)
        self._orphans = p.orphans_seen

        # engine actions, each confirmed by a fenced write; still the holder before each
        tiers = self.tiers
        for rec in p.expire:
            await tiers.expire(rec)
        for rec in p.archive:
            await tiers.archive(rec)
        for rec in p.idle_stop:
            await tiers.idle_stop(rec)
        for rec in p.pause:
            await tiers.pause(rec)
        for cid in p.duplicates:
            await tiers.remove_duplicate(cid)
        for name in p.orphan_workspaces:
            await tiers.remove_orphan_workspace(name)
        for rec, why in p.remove:
            await tiers.remove(rec, why)
        for cid in p.remove_orphans:
            self.fence.check_held()
            await self.backend.remove(cid)
            metrics.CHECKER_ACTIONS.labels(self.mid, "remove_orphan").inc()
            log.info("orphan_removed node_id=%s manager_id=%s", cid[:12], self.mid)
        if self.cycles % STORAGE_GC_CYCLES == 0:
            # workspaces whose node was removed behind our back, or whose creation died half-way
            self.fence.check_held()
            older_than = time.time() - self.limits().stuck_creation_seconds
            gone = await self.backend.collect_storage(self.mid, older_than)
            gone += await snapshots.collect(self.ops, older_than)
            if gone:
                metrics.CHECKER_ACTIONS.labels(self.mid, "remove_storage").inc(gone)
                log.info("orphan_storage_removed manager_id=%s count=%d", self.mid, gone)
        counts = _count(p, records)
        for action, ids in (("update", list(p.updates)), ("forget", [r.id for r in p.forget]),
                            ("adopt", [r.id for r in p.adopt]), ("restore", [r.id for r in p.restore])):
            if ids:
                metrics.CHECKER_ACTIONS.labels(self.mid, action).inc(len(ids))
                log.info("checker_%s manager_id=%s count=%d node_ids=%s", action, self.mid, len(ids),
                         ",".join(i[:12] for i in ids[:10]))
        await self._export_gauges(counts, replicas)
        if self.cfg.pool.enabled:
            await self._keep_pool(records, p)
        elapsed = time.perf_counter() - t0
        metrics.CHECKER_CYCLE_SECONDS.labels(self.mid).observe(elapsed)
        self.cycles += 1
        return p

    async def _records(self, ids: list[str]) -> list[NodeRecord]:
        """Every record of this manager_id, re-reading only those whose updated_at moved.

        Every writer stamps updated_at, so it serves as a version: a cycle over 10,000
        unchanged records reads one short stamp each instead of the whole hash. The cache
        is dropped now and then so nothing can stay wrong for long.
        """
        if self.cycles % 60 == 0:
            self._cache.clear()
        stamps = await self.store.node_stamps(ids)
        stale = [i for i, stamp in stamps.items() if self._cache.get(i, (None, ""))[1] != stamp]
        for rec in await self.store.get_nodes(stale):
            self._cache[rec.id] = (rec, stamps[rec.id])
        for gone in self._cache.keys() - stamps.keys():
            del self._cache[gone]
        return [self._cache[i][0] for i in ids if i in self._cache]

    async def _export_gauges(self, counts: dict[str, int], replicas: list[ReplicaInfo]) -> None:
        for status in (*NodeStatus, Role.POOLED):
            metrics.NODES.labels(self.mid, status).set(counts.get(status, 0))
        metrics.REPLICAS.labels(self.mid).set(sum(r.manager_id == self.mid for r in replicas))
        await _export_lost(self.ops)

    async def _keep_pool(self, records: list[NodeRecord], p: reconcile.Plan) -> None:
        """Size the pool by demand: fill it up to its target, or take the surplus out."""
        removed = {r.id for r, _ in p.remove}
        pooled = [r for r in records if r.role == Role.POOLED and r.id not in removed]
        metrics.POOL_SIZE.labels(self.mid).set(len(pooled))
        arrivals = await self.store.arrivals(self.mid)
        rate = self.demand.update(arrivals)
        start_seconds = self.ops.queue.expected_seconds
        peak = self.burst.update(arrivals, start_seconds)
        cap = await capacity.node_cap(self.ops)
        sessions = sum(1 for r in records if r.role != Role.POOLED and r.id not in removed
                       and r.status != NodeStatus.ARCHIVED)  # an archived session holds no container
        want = demand.plan(self.cfg.pool, rate, start_seconds, cap - sessions if cap else None, peak)
        metrics.POOL_TARGET.labels(self.mid).set(want.target)
        metrics.POOL_ARRIVAL_RATE.labels(self.mid).set(rate)
        metrics.POOL_BURST_PEAK.labels(self.mid).set(peak)
        if self._filling:
            return
        missing = want.target - len(pooled)
        if missing > 0:
            self._filling = True
            self._fill_task = asyncio.create_task(self._fill(missing, want.refill_concurrency))
        elif missing < 0:
            # the newest first: the oldest are claimed first, and recycled by age anyway
            ready = [r for r in pooled if r.status == NodeStatus.RUNNING]
            for rec in sorted(ready, key=lambda r: r.created_at, reverse=True)[:-missing]:
                if await self.store.unpool(self.mid, rec.id):  # not if a client claimed it meanwhile
                    await self.tiers.remove(rec, "pool above its target")

    async def _fill(self, n: int, concurrency: int) -> None:
        try:
            await pool.refill(self.ops, n, lambda: self.lease.held, self._offer_pooled, concurrency)
        finally:
            self._filling = False

    async def _offer_pooled(self, rec: NodeRecord) -> bool:
        try:
            await self.fence.write([self.store.pool_push_op(self.mid, rec.id)])
        except LeaseLost:
            return False
        return True


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _count(p: reconcile.Plan, records: list[NodeRecord]) -> dict[str, int]:
    counts: dict[str, int] = {}
    forgotten = {r.id for r in p.forget}
    for rec in records:
        if rec.id in forgotten:
            continue
        status = p.updates.get(rec.id, {}).get("status", rec.status)
        key = Role.POOLED if rec.role == Role.POOLED else status
        counts[key] = counts.get(key, 0) + 1
    for rec in p.adopt + p.restore:
        counts[rec.status] = counts.get(rec.status, 0) + 1
    return counts


async def _export_lost(ops: NodeOps) -> None:
    """Lost manager_ids and their nodes, as every lease holder sees them (dashboards take the max)."""
    gone = await lost.lost_managers(ops)
    for mid in await ops.store.manager_ids():
        if mid == ops.manager_id:
            continue
        is_lost = mid in gone
        metrics.MANAGER_LOST.labels(mid).set(int(is_lost))
        count = len([m for m in await ops.store.manager_node_ids(mid) if not is_reservation(m)]) if is_lost else 0
        metrics.NODES_UNREACHABLE.labels(mid).set(count)


def _clear_leader_gauges(mid: str) -> None:
    for status in (*NodeStatus, Role.POOLED):
        metrics.clear(metrics.NODES, mid, status)
    for g in (metrics.REPLICAS, metrics.POOL_SIZE):
        metrics.clear(g, mid)
