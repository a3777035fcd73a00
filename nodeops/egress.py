"""A session's egress policy: read it, and change it (stored, then announced on the event stream,
which every replica's host agent follows: nodeops/egress_agent.py applies it on the node's host)."""

from __future__ import annotations

import msgspec

from nodeops.context import NodeOps
from shared import metrics
from shared.egress import policy as egress_policy
from shared.egress.policy import EgressPolicy
from shared.errors import NodeNotFound
from shared.models import Event, EventKind, NodeRecord, NodeStatus


def of_record(ops: NodeOps, rec: NodeRecord) -> EgressPolicy:
    """The policy a record holds, or the configured default."""
    if not rec.egress:
        return ops.cfg.egress.default
    try:
        return msgspec.json.decode(rec.egress, type=EgressPolicy)
    except msgspec.DecodeError:  # written by a newer replica in a form this one does not know
        return ops.cfg.egress.default


async def _record(ops: NodeOps, node_id: str | None) -> NodeRecord:
    rec = await ops.store.get_node(node_id) if node_id else None
    if rec is None or rec.status == NodeStatus.RELEASED:
        raise NodeNotFound(node_id)
    return rec


async def get(ops: NodeOps, node_id: str | None) -> EgressPolicy:
    """The session's policy (NodeNotFound for an unknown session)."""
    return of_record(ops, await _record(ops, node_id))


async def put(ops: NodeOps, node_id: str | None, raw: object, by: str) -> EgressPolicy:
    """Validate and store a session's new policy, then announce it; BadRequest changes nothing."""
    pol = egress_policy.validate(raw)
    rec = await _record(ops, node_id)
    encoded = msgspec.json.encode(pol).decode()
    if not await ops.store.update_node(rec.id, egress=encoded):
        raise NodeNotFound(node_id)
    metrics.EGRESS_POLICY_CHANGES.labels(by).inc()
    await ops.store.publish(Event(type=EventKind.EGRESS_POLICY, node_id=rec.id, manager_id=rec.manager_id,
                                  replica_id=ops.replica.replica_id, detail=f"by={by} policy={encoded}"))
    return pol
