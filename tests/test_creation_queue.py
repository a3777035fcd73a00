"""Creations that queue and a pool that follows demand, on the real engine and Redis (issue 26):
a burst past the queue gets 503 + Retry-After for the excess with nothing half-made, a client
that leaves while queued (or while its node starts) leaves nothing, clients take turns, and the
pool's target grows under a burst and shrinks back when idle. Pure logic: tests/unit/test_admission.py."""

from __future__ import annotations

import concurrent.futures
import datetime
import socket
import time
from typing import Any
from urllib.parse import urlsplit

import docker
import httpx
import pytest
import redis

from tests.conftest import project_containers, wait_for


def metric(url: str, name: str) -> float:
    """The sum of a metric's samples whose name and labels start with name (0 when absent)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def names(client: docker.DockerClient, mid: str) -> set[str]:
    """The names (session ids) of the manager_id's containers."""
    return {c.attrs["Names"][0].lstrip("/") for c in project_containers(client, mid)}


def records(r: redis.Redis, prefix: str) -> list[bytes]:
    return [k for k in r.scan_iter(f"{prefix}:node:*") if k.count(b":") == 2]


def members(r: redis.Redis, prefix: str, mid: str) -> set[bytes]:
    """The manager_id's node set: its sessions and pending quota reservations."""
    return r.smembers(f"{prefix}:mgr:{mid}:nodes")  # type: ignore[return-value]


def release_all(url: str, cookies: list[str]) -> None:
    for node_id in cookies:
        httpx.post(url + "/release_session", cookies={"node_id": node_id}, timeout=60)


def test_a_burst_past_the_queue_gets_503_with_retry_after_for_the_excess_and_nothing_half_made(
        start_manager: Any, manager_id: str, prefix: str, redis_client: redis.Redis,
        docker_client: docker.DockerClient) -> None:
    m = start_manager(creation={"concurrency": 1, "queue_size": 2})
    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        rs = list(ex.map(lambda _: httpx.post(m.url + "/get_cookie", timeout=60), range(8)))
    ok = [r for r in rs if r.status_code == 200]
    refused = [r for r in rs if r.status_code != 200]
    # one creating and two queued at most while the burst arrived: the rest are refused at once
    assert len(ok) >= 3 and refused, [(r.status_code, r.text) for r in rs]
    for r in refused:
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, r.text
        assert "creation queue" in r.json()["detail"] and "full" in r.json()["detail"], r.text
    assert metric(m.url, "toolserver_create_queue_rejected_total") == len(refused)
    # nothing of a refused creation exists: containers, records and quota entries are the successes'
    cookies = [r.cookies["node_id"] for r in ok]
    assert names(docker_client, manager_id) == set(cookies)
    assert {k.decode().rsplit(":", 1)[1] for k in records(redis_client, prefix)} == set(cookies)
    assert {x.decode() for x in members(redis_client, prefix, manager_id)} == set(cookies)
    assert metric(m.url, "toolserver_create_queue_depth") == 0
    # each creation's phases are in the creation metric
    for ph in ("queue", "record", "workspace", "create", "start", "probe", "ready_write"):
        assert metric(m.url, f'toolserver_node_create_phase_duration_seconds_count{{phase="{ph}"}}') == len(ok), ph
    release_all(m.url, cookies)
    assert not project_containers(docker_client, manager_id)


def test_two_replicas_of_one_engine_share_its_bound_a_burst_past_it_gets_503_and_nothing_half_made(
        start_manager: Any, manager_id: str, prefix: str, redis_client: redis.Redis,
        docker_client: docker.DockerClient) -> None:
    # two processes of one manager_id (one engine): one creation at once and two waiting on the engine,
    # not on each process (with a queue per process both would create at once and six would be taken in)
    creation = {"concurrency": 1, "queue_size": 2}
    a, b = start_manager("a", creation=creation), start_manager("b", creation=creation)
    creating: list[int] = []
    done = False

    def watch() -> None:  # how many sessions are being created at once, seen from Redis
        while not done:
            keys = records(redis_client, prefix)
            creating.append(sum(redis_client.hget(k, "status") == b"creating" for k in keys))
            time.sleep(0.01)

    with concurrent.futures.ThreadPoolExecutor(11) as ex:
        watcher = ex.submit(watch)
        try:
            rs = list(ex.map(lambda i: httpx.post((a, b)[i % 2].url + "/get_cookie", timeout=120), range(10)))
        finally:
            done = True
        watcher.result()
    ok = [r for r in rs if r.status_code == 200]
    refused = [r for r in rs if r.status_code != 200]
    assert len(ok) >= 3 and refused, [(r.status_code, r.text) for r in rs]
    for r in refused:
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, r.text
        assert "creation queue" in r.json()["detail"] and "full" in r.json()["detail"], r.text
    assert max(creating) == 1, creating  # never two at once, though both replicas had requests
    assert sum(metric(m.url, "toolserver_create_queue_rejected_total") for m in (a, b)) == len(refused)
    assert sum(metric(m.url, 'toolserver_create_queue_wait_seconds_count{kind="client"}') for m in (a, b)) == len(ok)
    # nothing of a refused creation exists: containers, records and quota entries are the successes'
    cookies = [r.cookies["node_id"] for r in ok]
    assert names(docker_client, manager_id) == set(cookies)
    assert {k.decode().rsplit(":", 1)[1] for k in records(redis_client, prefix)} == set(cookies)
    assert {x.decode() for x in members(redis_client, prefix, manager_id)} == set(cookies)
    # and the engine's slots and queue are empty again
    assert not redis_client.zcard(f"{prefix}:mgr:{manager_id}:creating")
    assert not redis_client.zcard(f"{prefix}:mgr:{manager_id}:create_queue")
    release_all(a.url, cookies)
    assert not project_containers(docker_client, manager_id)


def test_clients_take_turns_one_burst_does_not_delay_another_clients_creation_beyond_its_turn(
        start_manager: Any, manager_id: str) -> None:
    m = start_manager(creation={"concurrency": 1, "queue_size": 16}, quota={"client_header": "X-Client",
                                                                           "per_client": 0})
    done: list[str] = []

    def create(who: str) -> httpx.Response:
        r = httpx.post(m.url + "/get_cookie", headers={"X-Client": who}, timeout=120)
        done.append(who)
        return r

    with concurrent.futures.ThreadPoolExecutor(6) as ex:
        burst = [ex.submit(create, "a") for _ in range(5)]
        # a's burst is in: one creating, four waiting
        wait_for(lambda: metric(m.url, "toolserver_create_queue_depth") == 4, timeout=30, what="a's burst queued")
        b = ex.submit(create, "b")
        rs = [f.result() for f in [*burst, b]]
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
    # b waited for a's running creation and a's next one at most, not for all five (first come, first served)
    assert done.index("b") <= 2, done
    release_all(m.url, [r.cookies["node_id"] for r in rs])


def test_the_pool_target_grows_under_a_burst_and_shrinks_back_when_idle(
        start_manager: Any, manager_id: str, prefix: str, redis_client: redis.Redis,
        docker_client: docker.DockerClient) -> None:
    # a short half-life is the test's clock: the arrival rate forgets the burst in seconds
    # (the largest burst's memory is off: here the rate alone sizes the pool)
    m = start_manager(pool={"size": 0, "max_size": 2, "demand_seconds": 10, "demand_half_life_seconds": 1,
                            "burst_memory_seconds": 0},
                      creation={"concurrency": 3}, checker={"interval_seconds": 0.3})
    pool_key = f"{prefix}:mgr:{manager_id}:pool"
    time.sleep(1)  # a few checker passes with no demand: the pool stays empty
    assert metric(m.url, "toolserver_pool_target_nodes") == 0 and redis_client.llen(pool_key) == 0
    arrivals = f"{prefix}:mgr:{manager_id}:arrivals"
    with concurrent.futures.ThreadPoolExecutor(5) as ex:
        burst = [ex.submit(httpx.post, m.url + "/get_cookie", timeout=120) for _ in range(4)]
        wait_for(lambda: metric(m.url, "toolserver_pool_target_nodes") == 2, timeout=10, what="target up")
        assert metric(m.url, "toolserver_pool_arrival_rate") > 0
        # demand goes on (the rate input, driven: the counter every creation request adds to) until the
        # pool has filled on this slow shared machine
        filled = False

        def demand() -> None:
            while not filled:
                redis_client.incrby(arrivals, 2)
                time.sleep(0.3)

        keep = ex.submit(demand)
        try:
            wait_for(lambda: redis_client.llen(pool_key) == 2, timeout=90, what="pool filled to its target")
        finally:
            filled = True
        keep.result()
        rs = [f.result() for f in burst]
    assert all(r.status_code == 200 for r in rs)
    pooled = {x.decode() for x in redis_client.lrange(pool_key, 0, -1)}
    # nobody asks for more: the rate decays, the target falls to size (0) and the pooled nodes go
    wait_for(lambda: metric(m.url, "toolserver_pool_target_nodes") == 0, timeout=30, what="target down")
    wait_for(lambda: redis_client.llen(pool_key) == 0, timeout=30, what="pool emptied")
    wait_for(lambda: not pooled & names(docker_client, manager_id)
             and not any(redis_client.exists(f"{prefix}:node:{i}") for i in pooled), timeout=30,
             what="pooled containers and their records removed")
    removed = f'toolserver_checker_actions_total{{action="remove",manager_id="{manager_id}"}}'
    wait_for(lambda: metric(m.url, removed) >= 2, timeout=10, what="removals counted")
    release_all(m.url, [r.cookies["node_id"] for r in rs])


def test_the_pool_holds_the_largest_recent_burst_and_meets_the_next_one_from_it(
        start_manager: Any, manager_id: str, prefix: str, redis_client: redis.Redis,
        docker_client: docker.DockerClient) -> None:
    # slow (~1-2 min on a loaded machine): six nodes are made, three cold and three pooled
    # the rate forgets the burst within seconds (half-life 1 s): only the burst's memory keeps the pool
    m = start_manager(pool={"size": 0, "max_size": 3, "demand_half_life_seconds": 1, "burst_memory_seconds": 600},
                      creation={"concurrency": 3}, checker={"interval_seconds": 0.3})
    pool_key = f"{prefix}:mgr:{manager_id}:pool"

    def burst() -> list[httpx.Response]:
        with concurrent.futures.ThreadPoolExecutor(3) as ex:
            rs = list(ex.map(lambda _: httpx.post(m.url + "/get_cookie", timeout=120), range(3)))
        assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
        return rs

    # the checker's first reading of the arrivals is only its origin: the burst comes after it
    wait_for(lambda: "toolserver_pool_burst_peak{" in httpx.get(m.url + "/metrics", timeout=10).text, timeout=30,
             what="the checker's first pass of the pool")
    first = burst()  # the pool is empty: three cold creations
    release_all(m.url, [r.cookies["node_id"] for r in first])
    wait_for(lambda: metric(m.url, "toolserver_pool_burst_peak") == 3, timeout=30, what="the burst's peak")
    wait_for(lambda: redis_client.llen(pool_key) == 3, timeout=150, what="pool filled to the burst's size")
    # each booted in the background (a low CPU weight) and has a client node's weight back once offered
    for node_id in redis_client.lrange(pool_key, 0, -1):
        shares = docker_client.api.inspect_container(node_id.decode())["HostConfig"]["CpuShares"]
        assert shares == 1024, (node_id, shares)
    # long after the rate has forgotten the burst, the target still holds it
    wait_for(lambda: metric(m.url, "toolserver_pool_arrival_rate") < 0.04, timeout=60, what="rate decayed")
    assert metric(m.url, "toolserver_pool_target_nodes") == 3
    assert redis_client.llen(pool_key) == 3
    hits = 'toolserver_pool_claims_total{result="hit"}'
    before = metric(m.url, hits)
    second = burst()  # met from the pool
    assert metric(m.url, hits) == before + 3
    release_all(m.url, [r.cookies["node_id"] for r in second])


def test_a_refill_waits_while_clients_are_asking_and_starts_once_they_stop(
        start_manager: Any, manager_id: str, prefix: str, redis_client: redis.Redis,
        docker_client: docker.DockerClient) -> None:
    m = start_manager(pool={"size": 1, "refill_quiet_seconds": 1, "refill_defer_seconds": 120},
                      checker={"interval_seconds": 0.3})
    pool_key = f"{prefix}:mgr:{manager_id}:pool"
    wait_for(lambda: redis_client.llen(pool_key) == 1, timeout=90, what="the pool filled")
    arrivals = f"{prefix}:mgr:{manager_id}:arrivals"
    asking = True

    def demand() -> None:  # clients go on asking (the counter every creation request adds to)
        while asking:
            redis_client.incr(arrivals)
            time.sleep(0.2)

    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        keep = ex.submit(demand)
        try:
            r = httpx.post(m.url + "/get_cookie", timeout=60)  # the pooled node: the pool is below its target
            assert r.status_code == 200, r.text
            # the checker has seen the pool empty and a refill waits (it would have started within a pass)
            wait_for(lambda: metric(m.url, "toolserver_pool_nodes") == 0, timeout=30, what="the pool seen empty")
            time.sleep(3)  # clients keep asking this long: no refill's creation may start meanwhile
        finally:
            asking = False
        keep.result()
    stopped = time.time()
    wait_for(lambda: redis_client.llen(pool_key) == 1, timeout=90, what="the pool refilled once clients stopped")
    refill = redis_client.lindex(pool_key, 0).decode()  # type: ignore[union-attr]
    created = docker_client.api.inspect_container(refill)["Created"]  # the engine's clock: this host's
    made = datetime.datetime.fromisoformat(created[:26] + "+00:00").timestamp()
    assert made >= stopped - 0.5, (made, stopped)  # not before clients stopped asking (0.5 s of clock slack)
    assert "pool_refill_deferred" in m.logs()
    httpx.post(m.url + "/release_session", cookies={"node_id": r.cookies["node_id"]}, timeout=60)


def _raw_get_cookie(url: str) -> socket.socket:
    """A get_cookie sent on a socket the test closes itself (a client that goes away)."""
    u = urlsplit(url)
    s = socket.create_connection((u.hostname or "127.0.0.1", u.port or 80))
    s.sendall(b"POST /get_cookie HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    return s


def volumes(client: docker.DockerClient, mid: str) -> list[Any]:
    return client.volumes.list(filters={"label": f"toolserver-manager.manager_id={mid}"})


@pytest.mark.parametrize("workers", [1, 2])
def test_a_queued_creation_whose_client_leaves_is_never_made(
        start_manager: Any, manager_id: str, prefix: str, redis_client: redis.Redis,
        docker_client: docker.DockerClient, workers: int) -> None:
    # with two workers the creations and the leaver land on either process: one queue, the engine's
    m = start_manager(creation={"concurrency": 1, "queue_size": 8}, workers=workers)
    # the leaver goes once it is seen queued, while burst_n creations go one at a time before its turn:
    # with three, a loaded machine (full run f10b) once saw it queued too late, after its turn had come
    # (it was then made and released, the other outcome the issue allows: the next test's)
    burst_n = 5

    def asked() -> float:
        """Creations waiting or given their turn, from one reading of /metrics (by the queue's depth
        alone, a turn taken between two polls would hide an arrival)."""
        text = httpx.get(m.url + "/metrics", timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(("toolserver_create_queue_depth",
                                       'toolserver_create_queue_wait_seconds_count{kind="client"}')))

    with concurrent.futures.ThreadPoolExecutor(burst_n) as ex:
        burst = [ex.submit(httpx.post, m.url + "/get_cookie", timeout=120) for _ in range(burst_n)]
        wait_for(lambda: asked() == burst_n, timeout=30, interval=0.02, what="burst queued")
        leaver = _raw_get_cookie(m.url)  # the same (anonymous) client: its turn is after the burst's
        wait_for(lambda: asked() == burst_n + 1, timeout=10, interval=0.02, what="leaver queued")
        leaver.close()
        wait_for(lambda: metric(m.url, 'toolserver_session_operations_total{op="create",result="client_left"}') == 1,
                 timeout=30, what="the leaver's creation given up")
        rs = [f.result() for f in burst]
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
    cookies = {r.cookies["node_id"] for r in rs}
    # the leaver never had a slot: the burst's waits ended in a creation, its own in nothing
    assert metric(m.url, 'toolserver_create_queue_wait_seconds_count{kind="client"}') == burst_n
    assert names(docker_client, manager_id) == cookies
    assert {k.decode().rsplit(":", 1)[1] for k in records(redis_client, prefix)} == cookies
    assert {x.decode() for x in members(redis_client, prefix, manager_id)} == cookies  # its reservation returned
    assert len(volumes(docker_client, manager_id)) == burst_n
    release_all(m.url, list(cookies))


@pytest.mark.parametrize("stage", ["record", "container"])
def test_a_creation_whose_client_leaves_while_its_node_starts_leaves_nothing(
        start_manager: Any, manager_id: str, prefix: str, redis_client: redis.Redis,
        docker_client: docker.DockerClient, stage: str) -> None:
    m = start_manager()
    leaver = _raw_get_cookie(m.url)
    # it has started: its record is written (the first step), or its container made, its node on its way
    wait_for(lambda: records(redis_client, prefix) if stage == "record" else project_containers(
        docker_client, manager_id), timeout=30, interval=0.02, what=f"the creation under way ({stage})")
    leaver.close()
    wait_for(lambda: not records(redis_client, prefix) and not project_containers(docker_client, manager_id)
             and not volumes(docker_client, manager_id) and not members(redis_client, prefix, manager_id),
             timeout=30, what="nothing of it left: record, container, workspace, quota entry")
    assert metric(m.url, 'toolserver_session_operations_total{op="create",result="client_left"}') == 1
    assert metric(m.url, "toolserver_create_queue_depth") == 0 and metric(m.url, "toolserver_creates_in_progress") == 0


@pytest.mark.parametrize("configured", [None, 512])
async def test_a_pooled_node_boots_at_a_low_cpu_weight_and_gets_its_configured_weight_back(
        manager_id: str, prefix: str, docker_client: docker.DockerClient, configured: int | None) -> None:
    # a refill's node boots in the background: its ~150 ms of boot CPU yields to clients' nodes
    from shared.config import load_config
    from shared.engines.base import NewNode
    from shared.engines.docker import DockerBackend
    from tests.conftest import NODE_IMAGE

    kwargs: dict[str, Any] = {"image": NODE_IMAGE, "labels": {"toolserver-manager.test": "1"}}
    if configured:
        kwargs["cpu_shares"] = configured
    cfg = load_config(None, environ={}, overrides={
        "manager_id": manager_id, "redis": {"key_prefix": prefix},
        "engine": {"docker": {"creation_kwargs": kwargs}}})
    backend = DockerBackend(cfg)

    def shares(cid: str) -> int:
        return int(docker_client.api.inspect_container(cid)["HostConfig"]["CpuShares"])

    try:
        pooled = await backend.create(NewNode(owner=manager_id, role="pooled", replica_id="r", created_at=0.0))
        client = await backend.create(NewNode(owner=manager_id, role="node", replica_id="r", created_at=0.0))
        assert shares(pooled) == 2
        assert shares(client) == (configured or 0)  # 0: the engine's default (1024)
        await backend.foreground(pooled)
        assert shares(pooled) == (configured or 1024)
    finally:
        for c in project_containers(docker_client, manager_id):
            c.remove(force=True, v=True)
        await backend.close()


@pytest.mark.parametrize("image_healthcheck", [False, True])
async def test_nodes_run_the_images_healthcheck_only_when_asked(
        manager_id: str, prefix: str, docker_client: docker.DockerClient, image_healthcheck: bool) -> None:
    # each Docker health check is an exec into the node (~170 ms of CPU here): 100 idle pooled nodes
    # checked every 10 s took most of the 2 cores in a 100-way burst, for a state only recorded
    from shared.config import load_config
    from shared.engines.base import NewNode
    from shared.engines.docker import DockerBackend
    from tests.conftest import NODE_IMAGE

    image_test = docker_client.images.get(NODE_IMAGE).attrs["Config"]["Healthcheck"]["Test"]
    assert image_test[0] == "CMD", image_test  # the reference image has one: what is turned off
    cfg = load_config(None, environ={}, overrides={
        "manager_id": manager_id, "redis": {"key_prefix": prefix},
        "engine": {"docker": {"image_healthcheck": image_healthcheck, "creation_kwargs": {
            "image": NODE_IMAGE, "labels": {"toolserver-manager.test": "1"}}}}})
    backend = DockerBackend(cfg)
    try:
        for role in ("pooled", "node"):
            cid = await backend.create(NewNode(owner=manager_id, role=role, replica_id="r", created_at=0.0))
            test = docker_client.api.inspect_container(cid)["Config"]["Healthcheck"]["Test"]
            assert test == (image_test if image_healthcheck else ["NONE"]), (role, test)
    finally:
        for c in project_containers(docker_client, manager_id):
            c.remove(force=True, v=True)
        await backend.close()
