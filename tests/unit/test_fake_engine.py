"""Node operations and the checker on the in-memory engine (shared/engines/fake.py) and the real
test Redis: the session state machine without Docker, in well under a second a test."""

from __future__ import annotations

import asyncio
import copy
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from checker.service import Checker
from nodeops import capacity, lifecycle, lost
from nodeops.context import NodeOps
from shared import __version__
from shared.config import deep_merge, load_config
from shared.engines import open_backend
from shared.engines.base import NewNode
from shared.engines.fake import FakeBackend
from shared.errors import NodeNotFound
from shared.models import NodeStatus, ReplicaInfo, Role
from shared.store import Store
from testing.redis_env import redis_url

MakeOps = Callable[..., Awaitable[NodeOps]]
NO_TIERS = {"idling_close_minutes": None, "idle_grace_seconds": 0,
            "tiers": {"pause_after_seconds": None, "archive_after_seconds": None}}


@pytest.fixture
async def make_ops(prefix: str) -> AsyncIterator[MakeOps]:
    """NodeOps of a fresh manager_id on the fake engine; node settings and other overrides merged in."""
    made: list[tuple[Store, httpx.AsyncClient]] = []

    async def make(node: dict[str, Any] | None = None, **over: Any) -> NodeOps:
        mid = f"fake-{uuid.uuid4().hex[:8]}"
        cfg = load_config(None, environ={}, overrides=deep_merge({
            "manager_id": mid, "engine": {"kind": "fake"}, "redis": {"url": redis_url(), "key_prefix": prefix},
            "cluster": {"node_secret_key": "fake-engine-test-key"},
            "node": deep_merge({"creation_wait_seconds": 5, "probe_interval_seconds": 0.001}, copy.deepcopy(node or {})),
        }, over))
        store = Store.open(cfg)
        backend = open_backend(cfg)
        assert isinstance(backend, FakeBackend)
        http = httpx.AsyncClient(transport=backend.http_transport())
        made.append((store, http))
        return NodeOps(cfg=cfg, store=store, backend=backend, http=http,
                       replica=ReplicaInfo(replica_id=cfg.replica_id, manager_id=mid, url="", version=__version__,
                                           started_at=time.time()))

    yield make
    for store, http in made:
        await http.aclose()
        await store.close()


def engine(ops: NodeOps) -> FakeBackend:
    assert isinstance(ops.backend, FakeBackend)
    return ops.backend


async def status(ops: NodeOps, node_id: str) -> tuple[str, str]:
    """(the record's status, its container's status or "gone")."""
    rec = await ops.store.get_node(node_id)
    assert rec is not None
    nodes = {n.id: n.status for n in await ops.backend.nodes(ops.manager_id)}
    return rec.status, nodes.get(rec.cid, "gone")


async def leader(ops: NodeOps) -> Checker:
    checker = Checker(ops)
    assert await checker.lease.acquire()
    return checker


async def test_create_answers_and_release_leaves_nothing(make_ops: MakeOps) -> None:
    ops = await make_ops()
    rec = await lifecycle.create_node(ops)
    assert await status(ops, rec.id) == (NodeStatus.RUNNING, NodeStatus.RUNNING)
    assert [w.session_id for w in await ops.backend.workspaces(ops.manager_id)] == [rec.id]
    assert await ops.store.manager_node_ids(ops.manager_id) == [rec.id]

    await lifecycle.release_node(ops, rec.id)
    assert await ops.store.get_node(rec.id) is None
    assert await ops.backend.nodes(ops.manager_id) == [] and await ops.backend.workspaces(ops.manager_id) == []
    with pytest.raises(NodeNotFound):
        await lifecycle.release_node(ops, rec.id)


async def test_a_node_that_never_answers_times_out_and_is_removed(make_ops: MakeOps) -> None:
    ops = await make_ops(node={"creation_wait_seconds": 0.2})
    ops.http = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(503)))
    with pytest.raises(Exception, match="timeout"):
        await lifecycle.create_node(ops)
    await ops.http.aclose()
    assert await ops.backend.nodes(ops.manager_id) == [] and await ops.backend.workspaces(ops.manager_id) == []
    assert await ops.store.manager_node_ids(ops.manager_id) == []


async def test_stop_then_resume_restarts_the_same_container(make_ops: MakeOps) -> None:
    ops = await make_ops()
    rec = await lifecycle.create_node(ops)
    await lifecycle.stop_node(ops, rec.id)
    assert await status(ops, rec.id) == (NodeStatus.EXITED, NodeStatus.EXITED)
    back = await lifecycle.ensure_running(ops, rec.id)
    assert back.cid == rec.cid and await status(ops, rec.id) == (NodeStatus.RUNNING, NodeStatus.RUNNING)


async def test_pause_then_resume_thaws(make_ops: MakeOps) -> None:
    ops = await make_ops()
    rec = await lifecycle.create_node(ops)
    await lifecycle.pause_node(ops, rec.id)
    assert await status(ops, rec.id) == (NodeStatus.PAUSED, NodeStatus.PAUSED)
    await lifecycle.ensure_running(ops, rec.id)
    assert await status(ops, rec.id) == (NodeStatus.RUNNING, NodeStatus.RUNNING)
    assert "unpause" in engine(ops).calls and "restart" not in engine(ops).calls


async def test_checker_pauses_stops_and_archives_idle_sessions(make_ops: MakeOps) -> None:
    # each tier alone, past its threshold at once: the pass decides from the records and one listing
    for tier, want in (({"pause_after_seconds": 0.001}, NodeStatus.PAUSED),
                       ({}, NodeStatus.EXITED),
                       ({"archive_after_seconds": 0.001}, NodeStatus.ARCHIVED)):
        node = deep_merge(copy.deepcopy(NO_TIERS), {"tiers": tier})
        if not tier:
            node["idling_close_minutes"] = 0.00001
        ops = await make_ops(node=node)
        rec = await lifecycle.create_node(ops)
        await (await leader(ops)).cycle()
        rec_status, container = await status(ops, rec.id)
        assert rec_status == want, tier
        assert container == ("gone" if want == NodeStatus.ARCHIVED else want)
        if want == NodeStatus.ARCHIVED:  # the workspace stays for the session to come back on
            assert [w.name for w in await ops.backend.workspaces(ops.manager_id)] == [rec.workspace]
        back = await lifecycle.ensure_running(ops, rec.id)  # any tier comes back on the next call
        assert back.workspace == rec.workspace and await status(ops, rec.id) == (NodeStatus.RUNNING,
                                                                                 NodeStatus.RUNNING)


async def test_checker_archives_a_session_whose_container_vanished(make_ops: MakeOps) -> None:
    ops = await make_ops(node=NO_TIERS)
    rec = await lifecycle.create_node(ops)
    keep = await lifecycle.create_node(ops)
    engine(ops).vanish(rec.cid)
    p = await (await leader(ops)).cycle()
    assert [r.id for r in p.lost] == [rec.id]
    assert await status(ops, rec.id) == (NodeStatus.ARCHIVED, "gone")
    assert await status(ops, keep.id) == (NodeStatus.RUNNING, NodeStatus.RUNNING)


async def test_checker_records_a_node_that_exited_on_its_own(make_ops: MakeOps) -> None:
    ops = await make_ops(node=NO_TIERS)
    rec = await lifecycle.create_node(ops)
    engine(ops).exit(rec.cid)
    await (await leader(ops)).cycle()
    assert await status(ops, rec.id) == (NodeStatus.EXITED, NodeStatus.EXITED)


async def test_checker_removes_a_container_whose_creating_replica_died(make_ops: MakeOps) -> None:
    ops = await make_ops(node=NO_TIERS)
    keep = await lifecycle.create_node(ops)
    # created, never started nor recorded, by a replica that is not live: nobody will finish it
    orphan = await ops.backend.create(NewNode(owner=ops.manager_id, role=Role.NODE, replica_id="gone-replica",
                                              created_at=time.time(), session_id=uuid.uuid4().hex))
    p = await (await leader(ops)).cycle()
    assert p.remove_orphans == [orphan]
    assert [n.id for n in await ops.backend.nodes(ops.manager_id)] == [keep.cid]


async def test_node_cap_is_the_engines_memory_over_a_nodes(make_ops: MakeOps) -> None:
    ops = await make_ops(engine={"fake": {"memory_bytes": 10 << 30, "node_memory_bytes": 3 << 30}})
    assert await capacity.node_cap(ops) == 3
    ops = await make_ops(engine={"fake": {"node_memory_bytes": 0}})
    assert await capacity.node_cap(ops) == 0  # nodes without a memory limit: nothing to derive a cap from
    ops = await make_ops(cluster={"max_nodes_per_manager": 7})
    assert await capacity.node_cap(ops) == 7


async def test_a_manager_without_heartbeats_is_lost(make_ops: MakeOps) -> None:
    ops = await make_ops(cluster={"lost_after_seconds": 0.5})
    other = f"fake-{uuid.uuid4().hex[:8]}"
    await ops.store.heartbeat(ReplicaInfo(replica_id=f"{other}-r", manager_id=other, url="", version=__version__,
                                          started_at=time.time()), ttl=0.2)
    assert other not in await lost.lost_managers(ops)  # seen just now
    deadline = time.monotonic() + 10
    while other not in (found := await lost.lost_managers(ops)) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert found[other] > 0.5


async def test_a_client_count_taken_by_a_replica_that_died_mid_creation_is_given_back(make_ops: MakeOps) -> None:
    """A replica killed between its quota reservation and its record leaves the reservation, which
    the checker drops once the replica is not live; the client's count goes with it, or the client
    would be refused one session early for ever (issue 29)."""
    ops = await make_ops(node=NO_TIERS)
    store, mid = ops.store, ops.manager_id

    async def count(client: str) -> int:
        return int(await store.redis.hget(store.keys.client_count(client), client) or 0)

    # a session of the same client that stays, made as get_cookie makes it
    kept = await lifecycle.create_node(ops, client="c1", reservation=await store.reserve(mid, 0, 0, "c1", 5))
    await store.reserve(mid, 0, 0, "c1:with:colons", 5, replica_id="dead-replica")  # its replica then died
    await store.reserve(mid, 0, 0, "c1", 5, replica_id="dead-replica")
    assert await count("c1") == 2 and await count("c1:with:colons") == 1
    checker = await leader(ops)
    p = await checker.cycle()
    assert len(p.stale_reservations) == 2
    assert await count("c1") == 1 and await count("c1:with:colons") == 0
    # a replica that gives its reservation back after the checker dropped it does not count it twice
    member = await store.reserve(mid, 0, 0, "c2", 5, replica_id="dead-replica")
    await checker.cycle()
    await store.unreserve(mid, member, "c2")
    assert await count("c2") == 0
    await lifecycle.release_node(ops, kept.id)
    assert await count("c1") == 0
