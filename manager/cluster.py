"""Replica registry, placement, forwarding to the owner of a manager_id, fan-out reads.

Lifecycle calls for a node of another manager_id go to a live replica of its owner
over HTTP with the internal token, as DB-GPT's RemoteWorkerManager routes a model's
start and stop to the worker manager that holds it; reads that need every engine fan
out with bounded concurrency and keep partial results.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import msgspec

from manager import metrics
from manager.runtime import Runtime
from shared.errors import CapacityExhausted, Forbidden, ManagerError, NoLiveManager, RedisUnavailable
from shared.models import ReplicaInfo

log = logging.getLogger(__name__)

TOKEN_HEADER = "x-tsm-internal-token"
VIA_HEADER = "x-tsm-via"  # set on requests proxied through the owner, so the owner never forwards again
REPLICA_HEADER = "x-tsm-replica"


class RemoteError(ManagerError):
    """An error answered by another replica, re-raised here with its status."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status_code = status


def check_internal(rt: Runtime, token: str | None) -> None:
    """Accept only requests carrying the cluster's internal token (constant-time compare)."""
    expected = rt.cfg.internal_token
    if not expected:
        raise Forbidden("internal forwarding is disabled: no cluster.internal_token configured")
    if not token or not hmac.compare_digest(token.encode(), expected.encode()):
        raise Forbidden("invalid internal token")


async def heartbeat_loop(rt: Runtime) -> None:
    """Keep this replica registered; re-registers by itself after a Redis flush."""
    ttl = rt.cfg.cluster.replica_ttl_seconds
    while not rt.stopping:
        try:
            async with rt.registry_lock:
                if rt.stopping:
                    return
                rt.replica.draining = rt.manager_id in await rt.store.draining()
                await rt.store.heartbeat(rt.replica, ttl)
        except RedisUnavailable as exc:
            log.warning("heartbeat_failed replica_id=%s error=%s", rt.replica.replica_id, exc.detail)
        await asyncio.sleep(rt.cfg.cluster.heartbeat_seconds)


async def owner_replicas(rt: Runtime, manager_id: str) -> list[ReplicaInfo]:
    replicas = [r for r in await rt.store.live_replicas(manager_id) if r.replica_id != rt.replica.replica_id]
    random.shuffle(replicas)
    return replicas


async def forward(rt: Runtime, manager_id: str, method: str, path: str, body: Any = None) -> Any:
    """Call an internal route on a live replica of manager_id; its errors are re-raised here."""
    if not rt.cfg.internal_token:
        raise NoLiveManager(manager_id)
    replicas = await owner_replicas(rt, manager_id)
    if not replicas:
        raise NoLiveManager(manager_id)
    metrics.FORWARDED.labels("lifecycle").inc()
    for rep in replicas:
        try:
            resp = await rt.http.request(
                method, rep.url + path, json=body,
                headers={TOKEN_HEADER: rt.cfg.internal_token, VIA_HEADER: rt.replica.replica_id},
                timeout=httpx.Timeout(rt.cfg.cluster.forward_timeout_seconds, connect=2.0))
        except httpx.TransportError as exc:
            log.warning("forward_failed manager_id=%s replica_id=%s error=%r", manager_id, rep.replica_id, exc)
            continue  # that replica died after its last heartbeat: try another
        try:
            data = resp.json()
        except ValueError:
            data = {"detail": resp.text}
        if resp.status_code >= 400:
            detail = data.get("detail") if isinstance(data, dict) else str(data)
            raise RemoteError(resp.status_code, str(detail))
        return data
    raise NoLiveManager(manager_id)


async def choose_manager(rt: Runtime) -> str:
    """This replica's own manager_id unless it is full or draining; else the least-loaded live one."""
    limit = rt.cfg.cluster.max_nodes_per_manager
    draining = await rt.store.draining()
    if rt.manager_id not in draining and limit <= 0:
        return rt.manager_id
    counts = await rt.store.node_counts()
    if rt.manager_id not in draining and counts.get(rt.manager_id, 0) < limit:
        return rt.manager_id
    live = {r.manager_id for r in await rt.store.live_replicas()} - draining - {rt.manager_id}
    candidates = sorted((counts.get(m, 0), m) for m in live if limit <= 0 or counts.get(m, 0) < limit)
    if not candidates:
        why = "draining" if rt.manager_id in draining else f"at capacity ({limit} nodes)"
        raise CapacityExhausted(f"no manager can take a new session: {rt.manager_id} is {why} and no other "
                                f"live manager_id has room")
    return candidates[0][1]


async def fan_out(rt: Runtime, call: Callable[[ReplicaInfo | None], Awaitable[Any]]) -> dict[str, Any]:
    """Run call once per live manager_id (None = this replica), bounded; partial results, failures named."""
    by_mgr: dict[str, ReplicaInfo | None] = {rt.manager_id: None}
    for rep in await rt.store.live_replicas():
        by_mgr.setdefault(rep.manager_id, rep)
    sem = asyncio.Semaphore(rt.cfg.cluster.fanout_concurrency)
    results: dict[str, Any] = {}
    failures: dict[str, str] = {}

    async def one(mid: str, rep: ReplicaInfo | None) -> None:
        async with sem:
            try:
                results[mid] = await asyncio.wait_for(call(rep), rt.cfg.cluster.fanout_timeout_seconds)
            except asyncio.TimeoutError:
                failures[mid] = f"timed out after {rt.cfg.cluster.fanout_timeout_seconds}s"
            except (ManagerError, httpx.HTTPError) as exc:
                failures[mid] = getattr(exc, "detail", None) or repr(exc)

    await asyncio.gather(*(one(m, r) for m, r in by_mgr.items()))
    return {"results": results, "failures": failures}


async def remote_get(rt: Runtime, rep: ReplicaInfo, path: str) -> Any:
    resp = await rt.http.get(rep.url + path, headers={TOKEN_HEADER: rt.cfg.internal_token},
                             timeout=rt.cfg.cluster.fanout_timeout_seconds)
    if resp.status_code >= 400:
        raise RemoteError(resp.status_code, resp.text[:200])
    return resp.json()


def replica_view(rep: ReplicaInfo) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.structs.asdict(rep)
    out["age_seconds"] = round(time.time() - rep.started_at, 1)
    return out
