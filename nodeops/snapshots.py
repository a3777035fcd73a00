"""Snapshots: a session's workspace saved by name, immutable, that new sessions start from.

The bytes are a seed on the host of the session's manager_id (copied as a fork copies, the source
held still only for the copy); the metadata is in Redis, within fork.snapshot_bytes per host and
fork.snapshots_per_client. Names are per client: two clients may each keep "base", and one never
sees, starts from or deletes the other's (an admin sees every client's). A session from a snapshot is made on the snapshot's host when placement
allows, else on another, its bytes streamed there through a replica of the snapshot's host.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from urllib.parse import quote

import msgspec

from nodeops import forks
from nodeops.context import NodeOps
from nodeops.forward import RemoteError, forward, owner_replicas, remote_stream
from nodeops.primitives import in_use, owned
from shared import metrics
from shared.errors import BadRequest, ManagerError, NodeNotFound, NoLiveManager, NotFound, QuotaExceeded
from shared.models import EventKind, Snapshot

log = logging.getLogger(__name__)

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class SnapshotExists(BadRequest):
    status_code = 409


class SnapshotAmbiguous(BadRequest):
    """An admin named a snapshot that several clients keep, without saying whose."""

    status_code = 409


def check_name(name: object) -> str:
    """A snapshot name as given, once it is one (BadRequest naming the rule otherwise)."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise BadRequest(f"invalid snapshot name {str(name)[:80]!r}: 1 to 64 letters, digits, '_', '.', '-', "
                         "starting with a letter or digit")
    return name


async def snapshot(ops: NodeOps, node_id: str | None, name: str) -> Snapshot:
    """Save a session's workspace as the snapshot name, on the engine that holds it."""
    check_name(name)
    if not node_id:
        raise NodeNotFound(node_id)
    rec = await owned(ops, node_id)
    if rec.manager_id == ops.manager_id:
        return await snapshot_local(ops, node_id, name)
    try:
        data = await forward(ops, rec.manager_id, "POST", f"/internal/nodes/{node_id}/snapshot", {"name": name})
    except RemoteError as exc:
        if exc.status_code == 404:
            raise NodeNotFound(node_id) from None
        raise
    return msgspec.convert(data, Snapshot)


def _refused(why: str, ops: NodeOps, name: str, client: str) -> ManagerError:
    f = ops.cfg.fork
    if why == "exists":
        return SnapshotExists(f"a snapshot named {name} exists for this client (snapshots are immutable: delete it first)")
    if why == "client":
        return QuotaExceeded(f"quota exceeded: client {client} already keeps {f.snapshots_per_client} snapshots")
    return QuotaExceeded(f"quota exceeded: snapshots on {ops.manager_id} would take over {f.snapshot_bytes} bytes "
                         "(fork.snapshot_bytes)")


async def snapshot_local(ops: NodeOps, node_id: str, name: str) -> Snapshot:
    """Save a session of this engine: checked against the limits before the copy (nothing is copied
    for a refusal) and again, atomically, when its size is known."""
    t0 = time.monotonic()
    f = ops.cfg.fork
    rec = await owned(ops, node_id)
    await in_use(ops, rec)
    if await ops.store.snapshots.get(rec.client, name) is not None:
        raise _refused("exists", ops, name, rec.client)
    used, kept = await ops.store.snapshots.usage(ops.manager_id, rec.client)
    if f.snapshots_per_client and kept >= f.snapshots_per_client:
        raise _refused("client", ops, name, rec.client)
    if f.snapshot_bytes and used >= f.snapshot_bytes:
        raise _refused("bytes", ops, name, rec.client)
    seed = f"{forks.seed_prefix(ops)}{uuid.uuid4().hex}"
    kept_seed = False
    try:
        stall = await forks.capture(ops, rec, seed)
        metrics.SOURCE_STALL_SECONDS.labels("snapshot").observe(stall)
        snap = Snapshot(name=name, manager_id=ops.manager_id, seed=seed, source=node_id, client=rec.client,
                        bytes=await ops.backend.seed_bytes(seed), created_at=time.time())
        why = await ops.store.snapshots.put(snap, f.snapshots_per_client, f.snapshot_bytes)
        if why != "ok":
            raise _refused(why, ops, name, rec.client)
        kept_seed = True
    finally:
        if not kept_seed:
            await asyncio.shield(ops.backend.drop_seed(seed))
    await ops.publish(EventKind.SNAPSHOTTED, rec, name)
    elapsed = time.monotonic() - t0
    metrics.SNAPSHOT_SECONDS.observe(elapsed)
    log.info("session_snapshotted node_id=%s name=%s bytes=%d stall_s=%.3f elapsed_s=%.3f", node_id[:12], name,
             snap.bytes, stall, elapsed)
    return snap


async def find(ops: NodeOps, name: str, client: str | None) -> Snapshot:
    """client's snapshot name (None: an admin, who sees every client's: the one of that name, or
    SnapshotAmbiguous when several clients keep one); NotFound otherwise."""
    check_name(name)
    if client is not None:
        snap = await ops.store.snapshots.get(client, name)
        if snap is None:
            raise NotFound(f"no snapshot named {name}")
        return snap
    named = [s for s in await ops.store.snapshots.all() if s.name == name]
    if not named:
        raise NotFound(f"no snapshot named {name}")
    if len(named) > 1:
        raise SnapshotAmbiguous(f"{len(named)} clients keep a snapshot named {name}: name one with ?client=<client> "
                                f"(its client field in GET /admin/snapshots)")
    return named[0]


async def listing(ops: NodeOps, client: str | None) -> list[Snapshot]:
    """The snapshots client keeps (None: every one)."""
    return [s for s in await ops.store.snapshots.all() if client is None or s.client == client]


def owner_query(snap: Snapshot) -> str:
    """The query naming a snapshot's client on the owner's internal routes."""
    return f"?client={quote(snap.client, safe='')}"


async def delete(ops: NodeOps, name: str, client: str | None) -> Snapshot:
    """Delete a snapshot: its bytes on its host, then its record (sessions made from it keep theirs); which."""
    snap = await find(ops, name, client)
    if snap.manager_id != ops.manager_id:
        await forward(ops, snap.manager_id, "DELETE", f"/internal/snapshots/{name}{owner_query(snap)}")
        return snap
    await delete_local(ops, name, snap.client)
    return snap


async def delete_local(ops: NodeOps, name: str, client: str) -> None:
    snap = await ops.store.snapshots.get(client, check_name(name))
    if snap is None:
        raise NotFound(f"no snapshot named {name}")
    await ops.backend.drop_seed(snap.seed)
    await ops.store.snapshots.delete(client, name)


async def fetch(ops: NodeOps, snap: Snapshot) -> str:
    """The snapshot's bytes copied from its host through a replica of it into a seed of this host
    (a fork's: the checker collects it if this replica dies before dropping it); its name."""
    replicas = await owner_replicas(ops, snap.manager_id)
    if not replicas or not ops.cfg.internal_token:
        raise NoLiveManager(snap.manager_id)
    seed = f"{forks.seed_prefix(ops, 'fork')}{uuid.uuid4().hex}"
    t0 = time.monotonic()
    try:
        chunks = await remote_stream(ops, replicas[0], f"/internal/snapshots/{snap.name}/bytes{owner_query(snap)}")
        await ops.backend.import_seed(seed, chunks)
    except BaseException:
        await asyncio.shield(ops.backend.drop_seed(seed))
        raise
    log.info("snapshot_fetched name=%s from=%s bytes=%d elapsed_s=%.3f", snap.name, snap.manager_id, snap.bytes,
             time.monotonic() - t0)
    return seed


async def collect(ops: NodeOps, older_than: float) -> int:
    """Drop this cluster's seeds on this host made before older_than that nothing needs: a fork's
    (its replica died before dropping it) and a snapshot's no snapshot names (its replica died
    between the copy and the record); how many."""
    gone = await ops.backend.drop_stale_seeds(forks.seed_prefix(ops, "fork"), older_than, set())
    keep = {s.seed for s in await ops.store.snapshots.all()}
    return gone + await ops.backend.drop_stale_seeds(forks.seed_prefix(ops), older_than, keep)
