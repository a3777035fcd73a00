"""Creation slots of one engine (manager_id), held in Redis so that every replica process driving
it shares one bound and one queue (nodeops/admission.py is the process's side).

A slot is a member of a sorted set scored by when its lease ends, in Redis's own clock (no skew
between hosts): a process renews what it holds, and one that was killed frees its slots and its
places in the queue once their leases lapse. Waiting client creations are ordered by turn:
a client's n-th waiting creation gets the turn after its (n-1)-th, and never one before the turn
being served, so one client's burst of N delays another client's single creation by one turn,
not N. Each call first drops lapsed members and hands free slots to the queue's head, so a slot
given back in one process goes to a waiter of any other at once; the waiter learns it on its
next poll (or at once, in the process that gave the slot back).
"""

from __future__ import annotations

from collections.abc import Sequence

from shared.store.base import Part, Script, redis_errors, text

# KEYS[1] slots (member -> lease end, ms), KEYS[2] refills' slots (same), KEYS[3] queue (member ->
# turn * 2^20 + arrival), KEYS[4] waiters (member -> lease end), KEYS[5] client -> last turn,
# KEYS[6] {round, seq}
COMMON = """
local t = redis.call('time')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local SEQ = 1048576
local function expire()
  redis.call('zremrangebyscore', KEYS[1], '-inf', now)
  redis.call('zremrangebyscore', KEYS[2], '-inf', now)
  local dead = redis.call('zrangebyscore', KEYS[4], '-inf', now)
  for _, m in ipairs(dead) do redis.call('zrem', KEYS[3], m) end
  if #dead > 0 then redis.call('zremrangebyscore', KEYS[4], '-inf', now) end
end
-- free slots to the queue's head, in turn; the granted members
local function grant(conc, lease)
  local granted = {}
  local free = conc - redis.call('zcard', KEYS[1])
  while free > 0 do
    local head = redis.call('zrange', KEYS[3], 0, 0, 'WITHSCORES')
    if #head == 0 then break end
    redis.call('zrem', KEYS[3], head[1])
    redis.call('zrem', KEYS[4], head[1])
    redis.call('zadd', KEYS[1], now + lease, head[1])
    redis.call('hset', KEYS[6], 'round', math.floor(tonumber(head[2]) / SEQ))
    table.insert(granted, head[1])
    free = free - 1
  end
  if redis.call('zcard', KEYS[3]) == 0 then redis.call('del', KEYS[5], KEYS[6]) end
  return granted
end
"""

# ARGV[1] member, ARGV[2] client, ARGV[3] '1' for a pool refill, ARGV[4] concurrency, ARGV[5] the
# queue's bound, ARGV[6] lease (ms)
# -> {state, waiting, running, position}: state 1 holds a slot, 0 waits (position: its place, 0 is the
# head), -1 refused (the queue is full). A first call enqueues, later ones poll (and renew the wait).
# A refill never queues: it takes a slot only when no client waits and it leaves one slot free.
ACQUIRE = COMMON + """
local member, client, conc, maxw, lease = ARGV[1], ARGV[2], tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
expire()
grant(conc, lease)
local running = redis.call('zcard', KEYS[1])
local waiting = redis.call('zcard', KEYS[3])
if redis.call('zscore', KEYS[1], member) then
  redis.call('zadd', KEYS[1], 'XX', now + lease, member)
  return {1, waiting, running, 0}
end
local rank = redis.call('zrank', KEYS[3], member)
if rank then
  redis.call('zadd', KEYS[4], now + lease, member)
  return {0, waiting, running, rank}
end
if ARGV[3] == '1' then
  if waiting == 0 and running < conc and redis.call('zcard', KEYS[2]) < math.max(1, conc - 1) then
    redis.call('zadd', KEYS[1], now + lease, member)
    redis.call('zadd', KEYS[2], now + lease, member)
    return {1, waiting, running + 1, 0}
  end
  return {0, waiting, running, waiting}
end
if waiting == 0 and running < conc then
  redis.call('zadd', KEYS[1], now + lease, member)
  return {1, 0, running + 1, 0}
end
if waiting >= maxw then return {-1, waiting, running, waiting} end
local round = tonumber(redis.call('hget', KEYS[6], 'round') or '0')
local last = tonumber(redis.call('hget', KEYS[5], client) or '-1')
local turn = math.max(round, last + 1)
redis.call('hset', KEYS[5], client, turn)
local seq = redis.call('hincrby', KEYS[6], 'seq', 1) % SEQ
redis.call('zadd', KEYS[3], turn * SEQ + seq, member)
redis.call('zadd', KEYS[4], now + lease, member)
return {0, waiting + 1, running, redis.call('zrank', KEYS[3], member)}
"""

# ARGV[1] concurrency, ARGV[2] lease (ms), ARGV[3..] members given back (held or waiting)
# -> the members granted a slot by it
RELEASE = COMMON + """
for i = 3, #ARGV do
  redis.call('zrem', KEYS[1], ARGV[i])
  redis.call('zrem', KEYS[2], ARGV[i])
  redis.call('zrem', KEYS[3], ARGV[i])
  redis.call('zrem', KEYS[4], ARGV[i])
end
expire()
return grant(tonumber(ARGV[1]), tonumber(ARGV[2]))
"""

# ARGV[1] lease (ms), ARGV[2..] members held -> how many are still held (a lapsed one is not renewed)
RENEW = """
local t = redis.call('time')
local until_ = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
local n = 0
for i = 2, #ARGV do
  -- counted by presence: ZADD's CH counts nothing when the new lease ends in the same millisecond
  if redis.call('zscore', KEYS[1], ARGV[i]) then
    n = n + 1
    redis.call('zadd', KEYS[1], 'XX', until_, ARGV[i])
  end
  redis.call('zadd', KEYS[2], 'XX', until_, ARGV[i])
end
return n
"""


class CreationSlots(Part):
    """The engine-wide creation slots and queue of a manager_id."""

    _acquire = Script(ACQUIRE)
    _release = Script(RELEASE)
    _renew = Script(RENEW)

    def _slot_keys(self, manager_id: str) -> list[str]:
        k = self.keys
        return [k.creation_slots(manager_id), k.creation_refills(manager_id), k.creation_queue(manager_id),
                k.creation_waiters(manager_id), k.creation_turns(manager_id), k.creation_round(manager_id)]

    async def creation_slot(self, manager_id: str, member: str, client: str, refill: bool, concurrency: int,
                            max_waiting: int, lease_seconds: float) -> tuple[int, int, int, int]:
        """Take a slot for member, queue it, or poll its place: (state, waiting, running, position),
        state 1 held, 0 waiting, -1 refused (a full queue)."""
        with redis_errors():
            got = await self._acquire(keys=self._slot_keys(manager_id),
                                      args=[member, client, "1" if refill else "0", concurrency, max_waiting,
                                            int(lease_seconds * 1000)])
        state, waiting, running, position = (int(x) for x in got)
        return state, waiting, running, position

    async def release_creation_slots(self, manager_id: str, members: Sequence[str], concurrency: int,
                                     lease_seconds: float) -> list[str]:
        """Give back slots held or places waited for; the waiters (of any process) granted a slot by it."""
        with redis_errors():
            got = await self._release(keys=self._slot_keys(manager_id),
                                      args=[concurrency, int(lease_seconds * 1000), *members])
        return [text(m) for m in got]

    async def renew_creation_slots(self, manager_id: str, members: Sequence[str], lease_seconds: float) -> int:
        """Push the leases of slots held further; how many of them were still held."""
        k = self.keys
        with redis_errors():
            return int(await self._renew(keys=[k.creation_slots(manager_id), k.creation_refills(manager_id)],
                                         args=[int(lease_seconds * 1000), *members]))

    async def creation_counts(self, manager_id: str) -> tuple[int, int]:
        """(waiting, running) on the engine as last written (lapsed members included until the next call)."""
        k = self.keys
        with redis_errors():
            async with self.redis.pipeline(transaction=False) as p:
                p.zcard(k.creation_queue(manager_id))
                p.zcard(k.creation_slots(manager_id))
                waiting, running = await p.execute()
        return int(waiting), int(running)
