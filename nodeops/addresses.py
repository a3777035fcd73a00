"""Where a node's secret may go: only to the address the engine confirms for that session.

A node's address in its Redis record is data anyone who can write Redis controls: rewriting it
once delivered a session's next request, with its cookie, body and node secret, to a listener of
a local user's. So the address a local node is reached at comes from the engine: checked once per
container (the engine's inspect: that container carries this session's label and our
manager_id, and is running at that address), then cached by container id, and checked again
whenever the record names another address (a restart moved it, or someone rewrote it). On a
mismatch the engine's address is used, never the record's.

Chosen over a per-request signature the node would verify: a signature keeps the secret from a
listener but not the request itself (cookie, body) nor the client's trust in the answer, and it
would need every node image to change. The cost is one engine call per container per replica.

Nodes of another manager_id are on another engine this replica cannot ask: a live replica of
their owner confirms the address with its engine (an internal call, cached the same way, on a
new connection so a host cut off fails its connect timeout and opens its circuit like any other
call to it, instead of a kept-alive connection waiting out cluster.forward_timeout_seconds).
When the owner has no live replica it can reach (or forwarding is off: no cluster.internal_token)
the record's address is used, as a node must stay reachable while its owner restarts (a lost
host's node then fails fast on its own open circuit); writing that record takes Redis's
password, which only the replicas have. The cache itself is nodeops/address_cache.py.
"""

from __future__ import annotations

import logging

from nodeops.context import NodeOps
from nodeops.forward import forward
from shared.engines.base import Address
from shared.errors import AddressUnconfirmed, ContainerGone, NoLiveManager
from shared.models import NodeRecord

log = logging.getLogger(__name__)


async def confirmed(ops: NodeOps, rec: NodeRecord) -> Address:
    """The address to send rec's node its secret at: the engine's for a local node."""
    recorded = Address(rec.host, rec.port)
    cid = rec.cid
    if not cid:
        raise AddressUnconfirmed(rec.id, "the record names no container")
    if ops.addresses.get(cid) == (rec.id, recorded):
        return recorded
    if rec.manager_id != ops.manager_id:
        return await _confirmed_by_owner(ops, rec, cid, recorded)
    try:
        info = await ops.backend.inspect(cid)
    except ContainerGone:
        ops.addresses.drop(cid)
        raise
    # the record's container id is Redis data too: it must be this session's, made by us
    ours = info.owner == ops.manager_id and (info.session_id == rec.id or (not info.session_id and info.id == rec.id))
    if not ours:
        raise AddressUnconfirmed(rec.id, f"container {cid[:12]} does not belong to it")
    if not info.port:
        ops.addresses.drop(cid)
        raise AddressUnconfirmed(rec.id, "its container is not running")
    ops.addresses.put(cid, rec.id, info.address)
    return info.address


async def _confirmed_by_owner(ops: NodeOps, rec: NodeRecord, cid: str, recorded: Address) -> Address:
    if not ops.cfg.internal_token:
        return recorded
    try:
        got = await forward(ops, rec.manager_id, "GET", f"/internal/nodes/{rec.id}/address", fresh=True)
    except NoLiveManager:
        log.info("address_unconfirmed node_id=%s manager_id=%s why=no live owner", rec.id[:12], rec.manager_id)
        return recorded
    if not isinstance(got, dict) or got.get("container_id") != cid:
        raise AddressUnconfirmed(rec.id, f"its owner {rec.manager_id} runs it in another container")
    addr = Address(str(got.get("host", "")), int(got.get("port", 0)))
    ops.addresses.put(cid, rec.id, addr)
    return addr
