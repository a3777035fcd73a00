"""Intents: a stop or release asked of a replica that does not own the node, kept for the owner
to carry out; the record says so at once."""

from __future__ import annotations

import contextlib

import msgspec

from shared.models import Intent, NodeRecord
from shared.store.base import Op, Part, Script, redis_errors, text

# KEYS[1] node hash, KEYS[2] the owner's intents hash; ARGV[1] node id, ARGV[2] op, ARGV[3] intent JSON,
# ARGV[4] now. Records a stop or release the owner will carry out, and makes the record say so at
# once: a release marks it released (every replica answers 403 for it from now on), a stop marks it
# exited (the next call must restart it through the owner). Nothing for a missing or released record.
RECORD_INTENT = """
if redis.call('exists', KEYS[1]) == 0 then return 0 end
if redis.call('hget', KEYS[1], 'status') == 'released' then return 0 end
if ARGV[2] == 'release' then
  redis.call('hset', KEYS[1], 'status', 'released', 'updated_at', ARGV[4])
else
  redis.call('hset', KEYS[1], 'status', 'exited', 'ready_at', '0', 'stopped_at', ARGV[4], 'updated_at', ARGV[4])
end
local cur = redis.call('hget', KEYS[2], ARGV[1])
if not (cur and string.find(cur, '"op":"release"', 1, true)) then redis.call('hset', KEYS[2], ARGV[1], ARGV[3]) end
return 1
"""

# KEYS[1] intents hash; ARGV[1] node id, ARGV[2] op. Drops the node's intent if it is that op.
DROP_INTENT = """
local cur = redis.call('hget', KEYS[1], ARGV[1])
if cur and string.find(cur, '"op":"' .. ARGV[2] .. '"', 1, true) then return redis.call('hdel', KEYS[1], ARGV[1]) end
return 0
"""


class Intents(Part):
    """Record, list and drop the intents waiting for a manager_id."""

    _record_intent = Script(RECORD_INTENT)
    _drop_intent = Script(DROP_INTENT)

    async def record_intent(self, rec: NodeRecord, intent: Intent) -> bool:
        """Record a stop or release for the node's owner to carry out; False when the record is gone."""
        with redis_errors():
            return bool(await self._record_intent(
                keys=[self.keys.node(rec.id), self.keys.intents(rec.manager_id)],
                args=[rec.id, intent.op, msgspec.json.encode(intent), f"{intent.at:.3f}"]))

    async def intents(self, manager_id: str) -> dict[str, Intent]:
        """node id -> the intent waiting for this manager_id (malformed entries are skipped)."""
        with redis_errors():
            raw = await self.redis.hgetall(self.keys.intents(manager_id))
        out: dict[str, Intent] = {}
        for node_id, blob in raw.items():
            with contextlib.suppress(msgspec.ValidationError, msgspec.DecodeError):
                out[text(node_id)] = msgspec.json.decode(blob, type=Intent)
        return out

    async def drop_intent(self, manager_id: str, node_id: str, op: str) -> bool:
        """Forget the node's intent if it is op (a later call superseded it)."""
        with redis_errors():
            return bool(await self._drop_intent(keys=[self.keys.intents(manager_id)], args=[node_id, op]))

    def intent_done_op(self, manager_id: str, node_id: str) -> Op:
        """An HDEL for fenced(): the intent goes in the same write that records it carried out."""
        return ("hdel", self.keys.intents(manager_id), [node_id])
