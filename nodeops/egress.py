"""A session's egress policy: read it, and change it (stored, then announced on the event stream,
which every replica's host agent follows: nodeops/egress_agent.py applies it on the node's host)."""

from __future__ import annotations

import time

import msgspec

from nodeops.context import NodeOps
from shared import metrics
from shared.egress import policy as egress_policy
from shared.egress.policy import EgressPolicy
from shared.egress.secrets import NAME as SECRET_NAME
from shared.egress.secrets import SecretBox
from shared.errors import BadRequest, NodeNotFound
from shared.models import Event, EventKind, NodeRecord, NodeStatus
from shared.store.egress_secrets import StoredSecret


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
    """Validate and store a session's new policy, announce it, and answer once this host's agent has
    it in force (as a hand-out waits: egress_settled); BadRequest changes nothing."""
    pol = egress_policy.validate(raw)
    rec = await _record(ops, node_id)
    encoded = msgspec.json.encode(pol).decode()
    if not await ops.store.update_node(rec.id, egress=encoded):
        raise NodeNotFound(node_id)
    metrics.EGRESS_POLICY_CHANGES.labels(by).inc()
    await ops.store.publish(Event(type=EventKind.EGRESS_POLICY, node_id=rec.id, manager_id=rec.manager_id,
                                  replica_id=ops.replica.replica_id, detail=f"by={by} policy={encoded}"))
    # a tightening the caller was told of must already hold for the node's next packet or query (a
    # query made right after the answer was resolved by the old policy, full run f8)
    if rec.status == NodeStatus.RUNNING:  # (one stopped or paused gets it when it runs again)
        await ops.egress_settled(rec)
    return pol


# --- secrets (shared/egress/secrets.py): set and listed by admins, never shown ---------------------
MAX_SECRET_BYTES = 8192


def _box(ops: NodeOps) -> SecretBox:
    key = ops.cfg.egress_secrets_key
    if not key:
        raise BadRequest("secrets cannot be stored: egress.secrets_key (or secrets_key_file) is not set")
    return SecretBox(key, ops.cfg.egress_secrets_old_keys)


async def put_secret(ops: NodeOps, name: str, raw: object) -> dict[str, object]:
    """Seal and store a secret bound to hosts; BadRequest (nothing stored) for bad input."""
    if not SECRET_NAME.match(name):
        raise BadRequest(f"secret name {name[:80]!r}: lower-case letters, digits, '.', '_', '-' (at most 63)")
    if not isinstance(raw, dict) or set(raw) - {"value", "hosts", "body"}:
        raise BadRequest('a secret is {"value": "...", "hosts": ["api.example.com", "*.example.com"], '
                         '"body": false}')
    value, hosts, body = raw.get("value"), raw.get("hosts"), raw.get("body", False)
    if not isinstance(body, bool):
        raise BadRequest("secret body must be true (replaced in request bodies too) or false (headers only)")
    if not isinstance(value, str) or not value or len(value.encode()) > MAX_SECRET_BYTES:
        raise BadRequest(f"secret value must be a non-empty string of at most {MAX_SECRET_BYTES} bytes")
    if not isinstance(hosts, list) or not hosts or not all(isinstance(h, str) for h in hosts):
        raise BadRequest("secret hosts must be a non-empty list of names")
    clean = egress_policy.validate({"allow": hosts}).allow
    if any(not egress_policy.is_name(h) for h in clean):
        raise BadRequest("secret hosts must be names (the proxy matches them to the TLS server name), not ranges")
    stored = StoredSecret(hosts=clean, sealed=_box(ops).seal(name, value), updated_at=time.time(), body=body)
    await ops.store.egress_secrets.put(name, stored)
    await ops.store.publish(Event(type=EventKind.EGRESS_SECRET, node_id="", manager_id="",
                                  replica_id=ops.replica.replica_id,
                                  detail=f"set name={name} hosts={','.join(clean)} body={str(body).lower()}"))
    return {"name": name, "hosts": clean, "body": body, "updated_at": stored.updated_at}


def _sealed_with(box: SecretBox | None, name: str, s: StoredSecret) -> str:
    """Which key opens a stored secret: "current", "old" (to rotate) or "unknown" (none here)."""
    if box is None:
        return "unknown"
    try:
        return "current" if box.open_which(name, s.sealed)[1] else "old"
    except Exception:
        return "unknown"


async def list_secrets(ops: NodeOps) -> list[dict[str, object]]:
    """Names, hosts and sealing key (current, old, unknown) of the stored secrets (never a value)."""
    box = SecretBox(ops.cfg.egress_secrets_key, ops.cfg.egress_secrets_old_keys) if ops.cfg.egress_secrets_key else None
    return [{"name": n, "hosts": s.hosts, "body": s.body, "updated_at": s.updated_at,
             "sealed_with": _sealed_with(box, n, s)}
            for n, s in sorted((await ops.store.egress_secrets.all()).items())]


async def rotate_secrets(ops: NodeOps) -> dict[str, object]:
    """Seal again under the current key every secret an old key sealed; what was done, by name
    (a secret no configured key opens is left as it is and named)."""
    box = _box(ops)
    out: dict[str, list[str]] = {"resealed": [], "current": [], "unreadable": [], "changed": []}
    for name, stored in sorted((await ops.store.egress_secrets.all()).items()):
        try:
            value, current = box.open_which(name, stored.sealed)
        except Exception:
            out["unreadable"].append(name)
            continue
        if current:
            out["current"].append(name)
            continue
        now = msgspec.structs.replace(stored, sealed=box.seal(name, value))
        out["resealed" if await ops.store.egress_secrets.replace(name, stored, now) else "changed"].append(name)
    if out["resealed"]:
        await ops.store.publish(Event(type=EventKind.EGRESS_SECRET, node_id="", manager_id="",
                                      replica_id=ops.replica.replica_id,
                                      detail=f"set rotated={','.join(out['resealed'])}"))
    return dict(out)
