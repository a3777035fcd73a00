"""The checker's half of durable lifecycle intent: stops and releases other replicas
recorded while no replica of this manager_id could be reached (nodeops/intents.py) are
carried out first thing in every pass, before the records are read, so the pass sees
their outcome and a returning owner never undoes what a client asked for meanwhile."""

from __future__ import annotations

import logging
import time

from checker.fence import Fence
from nodeops.context import NodeOps
from shared import metrics
from shared.errors import ContainerGone
from shared.models import EventKind, IntentOp, archived_fields, stopped_fields
from shared.store import Op

log = logging.getLogger(__name__)


async def carry_out(ops: NodeOps, fence: Fence) -> int:
    """Carry out every intent waiting for this manager_id; how many were done."""
    store, backend, mid = ops.store, ops.backend, ops.manager_id
    pending = await store.intents(mid)
    if not pending:
        return 0
    recs = {r.id: r for r in await store.get_nodes(list(pending))}
    done = 0
    for node_id, intent in pending.items():
        fence.check_held()
        rec = recs.get(node_id)
        now = time.time()
        detail = f"intent of {intent.at:.3f} carried out"
        if rec is None:  # released or removed since: nothing left to do
            await fence.write([store.intent_done_op(mid, node_id)])
            continue
        if intent.op == IntentOp.RELEASE:
            if rec.cid:
                await backend.remove(rec.cid)
            if rec.workspace:
                await backend.remove_workspace(rec.workspace)
            await fence.write([*store.delete_ops(rec), store.intent_done_op(mid, node_id), *fence.event(EventKind.RELEASED, node_id, detail)])
        else:
            gone = not rec.cid
            try:
                if rec.cid:
                    await backend.stop(rec.cid, timeout=ops.cfg.node.stop_timeout_seconds)
            except ContainerGone:
                gone = True
            writes: list[Op]
            if gone and rec.workspace:  # nothing left to stop: the session stays, archived
                writes = [fence.update(node_id, archived_fields(now), now), store.archived_op(mid, node_id)]
                gone = False
            elif gone:  # only the engine's word ends a session: the container is no more
                writes = store.delete_ops(rec)
            else:
                writes = [fence.update(node_id, stopped_fields(now), now)]
            await fence.write([*writes, store.intent_done_op(mid, node_id), *fence.event(EventKind.REMOVED if gone else EventKind.STOPPED, node_id, detail)])
        done += 1
        metrics.INTENTS.labels(intent.op, "done").inc()
        log.info("intent_carried_out node_id=%s manager_id=%s op=%s waited_s=%.1f", node_id[:12], mid,
                 intent.op, now - intent.at)
    return done
