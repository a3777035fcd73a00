"""On a Redis Cluster every script and every MULTI must name keys of one slot (else CROSSSLOT):
each store call is run on a client that records the keys of each script call and each MULTI, and
redis-py's own key slot of those keys is checked. The same calls on one Redis keep their names."""

from __future__ import annotations

import asyncio
from typing import Any

from redis.crc import key_slot

from shared.keys import Keys, home
from shared.models import Event, Intent, NodeRecord, NodeStatus, ReplicaInfo, Snapshot
from shared.store import Store


class Recorder:
    """A client that records (what, keys) of each script call and each MULTI, and answers enough
    for the store's code to go on ('ok' from scripts, the pool's head from LRANGE)."""

    def __init__(self) -> None:
        self.atomic: list[tuple[str, list[str]]] = []
        self.pool_head: list[bytes] = []

    def register_script(self, source: str) -> Any:
        rec = self

        class Fake:
            async def __call__(self, keys: list[str] = (), args: list[Any] = ()) -> Any:  # type: ignore[assignment]
                rec.atomic.append((source.strip().splitlines()[0][:40], list(keys)))
                if "lpop" in source:  # the pool's claim: the first id it was given
                    return args[3]
                if "cjson.encode(t)" in source:
                    return b"[]"
                if "table.concat(out, '\\n')" in source:
                    return b""
                return b"ok" if "return 'ok'" in source else 1

        return Fake()

    def pipeline(self, transaction: bool = True) -> Any:
        rec = self

        class Pipe:
            def __init__(self) -> None:
                self.keys: list[str] = []

            async def __aenter__(self) -> Pipe:
                return self

            async def __aexit__(self, *a: Any) -> None:
                return None

            def execute_command(self, name: str, key: str, *args: Any) -> None:
                self.keys.append(key)

            def __getattr__(self, name: str) -> Any:
                def cmd(key: Any, *a: Any, **kw: Any) -> None:
                    self.keys.append(key if isinstance(key, str) else next(iter(key)))
                return cmd

            async def execute(self) -> list[Any]:
                if transaction:
                    rec.atomic.append(("MULTI", list(self.keys)))
                return [b"1-0", 1] + [0] * max(0, len(self.keys) - 2)

        return Pipe()

    async def lrange(self, key: str, *a: Any) -> list[bytes]:
        head, self.pool_head = self.pool_head, []
        return head

    def __getattr__(self, name: str) -> Any:
        async def cmd(*a: Any, **kw: Any) -> Any:
            return set() if name == "smembers" else None
        return cmd


def _node(nid: str, mgr: str, client: str = "c1") -> NodeRecord:
    return NodeRecord(id=nid, short_id=nid[:12], manager_id=mgr, status=NodeStatus.RUNNING, created_at=1.0,
                      updated_at=1.0, last_request_at=1.0, client=client)


async def _every_call(store: Store, rec: Recorder) -> None:
    k = store.keys
    a, b = k.new_session_id("mgr-a"), k.new_session_id("mgr-a")
    other = k.new_session_id("mgr-b")
    await store.put_node(_node(a, "mgr-a"), replace_member="pending:1")
    await store.update_node(a, status="exited")
    await store.get_nodes([a, b, other])
    await store.node_stamps([a, other, b])
    await store.delete_node(_node(a, "mgr-a"))
    await store.reserve("mgr-a", 5, 0, "c1", 3)
    await store.reserve("mgr-a", 5, 100, "c1", 3)
    await store.unreserve("mgr-a", "pending:1", "c1")
    rec.pool_head = [b.encode()]
    await store.claim_pooled("mgr-a", "c1", "r1", 3)
    ops = [*store.delete_ops(_node(a, "mgr-a")), store.update_op(b, {"status": "exited"}, 2.0),
           *store.adopt_ops(_node(b, "mgr-a"), 2.0), *store.event_op(Event(type="node_stopped", node_id=b, manager_id="mgr-a")),
           store.intent_done_op("mgr-a", b), store.cycle_count_op("mgr-a", 3), store.archived_op("mgr-a", b),
           store.pool_push_op("mgr-a", b), store.unreserve_op("mgr-a", "pending:1")]
    await store.fenced("mgr-a", "r1", 3, ops)
    await store.record_intent(_node(b, "mgr-a"), Intent(op="release", at=1.0, by="r2"))
    await store.drop_intent("mgr-a", b, "release")
    await store.leases.acquire("mgr-a", "r1", 1000)
    await store.leases.renew("mgr-a", "r1:3", 1000)
    await store.leases.release("mgr-a", "r1:3")
    await store.lock_session(b, "h", 1000)
    await store.unlock_session(b, "h")
    await store.heartbeat(ReplicaInfo(replica_id="r1", manager_id="mgr-a", url="http://x", version="1", started_at=1.0), 5)
    await store.deregister("r1")
    await store.watch_started(b)
    await store.mcp.session_put("h1", {"node": b}, 10)
    await store.mcp.stream_add("h1", "s1", "data", "m", 10)
    snap = Snapshot(name="s", manager_id="mgr-a", seed="x", source=b, client="c1", bytes=10, created_at=1.0)
    await store.snapshots.put(snap, 3, 1000)
    await store.snapshots.delete("c1", "s")
    await store.set_client_count("c1", 4, 2, 1)  # the upkeep's recount and its removal of a gone stream
    await store.remove_gone_stream("mgr-a", 1.0)
    await store.take_client("c1", 3)
    await store.give_client("c1")


def test_every_script_and_multi_names_one_slot_on_a_cluster() -> None:
    rec = Recorder()
    store = Store(rec, Keys("tsm", cluster=True), lease_redis=rec)  # type: ignore[arg-type]
    asyncio.run(_every_call(store, rec))
    assert len(rec.atomic) > 25
    crossing = [(what, keys) for what, keys in rec.atomic if len({key_slot(x.encode()) for x in keys}) > 1]
    assert crossing == []


def test_sessions_of_a_manager_share_its_slot() -> None:
    k = Keys("tsm", cluster=True)
    sid = k.new_session_id("mgr-a")
    assert len(sid) == 64 and sid.startswith(home("mgr-a")) and int(sid, 16) >= 0
    slots = {key_slot(x.encode()) for x in (k.node(sid), k.watchers(sid), k.session_lock(sid), k.manager_nodes("mgr-a"),
                                           k.lease("mgr-a"), k.fence("mgr-a"), k.intents("mgr-a"), k.pool("mgr-a"))}
    assert len(slots) == 1


def test_one_redis_keeps_its_names() -> None:
    k = Keys("tsm")
    assert (k.node("abc"), k.manager_nodes("m"), k.client_count("c1"), k.events(), k.replica("r")) == (
        "tsm:node:abc", "tsm:mgr:m:nodes", "tsm:client_count", "tsm:events", "tsm:replica:r")
    assert "{" not in k.lease("m") + k.snapshot("s") + k.mcp_session("h") + k.watchers("n")
