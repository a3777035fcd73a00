"""The creation queue (nodeops/admission.py) and the pool's demand arithmetic (nodeops/demand.py)
as pure logic; tests/test_creation_queue.py drives both through real managers."""

from __future__ import annotations

import asyncio

import pytest

from nodeops.admission import CreationQueue
from nodeops.demand import ArrivalRate, BurstPeak, plan
from shared.config import PoolConfig
from shared.errors import CreationQueueFull


async def _hold(q: CreationQueue, client: str, log: list[str], release: asyncio.Event, *,
                refill: bool = False) -> None:
    async with q.slot(client, refill=refill):
        log.append(client)
        await release.wait()


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_clients_take_turns_so_one_burst_delays_another_client_by_one_turn_at_most() -> None:
    q = CreationQueue(concurrency=1, max_waiting=10)
    gate = asyncio.Event()
    log: list[str] = []
    first = asyncio.create_task(_hold(q, "a", log, gate))
    await _settle()
    burst = [asyncio.create_task(_hold(q, "a", log, gate)) for _ in range(4)]
    await _settle()
    b = asyncio.create_task(_hold(q, "b", log, gate))
    c = asyncio.create_task(_hold(q, "c", log, gate))
    await _settle()
    assert q.waiting == 6 and q.running == 1
    # a's burst came first, yet b and c each wait for one of a's creations, not for all four
    assert q.order() == ["a", "b", "c", "a", "a", "a"]
    gate.set()
    await asyncio.gather(first, *burst, b, c)
    assert log == ["a", "a", "b", "c", "a", "a", "a"]
    assert q.running == 0 and q.waiting == 0


async def test_a_full_queue_refuses_with_retry_after_and_nothing_else_is_disturbed() -> None:
    q = CreationQueue(concurrency=2, max_waiting=2, expected_seconds=3.0)
    gate = asyncio.Event()
    log: list[str] = []
    tasks = [asyncio.create_task(_hold(q, f"c{i}", log, gate)) for i in range(4)]
    await _settle()
    with pytest.raises(CreationQueueFull) as info:
        async with q.slot("late"):
            pass
    # (2 waiting + 2 running) / 2 slots * 3 s
    assert info.value.status_code == 503 and info.value.retry_after == 6
    assert "creation queue" in info.value.detail and "full" in info.value.detail
    assert q.waiting == 2 and q.running == 2
    gate.set()
    await asyncio.gather(*tasks)
    assert sorted(log) == ["c0", "c1", "c2", "c3"]


async def test_a_waiter_that_leaves_gives_its_place_back_and_one_granted_meanwhile_its_slot() -> None:
    q = CreationQueue(concurrency=1, max_waiting=5)
    gate = asyncio.Event()
    log: list[str] = []
    holder = asyncio.create_task(_hold(q, "a", log, gate))
    await _settle()
    leaver = asyncio.create_task(_hold(q, "b", log, gate))
    stayer = asyncio.create_task(_hold(q, "c", log, gate))
    await _settle()
    leaver.cancel()
    await _settle()
    assert q.waiting == 1 and q.order() == ["c"]
    gate.set()
    await asyncio.gather(holder, stayer)
    assert log == ["a", "c"] and q.running == 0
    # granted and cancelled before it ran: the slot goes to the next one, not lost
    gate2 = asyncio.Event()
    h2 = asyncio.create_task(_hold(q, "a", log, gate2))
    await _settle()
    w = asyncio.create_task(_hold(q, "b", log, gate2))
    await _settle()
    gate2.set()
    await asyncio.sleep(0)  # h2 releases, w's future is granted but w has not resumed yet
    w.cancel()
    await asyncio.gather(h2, w, return_exceptions=True)
    assert q.running == 0 and q.waiting == 0


async def test_refills_wait_behind_every_client_and_never_hold_the_last_slot() -> None:
    q = CreationQueue(concurrency=2, max_waiting=5)
    gate = asyncio.Event()
    log: list[str] = []
    refills = [asyncio.create_task(_hold(q, "pool", log, gate, refill=True)) for _ in range(3)]
    await _settle()
    assert q.running == 1 and log == ["pool"]  # one slot stays free for a client
    client = asyncio.create_task(_hold(q, "a", log, gate))
    await _settle()
    assert log == ["pool", "a"]  # at once, ahead of the two refills queued before it
    assert q.waiting == 0  # refills do not count against the client queue's bound
    gate.set()
    await asyncio.gather(*refills, client)
    assert log.count("pool") == 3


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
