"""The primitives every session operation is built of: probe a node, wait until it answers,
read a session's record, drop a session the engine says is gone, remove one, lock one.
Lifecycle (nodeops/lifecycle.py) and resume (nodeops/resume.py) both build on these; this
module imports neither.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx

from nodeops import addresses
from nodeops.context import NodeOps
from nodeops.locks import SessionLock
from shared.engines.base import NodeInfo
from shared.errors import AddressUnconfirmed, ContainerGone, NodeNotFound, NodeTimeout
from shared.models import NODE_SECRET_HEADER, EventKind, NodeRecord, NodeStatus


async def probe(ops: NodeOps, rec: NodeRecord, timeout: float = 1.0) -> bool:
    """One HTTP probe of the node's health route, with the node's secret (sent only to the
    address the engine confirms: nodeops/addresses.py)."""
    try:
        host, port = await addresses.confirmed(ops, rec)
    except (AddressUnconfirmed, ContainerGone):
        return False
    try:
        # the status is all a probe needs: the body is never read (a node's server is the session's
        # own code, and an endless body read whole would grow the replica without bound)
        async with ops.http.stream("GET", f"http://{host}:{port}{ops.cfg.node.health_path}", timeout=timeout,
                                   headers={NODE_SECRET_HEADER: ops.store.secrets.of(rec)}) as resp:
            status = resp.status_code
    except httpx.HTTPError:
        return False
    if status in (401, 403):
        # waiting longer cannot help: every proxied request would be refused the same way
        raise NodeTimeout(f"the node refused its probe with {status}: the image "
                          f"{rec.image or '?'} does not accept the manager's {NODE_SECRET_HEADER} header")
    return status < 500


async def wait_ready(ops: NodeOps, rec: NodeRecord, deadline: float) -> bool:
    """Probe the node every few tens of milliseconds until it answers or the deadline passes.

    Also watches the container now and then, so a node that dies at start fails fast. That look
    runs beside the probes, never between two: on a loaded engine one inspect took longer than
    the node needed to answer, and every probe waited for it.
    """
    interval = ops.cfg.node.probe_interval_seconds
    next_inspect = time.monotonic() + 0.5
    looking: asyncio.Task[NodeInfo] | None = None
    try:
        while time.monotonic() < deadline:
            if await probe(ops, rec, timeout=min(1.0, max(0.05, deadline - time.monotonic()))):
                return True
            if looking is not None and looking.done():
                _seen(rec, looking)
                looking = None
                next_inspect = time.monotonic() + 0.5
            if looking is None and time.monotonic() >= next_inspect:
                looking = asyncio.ensure_future(ops.backend.inspect(rec.cid))
            await asyncio.sleep(interval)
        return False
    finally:
        if looking is not None and not looking.done():
            looking.cancel()


def _seen(rec: NodeRecord, looking: asyncio.Task[NodeInfo]) -> None:
    """What an inspect of a starting node says: gone or dead ends the wait, a new address is taken."""
    try:
        info = looking.result()
    except ContainerGone:
        raise NodeTimeout("Node start failed: its container was removed") from None
    if info.status in (NodeStatus.EXITED, NodeStatus.DEAD):
        raise NodeTimeout(f"Node creation failed: the container {info.status}")
    if info.port and info.address != (rec.host, rec.port):
        rec.host, rec.port = info.address


async def owned(ops: NodeOps, node_id: str) -> NodeRecord:
    """A session's record; NodeNotFound when there is none or it is being released."""
    rec = await ops.store.get_node(node_id)
    if rec is None or rec.status == NodeStatus.RELEASED:
        raise NodeNotFound(node_id)
    return rec


async def gone(ops: NodeOps, rec: NodeRecord) -> NodeNotFound:
    """The engine says the session's container (and workspace, if it had one) is gone: drop the
    record, answer as for an unknown id."""
    await ops.store.delete_node(rec)
    ops.forget_address(rec.id)
    await ops.publish(EventKind.REMOVED, rec, "container gone")
    return NodeNotFound(rec.id)


async def discard(ops: NodeOps, rec: NodeRecord) -> None:
    """Remove a session entirely: its container, its workspace, then its record (in that order, so
    that a failure half-way leaves a record saying what is left)."""
    if rec.cid:
        await ops.backend.remove(rec.cid)
    if rec.workspace:
        await ops.backend.remove_workspace(rec.workspace)
    await ops.store.delete_node(rec)
    ops.forget_address(rec.id)


def session_lock(ops: NodeOps, rec: NodeRecord) -> SessionLock:
    """The session's lock as this replica takes it while it makes or restarts the container,
    waiting for another holder (the checker takes it too before it removes a container)."""
    wait = ops.cfg.node.creation_wait_seconds + 10
    return SessionLock(ops.store, rec.id, f"{ops.replica.replica_id}:{uuid.uuid4().hex[:8]}", wait,
                       wait_seconds=wait)


async def in_use(ops: NodeOps, rec: NodeRecord) -> None:
    """Count the session as active now, so no tier action is taken on it meanwhile."""
    await ops.store.touch({rec.id: (rec.manager_id, time.time())})
