"""Events split by manager_id (issue 29), on the real Redis and on a real six-node Redis Cluster:
each replica's event hub reads its own manager_id's stream (and the broadcast one), the stream of
a session of another manager_id only while it caches or works on one, the cluster-wide stream only
for a socket that watches every session or while a replica before the split is live; sockets
resume by the ids of the stream they are served from, on any replica.

The hubs here are the replicas' own (manager/events/hub.py) on the store's own code; the sockets
over them are tested on real managers in test_websocket.py, test_client.py and, on the cluster,
test_redis_cluster.py."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import pytest

from manager.events.hub import EventHub, Subscription
from manager.replica.activity import AddressCache
from shared.config import Config
from shared.keys import Keys
from shared.models import Event, NodeRecord, NodeStatus
from shared.store import ALL, BROADCAST, Store
from testing import redis_env
from testing.redis_cluster import RedisCluster
from tests.conftest import until


@pytest.fixture(params=["redis", "cluster"])
async def open_store(request: pytest.FixtureRequest, prefix: str) -> AsyncIterator[Callable[..., Store]]:
    """Makes stores under this test's prefix (one per simulated replica), on one Redis or the cluster."""
    made: list[Store] = []
    redis_cfg: dict[str, Any] = {"url": redis_env.redis_url(), "key_prefix": prefix}
    if request.param == "cluster":
        c: RedisCluster = request.getfixturevalue("cluster")
        redis_cfg = {"url": redis_env.private_url("127.0.0.1", c.ports[0]), "cluster_nodes": c.seeds[:3],
                     "key_prefix": f"ev-{uuid.uuid4().hex[:6]}"}

    def make(**events: Any) -> Store:
        store = Store.open(msgspec.convert({"redis": redis_cfg, "events": events}, Config))
        made.append(store)
        return store

    yield make
    for s in made:
        await s.close()


class Replica:
    """A replica's event hub with what it was handed (its on_event) and its address cache."""

    def __init__(self, store: Store, manager_id: str, cache_ttl: float = 30.0,
                 busy: Callable[[], set[str]] | None = None, block_ms: int = 200,
                 unsplit_check_seconds: float = 3600.0) -> None:
        # the keeper of readers looks again at a change it is told of, else at the next unsplit check:
        # an hour unless a test needs that check, so a reader a change needs is started by the change
        self.store = store
        self.cache = AddressCache(cache_ttl)
        self.seen: list[Event] = []
        self.hub = EventHub(store, self.cache, self.seen.append, manager_id=manager_id, busy=busy,
                            block_ms=block_ms, unsplit_check_seconds=unsplit_check_seconds)
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Replica:
        self.task = asyncio.create_task(self.hub.run())
        await until(lambda: self.hub.manager_id in self.hub.cursors and BROADCAST in self.hub.cursors,
                    what="the hub following its own streams")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.hub.stop()  # as the replica's shutdown does
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)

    def nodes_seen(self) -> list[str]:
        return [e.node_id for e in self.seen]


def _rec(store: Store, mgr: str) -> NodeRecord:
    nid = store.keys.new_session_id(mgr)
    return NodeRecord(id=nid, short_id=nid[:12], manager_id=mgr, status=NodeStatus.RUNNING, created_at=1.0,
                      updated_at=1.0, last_request_at=1.0)


def _drain(sub: Subscription) -> list[Event]:
    out = []
    while not sub.queue.empty():
        out.append(sub.queue.get_nowait())
    return out


async def test_a_replica_reads_its_own_manager_ids_events_not_the_clusters(open_store: Callable[..., Store]) -> None:
    store = open_store(manager_stream_maxlen=10)
    token = await store.leases.acquire("m-a", "chk", 60000)
    async with Replica(store, "m-a") as a, Replica(store, "m-b") as b:
        ev_a = [Event(type="ready", node_id=f"a{i}", manager_id="m-a") for i in range(5)]
        ev_b = [Event(type="ready", node_id=f"b{i}", manager_id="m-b") for i in range(7)]
        ev_c = [Event(type="ready", node_id=f"c{i}", manager_id="m-c") for i in range(250)]
        for ev in ev_a[:3] + ev_b + ev_c:
            await store.publish(ev)
        # the checker's events travel in its fenced write, to the same stream
        assert await store.fenced("m-a", "chk", token, [op for ev in ev_a[3:] for op in store.event_op(ev)])
        await store.publish(Event(type="egress_secret", node_id="", manager_id="", detail="set k"))
        await until(lambda: len(a.seen) == 6 and len(b.seen) == 8, what="each replica's events")
        assert a.nodes_seen() == [e.node_id for e in ev_a] + [""]  # its own, in order, and the broadcast
        assert b.nodes_seen() == [e.node_id for e in ev_b] + [""]
        # every event is in the cluster-wide stream too, for views of the whole cluster
        everything = await store.read_events("0-0", block_ms=None, count=1000)
        assert len(everything) == 5 + 7 + 250 + 1
        # and a replica of m-c, started now, has nothing to catch up: it starts at its stream's end
        async with Replica(store, "m-c") as c:
            await store.publish(Event(type="stopped", node_id="c-late", manager_id="m-c"))
            await until(lambda: c.nodes_seen() == ["c-late"], what="m-c's replica seeing its event")
        assert len(a.seen) == 6 and len(b.seen) == 8
    # a manager's stream is trimmed at events.manager_stream_maxlen (approximately, as XADD ~ does)
    rows = await store.read_events("0-0", block_ms=None, count=1000, scope="m-c")
    assert len(rows) < 251 and rows[-1].node_id == "c-late"


async def test_a_cached_session_of_another_manager_id_is_followed_while_cached(
        open_store: Callable[..., Store]) -> None:
    store = open_store()
    async with Replica(store, "m-a", cache_ttl=1.0) as a, Replica(store, "m-b") as b:
        rec = _rec(store, "m-b")
        a.cache.put(rec)  # a call here for a session of m-b read its record
        await until(lambda: "m-b" in a.hub.cursors, what="m-a's replica following m-b")
        # cached before its stream was followed: dropped once, so the next call reads it again
        assert a.cache.get(rec.id) is None
        a.cache.put(rec)
        await store.publish(Event(type="restarted", node_id=rec.id, manager_id="m-b"))
        await until(lambda: a.cache.get(rec.id) is None, what="the cached address dropped by m-b's event")
        assert a.nodes_seen() == [rec.id]
        # once no entry of m-b can still be cached, m-b's stream is no longer read here
        await until(lambda: "m-b" not in a.hub.cursors, timeout=30, what="m-b unfollowed")
        await store.publish(Event(type="stopped", node_id=rec.id, manager_id="m-b"))
        await until(lambda: b.nodes_seen() == [rec.id, rec.id], what="m-b's own replica seeing both")
        await store.publish(Event(type="stopped", node_id="a-mark", manager_id="m-a"))
        await until(lambda: "a-mark" in a.nodes_seen(), what="m-a's replica seeing a later event of its own")
        assert a.nodes_seen() == [rec.id, "a-mark"]


async def test_work_in_progress_on_a_session_follows_its_manager_id(open_store: Callable[..., Store]) -> None:
    """The thaw of a racing pause needs the 'paused' event of a node this replica has work on,
    whatever its manager_id, even when its record is no longer cached."""
    store = open_store()
    busy: set[str] = set()
    async with Replica(store, "m-a", busy=lambda: busy) as a:
        busy.add("m-x")
        a.hub.work_started("m-x")  # as the replica's activity tells it (ActivityRecorder.on_quiet_work)
        await until(lambda: "m-x" in a.hub.cursors, what="m-x followed for work in progress")
        await store.publish(Event(type="paused", node_id="x1", manager_id="m-x"))
        await until(lambda: a.nodes_seen() == ["x1"], what="the paused event of m-x")
        busy.clear()
        await until(lambda: "m-x" not in a.hub.cursors, what="m-x unfollowed once the work ended")


async def test_an_idle_hub_looks_only_when_its_readers_read(open_store: Callable[..., Store]) -> None:
    """Nothing changes, nothing is looked at but by the readers, once a block each: the keeper of
    readers waits to be told of a change (it looked ten times a second, an idle replica's wakeups)."""
    store = open_store()
    async with Replica(store, "m-a", block_ms=1000) as a:
        looks = 0
        interest = a.hub.interest

        def counted() -> set[str]:
            nonlocal looks
            looks += 1
            return interest()

        a.hub.interest = counted  # type: ignore[method-assign]
        t0 = time.monotonic()
        # the window is the measure (no condition to wait on): a busy machine only makes fewer looks
        await asyncio.sleep(3.0)
        readers = len(a.hub.readers)  # one per slot group: one on a Redis, two on the cluster
        bound = readers * (time.monotonic() - t0 + 1) + 2
        assert looks <= bound, f"{looks} looks in 3 s with {readers} reader(s): more than their blocks"


async def test_sockets_streams_and_resumption_on_another_replica(open_store: Callable[..., Store]) -> None:
    store = open_store()
    async with Replica(store, "m-a") as a, Replica(store, "m-c") as c:
        every = a.hub.subscribe(scope=ALL, after=await store.last_event_id(ALL))  # an admin's view of all
        of_b = a.hub.subscribe(manager_id="m-b", scope="m-b", after=await store.last_event_id("m-b"))
        rec = _rec(store, "m-b")
        one = a.hub.subscribe(node_id=rec.id, scope="m-b", after=await store.last_event_id("m-b"))
        sent = []
        for i in range(6):
            for mid, nid in (("m-a", f"a{i}"), ("m-b", rec.id if i % 2 else f"b{i}")):
                ev = Event(type="health", node_id=nid, manager_id=mid, detail=str(i))
                await store.publish(ev)
                sent.append(ev)
        got_all: list[Event] = []
        got_b: list[Event] = []
        got_one: list[Event] = []
        await until(lambda: (got_all.extend(_drain(every)), got_b.extend(_drain(of_b)), got_one.extend(_drain(one)))
                    and len(got_all) == 12 and len(got_b) == 6 and len(got_one) == 3, what="each socket's events")
        assert [(e.manager_id, e.detail) for e in got_all] == [(e.manager_id, e.detail) for e in sent]
        assert [e.detail for e in got_b] == ["0", "1", "2", "3", "4", "5"]
        assert [e.detail for e in got_one] == ["1", "3", "5"]
        # resumed on another replica (of another manager_id, following neither stream) by the ids seen
        again_all = c.hub.subscribe(scope=ALL, after=got_all[3].id)
        again_b = c.hub.subscribe(manager_id="m-b", scope="m-b", after=got_b[1].id)
        rest_all: list[Event] = []
        rest_b: list[Event] = []
        await until(lambda: (rest_all.extend(_drain(again_all)), rest_b.extend(_drain(again_b)))
                    and len(rest_all) == 8 and len(rest_b) == 4, what="the resumed sockets' events")
        assert [e.id for e in rest_all] == [e.id for e in got_all[4:]]
        assert [e.id for e in rest_b] == [e.id for e in got_b[2:]]
        for sub in (every, of_b, one, again_all, again_b):
            sub.close()
        await until(lambda: ALL not in a.hub.cursors and "m-b" not in c.hub.cursors,
                    what="streams no socket needs unfollowed")


async def test_a_rolling_upgrade_from_the_single_stream(open_store: Callable[..., Store]) -> None:
    """A replica before the split reads and writes only the cluster-wide stream (the old key, its
    entries with field e): it reads what split replicas publish, and they read what it writes."""
    store = open_store()
    r = store.redis
    async with Replica(store, "m-a", unsplit_check_seconds=0.2) as a:
        await store.publish(Event(type="ready", node_id="new-1", manager_id="m-b"))
        # what the old reader did: XREAD of the one stream, each entry's JSON in field e
        rows = await r.xrange(store.keys.events())
        assert [json.loads(f[b"e"])["node_id"] for _, f in rows] == ["new-1"]
        # an old replica's heartbeat (it knows no event_readers set)
        await r.zadd(store.keys.replicas(), {"old-replica": time.time() + 3600})
        await until(lambda: a.hub.unsplit and ALL in a.hub.cursors, what="the old stream followed")
        await r.xadd(store.keys.events(), {"e": msgspec.json.encode(
            Event(type="stopped", node_id="old-1", manager_id="m-a"))})
        await store.publish(Event(type="stopped", node_id="new-2", manager_id="m-a"))
        await until(lambda: a.nodes_seen() == ["old-1", "new-2"], what="the old replica's event and a new one")
        await asyncio.sleep(0.5)  # new-2 is in both streams it follows: seen once
        assert a.nodes_seen() == ["old-1", "new-2"]
        await r.zrem(store.keys.replicas(), "old-replica")
        await until(lambda: not a.hub.unsplit and ALL not in a.hub.cursors, what="the old stream left")


async def test_the_stream_of_a_manager_id_gone_is_removed_and_a_resume_told(open_store: Callable[..., Store]) -> None:
    """The upkeep removes a manager_id's stream once no replica of it is live, it holds no session and
    it wrote no event for the grace; a resume from before the removal is told (a socket's gap
    message, test_websocket.py), one from after it is not; a replica that followed the stream reads
    it again when its manager_id comes back."""
    from checker.upkeep import Upkeep
    from shared.models import ReplicaInfo

    store = open_store()
    cfg = msgspec.convert({"events": {"gone_stream_grace_seconds": 2.0}}, Config)
    upkeep = Upkeep(store, cfg)
    first = [await store.publish(Event(type="ready", node_id=f"g{i}", manager_id=m)) for i in range(3)
             for m in ("m-gone", "m-live", "m-held", "m-recent")]
    rec = _rec(store, "m-held")
    await store.put_node(rec)  # a session left: its stream stays
    live = ReplicaInfo(replica_id="r-live", manager_id="m-live", url="http://x", version="1", started_at=1.0)
    gone = ReplicaInfo(replica_id="r-gone", manager_id="m-gone", url="http://x", version="1", started_at=1.0)
    await store.heartbeat(gone, 0.3)  # its replica went away: its heartbeat key expires
    async with Replica(store, "m-other", busy=lambda: {"m-gone"}) as follower:  # works on a session of m-gone
        await until(lambda: "m-gone" in follower.hub.cursors, what="the gone manager_id's stream followed")
        await asyncio.sleep(2.2)  # past the grace (no condition to wait on: the grace is the feature)
        await store.heartbeat(live, 60)
        await store.publish(Event(type="ready", node_id="late", manager_id="m-recent"))  # an event within the grace
        removed = await upkeep.remove_gone_streams()
        assert list(removed) == ["m-gone"], removed
        assert not await store.redis.exists(store.stream_key("m-gone"))
        for m in ("m-live", "m-held", "m-recent"):
            assert await store.redis.exists(store.stream_key(m)), m
        last = removed["m-gone"]
        # a resume from before the removal is told up to where; one from the last id removed is not
        assert await store.stream_removed_after(first[0], "m-gone") == last
        assert await store.stream_removed_after(last, "m-gone") is None
        assert await store.stream_removed_after(first[1], "m-live") is None
        assert await upkeep.remove_gone_streams() == {}
        # m-gone comes back: its new events reach the replica that still follows it
        await store.publish(Event(type="created", node_id="back", manager_id="m-gone"))
        await until(lambda: "back" in follower.nodes_seen(), what="the new stream's first event")
        assert await store.stream_removed_after(first[0], "m-gone") == last  # still told: those are gone


def test_keys_of_the_split_streams() -> None:
    """A manager's stream shares its home slot (the checker's fenced write carries it); the
    cluster-wide stream keeps the name replicas before the split read."""
    k = Keys("p", cluster=True)
    assert k.manager_events("m1").startswith(k.lease("m1").split(":mgr:")[0])
    assert k.events() == "p:{ev}:events" and Keys("p").events() == "p:events"
