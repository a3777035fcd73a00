"""The creation queue (nodeops/admission.py on shared/store/creations.py, on the real Redis: several
CreationQueues of one manager_id are several processes of one engine) and the pool's demand
arithmetic (nodeops/demand.py) as pure logic; tests/test_creation_queue.py drives both through
real managers."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from nodeops.admission import CreationQueue
from nodeops.demand import ArrivalRate, BurstPeak, plan
from shared.config import PoolConfig
from shared.errors import CreationQueueFull, RedisUnavailable
from shared.store import Store
from tests.conftest import until


async def _hold(q: CreationQueue, client: str, log: list[str], release: asyncio.Event, *,
                refill: bool = False) -> None:
    async with q.slot(client, refill=refill):
        log.append(client)
        await release.wait()


def _queues(store: Store, n: int, concurrency: int, max_waiting: int, lease_seconds: float = 10.0,
            expected_seconds: float = 1.0) -> list[CreationQueue]:
    """n processes' queues of one fresh engine."""
    mid = f"adm-{uuid.uuid4().hex[:8]}"
    return [CreationQueue(store, mid, concurrency, max_waiting, lease_seconds=lease_seconds,
                          expected_seconds=expected_seconds) for _ in range(n)]


async def _start(q: CreationQueue, client: str, log: list[str], gate: asyncio.Event, *,
                 waiting: int | None = None, running: int | None = None, refill: bool = False) -> asyncio.Task[None]:
    """A creation asking for its slot, once the engine has taken it in (in arrival order)."""
    t = asyncio.create_task(_hold(q, client, log, gate, refill=refill))
    await until(lambda: _counts(q, waiting, running), timeout=10, interval=0.01, what=f"{client} taken in")
    return t


async def _counts(q: CreationQueue, waiting: int | None, running: int | None) -> bool:
    w, r = await q.store.creation_counts(q.manager_id)
    return (waiting is None or w == waiting) and (running is None or r == running)


async def test_clients_take_turns_so_one_burst_delays_another_client_by_one_turn_at_most(store: Store) -> None:
    q, other = _queues(store, 2, concurrency=1, max_waiting=10)
    gate = asyncio.Event()
    log: list[str] = []
    first = await _start(q, "a", log, gate, running=1)
    burst = [await _start(q, "a", log, gate, waiting=i + 1) for i in range(4)]
    # b and c come through another process of the same engine: the same queue
    b = await _start(other, "b", log, gate, waiting=5)
    c = await _start(other, "c", log, gate, waiting=6)
    assert log == ["a"] and q.local_waiting == 4 and other.local_waiting == 2
    gate.set()
    await asyncio.gather(first, *burst, b, c)
    # a's burst came first, yet b and c each wait for one of a's creations, not for all four
    assert log == ["a", "a", "b", "c", "a", "a", "a"]
    assert await store.creation_counts(q.manager_id) == (0, 0)


async def test_a_full_queue_refuses_with_retry_after_and_nothing_else_is_disturbed(store: Store) -> None:
    q, other = _queues(store, 2, concurrency=2, max_waiting=2, expected_seconds=3.0)
    gate = asyncio.Event()
    log: list[str] = []
    tasks = [await _start(q, f"c{i}", log, gate, waiting=max(0, i - 1)) for i in range(4)]
    with pytest.raises(CreationQueueFull) as info:  # the bound is the engine's: another process is refused too
        async with other.slot("late"):
            pass
    # (2 waiting + 2 running) / 2 slots * 3 s
    assert info.value.status_code == 503 and info.value.retry_after == 6
    assert "creation queue" in info.value.detail and "full" in info.value.detail
    assert await store.creation_counts(q.manager_id) == (2, 2)
    gate.set()
    await asyncio.gather(*tasks)
    assert sorted(log) == ["c0", "c1", "c2", "c3"]


async def test_a_waiter_that_leaves_gives_its_place_back_and_one_granted_meanwhile_its_slot(store: Store) -> None:
    q, = _queues(store, 1, concurrency=1, max_waiting=5)
    gate = asyncio.Event()
    log: list[str] = []
    holder = await _start(q, "a", log, gate, running=1)
    leaver = await _start(q, "b", log, gate, waiting=1)
    stayer = await _start(q, "c", log, gate, waiting=2)
    leaver.cancel()
    await until(lambda: _counts(q, 1, 1), timeout=10, interval=0.01, what="the leaver's place given back")
    gate.set()
    await asyncio.gather(holder, stayer)
    assert log == ["a", "c"]
    assert await store.creation_counts(q.manager_id) == (0, 0)
    # granted and cancelled before it ran: the slot goes to the next one, not lost
    gate2 = asyncio.Event()
    h2 = await _start(q, "a", log, gate2, running=1)
    w = await _start(q, "b", log, gate2, waiting=1)
    w2 = await _start(q, "c", log, gate2, waiting=2)
    gate2.set()
    await asyncio.sleep(0)
    w.cancel()  # h2 is giving its slot back, which may already have gone to w
    await asyncio.gather(h2, w, w2, return_exceptions=True)
    assert log[-1] == "c" and "b" not in log[2:-1]
    assert await store.creation_counts(q.manager_id) == (0, 0)


async def test_refills_wait_behind_every_client_and_never_hold_the_last_slot(store: Store) -> None:
    q, other = _queues(store, 2, concurrency=2, max_waiting=5)
    gate = asyncio.Event()
    log: list[str] = []
    refills = [asyncio.create_task(_hold(q, "pool", log, gate, refill=True)) for _ in range(3)]
    await until(lambda: log == ["pool"], timeout=10, interval=0.01, what="one refill running")
    assert await store.creation_counts(q.manager_id) == (0, 1)  # one slot stays free for a client
    client = await _start(other, "a", log, gate, running=2)
    assert log == ["pool", "a"]  # at once, ahead of the two refills asking before it
    # refills do not count against the queue's bound
    assert other.local_waiting == 0 and q.local_waiting == 0 and await store.creation_counts(q.manager_id) == (0, 2)
    gate.set()
    await asyncio.gather(*refills, client)
    assert log.count("pool") == 3


async def test_the_bound_is_the_engines_across_processes_and_a_killed_process_frees_its_slots(store: Store) -> None:
    q, other = _queues(store, 2, concurrency=2, max_waiting=4, lease_seconds=1.0)
    gate = asyncio.Event()
    log: list[str] = []
    held = [await _start(q, "a", log, gate, running=i + 1) for i in range(2)]
    # the engine's two slots are held by the first process: the second one's creation waits
    late = await _start(other, "b", log, gate, waiting=1)
    assert log == ["a", "a"] and other.local_waiting == 1
    # the first process dies holding both (no give-back, no renewal): its leases lapse and b goes on
    assert q._renewer is not None
    q._renewer.cancel()
    for t in held:
        t.cancel()
    q.store = _Dead()  # type: ignore[assignment]
    await asyncio.gather(*held, return_exceptions=True)
    await until(lambda: log == ["a", "a", "b"], timeout=20, interval=0.05, what="b served once a's leases lapsed")
    gate.set()
    await late
    # b's slot is given back (the dead process's second one may lapse a moment after the first)
    held_now = await store.redis.zrange(store.keys.creation_slots(other.manager_id), 0, -1)
    assert not [m for m in held_now if other._tag in str(m)], held_now


class _Dead:
    """A process that is gone: it never reaches Redis again (what it holds is not given back)."""

    def __getattr__(self, name: str) -> object:
        async def gone(*a: object, **kw: object) -> None:
            raise RedisUnavailable("the process is gone")

        return gone


async def test_a_renewal_counts_every_slot_still_held_even_in_the_millisecond_it_was_granted(store: Store) -> None:
    # the count came from ZADD CH, which counts no change when the new lease ends where the old one
    # did: a renewal in the millisecond of the grant said the slot was lost (seen on the cluster)
    mid = f"adm-{uuid.uuid4().hex[:8]}"
    assert (await store.creation_slot(mid, "m1", "a", False, 1, 1, 10))[0] == 1
    for _ in range(50):
        got = await asyncio.gather(*(store.renew_creation_slots(mid, ["m1"], 10) for _ in range(4)))
        assert got == [1, 1, 1, 1], got
    assert await store.renew_creation_slots(mid, ["gone"], 10) == 0
    await store.release_creation_slots(mid, ["m1"], 1, 10)


def test_arrival_rate_follows_a_burst_and_forgets_it_with_its_half_life() -> None:
    now = [0.0]
    r = ArrivalRate(half_life_seconds=10, clock=lambda: now[0])
    assert r.update(100) == 0.0  # the first reading is the origin
    now[0] = 1.0
    burst = r.update(150)  # 50 in one second
    assert 50 * 0.06 < burst < 50 * 0.07  # 1 - 0.5 ** (1 / 10) of the way to 50/s
    now[0] = 11.0
    assert r.update(150) == pytest.approx(burst / 2, rel=1e-6)  # one half-life of nothing
    now[0] = 12.0
    assert r.update(10) < burst / 2  # a counter that went back counts no arrivals, not negative ones


def test_pool_plan_follows_the_rate_within_its_bounds_and_the_engines_room() -> None:
    cfg = PoolConfig(size=2, max_size=20, demand_seconds=10, refill_concurrency=4)
    assert plan(cfg, 0.0, 0.5, None).target == 2  # idle: the floor
    assert plan(cfg, 0.0, 0.5, None).refill_concurrency == 1
    assert plan(PoolConfig(max_size=5), 0.04, 0.5, None).target == 0  # a rate decayed to almost nothing
    busy = plan(cfg, 1.5, 0.5, None)
    assert busy.target == 15 and busy.refill_concurrency == 1
    assert plan(cfg, 100.0, 0.5, None).target == 20  # the ceiling
    assert plan(cfg, 100.0, 0.5, None).refill_concurrency == 4
    assert plan(cfg, 100.0, 0.5, 7).target == 7  # the engine's cap leaves room for 7 more
    assert plan(cfg, 100.0, 0.5, -3).target == 0
    fixed = PoolConfig(size=3)  # no max_size: the fixed pool of before
    assert plan(fixed, 100.0, 0.5, None).target == 3
    assert plan(PoolConfig(size=0, max_size=5, demand_seconds=1), 0.2, 30.0, None).target == 5  # 0.2/s * 30 s = 6, past max_size


def test_burst_peak_remembers_the_most_arrivals_within_a_creations_time_for_its_memory() -> None:
    now = [0.0]
    b = BurstPeak(memory_seconds=60, clock=lambda: now[0])
    assert b.update(1000, window_seconds=2) == 0  # the first reading is the origin
    for t, total in ((1, 1001), (2, 1060), (3, 1100), (4, 1101)):  # 59 then 40 within 2 s: 99
        now[0] = t
        b.update(total, window_seconds=2)
    assert b.peak == 99
    now[0] = 30
    assert b.update(1105, window_seconds=2) == 99  # a quiet while: still remembered
    now[0] = 65
    assert b.update(1106, window_seconds=2) == 4  # past its memory: the burst is forgotten
    now[0] = 66
    assert b.update(5, window_seconds=2) == 4  # a counter that went back counts no arrivals
    assert BurstPeak(memory_seconds=0, clock=lambda: now[0]).update(10, 2) == 0  # off


def test_pool_plan_holds_the_largest_recent_burst_and_makes_it_at_full_refill_concurrency() -> None:
    cfg = PoolConfig(size=0, max_size=150, demand_seconds=10, refill_concurrency=4)
    after = plan(cfg, 0.1, 1.0, None, peak=100)  # the rate has all but forgotten a burst of 100
    assert after.target == 100 and after.refill_concurrency == 4
    assert plan(cfg, 0.1, 1.0, 60, peak=100).target == 60  # where the host can hold it
    assert plan(PoolConfig(size=0, max_size=50), 0.0, 1.0, None, peak=100).target == 50  # max_size bounds it
    assert plan(cfg, 0.1, 1.0, None).refill_concurrency == 1  # no burst: as before
