"""The warm pool: ready nodes waiting for a client, claimed atomically by any replica.

The checker (lease holder) keeps a target of pooled nodes per manager_id that follows the
recent arrival rate (nodeops/demand.py) between ``pool.size`` and ``pool.max_size``; every
claim counts one arrival. Refills wait behind client creations in the creation queue
(nodeops/admission.py), so filling the pool never delays a client's own creation. A claim
pops one in a Lua script so two replicas can never hand out the same node. A claimed
node stays marked ``claiming`` until the answer is on its way; the checker releases
nodes left in that state by a replica that died in between. A new pooled node is sent
``pool.warm_up_path`` once before it is offered: a client's first call then finds a node that
has already done its own first-call work.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import httpx

from nodeops import addresses, capacity, lifecycle, primitives
from nodeops.context import NodeOps
from shared import metrics
from shared.errors import ManagerError
from shared.models import NODE_SECRET_HEADER, EventKind, NodeRecord, Role

log = logging.getLogger(__name__)
WARM_UP_TIMEOUT = 10.0  # seconds; a node slower than this to answer is pooled anyway


async def claim(ops: NodeOps, client: str = "") -> NodeRecord | None:
    """A ready pooled node for this client, or None when the pool is off or empty.

    One Redis call past the pool's head (shared/store/pool.py): the arrival (a hit or a miss, it
    is demand), the claim, the session's idle time and its record; delivered() finishes it."""
    if not ops.cfg.pool.enabled:
        return None
    t0 = time.monotonic()
    # the client's quota holds for pooled nodes too (over it: None, and the reservation says why)
    limit = capacity.client_cap(ops.cfg.quota.per_client, await capacity.node_cap(ops)) if client else 0
    rec = await ops.store.claim_pooled_record(ops.manager_id, client, ops.replica.replica_id, limit)
    if rec is None:
        metrics.POOL_CLAIMS.labels("miss").inc()
        return None
    took = time.monotonic() - t0
    metrics.POOL_CLAIMS.labels("hit").inc()
    metrics.NODE_CREATE_SECONDS.labels("pool").observe(took)
    log.info("pool_claimed node_id=%s manager_id=%s claim_ms=%.1f", rec.id[:12], ops.manager_id, took * 1000)
    return rec


async def delivered(ops: NodeOps, rec: NodeRecord) -> None:
    """The client has its cookie: the node is an ordinary session from now on (and announced as
    ready, both in one round trip's time)."""
    if rec.role == Role.CLAIMING:
        t0 = time.monotonic()
        await asyncio.gather(ops.store.update_node(rec.id, role=Role.NODE),
                             ops.publish(EventKind.READY, rec, "claimed from pool"))
        rec.role = Role.NODE
        log.info("pool_delivered node_id=%s deliver_ms=%.1f", rec.id[:12], (time.monotonic() - t0) * 1000)


async def refill(ops: NodeOps, n: int, allowed: Callable[[], bool],
                 offer: Callable[[NodeRecord], Awaitable[bool]], concurrency: int = 1) -> None:
    """Create n pooled nodes, concurrency at a time, while allowed(); offer(rec) puts each in the
    pool (False: refused).

    A refused node (the lease moved on meanwhile) is removed: nobody would ever hand it out.
    """
    sem = asyncio.Semaphore(max(1, concurrency))
    gauge = metrics.POOL_REFILL_IN_FLIGHT.labels(ops.manager_id)

    async def one() -> None:
        async with sem:
            await quiet(ops)
            if not allowed():
                return
            gauge.inc()
            try:
                rec = await lifecycle.create_node(ops, role=Role.POOLED)
            finally:
                gauge.dec()
            await warm_up(ops, rec)
            try:  # it booted at a low CPU weight (the engine's background): a client's node has the normal one
                await ops.backend.foreground(rec.cid)
            except ManagerError as exc:
                log.warning("pool_foreground_failed node_id=%s error=%s", rec.id[:12], exc.detail)
                await primitives.discard(ops, rec)
                return
            if not await offer(rec):
                await primitives.discard(ops, rec)

    results = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            log.warning("pool_fill_failed manager_id=%s error=%r", ops.manager_id, r)


async def quiet(ops: NodeOps) -> float:
    """Wait until no creation request of this manager_id arrived for pool.refill_quiet_seconds, at
    most pool.refill_defer_seconds: a refill yields to clients who are claiming (and then calling)
    pooled nodes; the seconds it waited."""
    p = ops.cfg.pool
    t0 = time.monotonic()
    if p.refill_defer_seconds <= 0 or p.refill_quiet_seconds <= 0:
        return 0.0
    deadline = t0 + p.refill_defer_seconds
    try:
        while True:
            count, now = await ops.store.arrivals(ops.manager_id), time.monotonic()
            seen = _arrivals.get(ops.manager_id)
            if seen is None or seen[0] != count:  # new arrivals (or none seen before): quiet from now on
                seen = _arrivals[ops.manager_id] = (count, now)
            left = p.refill_quiet_seconds - (now - seen[1])
            if left <= 0 or now >= deadline:
                break
            await asyncio.sleep(min(left, deadline - now))
    except ManagerError as exc:  # Redis is away: the creation will say so
        log.info("pool_quiet_unknown manager_id=%s error=%s", ops.manager_id, exc.detail)
    waited = time.monotonic() - t0
    if waited >= 0.01:
        log.info("pool_refill_deferred manager_id=%s waited_ms=%.0f", ops.manager_id, waited * 1000)
    return waited


_arrivals: dict[str, tuple[int, float]] = {}  # manager_id -> (its arrivals count, since when it is that)


async def warm_up(ops: NodeOps, rec: NodeRecord) -> bool:
    """Send a new pooled node pool.warm_up_path once, so its first-call work is done before a
    client claims it; True when it answered below 500. A failure only costs the client that work."""
    p = ops.cfg.pool
    if not p.warm_up_path:
        return False
    t0 = time.monotonic()
    try:
        host, port = await addresses.confirmed(ops, rec)
        # the status is all it needs: the body is never read (as a probe's)
        async with ops.http.stream("POST", f"http://{host}:{port}{p.warm_up_path}", content=p.warm_up_body.encode(),
                                   headers={"content-type": "application/json",
                                            NODE_SECRET_HEADER: ops.store.secrets.of(rec)},
                                   timeout=WARM_UP_TIMEOUT) as r:
            status = r.status_code
    except (httpx.HTTPError, ManagerError) as exc:
        log.info("pool_warm_up_failed node_id=%s error=%r", rec.id[:12], exc)
        return False
    log.info("pool_warmed node_id=%s status=%d elapsed_ms=%.0f", rec.id[:12], status, (time.monotonic() - t0) * 1000)
    return status < 500
