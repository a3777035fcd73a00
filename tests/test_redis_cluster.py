"""The store on a real six-node Redis Cluster (testing.redis_cluster): leases and fencing, intents,
quotas across manager_ids, the pool, tiers, MCP sessions and the events stream, each call's keys on
one slot (a CROSSSLOT call fails here); and managers on the cluster through a session's life and
a primary killed with -9 under a client loop."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest

from checker.lease import Lease
from shared.config import Config
from shared.errors import QuotaExceeded
from shared.keys import Keys, home
from shared.models import Event, Intent, NodeRecord, NodeStatus
from shared.store import Store
from testing import redis_env
from testing.harness import report
from testing.redis_cluster import RedisCluster
from tests.conftest import until, wait_for
from tests.test_tiers import ADMIN, read, tiers, write


def cluster_redis_cfg(c: RedisCluster, prefix: str) -> dict[str, object]:
    # the url's password is the cluster's; its host is not used (README)
    return {"url": redis_env.private_url("127.0.0.1", c.ports[0]), "cluster_nodes": c.seeds[:3], "key_prefix": prefix,
            "socket_timeout_seconds": 0.5}


@pytest.fixture
async def cstore(cluster: RedisCluster) -> AsyncIterator[Store]:
    import msgspec

    cfg = msgspec.convert({"redis": cluster_redis_cfg(cluster, f"tc-{uuid.uuid4().hex[:6]}")}, Config)
    store = Store.open(cfg)
    yield store
    await store.close()


def _rec(store: Store, mgr: str, client: str = "") -> NodeRecord:
    nid = store.keys.new_session_id(mgr)
    return NodeRecord(id=nid, short_id=nid[:12], manager_id=mgr, status=NodeStatus.RUNNING, created_at=1.0,
                      updated_at=1.0, last_request_at=1.0, client=client)


async def test_records_lease_fencing_and_intents_on_the_cluster(cstore: Store, cluster: RedisCluster) -> None:
    store = cstore
    mgrs = [f"m{i}" for i in range(8)]
    # the managers' homes land on more than one primary: the store really is spread
    assert len({cluster.primary_of(store.keys.lease(m)) for m in mgrs}) > 1
    recs = [_rec(store, m) for m in mgrs]
    for r in recs:
        await store.put_node(r)
    got = await store.get_nodes([r.id for r in recs])  # ids of 8 slots in one call
    assert sorted(r.id for r in got) == sorted(r.id for r in recs)
    assert set((await store.node_stamps([r.id for r in recs])).keys()) == {r.id for r in recs}
    assert await store.manager_ids() == sorted(mgrs)

    # A's lease lapses on its own; B's outlives making the renewer's cluster client (discovery took
    # longer than a 0.6 s lease once, on a loaded machine, and the renewal of a lapsed B failed)
    a, b = Lease(store, "m0", "A", ttl=0.6), Lease(store, "m0", "B", ttl=60)
    assert await a.acquire() and a.token == 1
    assert not await b.acquire()
    ev = Event(type="node_stopped", node_id=recs[0].id, manager_id="m0")
    assert await store.fenced("m0", "A", 1, [store.update_op(recs[0].id, {"status": "exited"}, 2.0),
                                            *store.event_op(ev), store.archived_op("m0", recs[0].id)])
    assert (await store.get_node(recs[0].id)).status == "exited"  # type: ignore[union-attr]
    assert [e.node_id for e in await store.read_events("0-0", block_ms=None)] == [recs[0].id]

    async def lapsed() -> bool:
        return (await store.leases.view("m0")).holder is None

    await until(lapsed, timeout=5, interval=0.02, what="lease A lapsed")
    assert await b.acquire() and b.token == 2
    # the checker's renewer thread has a blocking cluster client of its own: it renews B, never A
    assert store.leases.renewer is not None
    renewer = store.leases.renewer()
    try:
        assert renewer.renew("m0", "B:2", 600) and not renewer.renew("m0", "A:1", 600)
    finally:
        renewer.close()
    # the deposed holder writes nothing at all: neither the record nor the events stream of another slot
    assert not await store.fenced("m0", "A", 1, [store.update_op(recs[0].id, {"status": "stale"}, 3.0),
                                                *store.event_op(ev)])
    assert (await store.get_node(recs[0].id)).status == "exited"  # type: ignore[union-attr]
    assert len(await store.read_events("0-0", block_ms=None)) == 1

    # intents: a release recorded for the owner marks the record at once, in the owner's slot
    assert await store.record_intent(recs[1], Intent(op="release", at=5.0, by="r9"))
    assert (await store.get_node(recs[1].id)).status == "released"  # type: ignore[union-attr]
    assert list((await store.intents("m1")).keys()) == [recs[1].id]
    assert await store.fenced("m1", "B", 0, []) is True  # nothing to write: nothing refused
    lease1 = Lease(store, "m1", "C", ttl=5)
    assert await lease1.acquire()
    assert await store.fenced("m1", "C", lease1.token or 0, [*store.delete_ops(recs[1]),
                                                             store.intent_done_op("m1", recs[1].id)])
    assert await store.get_node(recs[1].id) is None and await store.intents("m1") == {}
    await store.delete_node(recs[2])
    assert await store.get_node(recs[2].id) is None


async def test_client_quota_across_manager_ids_and_the_pool(cstore: Store) -> None:
    store = cstore
    # a client's limit holds across manager_ids of different slots, under parallel creations
    async def one(mgr: str) -> str:
        try:
            return await store.reserve(mgr, per_manager=0, total=0, client="cq", per_client=3)
        except QuotaExceeded as exc:
            return exc.detail

    results = await asyncio.gather(*(one(f"q{i % 4}") for i in range(12)))
    assert sum(not r.startswith("quota") for r in results) == 3
    # a manager's refusal gives the client's count back
    await store.reserve("qa", per_manager=1, total=0)
    with pytest.raises(QuotaExceeded):
        await store.reserve("qa", per_manager=1, total=0, client="cz", per_client=5)
    assert int(await store.redis.hget(store.keys.client_count("cz"), "cz") or 0) == 0
    # total across manager_ids
    for i in range(2):
        await store.reserve(f"t{i}", per_manager=0, total=17)
    # the pool: a claim takes the client's count in its slot and the node in the manager's
    pooled = _rec(store, "qp")
    pooled.role = "pooled"
    await store.put_node(pooled)
    await store.redis.rpush(store.keys.pool("qp"), pooled.id)
    assert await store.claim_pooled("qp", client="cp", claimer="r1", per_client=1) == pooled.id
    assert await store.claim_pooled("qp", client="cp", claimer="r1", per_client=1) is None
    assert int(await store.redis.hget(store.keys.client_count("cp"), "cp") or 0) == 1


async def test_the_engines_creation_slots_on_the_cluster(cstore: Store) -> None:
    # the scripts name the manager's home slot only: a slot, a waiter, a release that grants it
    store = cstore
    assert await store.creation_slot("cs", "m1", "a", False, 1, 1, 10) == (1, 0, 1, 0)
    assert await store.creation_slot("cs", "m2", "b", False, 1, 1, 10) == (0, 1, 1, 0)
    assert (await store.creation_slot("cs", "m3", "c", False, 1, 1, 10))[0] == -1  # the queue is full
    assert await store.creation_slot("cs", "r1", "", True, 1, 1, 10) == (0, 1, 1, 1)  # a refill waits
    assert await store.release_creation_slots("cs", ["m1"], 1, 10) == ["m2"]
    assert await store.renew_creation_slots("cs", ["m2"], 10) == 1
    assert await store.release_creation_slots("cs", ["m2"], 1, 10) == []
    assert await store.creation_counts("cs") == (0, 0)


async def test_mcp_sessions_and_streams_on_the_cluster(cstore: Store) -> None:
    mcp = cstore.mcp
    await mcp.session_put("h1", {"node": "n1", "owner": "c"}, 30)
    assert (await mcp.session_get("h1")) == {"node": "n1", "owner": "c"}
    first = await mcp.stream_add("h1", "s1", "one", "m", 30)
    await mcp.stream_add("h1", "s1", "two", "m", 30)
    assert [d for _, d, _ in await mcp.stream_read("h1", "s1", first, None)] == ["two"]
    await mcp.stream_hold("h1", "s1", "r1", 5)
    assert await mcp.stream_held("h1", "s1")
    assert await mcp.session_delete("h1")


def test_the_checker_moves_a_session_down_the_tiers_on_the_cluster(cluster: RedisCluster, start_manager,  # type: ignore[no-untyped-def]
                                                                  prefix: str) -> None:
    """The checker's fenced writes (tier moves and their events) and the resume, on the cluster."""
    import json

    import redis

    m = start_manager(redis=cluster_redis_cfg(cluster, prefix), **tiers(pause=1.0, stop=2.0, archive=3.0))
    cl = httpx.Client(base_url=m.url, timeout=60)
    r = cl.post("/get_cookie")
    assert r.status_code == 200, (r.text, m.logs()[-3000:])
    node_id = r.cookies["node_id"]
    write(cl, "notes.txt", b"before")

    def tier() -> str:
        rows = httpx.get(m.url + "/admin/nodes", headers=ADMIN).json()["nodes"]
        return str(next(n for n in rows if n["id"] == node_id)["tier"])

    wait_for(lambda: tier() == "archived", timeout=30, interval=0.1, what="the session archived")
    assert read(cl, "notes.txt") == b"before"  # brought back from the archive, its file kept
    assert tier() == "running"
    rc = redis.RedisCluster(host="127.0.0.1", port=cluster.ports[0], password=cluster.password)
    try:
        kinds = [json.loads(f[b"e"])["type"] for _, f in rc.xrange(Keys(prefix, cluster=True).events())
                 if json.loads(f[b"e"])["node_id"] == node_id]
    finally:
        rc.close()
    for kind in ("paused", "idle_stopped", "archived", "resumed"):
        assert kind in kinds, kinds
    assert cl.post("/release_session").status_code == 200


def test_managers_on_the_cluster_survive_a_primary_killed(start_manager, prefix: str,  # type: ignore[no-untyped-def]
                                                         manager_id: str) -> None:
    """Sessions made, used, stopped, brought back and released through two replicas on the cluster;
    then the primary of the manager's slot is killed with -9 under a client loop."""
    c = RedisCluster().start()
    try:
        redis_cfg = cluster_redis_cfg(c, prefix)
        reps = [start_manager(name=f"c{i}", redis=redis_cfg) for i in range(2)]
        sessions: list[tuple[httpx.Client, str, bytes]] = []
        for i in range(4):
            cl = httpx.Client(base_url=reps[i % 2].url, timeout=30)
            r = cl.post("/get_cookie")
            assert r.status_code == 200, (r.text, reps[i % 2].logs()[-3000:])
            assert r.cookies["node_id"].startswith(home(manager_id))
            mark = uuid.uuid4().hex.encode()
            write(cl, "mark.txt", mark)
            sessions.append((cl, r.cookies["node_id"], mark))
        # a session's life through the other replica: stopped, brought back with its file, released
        cl, _nid, mark = sessions[3]
        cl.base_url = httpx.URL(reps[0].url)
        assert cl.post("/close_session").status_code == 200
        assert cl.post("/reconnect_session").status_code == 200
        assert read(cl, "mark.txt") == mark
        assert cl.post("/release_session").status_code == 200
        sessions.pop()

        victim = c.primary_of(f"{prefix}:{{{home(manager_id)}}}:x")
        c.wait_synced()
        results: list[tuple[float, str, int]] = []
        stop = threading.Event()

        def loop() -> None:
            clients = [httpx.Client(base_url=m.url, timeout=10) for m in reps]
            while not stop.is_set():
                for _c, node_id, _ in sessions:
                    for m, mc in zip(reps, clients):
                        mc.cookies.set("node_id", node_id)
                        for what, method, path in (("tools", "POST", "/get_available_tools"), ("ready", "GET", "/ready")):
                            try:
                                code = mc.request(method, path).status_code
                            except httpx.HTTPError:
                                code = 0
                            results.append((time.monotonic(), f"{what} {node_id[:8]} via {m.replica_id}", code))
            for mc in clients:
                mc.close()

        worker = threading.Thread(target=loop, daemon=True)
        worker.start()
        wait_for(lambda: len(results) > 16, what="the client loop running")
        killed = time.monotonic()
        c.kill(victim)
        wait_for(lambda: c.primary_of(f"{prefix}:{{{home(manager_id)}}}:x") != victim, timeout=30, interval=0.1,
                 what="the cluster promoting the replica")
        promoted = time.monotonic()

        def recovered() -> bool:
            later = [code for t, _, code in results if t > promoted + 0.5]
            return len(later) >= 4 * len(sessions) * len(reps) and all(code == 200 for code in later[-16:])

        wait_for(recovered, timeout=60, interval=0.1, what="every call answered again")
        stop.set()
        worker.join(30)
        failed = [(round(t - killed, 2), what, code) for t, what, code in results if t > killed and code != 200]
        window = (max(t for t, _, _ in failed) - killed) if failed else 0.0
        report(f"redis cluster failover: replica promoted {promoted - killed:.2f} s after its primary was killed "
               f"(cluster-node-timeout {c.node_timeout_ms} ms); {len(failed)} of "
               f"{len([r for r in results if r[0] > killed])} calls failed, the last {window:.2f} s after the kill")
        print(f"error window {window:.2f} s; failed calls: {failed[:10]}")
        # tool calls do not need Redis (addresses cached): none failed
        assert not [f for f in failed if f[1].startswith("tools")], failed
        # 0 sessions lost: each still answers with its file through either replica
        for cl, _node_id, mark in sessions:
            for m in reps:
                cl.base_url = httpx.URL(m.url)
                assert read(cl, "mark.txt") == mark
        for m in reps:  # the managers write to the promoted primary: a new session through each
            cl = httpx.Client(base_url=m.url, timeout=30)
            r = cl.post("/get_cookie")
            assert r.status_code == 200, (r.text, m.logs()[-3000:])
            assert cl.post("/release_session").status_code == 200
        for cl, _, _ in sessions:
            assert cl.post("/release_session").status_code == 200
    finally:
        c.close()


async def test_store_calls_in_a_killed_primarys_slot_wait_out_the_failover() -> None:
    """Store calls on the slot of a primary killed with -9: they error (503 naming Redis) only in
    the window until its replica is promoted, then go on there with every record written before."""
    import msgspec

    from shared.errors import RedisUnavailable

    c = RedisCluster().start()
    store = Store.open(msgspec.convert({"redis": cluster_redis_cfg(c, "tf")}, Config))
    try:
        recs = [_rec(store, "mf") for _ in range(20)]
        for r in recs:
            await store.put_node(r)
        victim = c.primary_of(store.keys.lease("mf"))
        await asyncio.to_thread(c.wait_synced)
        await asyncio.sleep(1.0)  # the records replicated (asynchronously) to the victim's replica
        results: list[tuple[float, bool]] = []
        longest = [0.0]  # the longest call: a call that waited the failover out shows it here
        stop = asyncio.Event()

        async def loop() -> None:
            i = 0
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    await store.update_node(recs[i % 20].id, last_seen=str(time.time()))
                    ok = (await store.get_node(recs[(i + 7) % 20].id)) is not None
                except RedisUnavailable:
                    ok = False
                results.append((time.monotonic(), ok))
                longest[0] = max(longest[0], time.monotonic() - t0)
                i += 1
                await asyncio.sleep(0.005)

        task = asyncio.create_task(loop())
        await asyncio.sleep(0.3)
        killed = time.monotonic()
        c.kill(victim)
        await until(lambda: c.primary_of(store.keys.lease("mf")) != victim, timeout=30, what="a replica promoted")
        promoted = time.monotonic()
        await until(lambda: [ok for t, ok in results if t > promoted + 1.0], timeout=30,
                    what="calls a second after the promotion")
        await asyncio.sleep(1.0)
        stop.set()
        await task
        failed = [t - killed for t, ok in results if not ok]
        after = [ok for t, ok in results if t > promoted + 1.0]
        report(f"redis cluster failover, store calls in the killed primary's slot: promoted {promoted - killed:.2f} s "
               f"after the kill; {len(failed)} of {len([1 for t, _ in results if t > killed])} calls failed, "
               f"error window {(max(failed) if failed else 0.0):.2f} s after the kill; the longest call {longest[0]:.2f} s")
        assert after and all(after)  # served again by the promoted replica
        assert len(await store.get_nodes([r.id for r in recs])) == 20  # no record lost
    finally:
        await store.close()
        c.close()


def test_events_split_by_manager_id_through_replicas_on_the_cluster(  # type: ignore[no-untyped-def]
        cluster: RedisCluster, manager_id_b: str, start_manager, prefix: str, manager_id: str) -> None:
    """The consumers of events on the cluster, across two manager_ids: a session's socket and an
    admin's view of every session on a replica of the other manager_id, a resume of that view on
    the session's own replica, and the other replica's cached address of a restarted session."""
    from tests.test_websocket import ADMIN_TOKEN, open_ws, recv_event, recv_json, ws_url

    # the default client timeout (60 s): these sockets say nothing while a session is made
    redis_cfg = cluster_redis_cfg(cluster, prefix)
    a = start_manager(name="ea", redis=redis_cfg)
    b = start_manager(name="eb", mid=manager_id_b, redis=redis_cfg)
    bearer = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with open_ws(ws_url(b.url, "/ws/events"), additional_headers=bearer) as every:
        assert recv_json(every)["success"] is True
        cl = httpx.Client(base_url=a.url, timeout=60)
        r = cl.post("/get_cookie")
        assert r.status_code == 200, (r.text, a.logs()[-3000:])
        node_id = r.cookies["node_id"]
        seen = [recv_event(every)]
        while seen[-1]["event"] != "ready":
            seen.append(recv_event(every))
        assert {e["node_id"] for e in seen} == {node_id} and seen[0]["event"] == "created"
        resume_from = seen[-1]["id"]
        via_b = httpx.Client(base_url=b.url, timeout=60, cookies={"node_id": node_id})
        write(via_b, "mark.txt", b"kept")  # b caches the session of a's manager_id
        with open_ws(ws_url(b.url, "/ws/events"), node_id) as mine:
            assert recv_json(mine)["data"]["id"] == node_id
            assert cl.post("/close_session").status_code == 200  # a's own replica
            ev = recv_event(mine)
            assert ev["event"] == "stopped" and ev["node_id"] == node_id, ev
        assert cl.post("/reconnect_session").status_code == 200
        # b dropped its cached address on a's events: the restarted container answers through b
        assert read(via_b, "mark.txt") == b"kept"
        assert cl.post("/release_session").status_code == 200
        while recv_event(every)["event"] != "released":
            pass
    # the view of every session resumed on the session's own replica by the id b gave
    with open_ws(ws_url(a.url, f"/ws/events?last_event_id={resume_from}"), additional_headers=bearer) as again:
        assert recv_json(again)["success"] is True
        kinds = [recv_event(again)["event"]]
        while kinds[-1] != "released":
            kinds.append(recv_event(again)["event"])
        assert "created" not in kinds and kinds[0] == "stopped" and "restarted" in kinds, kinds


async def test_a_client_count_taken_by_a_replica_that_died_is_given_back_on_the_cluster(
        cluster: RedisCluster) -> None:
    """The checker (on the fake engine) drops the reservation of a replica that died mid-creation
    and gives its client's count back: on the cluster that count is another slot's, written after
    the fenced part."""
    from checker.service import Checker
    from nodeops.context import NodeOps
    from shared import __version__
    from shared.config import load_config
    from shared.engines import open_backend
    from shared.models import ReplicaInfo

    mid = f"fake-{uuid.uuid4().hex[:8]}"
    cfg = load_config(None, environ={}, overrides={
        "manager_id": mid, "engine": {"kind": "fake"}, "cluster": {"node_secret_key": "fake-engine-test-key"},
        "redis": cluster_redis_cfg(cluster, f"tq-{uuid.uuid4().hex[:6]}")})
    store = Store.open(cfg)
    backend = open_backend(cfg)
    http = httpx.AsyncClient(transport=backend.http_transport())  # type: ignore[attr-defined]
    try:
        ops = NodeOps(cfg=cfg, store=store, backend=backend, http=http,
                      replica=ReplicaInfo(replica_id=cfg.replica_id, manager_id=mid, url="", version=__version__,
                                          started_at=time.time()))

        async def count(client: str) -> int:
            return int(await store.redis.hget(store.keys.client_count(client), client) or 0)

        await store.reserve(mid, 0, 0, "c1", 5, replica_id="dead-replica")
        await store.reserve(mid, 0, 0, "c2", 5, replica_id="dead-replica")
        assert await count("c1") == 1 and await count("c2") == 1
        checker = Checker(ops)
        assert await checker.lease.acquire()
        p = await checker.cycle()
        assert len(p.stale_reservations) == 2
        assert await count("c1") == 0 and await count("c2") == 0
        assert [m for m in await store.manager_node_ids(mid)] == []
    finally:
        await http.aclose()
        await store.close()
