"""The checker on the real parts: one leader per manager_id, failover, fencing after a stall,
reconcile (gone, adopted, idle, GC, stuck creations), rebuild after Redis loses everything."""

from __future__ import annotations

import signal
import time
import uuid

import docker
import httpx
import redis

from testing.harness import PrivateRedis
from testing.hosts import PrivateEngine
from tests.conftest import ADMIN_TOKEN, NODE_IMAGE, project_containers, wait_for

FAST = {"checker": {"interval_seconds": 0.5, "lease_ttl_seconds": 5}}
ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}


def cycles_by_token(r: redis.Redis, prefix: str, mid: str) -> dict[str, int]:
    raw = r.hgetall(f"{prefix}:mgr:{mid}:checker_stats")
    return {k.decode().split(":", 1)[1]: int(v) for k, v in raw.items() if k.startswith(b"cycles:")}


def lease_holder(r: redis.Redis, prefix: str, mid: str) -> str | None:
    v = r.get(f"{prefix}:mgr:{mid}:lease")
    return v.decode().rpartition(":")[0] if v else None


def test_exactly_one_leader_and_failover_after_sigkill(start_manager, redis_client: redis.Redis, prefix: str,
                                                       manager_id: str) -> None:
    reps = [start_manager(name=f"r{i}", **FAST) for i in range(3)]
    holder = wait_for(lambda: lease_holder(redis_client, prefix, manager_id), what="a lease holder")
    # four passes of the holder: time enough for any other replica to have acted too
    wait_for(lambda: sum(cycles_by_token(redis_client, prefix, manager_id).values()) >= 4, what="four passes")
    counts = cycles_by_token(redis_client, prefix, manager_id)
    assert len(counts) == 1, f"more than one checker acted: {counts}"
    assert lease_holder(redis_client, prefix, manager_id) == holder
    # the holder counts the live replicas of its manager_id from the registry its pass read
    alive = f'toolserver_replicas_alive{{manager_id="{manager_id}"}} 3.0'
    leader_url = next(m.url for m in reps if m.replica_id == holder)
    wait_for(lambda: alive in httpx.get(leader_url + "/metrics").text, what="three replicas alive in the gauge")
    # the admin view says who holds it, with its token and since when
    leases = httpx.get(reps[0].url + "/admin/leases", headers=ADMIN).json()["leases"]
    mine = next(x for x in leases if x["manager_id"] == manager_id)
    assert mine["holder"] == holder and mine["token"] == 1 and mine["since"]

    leader = next(m for m in reps if m.replica_id == holder)
    t0 = time.monotonic()
    leader.kill()
    new = wait_for(lambda: (h := lease_holder(redis_client, prefix, manager_id)) and h != holder and h,
                   timeout=10, interval=0.05, what="takeover")
    took = time.monotonic() - t0
    print(f"takeover after SIGKILL: {took:.2f}s (TTL 5s)")
    wait_for(lambda: cycles_by_token(redis_client, prefix, manager_id).get("2", 0) > 0, what="new leader acting")
    assert new in {m.replica_id for m in reps if m is not leader}


def test_stalled_leader_is_fenced_out(start_manager, redis_client: redis.Redis, prefix: str,
                                      manager_id: str) -> None:
    reps = [start_manager(name=f"s{i}", **FAST) for i in range(2)]
    holder = wait_for(lambda: lease_holder(redis_client, prefix, manager_id), what="a lease holder")
    leader = next(m for m in reps if m.replica_id == holder)
    leader.signal(signal.SIGSTOP)
    try:
        wait_for(lambda: (h := lease_holder(redis_client, prefix, manager_id)) and h != holder, timeout=12,
                 what="takeover while the old leader is stopped")
        old_cycles = cycles_by_token(redis_client, prefix, manager_id).get("1", 0)
    finally:
        leader.signal(signal.SIGCONT)
    wait_for(lambda: "lease_lost" in leader.logs(), timeout=10, what="the old leader stepping down")
    # four passes of the new holder since then: the deposed one had as long to write, were it able to
    since = cycles_by_token(redis_client, prefix, manager_id).get("2", 0)
    wait_for(lambda: cycles_by_token(redis_client, prefix, manager_id).get("2", 0) >= since + 4,
             what="four passes of the new holder")
    counts = cycles_by_token(redis_client, prefix, manager_id)
    assert counts.get("1", 0) == old_cycles, "the deposed leader wrote after losing its lease"
    assert counts.get("2", 0) > 0
    assert lease_holder(redis_client, prefix, manager_id) != holder


def test_reconcile_gone_adopted_idle_and_gc(start_manager, docker_client: docker.DockerClient,
                                            redis_client: redis.Redis, prefix: str, manager_id: str) -> None:
    m = start_manager(node={"idling_close_minutes": 0.05, "idle_grace_seconds": 0, "exited_gc_minutes": 60},
                      **FAST)
    a = httpx.Client(base_url=m.url, timeout=60)
    a.post("/get_cookie")
    a_id = a.cookies["node_id"]
    b = httpx.Client(base_url=m.url, timeout=60)
    b.post("/get_cookie")
    b_id = b.cookies["node_id"]

    # removed behind the manager's back: the session is archived within a cycle or two (its
    # workspace is kept for its next call)
    docker_client.containers.get(b_id).remove(force=True)
    wait_for(lambda: redis_client.hget(f"{prefix}:node:{b_id}", "status") == b"archived",
             what="the session of a gone container archived")

    # started by hand with the project's labels: adopted
    # (with a secret in its config, as the manager creates nodes: adoption reads it from there)
    c = docker_client.containers.run(NODE_IMAGE, detach=True, init=True, ports={"31942/tcp": ("127.0.0.1", None)},
                                     environment={"NODE_SECRET": "made-by-hand"},
                                     labels={"toolserver-manager.manager_id": manager_id,
                                             "toolserver-manager.role": "node"})
    wait_for(lambda: redis_client.hget(f"{prefix}:node:{c.id}", "status") == b"running", timeout=15,
             what="adoption (after the young-container grace)")
    adopted = httpx.Client(base_url=m.url, timeout=60, cookies={"node_id": c.id})
    wait_for(lambda: adopted.post("/").status_code == 200, timeout=10, what="proxying to the adopted node")

    # idle for 3 s: stopped by the checker; the next proxied call brings it back
    wait_for(lambda: redis_client.hget(f"{prefix}:node:{a_id}", "status") == b"exited", timeout=15,
             what="idle stop")
    assert docker_client.containers.get(a_id).status == "exited"
    assert a.post("/").json() == {"message": "Hello World"}
    assert docker_client.containers.get(a_id).status == "running"


def test_stopped_sessions_are_archived_and_come_back(start_manager, docker_client: docker.DockerClient,
                                                    redis_client: redis.Redis, prefix: str, manager_id: str) -> None:
    m = start_manager(node={"tiers": {"archive_after_seconds": 2}}, **FAST)
    c = httpx.Client(base_url=m.url, timeout=60)
    c.post("/get_cookie")
    node_id = c.cookies["node_id"]
    c.post("/close_session")
    # the record says archived only once the engine has removed the container (tiers.archive), so the
    # status is the condition to wait on; the container being gone is then a fact, not a race
    wait_for(lambda: redis_client.hget(f"{prefix}:node:{node_id}", "status") == b"archived", timeout=15,
             what="archival of a stopped node")
    assert not project_containers(docker_client, manager_id)
    assert docker_client.volumes.get(f"tsm-session-{node_id}")  # the workspace stays
    assert c.post("/reconnect_session").json() == f"Reconnect session: {node_id}"
    assert docker_client.containers.get(node_id).status == "running"
    c.post("/release_session")


def test_half_made_node_of_a_killed_replica_is_removed(start_manager, docker_client: docker.DockerClient,
                                                       redis_client: redis.Redis, prefix: str,
                                                       manager_id: str) -> None:
    slow = {"node": {"creation_wait_seconds": 3, "creation_kwargs": {"command": ["sleep", "infinity"]}},
            "checker": {"interval_seconds": 0.5, "lease_ttl_seconds": 5, "stuck_creation_seconds": 1}}
    survivor = start_manager(name="survivor", builtin_monitor=True, **slow)
    doomed = start_manager(name="doomed", builtin_monitor=False, **slow)
    with httpx.Client(timeout=30) as c:
        try:
            c.post(doomed.url + "/get_cookie", timeout=1.0)
        except httpx.ReadTimeout:
            pass
    wait_for(lambda: project_containers(docker_client, manager_id), what="the half-made container")
    doomed.kill()
    # deadline: creation_wait + 5 s; the survivor's checker removes container and record
    wait_for(lambda: not project_containers(docker_client, manager_id), timeout=20,
             what="removal of the half-made container")
    wait_for(lambda: redis_client.scard(f"{prefix}:mgr:{manager_id}:nodes") == 0,
             what="its record and reservation gone")
    assert survivor.proc is not None and survivor.proc.poll() is None


def test_test_nodes_are_removed_at_leader_start(start_manager, docker_client: docker.DockerClient,
                                                manager_id: str) -> None:
    docker_client.containers.create(NODE_IMAGE, labels={"toolserver-manager.manager_id": manager_id,
                                                        "toolserver-manager.role": "test"})
    start_manager(**FAST)
    wait_for(lambda: not project_containers(docker_client, manager_id), timeout=10, what="test node removal")


def test_redis_flush_is_rebuilt_from_the_engine(private_redis: PrivateRedis, start_manager,  # type: ignore[no-untyped-def]
                                                docker_client: docker.DockerClient, manager_id: str) -> None:
    # a Redis of its own: flushing it touches nobody's data
    url = private_redis.url
    r = redis.Redis.from_url(url)
    prefix = f"flush-{uuid.uuid4().hex[:6]}"
    m = start_manager(redis={"url": url, "key_prefix": prefix}, **FAST)
    clients = []
    for _ in range(2):
        c = httpx.Client(base_url=m.url, timeout=60)
        assert c.post("/get_cookie").status_code == 200
        clients.append(c)
    ids = {c.cookies["node_id"] for c in clients}
    r.flushdb()
    wait_for(lambda: all(r.hget(f"{prefix}:node:{i}", "status") == b"running" for i in ids), timeout=20,
             what="records adopted back from container labels")
    for c in clients:
        assert c.post("/get_available_tools").status_code == 200
    # the replica re-registered itself and the lease was taken again
    wait_for(lambda: r.exists(f"{prefix}:replica:{m.replica_id}"), what="re-registration")
    wait_for(lambda: r.get(f"{prefix}:mgr:{manager_id}:lease"), timeout=10, what="lease re-acquired")
    for c in clients:
        c.post("/release_session")
    r.flushdb()
    r.close()


def test_stop_after_exit_only_when_last(start_manager, docker_client: docker.DockerClient,
                                        manager_id: str, redis_client: redis.Redis, prefix: str) -> None:
    opts = {"checker": {"interval_seconds": 0.5, "lease_ttl_seconds": 5, "stop_after_exit": True}}
    a = start_manager(name="a", **opts)
    b = start_manager(name="b", **opts)
    c = httpx.Client(base_url=a.url, timeout=60)
    c.post("/get_cookie")
    node_id = c.cookies["node_id"]
    registered = [f"{prefix}:replica:{m.replica_id}" for m in (a, b)]
    wait_for(lambda: redis_client.exists(*registered) == 2, what="both replicas registered")
    # stopping one of two replicas (leader or not) must not stop the nodes: a replica stops them
    # while it shuts down, so once b has exited they would be stopped already
    b.stop()
    assert "stop_after_exit_skipped" in b.logs()
    assert docker_client.containers.get(node_id).status == "running"
    # b deregistered as it stopped, so a is the last replica: stopping it stops its nodes
    wait_for(lambda: not redis_client.exists(registered[1]), what="b gone from the registry")
    a.stop()
    wait_for(lambda: docker_client.containers.get(node_id).status == "exited", timeout=10,
             what="nodes stopped after the last replica exits")


def test_checker_survives_a_dockerd_restart(private_engine: PrivateEngine, start_manager,  # type: ignore[no-untyped-def]
                                            redis_client: redis.Redis, prefix: str, manager_id: str) -> None:
    # the run's private engine is the one restarted, never the machine's
    m = start_manager(**FAST, **private_engine.manager_overrides())
    c = httpx.Client(base_url=m.url, timeout=60)
    assert c.post("/get_cookie").status_code == 200
    holder = wait_for(lambda: lease_holder(redis_client, prefix, manager_id), what="a lease holder")
    private_engine.stop_engine()
    try:
        wait_for(lambda: "checker_engine_unavailable" in m.logs(), timeout=10, what="the outage logged")
    finally:
        private_engine.start_engine()
    before = sum(cycles_by_token(redis_client, prefix, manager_id).values())
    wait_for(lambda: sum(cycles_by_token(redis_client, prefix, manager_id).values()) > before + 2, timeout=15,
             what="cycles resuming")
    assert lease_holder(redis_client, prefix, manager_id) == holder  # kept its lease through the outage
    wait_for(lambda: c.post("/").status_code == 200, timeout=20, what="the session serving again")
    c.post("/release_session")


def test_a_container_killed_behind_the_managers_back_is_seen_at_once(
        start_manager, docker_client: docker.DockerClient, redis_client: redis.Redis, prefix: str,
        manager_id: str) -> None:
    # passes five minutes apart (the lease must outlive one): within the test's minute only the
    # engine's event can wake the checker
    m = start_manager(checker={"interval_seconds": 300, "lease_ttl_seconds": 400})
    c = httpx.Client(base_url=m.url, timeout=60)
    assert c.post("/get_cookie").status_code == 200
    node_id = c.cookies["node_id"]
    wait_for(lambda: lease_holder(redis_client, prefix, manager_id), what="a lease holder")
    wait_for(lambda: sum(cycles_by_token(redis_client, prefix, manager_id).values()) >= 1, what="a first pass")
    wait_for(lambda: "engine_events_following" in m.logs(), what="the checker following the engine's events")
    docker_client.containers.get(node_id).kill()
    wait_for(lambda: redis_client.hget(f"{prefix}:node:{node_id}", "status") == b"exited", timeout=60,
             what="the killed node's record marked exited")
