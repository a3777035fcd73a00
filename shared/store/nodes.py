"""Node records and their index: a record is a hash written field by field, never overwritten
whole, so concurrent updates of different fields cannot lose each other; a manager_id's set of
node ids and its last-request sorted set index them. Also the checker's fenced writes of records."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import msgspec

from shared.keys import is_reservation
from shared.models import NodeRecord
from shared.nodesecret import NodeSecrets
from shared.store.base import Op, Part, Script, client_count_ops, redis_errors, text
from shared.store.batch import BatchedHgetall

# KEYS[1] node hash; ARGV: field, value, field, value...
# Only update a record that still exists: a late write must not resurrect a released node.
HSET_IF_EXISTS = """
if redis.call('exists', KEYS[1]) == 0 then return 0 end
redis.call('hset', KEYS[1], unpack(ARGV))
return 1
"""

# KEYS: node hashes; ARGV: names of numeric fields
# Returns the existing records as one JSON array, numbers typed, for one decode on the client.
READ_NODES = """
local num = {}
for _, f in ipairs(ARGV) do num[f] = true end
local out = {}
for _, key in ipairs(KEYS) do
  local h = redis.call('hgetall', key)
  if #h > 0 then
    local t = {}
    for i = 1, #h, 2 do
      if num[h[i]] then t[h[i]] = tonumber(h[i + 1]) or 0 else t[h[i]] = h[i + 1] end
    end
    if t['id'] and t['manager_id'] then out[#out + 1] = cjson.encode(t) end
  end
end
return '[' .. table.concat(out, ',') .. ']'
"""

# KEYS: node hashes. Returns their updated_at fields joined by newlines ('' where missing).
READ_STAMPS = """
local out = {}
for i, key in ipairs(KEYS) do out[i] = redis.call('hget', key, 'updated_at') or '' end
return table.concat(out, '\\n')
"""


class NodeRecords(Part):
    """Read, write, index and remove node records."""

    secrets: NodeSecrets  # a derived secret is never written
    _hset_if_exists = Script(HSET_IF_EXISTS)
    _read_nodes = Script(READ_NODES)
    _hgetall: BatchedHgetall | None = None
    _read_stamps = Script(READ_STAMPS)

    async def put_node(self, rec: NodeRecord, replace_member: str | None = None) -> None:
        """Write a whole new record and index it (creation; not for updates)."""
        k = self.keys
        ops: list[Op] = [("hset", k.node(rec.id), [x for kv in self._hash(rec).items() for x in kv])]
        if replace_member:
            ops.append(("srem", k.manager_nodes(rec.manager_id), [replace_member]))
        ops += self._index_ops(rec, rec.last_request_at or time.time())
        # the registry's set of manager ids (its own slot on a cluster; it only grows, so its own MULTI
        # after the record's is enough: reserve() added the manager_id before any creation)
        ops.append(("sadd", k.managers(), [rec.manager_id]))
        with redis_errors():
            await self.apply(ops)

    async def get_node(self, node_id: str) -> NodeRecord | None:
        """A record, or None; concurrent lookups share a pipeline (shared/store/batch.py says why)."""
        if self._hgetall is None:
            self._hgetall = BatchedHgetall(self.redis, redis_errors)
        data = await self._hgetall(self.keys.node(node_id))
        if not data or b"manager_id" not in data:
            return None
        try:
            return NodeRecord.from_hash(data)
        except msgspec.ValidationError:
            return None

    async def get_nodes(self, node_ids: Sequence[str]) -> list[NodeRecord]:
        """Records for many ids, a thousand per round trip; missing ones are skipped.

        One script call returns a chunk as a single JSON array with numbers typed, so the
        client parses one reply and decodes it in one msgspec call: per-reply overhead,
        not Redis, dominated reading 10,000 records one HGETALL at a time.
        """
        out: list[NodeRecord] = []
        for group in self.by_slot([self.keys.node(nid) for nid in node_ids]):  # one script per slot
            ids = [node_ids[j] for j in group]
            for i in range(0, len(ids), 1000):
                keys = [self.keys.node(nid) for nid in ids[i:i + 1000]]
                with redis_errors():
                    blob = await self._read_nodes(keys=keys, args=NodeRecord.numeric_fields())
                try:
                    out += msgspec.json.decode(blob, type=list[NodeRecord])
                except msgspec.ValidationError:  # a malformed record: fall back to one by one
                    out += [r for r in [await self.get_node(nid) for nid in ids[i:i + 1000]] if r]
        return out

    async def node_stamps(self, node_ids: Sequence[str]) -> dict[str, str]:
        """node id -> its updated_at as stored (a version stamp), for the records that exist."""
        out: dict[str, str] = {}
        for group in self.by_slot([self.keys.node(nid) for nid in node_ids]):  # one script per slot
            ids = [node_ids[j] for j in group]
            for i in range(0, len(ids), 5000):
                chunk = ids[i:i + 5000]
                with redis_errors():
                    blob = await self._read_stamps(keys=[self.keys.node(n) for n in chunk])
                for node_id, stamp in zip(chunk, text(blob).split("\n")):
                    if stamp:
                        out[node_id] = stamp
        return out

    def _hash(self, rec: NodeRecord) -> dict[str, str]:
        """The record as written: a derived secret left out (the node's is computed on use)."""
        out = rec.to_hash()
        out["secret"] = self.secrets.stored(rec.id, rec.secret)
        return out

    def _fields(self, node_id: str, fields: dict[str, Any]) -> dict[str, Any]:
        if "secret" in fields:
            fields = {**fields, "secret": self.secrets.stored(node_id, str(fields["secret"]))}
        return fields

    async def update_node(self, node_id: str, **fields: Any) -> bool:
        """Set some fields of an existing record; False when the record is gone."""
        fields = self._fields(node_id, fields)
        args: list[str] = []
        for key, value in fields.items():
            args += [key, str(value)]
        args += ["updated_at", str(time.time())]
        with redis_errors():
            return bool(await self._hset_if_exists(keys=[self.keys.node(node_id)], args=args))

    async def delete_node(self, rec: NodeRecord) -> None:
        """Remove a record and every index entry of it."""
        with redis_errors():
            await self.apply(self.delete_ops(rec))

    async def manager_node_ids(self, manager_id: str) -> list[str]:
        with redis_errors():
            return [text(m) for m in await self.redis.smembers(self.keys.manager_nodes(manager_id))]

    async def scan_all_nodes(self) -> AsyncIterator[NodeRecord]:
        """Every record of every manager_id, in batches."""
        for mid in await self.manager_ids():
            ids = [i for i in await self.manager_node_ids(mid) if not is_reservation(i)]
            for i in range(0, len(ids), 500):
                for rec in await self.get_nodes(ids[i:i + 500]):
                    yield rec

    # writes for fenced(): each a (command, key, args) the FENCED script applies
    def update_op(self, node_id: str, fields: dict[str, Any], now: float) -> Op:
        """Set fields of a record that still exists (never resurrects a removed one)."""
        args = [x for kv in self._fields(node_id, fields).items() for x in kv] + ["updated_at", f"{now:.3f}"]
        return ("hset_xx", self.keys.node(node_id), args)

    def adopt_ops(self, rec: NodeRecord, now: float) -> list[Op]:
        """Record and index a node found on the engine; a record written meanwhile is kept."""
        return [("hset_nx", self.keys.node(rec.id), [x for kv in self._hash(rec).items() for x in kv]),
                *self._index_ops(rec, now)]

    def _index_ops(self, rec: NodeRecord, last_request: float) -> list[Op]:
        k = self.keys
        return [("sadd", k.manager_nodes(rec.manager_id), [rec.id]),
                ("zadd", k.last_request(rec.manager_id), [str(last_request), rec.id])]

    def delete_ops(self, rec: NodeRecord) -> list[Op]:
        k = self.keys
        ops: list[Op] = [("del", k.node(rec.id), []), ("del", k.watchers(rec.id), []),
                         ("srem", k.manager_nodes(rec.manager_id), [rec.id]),
                         ("srem", k.archived(rec.manager_id), [rec.id]),
                         ("zrem", k.last_request(rec.manager_id), [rec.id]),
                         ("lrem", k.pool(rec.manager_id), [0, rec.id])]
        if rec.client:
            ops += client_count_ops(k, rec.client, -1)
        return ops
