"""Store scripts on the real Redis: quotas across manager ids and pool claims, keys passed in."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import redis.asyncio as aioredis

from shared.errors import QuotaExceeded, RedisUnavailable
from shared.keys import Keys
from shared.models import NodeRecord, Snapshot
from shared.store import Store
from testing.harness import PrivateRedis
from tests.conftest import REDIS_URL


async def test_total_quota_counts_every_manager_id(store: Store) -> None:
    for _ in range(3):
        await store.reserve("ma", per_manager=0, total=5)
    # a manager id the reserving replica has never seen counts too

    async def one() -> str:
        try:
            return await store.reserve("mb", per_manager=0, total=5)
        except QuotaExceeded as exc:
            return exc.detail

    results = await asyncio.gather(*(one() for _ in range(6)))
    assert sum(not r.startswith("quota") for r in results) == 2
    assert "quota exceeded: the cluster already has 5 nodes" in results


async def test_claim_skips_stale_ids_and_never_hands_a_node_out_twice(store: Store) -> None:
    k = store.keys
    pooled = [f"p{i}" for i in range(25)]
    for nid in pooled:
        await store.put_node(NodeRecord(id=nid, manager_id="mp", role="pooled"))
    # ids whose record is gone or no longer pooled sit in front of and between the live ones
    await store.redis.rpush(k.pool("mp"), "gone1", *pooled[:12], "gone2", *pooled[12:])
    await store.put_node(NodeRecord(id="taken", manager_id="mp", role="node"))
    await store.redis.lpush(k.pool("mp"), "taken")
    got = await asyncio.gather(*(store.claim_pooled("mp", client="c1") for _ in range(30)))
    claimed = [g for g in got if g]
    assert sorted(claimed) == sorted(pooled)
    assert got.count(None) == 5
    assert await store.redis.llen(k.pool("mp")) == 0
    rec = await store.get_node("p3")
    assert rec is not None and rec.role == "claiming" and rec.client == "c1"
    assert int(await store.redis.hget(k.client_count(), "c1")) == 25


async def test_concurrent_claims_take_different_ids_of_the_head_instead_of_retrying_one_by_one(
        store: Store) -> None:
    k = store.keys
    pooled = [f"b{i}" for i in range(40)]
    for nid in pooled:
        await store.put_node(NodeRecord(id=nid, manager_id="mb", role="pooled"))
    await store.redis.rpush(k.pool("mb"), *pooled)
    calls = [0]
    script = store._claim

    async def counted(*a: object, **kw: object) -> object:
        calls[0] += 1
        return await script(*a, **kw)

    store._claim = counted  # type: ignore[method-assign]
    got = await asyncio.gather(*(store.claim_pooled("mb", client="c2") for _ in range(40)))
    assert sorted(g for g in got if g) == sorted(pooled)
    # a burst reads the same head: each claimer takes another of its ids, a few rounds in all (one
    # claim a round, as when only the head itself could be taken, is 40 + 39 + ... = 820 calls)
    assert calls[0] <= 40 + 24 + 8 + 8, calls[0]


async def test_a_claim_is_one_call_counting_the_arrival_starting_idle_time_and_returning_the_record(
        store: Store) -> None:
    k = store.keys
    await store.put_node(NodeRecord(id="w1", manager_id="mw", role="pooled", host="10.0.0.9", port=8080,
                                    container_id="c" * 64, last_request_at=1.0))
    await store.redis.zadd(k.last_request("mw"), {"w1": 1.0})
    await store.redis.rpush(k.pool("mw"), "w1")
    rec = await store.claim_pooled_record("mw", client="c1", claimer="r9", now=500.0)
    assert rec is not None and rec.id == "w1" and rec.role == "claiming" and rec.client == "c1"
    assert (rec.host, rec.port, rec.container_id) == ("10.0.0.9", 8080, "c" * 64)
    assert rec.claimed_by == "r9" and rec.claimed_at == 500.0
    assert await store.redis.zscore(k.last_request("mw"), "w1") == 500.0  # idle from the claim on
    assert await store.arrivals("mw") == 1
    # a miss (empty pool) and a refusal by the client's limit are demand too, one each
    assert await store.claim_pooled_record("mw", client="c1") is None
    await store.put_node(NodeRecord(id="w2", manager_id="mw", role="pooled"))
    await store.redis.rpush(k.pool("mw"), "w2")
    assert await store.claim_pooled_record("mw", client="c1", per_client=1) is None
    assert await store.arrivals("mw") == 3
    assert await store.redis.lrange(k.pool("mw"), 0, -1) == [b"w2"]


async def test_intents_mark_the_record_at_once_and_a_release_is_never_undone(store: Store) -> None:
    from shared.models import Intent

    for nid in ("a", "b"):
        await store.put_node(NodeRecord(id=nid, manager_id="mi", status="running"))
    assert await store.record_intent(NodeRecord(id="a", manager_id="mi"), Intent(op="stop", at=1.0, by="r"))
    assert (await store.get_node("a")).status == "exited"
    assert await store.record_intent(NodeRecord(id="a", manager_id="mi"), Intent(op="release", at=2.0, by="r"))
    assert (await store.get_node("a")).status == "released"
    # a later close of a released node changes nothing: the release stands
    assert not await store.record_intent(NodeRecord(id="a", manager_id="mi"), Intent(op="stop", at=3.0, by="r"))
    assert (await store.intents("mi"))["a"].op == "release"
    # a call that wants the node running drops a pending stop, never a release
    assert await store.record_intent(NodeRecord(id="b", manager_id="mi"), Intent(op="stop", at=1.0, by="r"))
    assert not await store.drop_intent("mi", "a", "stop")
    assert await store.drop_intent("mi", "b", "stop")
    assert set(await store.intents("mi")) == {"a"}
    # no record, no intent
    assert not await store.record_intent(NodeRecord(id="zz", manager_id="mi"), Intent(op="release", at=1.0))
    assert set(await store.intents("mi")) == {"a"}


async def test_a_snapshot_recorded_before_names_were_per_client_is_still_its_clients(store: Store) -> None:
    """Recorded under its bare name (as before names were per client): found and deleted by its
    client, never by another."""
    old = Snapshot(name="legacy", manager_id="m1", seed="s1", source="n1", client="alice", bytes=5, created_at=1.0)
    k = store.keys
    await store.redis.hset(k.snapshot("legacy"), mapping={f: str(v) for f, v in msgspec.structs.asdict(old).items()})
    await store.redis.sadd(k.snapshots(), "legacy")
    await store.redis.hincrby(k.snapshot_count(), "alice", 1)
    await store.redis.hincrby(k.snapshot_bytes(), "m1", 5)
    assert await store.snapshots.get("bob", "legacy") is None
    assert not await store.snapshots.delete("bob", "legacy")
    assert await store.snapshots.get("alice", "legacy") == old
    assert [s.name for s in await store.snapshots.all()] == ["legacy"]
    assert await store.snapshots.delete("alice", "legacy")
    assert await store.snapshots.all() == [] and await store.snapshots.usage("m1", "alice") == (0, 0)



async def test_a_thousand_concurrent_lookups_share_few_connections_and_each_gets_its_own_record(
        prefix: str) -> None:
    # one connection taken per lookup made the tail of a burst wait past the pool's timeout (503
    # where 403 was due, tests/test_store_load.py); joined, a burst takes one per pipeline
    r = aioredis.BlockingConnectionPool.from_url(REDIS_URL, max_connections=2, timeout=2)
    taken = [0]
    get_connection = r.get_connection

    async def counted(*a: Any, **kw: Any) -> Any:
        taken[0] += 1
        return await get_connection(*a, **kw)

    r.get_connection = counted  # type: ignore[method-assign]
    client = aioredis.Redis(connection_pool=r)
    store = Store(client, Keys(prefix))
    try:
        ids = [f"n{i:04d}" for i in range(500)]
        for nid in ids:
            await store.put_node(NodeRecord(id=nid, manager_id=f"m{nid}", role="node"))
        asked = ids + [f"absent{i}" for i in range(400)] + ids[:100]  # repeats, and unknown ones
        # a caller that leaves (a client that hung up) costs the others nothing
        left = asyncio.ensure_future(store.get_node(ids[0]))
        got = asyncio.gather(*(store.get_node(nid) for nid in asked))
        left.cancel()
        taken[0] = 0
        recs = await got
        assert taken[0] <= 3, f"{taken[0]} connections taken for {len(asked)} lookups"
        assert [rec.manager_id if rec else None for rec in recs] == [
            f"m{nid}" if not nid.startswith("absent") else None for nid in asked]
        assert len(r._in_use_connections) == 0 and len(r._available_connections) <= 2
    finally:
        await client.aclose()


async def test_every_lookup_of_a_batch_hears_that_redis_is_down(private_redis: PrivateRedis) -> None:
    client = aioredis.Redis.from_url(private_redis.url, socket_timeout=1, socket_connect_timeout=1)
    store = Store(client, Keys("down"))
    private_redis.kill()
    try:
        got = await asyncio.gather(*(store.get_node(f"x{i}") for i in range(20)), return_exceptions=True)
        assert all(isinstance(g, RedisUnavailable) for g in got), got
    finally:
        await client.aclose()
