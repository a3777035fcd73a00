"""Fenced writes: the checker's batches of writes, applied by a Lua script only while the caller
holds the manager_id's lease with the current token, so a deposed checker cannot overwrite its
successor's work; and the count of reconcile cycles kept the same way."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from shared.store.base import Op, Part, Script, redis_errors, slot, text

# KEYS[1] lease, KEYS[2] fence counter, KEYS[3..] keys the ops name by index
# ARGV[1] holder, ARGV[2] token, ARGV[3] ops as JSON: [[op, key_index, args...], ...]
# Rejects every op unless the caller still holds the lease with the current token.
FENCED = """
local cur = redis.call('get', KEYS[1])
if cur ~= (ARGV[1] .. ':' .. ARGV[2]) then return -1 end
if redis.call('get', KEYS[2]) ~= ARGV[2] then return -1 end
local ops = cjson.decode(ARGV[3])
local n = 0
for _, op in ipairs(ops) do
  local name, key = op[1], KEYS[op[2]]
  local args = {}
  for i = 3, #op do args[#args + 1] = op[i] end
  if name == 'hset_xx' then
    if redis.call('exists', key) == 1 then redis.call('hset', key, unpack(args)); n = n + 1 end
  elseif name == 'hset_nx' then
    if redis.call('exists', key) == 0 then redis.call('hset', key, unpack(args)); n = n + 1 end
  elseif name == 'xadd' then
    redis.call('xadd', key, 'MAXLEN', '~', args[1], '*', unpack(args, 2))
    n = n + 1
  else
    redis.call(name, key, unpack(args))
    n = n + 1
  end
end
return n
"""


class Fenced(Part):
    """Apply a checker's writes under its lease token."""

    _fenced = Script(FENCED)

    async def fenced(self, manager_id: str, holder: str, token: int, ops: Sequence[Op]) -> bool:
        """Apply ops [(redis_op, key, args)] atomically iff holder still has the lease with token."""
        tail: list[Op] = []
        if self.clustered:
            # the script runs in the lease's slot; a write of another slot (a client's count, the
            # events stream, a session not of this manager's home) follows once the fenced part
            # was accepted, so a deposed checker still writes nothing at all
            here = slot(self.keys.lease(manager_id))
            tail = [op for op in ops if slot(op[1]) != here]
            ops = [op for op in ops if slot(op[1]) == here]
        # in chunks, each fenced on its own, so a mass change never blocks Redis for long
        for i in range(0, len(ops), 2000):
            if not await self._fenced_chunk(manager_id, holder, token, ops[i:i + 2000]):
                return False
        if tail:
            with redis_errors():
                async with self.redis.pipeline(transaction=False) as p:
                    queue_fenced_tail(p, tail)
                    await p.execute()
        return True

    async def _fenced_chunk(self, manager_id: str, holder: str, token: int, ops: Sequence[Op]) -> bool:
        keys = [self.keys.lease(manager_id), self.keys.fence(manager_id)]
        index: dict[str, int] = {}
        encoded = []
        for name, key, args in ops:
            if key not in index:
                keys.append(key)
                index[key] = len(keys)
            encoded.append([name, index[key], *[str(a) for a in args]])
        with redis_errors():
            res = await self._fenced(keys=keys, args=[holder, token, msgspec.json.encode(encoded)])
        return int(res) >= 0

    def cycle_count_op(self, manager_id: str, token: int) -> Op:
        return ("hincrby", self.keys.checker_stats(manager_id), [f"cycles:{token}", 1])

    async def checker_cycles(self, manager_id: str) -> dict[str, int]:
        """Reconcile cycles run per lease token (admin view)."""
        with redis_errors():
            stats = await self.redis.hgetall(self.keys.checker_stats(manager_id))
        return {text(k).split(":", 1)[1]: int(v) for k, v in stats.items() if text(k).startswith("cycles:")}


def queue_fenced_tail(p: object, ops: Sequence[Op]) -> None:
    """The FENCED script's ops as plain commands (hset_xx/hset_nx as HSET, xadd capped)."""
    for name, key, args in ops:
        if name in ("hset_xx", "hset_nx"):
            p.execute_command("HSET", key, *args)  # type: ignore[attr-defined]
        elif name == "xadd":
            p.execute_command("XADD", key, "MAXLEN", "~", args[0], "*", *args[1:])  # type: ignore[attr-defined]
        else:
            p.execute_command(name.upper(), key, *args)  # type: ignore[attr-defined]
