"""Calls to a live replica of another manager_id, with the cluster's internal token.

Lifecycle calls for a node of another manager_id go to a live replica of its owner
over HTTP, as DB-GPT's RemoteWorkerManager routes a model's start and stop to the
worker manager that holds it.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import httpx

from nodeops.circuit import host_unreachable_error
from nodeops.context import NodeOps
from shared import metrics
from shared.errors import HostUnreachable, ManagerError, NoLiveManager
from shared.models import ReplicaInfo

log = logging.getLogger(__name__)

TOKEN_HEADER = "x-tsm-internal-token"
VIA_HEADER = "x-tsm-via"  # set on requests proxied through the owner, so the owner never forwards again


class RemoteError(ManagerError):
    """An error answered by another replica, re-raised here with its status."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status_code = status
        self.extra: dict[str, Any] = {}


async def owner_replicas(ops: NodeOps, manager_id: str) -> list[ReplicaInfo]:
    """Live replicas of manager_id other than this one, in random order (spreads the load)."""
    replicas = [r for r in await ops.store.live_replicas(manager_id) if r.replica_id != ops.replica.replica_id]
    random.shuffle(replicas)
    return replicas


async def forward(ops: NodeOps, manager_id: str, method: str, path: str, body: Any = None,
                  fresh: bool = False) -> Any:
    """Call an internal route on a live replica of manager_id; its errors are re-raised here.

    fresh: on a new connection, for a call on the way of a client's request (the owner's address
    confirmation): a host cut off fails its connect timeout (2 s) and opens its circuit, where a
    connection kept alive from before would wait out the read timeout (forward_timeout_seconds)."""
    if not ops.cfg.internal_token:
        raise NoLiveManager(manager_id)
    replicas = await owner_replicas(ops, manager_id)
    if not replicas:
        raise NoLiveManager(manager_id)
    metrics.FORWARDED.labels("lifecycle").inc()
    unreachable: HostUnreachable | None = None
    for rep in replicas:
        host, port = _host_port(rep.url)
        try:
            ops.circuits.check(host)
        except HostUnreachable as exc:  # its host is known to be down: do not wait for a connect
            unreachable = exc
            continue
        try:
            resp = await (ops.one_connection_http() if fresh else ops.http).request(
                method, rep.url + path, json=body,
                headers={TOKEN_HEADER: ops.cfg.internal_token, VIA_HEADER: ops.replica.replica_id},
                timeout=httpx.Timeout(ops.cfg.cluster.forward_timeout_seconds,
                                      connect=min(2.0, ops.cfg.proxy.connect_timeout_seconds)))
        except httpx.TransportError as exc:
            log.warning("forward_failed manager_id=%s replica_id=%s error=%r", manager_id, rep.replica_id, exc)
            if isinstance(exc, httpx.ConnectTimeout) or _unreachable(exc):
                ops.circuits.failure(host, port, manager_id, f"replica {rep.replica_id}: {exc!r}")
                unreachable = HostUnreachable(host, manager_id, f"connecting to replica {rep.replica_id} failed")
            continue  # that replica died after its last heartbeat: try another
        ops.circuits.success(host)
        try:
            data = resp.json()
        except ValueError:
            data = {"detail": resp.text}
        if resp.status_code >= 400:
            detail = data.get("detail") if isinstance(data, dict) else str(data)
            err = RemoteError(resp.status_code, str(detail))
            if isinstance(data, dict):  # what the error carried besides its message (a fork's copies made)
                err.extra = {k: v for k, v in data.items() if k != "detail"}
            raise err
        return data
    raise unreachable or NoLiveManager(manager_id)


def _unreachable(exc: BaseException) -> bool:
    """Whether a transport error (or what caused it, a few layers down) says the host cannot be reached."""
    seen: BaseException | None = exc
    for _ in range(6):
        if seen is None:
            return False
        if host_unreachable_error(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


async def remote_get(ops: NodeOps, rep: ReplicaInfo, path: str) -> Any:
    """A read from one other replica's internal routes."""
    resp = await ops.http.get(rep.url + path, headers={TOKEN_HEADER: ops.cfg.internal_token},
                              timeout=ops.cfg.cluster.fanout_timeout_seconds)
    if resp.status_code >= 400:
        raise RemoteError(resp.status_code, resp.text[:200])
    return resp.json()


async def remote_stream(ops: NodeOps, rep: ReplicaInfo, path: str) -> AsyncIterator[bytes]:
    """A streamed read from another replica's internal routes, opened (its errors raised here)."""
    req = ops.http.build_request("GET", rep.url + path, headers={TOKEN_HEADER: ops.cfg.internal_token},
                                 timeout=httpx.Timeout(None, connect=2.0))
    try:
        resp = await ops.http.send(req, stream=True)
    except httpx.TransportError as exc:
        raise NoLiveManager(rep.manager_id) from exc
    if resp.status_code >= 400:
        body = await resp.aread()
        await resp.aclose()
        raise RemoteError(resp.status_code, body.decode("utf-8", "replace")[:200])

    async def chunks() -> AsyncIterator[bytes]:
        try:
            async for chunk in resp.aiter_raw():
                yield chunk
        finally:
            await resp.aclose()

    return chunks()
