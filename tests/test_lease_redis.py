"""Lease and fencing on the real Redis: one holder, tokens grow, stale holders are refused."""

from __future__ import annotations

import asyncio

from checker.lease import Lease
from shared.store import Store


async def test_one_holder_and_fencing(store: Store) -> None:
    a = Lease(store, "m1", "A", ttl=0.6)
    b = Lease(store, "m1", "B", ttl=0.6)
    assert await a.acquire() and a.token == 1
    assert not await b.acquire()
    assert await a.renew()
    view = await store.leases.view("m1")
    assert view.holder == "A" and view.token == 1 and view.expires_in_ms and view.expires_in_ms > 0
    node_key = store.keys.node("n1")
    assert await store.fenced("m1", "A", 1, [("hset", node_key, ["status", "running"])])
    # A stalls past its TTL (it renews no more): its lease lapses in Redis; B takes over with a higher token
    async def lapsed() -> None:
        while (await store.leases.view("m1")).holder is not None:
            await asyncio.sleep(0.02)

    await asyncio.wait_for(lapsed(), 5)
    assert not a.held
    assert await b.acquire() and b.token == 2
    # A's late write is refused and changes nothing; its renewal is refused too
    assert not await store.fenced("m1", "A", 1, [("hset", node_key, ["status", "stale"])])
    assert (await store.redis.hget(node_key, "status")) == b"running"
    assert not await a.renew()
    assert a.token is None


async def test_release_hands_over_at_once(store: Store) -> None:
    a = Lease(store, "m2", "A", ttl=30)
    b = Lease(store, "m2", "B", ttl=30)
    assert await a.acquire()
    await a.release()
    assert await b.acquire() and b.token == 2
    # a released holder cannot free its successor's lease
    a.token = 1
    await a.release()
    assert (await store.leases.view("m2")).holder == "B"


async def test_hset_xx_never_resurrects(store: Store) -> None:
    a = Lease(store, "m3", "A", ttl=30)
    await a.acquire()
    key = store.keys.node("gone")
    assert await store.fenced("m3", "A", a.token or 0, [("hset_xx", key, ["status", "running"])])
    assert not await store.redis.exists(key)


async def test_quota_reservation_is_atomic(store: Store) -> None:
    from shared.errors import QuotaExceeded

    async def one() -> str:
        try:
            return await store.reserve("mq", per_manager=0, total=10)
        except QuotaExceeded:
            return "refused"

    results = await asyncio.gather(*(one() for _ in range(50)))
    assert sum(r != "refused" for r in results) == 10
    assert await store.redis.scard(store.keys.manager_nodes("mq")) == 10
