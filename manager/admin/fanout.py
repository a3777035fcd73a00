"""Cluster-wide admin reads: one call per live manager_id, bounded, partial results kept."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import msgspec

from manager.replica.runtime import Runtime
from shared.errors import ManagerError
from shared.models import ReplicaInfo


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
            except TimeoutError:
                failures[mid] = f"timed out after {rt.cfg.cluster.fanout_timeout_seconds}s"
            except (ManagerError, httpx.HTTPError) as exc:
                failures[mid] = getattr(exc, "detail", None) or repr(exc)

    await asyncio.gather(*(one(m, r) for m, r in by_mgr.items()))
    return {"results": results, "failures": failures}


def replica_view(rep: ReplicaInfo) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.structs.asdict(rep)
    out["age_seconds"] = round(time.time() - rep.started_at, 1)
    return out
