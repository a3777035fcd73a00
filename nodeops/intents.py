"""Lifecycle calls as durable intent: a close or release for a node whose owner has no
reachable replica is recorded in Redis and answered at once; the owner's checker carries
it out when the owner is back (see checker/intents.py). Nothing a client asked for is
lost because a replica or its host was down, as a Kubernetes object's desired state
outlives the controller that acts on it."""

from __future__ import annotations

import logging
import time

from nodeops.context import NodeOps
from shared import metrics
from shared.errors import NodeNotFound
from shared.models import EventKind, Intent, IntentOp, NodeRecord

log = logging.getLogger(__name__)


async def record(ops: NodeOps, rec: NodeRecord, op: IntentOp) -> None:
    """Accept op for the owner to carry out; the record says so at once (released, or exited)."""
    intent = Intent(op=op, at=time.time(), by=ops.replica.replica_id)
    if not await ops.store.record_intent(rec, intent):
        raise NodeNotFound(rec.id)  # released (or removed) meanwhile: as for an unknown id
    ops.forget_address(rec.id)
    # every replica drops its cached address: the session is gone (or stopped) for the client now
    await ops.publish(EventKind.RELEASED if op == IntentOp.RELEASE else EventKind.STOPPED, rec,
                      f"recorded: {rec.manager_id} carries it out when it is back")
    metrics.INTENTS.labels(op, "recorded").inc()
    log.info("intent_recorded node_id=%s manager_id=%s op=%s", rec.id[:12], rec.manager_id, op)


async def supersede_stop(ops: NodeOps, manager_id: str, node_id: str) -> None:
    """A call that wants the node running came after a recorded close: the close is dropped."""
    if await ops.store.drop_intent(manager_id, node_id, IntentOp.STOP):
        metrics.INTENTS.labels(IntentOp.STOP, "superseded").inc()
        log.info("intent_superseded node_id=%s manager_id=%s op=stop", node_id[:12], manager_id)
