"""The checker's half of durable lifecycle intent: stops and releases other replicas
recorded while no replica of this manager_id could be reached (nodeops/intents.py) are
carried out first thing in every pass, before the records are read, so the pass sees
their outcome and a returning owner never undoes what a client asked for meanwhile."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from checker.tiers import archived_fields
from shared import metrics
from shared.errors import ContainerGone
from shared.models import Event, IntentOp, NodeStatus

if TYPE_CHECKING:
    from checker.service import Checker

log = logging.getLogger(__name__)


async def carry_out(ck: "Checker") -> int:
    """Carry out every intent waiting for this manager_id; how many were done."""
    pending = await ck.store.intents(ck.mid)
    if not pending:
        return 0
    recs = {r.id: r for r in await ck.store.get_nodes(list(pending))}
    done = 0
    for node_id, intent in pending.items():
        ck._check_held()
        rec = recs.get(node_id)
        store = ck.store
        holder = ck.lease.holder
        now = time.time()
        if rec is None:  # released or removed since: nothing left to do
            await ck._fenced([store.intent_done_op(ck.mid, node_id)])
            continue
        if intent.op == IntentOp.RELEASE:
            if rec.cid:
                await ck.backend.remove(rec.cid)
            if rec.workspace:
                await ck.backend.remove_workspace(rec.workspace)
            await ck._fenced(store.delete_ops(rec) + [store.intent_done_op(ck.mid, node_id), store.event_op(
                Event(type="released", node_id=node_id, manager_id=ck.mid, replica_id=holder,
                      detail=f"intent of {intent.at:.3f} carried out"))])
        else:
            gone = not rec.cid
            try:
                if rec.cid:
                    await ck.backend.stop(rec.cid, timeout=ck.cfg.node.stop_timeout_seconds)
            except ContainerGone:
                gone = True
            if gone and rec.workspace:  # nothing left to stop: the session stays, archived
                ops = [store.update_op(node_id, archived_fields(now), now), store.archived_op(ck.mid, node_id)]
                gone = False
            elif gone:  # only the engine's word ends a session: the container is no more
                ops = store.delete_ops(rec)
            else:
                ops = [store.update_op(node_id, {"status": NodeStatus.EXITED, "ready_at": 0,
                                                 "stopped_at": f"{now:.3f}"}, now)]
            await ck._fenced(ops + [store.intent_done_op(ck.mid, node_id), store.event_op(
                Event(type="removed" if gone else "stopped", node_id=node_id, manager_id=ck.mid, replica_id=holder,
                      detail=f"intent of {intent.at:.3f} carried out"))])
        done += 1
        metrics.INTENTS.labels(intent.op, "done").inc()
        log.info("intent_carried_out node_id=%s manager_id=%s op=%s waited_s=%.1f", node_id[:12], ck.mid,
                 intent.op, now - intent.at)
    return done
