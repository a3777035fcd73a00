"""The cluster on real parts: three replicas, two manager_ids on two real Docker engines,
HAProxy round-robin in front; forwarding, placement, registry, partial fan-out, kills."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import httpx
import pytest
import redis

from testing import machine
from testing.harness import HAProxy, ManagerProc
from tests.conftest import ADMIN_TOKEN, INTERNAL_TOKEN, LABEL, ROOT, remove_containers, wait_for

ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture(scope="module")
def engine2() -> Iterator[str]:
    """A second dockerd with its own socket, data root, exec root and bridge; held under a lock on
    the state directory (no file of its own to leave behind), since another run on this machine
    would stop it under our feet. Named for this run: with the name every run used, another run's
    engine, started the moment ours stopped, was reported as ours left behind."""
    state = os.environ.get("TSM_STATE_DIR", "/var/lib/toolserver-manager")
    os.makedirs(state, exist_ok=True)
    tag = uuid.uuid4().hex[:6]
    env = {**os.environ, "TSM_ENGINE2_NAME": f"tsm-engine2-{tag}", "TSM_ENGINE2_BRIDGE": f"tsmb2-{tag}"}
    lock = os.open(state, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the bridge's subnet is one for all runs
        machine.RUN.host_tags.add(env["TSM_ENGINE2_NAME"])  # its data, socket and bridge are this run's to remove
        out = subprocess.run(["bash", str(ROOT / "scripts/second-engine.sh"), "start"], check=True,
                             capture_output=True, text=True, env=env)
        try:
            yield out.stdout.strip().splitlines()[-1]
        finally:
            subprocess.run(["bash", str(ROOT / "scripts/second-engine.sh"), "stop"], check=False, env=env)
    finally:
        os.close(lock)


def _ok(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(url, timeout=1).status_code == 200
    return False


@dataclass
class Cluster:
    a1: ManagerProc
    a2: ManagerProc
    b1: ManagerProc
    lb: HAProxy
    mid_a: str
    mid_b: str
    prefix: str


@pytest.fixture
def cluster(engine2: str, start_manager, tmp_path: Path, prefix: str, manager_id: str,
            docker_client: docker.DockerClient) -> Iterator[Cluster]:
    mid_b = f"test-{uuid.uuid4().hex[:8]}"
    common = {"checker": {"interval_seconds": 0.5, "lease_ttl_seconds": 5},
              "cluster": {"internal_token": INTERNAL_TOKEN, "heartbeat_seconds": 0.5, "replica_ttl_seconds": 2,
                          "fanout_timeout_seconds": 2}}
    # the three start side by side (each spends a second or more importing and connecting, mostly
    # waiting: nine tests took 5-12 s each to set up, one replica after the other)
    a1 = start_manager(name="a1", wait=False, **common)
    a2 = start_manager(name="a2", wait=False, **common)
    # sessions made through b1 stay on engine B, whose nodes the tests drive (placement spreads otherwise)
    b1 = start_manager(name="b1", mid=mid_b, docker_host=engine2, wait=False,
                       **{**common, "cluster": {**common["cluster"], "placement": "local"}})
    for m in (a1, a2, b1):
        m.wait_alive()
    lb = HAProxy([(m.replica_id, m.port) for m in (a1, a2, b1)], tmp_path)
    wait_for(lambda: len(httpx.get(a1.url + "/admin/replicas", headers=ADMIN).json()["replicas"]) == 3,
             what="three registered replicas")
    yield Cluster(a1, a2, b1, lb, manager_id, mid_b, prefix)
    lb.stop()
    for m in (a1, a2, b1):
        m.stop()
    client2 = docker.DockerClient(base_url=engine2, version="1.41")
    remove_containers(client2, mid_b)
    client2.close()


def test_full_lifecycle_through_the_balancer(cluster: Cluster, redis_client: redis.Redis) -> None:
    seen: set[str] = set()
    c = httpx.Client(base_url=cluster.lb.url, timeout=60)
    r = c.post("/get_cookie")
    assert r.status_code == 200, r.text
    node_id = r.cookies["node_id"]
    seen.add(r.headers["x-tsm-replica"])
    for _ in range(6):
        r = c.post("/get_available_tools")
        assert r.status_code == 200
        seen.add(r.headers["x-tsm-replica"])
    blob = b"cluster!" * 100_000
    assert c.post("/upload_file", files={"file": ("f.bin", blob)}).status_code == 200
    assert c.post("/download_file", json={"file_path": "f.bin"}).content == blob
    assert c.post("/close_session").json() == f"Close session: {node_id}"
    assert c.post("/download_file", json={"file_path": "f.bin"}).content == blob  # restarted, same workspace
    assert c.post("/reconnect_session").json() == f"Reconnect session: {node_id}"
    for _ in range(3):
        r = c.post("/")
        assert r.status_code == 200
        seen.add(r.headers["x-tsm-replica"])
    assert c.post("/release_session").json() == f"Release session: {node_id}"
    assert c.post("/").status_code == 403
    assert len(seen) == 3, f"requests landed on {seen}"


def test_lifecycle_calls_are_forwarded_to_the_owner(cluster: Cluster, engine2: str) -> None:
    # created on engine B through its own replica, then driven through replicas of A
    c = httpx.Client(base_url=cluster.b1.url, timeout=60)
    assert c.post("/get_cookie").status_code == 200
    node_id = c.cookies["node_id"]
    d2 = docker.DockerClient(base_url=engine2, version="1.41")
    assert d2.containers.get(node_id).labels[LABEL] == cluster.mid_b
    via_a = httpx.Client(base_url=cluster.a1.url, timeout=60, cookies={"node_id": node_id})
    assert via_a.post("/close_session").json() == f"Close session: {node_id}"
    assert d2.containers.get(node_id).status == "exited"
    assert via_a.post("/").json() == {"message": "Hello World"}  # auto-restart forwarded to the owner
    assert d2.containers.get(node_id).status == "running"
    assert via_a.post("/reconnect_session").json() == f"Reconnect session: {node_id}"
    assert via_a.post("/release_session").json() == f"Release session: {node_id}"
    with pytest.raises(docker.errors.NotFound):
        d2.containers.get(node_id)
    d2.close()


def test_forged_internal_request_is_refused(cluster: Cluster) -> None:
    r = httpx.post(cluster.a1.url + "/internal/nodes", json={})
    assert r.status_code == 403 and "token" in r.json()["detail"]
    r = httpx.post(cluster.a1.url + "/internal/nodes", json={}, headers={"x-tsm-internal-token": "guess"})
    assert r.status_code == 403
    r = httpx.post(cluster.a1.url + f"/internal/nodes/{'0' * 64}/release", headers={"x-tsm-internal-token": "x"})
    assert r.status_code == 403


def test_no_live_owner_is_a_fast_503(cluster: Cluster) -> None:
    c = httpx.Client(base_url=cluster.b1.url, timeout=60)
    ids = []
    for _ in range(2):
        c.cookies.clear()
        c.post("/get_cookie")
        ids.append(c.cookies["node_id"])
    cluster.b1.kill()
    wait_for(lambda: all(r["manager_id"] != cluster.mid_b for r in
                         httpx.get(cluster.a1.url + "/admin/replicas", headers=ADMIN).json()["replicas"]),
             timeout=10, what="b1 dropping out of the registry")
    via_a = httpx.Client(base_url=cluster.a1.url, timeout=10, cookies={"node_id": ids[0]})
    r = via_a.post("/reconnect_session")  # only the owner can restart its node, and wait for it
    assert r.status_code == 503 and r.json() == {"detail": f"no live manager for {cluster.mid_b}"}
    # proxied traffic still goes straight to the node, which is reachable from here
    assert via_a.post("/").json() == {"message": "Hello World"}
    # a close is kept for the owner (tests/test_multihost.py sees it carried out) and answered now;
    # the closed node then waits for its owner to restart it
    via_a.cookies.set("node_id", ids[1])
    assert via_a.post("/close_session").json() == f"Close session: {ids[1]}"
    r = via_a.post("/")
    assert r.status_code == 503 and r.json() == {"detail": f"no live manager for {cluster.mid_b}"}


def test_proxy_through_owner_when_not_routable(engine2: str, start_manager, manager_id: str) -> None:
    mid_b = f"test-{uuid.uuid4().hex[:8]}"
    opts = {"cluster": {"internal_token": INTERNAL_TOKEN, "heartbeat_seconds": 0.5, "replica_ttl_seconds": 2,
                        "proxy_through_owner": {mid_b: True}}}
    a = start_manager(name="a", **opts)
    b = start_manager(name="b", mid=mid_b, docker_host=engine2, **opts)
    try:
        c = httpx.Client(base_url=b.url, timeout=60)
        c.post("/get_cookie")
        node_id = c.cookies["node_id"]
        wait_for(lambda: len(httpx.get(a.url + "/admin/replicas", headers=ADMIN).json()["replicas"]) == 2,
                 what="both registered")
        via_a = httpx.Client(base_url=a.url, timeout=60, cookies={"node_id": node_id})
        blob = b"x" * 300_000
        assert via_a.post("/upload_file", files={"file": ("o.bin", blob)}).status_code == 200
        assert via_a.post("/download_file", json={"file_path": "o.bin"}).content == blob
        metrics = httpx.get(a.url + "/metrics").text
        assert 'toolserver_forwarded_requests_total{kind="proxy"} 2.0' in metrics
        via_a.post("/release_session")
    finally:
        client2 = docker.DockerClient(base_url=engine2, version="1.41")
        remove_containers(client2, mid_b)
        client2.close()


def test_local_placement_prefers_own_engine_then_least_loaded(engine2: str, start_manager, manager_id: str,
                                                              docker_client: docker.DockerClient) -> None:
    mid_b = f"test-{uuid.uuid4().hex[:8]}"
    opts = {"cluster": {"internal_token": INTERNAL_TOKEN, "heartbeat_seconds": 0.5, "replica_ttl_seconds": 2,
                        "max_nodes_per_manager": 1, "placement": "local"}}
    a = start_manager(name="a", **opts)
    start_manager(name="b", mid=mid_b, docker_host=engine2, **opts)
    try:
        wait_for(lambda: len(httpx.get(a.url + "/admin/replicas", headers=ADMIN).json()["replicas"]) == 2,
                 what="both registered")
        first = httpx.Client(base_url=a.url, timeout=60)
        assert first.post("/get_cookie").status_code == 200
        assert docker_client.containers.get(first.cookies["node_id"]).labels[LABEL] == manager_id
        second = httpx.Client(base_url=a.url, timeout=60)
        assert second.post("/get_cookie").status_code == 200  # engine A is full: placed on B
        d2 = docker.DockerClient(base_url=engine2, version="1.41")
        assert d2.containers.get(second.cookies["node_id"]).labels[LABEL] == mid_b
        assert second.post("/").json() == {"message": "Hello World"}
        r = httpx.post(a.url + "/get_cookie", timeout=60)
        assert r.status_code == 503 and "no manager can take a new session" in r.json()["detail"]
        second.post("/release_session")
        d2.close()
    finally:
        client2 = docker.DockerClient(base_url=engine2, version="1.41")
        remove_containers(client2, mid_b)
        client2.close()


def test_spread_placement_evens_engines_and_skips_a_full_one(engine2: str, start_manager, manager_id: str,
                                                             docker_client: docker.DockerClient,
                                                             tmp_path: Path) -> None:
    """Every get_cookie reaches replica a (HAProxy balance first); sessions still spread over both
    engines, and b, full at its own cap (2, where a's is 4), is skipped though it has fewer."""
    mid_b = f"test-{uuid.uuid4().hex[:8]}"
    opts = {"internal_token": INTERNAL_TOKEN, "heartbeat_seconds": 0.5, "replica_ttl_seconds": 2}
    a = start_manager(name="a", cluster={**opts, "max_nodes_per_manager": 4})
    b = start_manager(name="b", mid=mid_b, docker_host=engine2, cluster={**opts, "max_nodes_per_manager": 2})
    lb = HAProxy([(a.replica_id, a.port), (b.replica_id, b.port)], tmp_path, balance="first")
    d2 = docker.DockerClient(base_url=engine2, version="1.41")
    try:
        wait_for(lambda: {r["manager_id"]: r["node_cap"] for r in
                          httpx.get(a.url + "/admin/replicas", headers=ADMIN).json()["replicas"]}
                 == {manager_id: 4, mid_b: 2}, what="both registered with their caps")
        on: dict[str, int] = {manager_id: 0, mid_b: 0}
        placed = []
        for _ in range(6):
            r = httpx.post(lb.url + "/get_cookie", timeout=60)
            assert r.status_code == 200, r.text
            assert r.headers["x-tsm-replica"] == a.replica_id
            node_id = r.cookies["node_id"]
            (owner,) = [mid for mid, engine in ((manager_id, docker_client), (mid_b, d2))
                        if engine.containers.list(filters={"label": [f"{LABEL}={mid}",
                                                                     f"toolserver-manager.session_id={node_id}"]})]
            on[owner] += 1
            placed.append("a" if owner == manager_id else "b")
            if len(placed) <= 4:
                assert abs(on[manager_id] - on[mid_b]) <= 1, placed
        assert placed == ["a", "b", "a", "b", "a", "a"]  # the last: b has fewer but is full
        assert len(d2.containers.list(filters={"label": f"{LABEL}={mid_b}"})) == 2
        r = httpx.post(lb.url + "/get_cookie", timeout=60)
        assert r.status_code == 503 and "no manager can take a new session" in r.json()["detail"]
    finally:
        lb.stop()
        remove_containers(d2, mid_b)
        d2.close()


def test_an_engine_that_cannot_take_a_session_passes_it_on(start_manager, manager_id: str, manager_id_b: str,
                                                            docker_client: docker.DockerClient) -> None:
    """Placement's first choice fails at once (its replica died before its registry entry expired;
    its engine lacks the node image): the next manager_id takes the session."""
    a = start_manager(name="a")
    b = start_manager(name="b", mid=manager_id_b, cluster={"replica_ttl_seconds": 60})
    wait_for(lambda: len(httpx.get(a.url + "/admin/replicas", headers=ADMIN).json()["replicas"]) == 2,
             what="both registered")
    first = httpx.post(a.url + "/get_cookie", timeout=60)
    assert first.status_code == 200
    assert docker_client.containers.get(first.cookies["node_id"]).labels[LABEL] == manager_id
    b.kill()  # still registered for a minute: b, with fewer nodes, is placement's first choice
    r = httpx.post(a.url + "/get_cookie", timeout=60)
    assert r.status_code == 200, r.text
    assert docker_client.containers.get(r.cookies["node_id"]).labels[LABEL] == manager_id
    assert f"placement_next manager_id={manager_id_b} reason='no live manager for {manager_id_b}'" in a.logs()

    image = f"toolserver-node:absent-{uuid.uuid4().hex[:8]}"
    c = start_manager(name="c", mid=manager_id_b, node={"creation_kwargs": {"image": image}})
    wait_for(lambda: manager_id_b in {r["manager_id"] for r in
                                      httpx.get(a.url + "/admin/replicas", headers=ADMIN).json()["replicas"]
                                      if r["replica_id"] == c.replica_id}, what="c registered")
    r = httpx.post(c.url + "/get_cookie", timeout=60)  # c's engine lacks the image: a's has it
    assert r.status_code == 200, r.text
    assert docker_client.containers.get(r.cookies["node_id"]).labels[LABEL] == manager_id
    assert f"placement_next manager_id={manager_id_b} reason='node image {image} is not on the engine'" in c.logs()
    assert httpx.get(c.url + "/ready").status_code == 503


def test_registry_heartbeat_and_graceful_deregistration(cluster: Cluster, redis_client: redis.Redis) -> None:
    key = f"{cluster.prefix}:replica:{cluster.a2.replica_id}"
    assert redis_client.exists(key) and 0 < redis_client.pttl(key) <= 2000
    cluster.a2.stop()
    assert not redis_client.exists(key)  # gone at once, not after its TTL
    key_b = f"{cluster.prefix}:replica:{cluster.b1.replica_id}"
    cluster.b1.kill()
    wait_for(lambda: not redis_client.exists(key_b), what="a killed replica expiring")  # its TTL: asserted above


def test_replica_killed_while_proxying_others_keep_serving(cluster: Cluster) -> None:
    c = httpx.Client(base_url=cluster.lb.url, timeout=60)
    assert c.post("/get_cookie").status_code == 200
    cluster.a2.kill()
    # a2 refuses connections from now on: the balancer retries each such request on another replica
    # (retry-on conn-failure, redispatch) until its health check takes a2 out, so none is lost
    statuses = [c.post("/get_available_tools").status_code for _ in range(12)]
    assert statuses == [200] * 12, statuses
    assert c.post("/release_session").status_code == 200


def test_restarted_node_port_is_used_at_once_everywhere(cluster: Cluster) -> None:
    c1 = httpx.Client(base_url=cluster.a1.url, timeout=60)
    c1.post("/get_cookie")
    node_id = c1.cookies["node_id"]
    assert c1.post("/").status_code == 200  # a1 caches the address
    c2 = httpx.Client(base_url=cluster.a2.url, timeout=60, cookies={"node_id": node_id})
    for _ in range(3):
        assert c2.post("/reconnect_session").status_code == 200
        assert c1.post("/").json() == {"message": "Hello World"}
    c1.post("/release_session")


def test_fan_out_returns_partial_results(cluster: Cluster) -> None:
    r = httpx.get(cluster.a1.url + "/admin/engines", headers=ADMIN, timeout=10).json()
    assert set(r["results"]) == {cluster.mid_a, cluster.mid_b} and not r["failures"]
    cluster.b1.signal(signal.SIGSTOP)
    try:
        # bounded by the fan-out timeout (2 s here), not by the stopped replica
        r = httpx.get(cluster.a1.url + "/admin/engines", headers=ADMIN, timeout=6).json()
        assert set(r["results"]) == {cluster.mid_a}
        assert set(r["failures"]) == {cluster.mid_b}
    finally:
        cluster.b1.signal(signal.SIGCONT)


def test_graceful_stop_deregisters_at_once_and_drains(start_manager, redis_client: redis.Redis,
                                                      prefix: str, docker_client: docker.DockerClient) -> None:
    a1 = start_manager(name="a1")
    a2 = start_manager(name="a2")
    c = httpx.Client(base_url=a1.url, timeout=60)
    c.post("/get_cookie")
    node_id = c.cookies["node_id"]
    result: dict[str, httpx.Response] = {}

    # a call that runs until the test lets it end
    node = docker_client.containers.get(node_id)
    command = "touch /tmp/started; while [ ! -f /tmp/go ]; do sleep 0.05; done; echo drained"

    def slow_call() -> None:
        result["r"] = httpx.post(a1.url + "/execute_tool", cookies={"node_id": node_id}, timeout=60, json={
            "tool_name": "shell_command_executor", "arguments": {"command": command}})

    t = threading.Thread(target=slow_call)
    t.start()
    wait_for(lambda: node.exec_run(["test", "-f", "/tmp/started"]).exit_code == 0, interval=0.05,
             what="the call in flight on a1")
    a1.signal(signal.SIGTERM)
    # out of the registry while the in-flight request is still running
    wait_for(lambda: not redis_client.exists(f"{prefix}:replica:{a1.replica_id}"), interval=0.02,
             what="deregistration at the stop signal")
    assert t.is_alive() and "r" not in result
    node.exec_run(["touch", "/tmp/go"])
    t.join(30)
    assert result["r"].status_code == 200 and "drained" in result["r"].text
    assert httpx.post(a2.url + "/", cookies={"node_id": node_id}).status_code == 200
    httpx.post(a2.url + "/release_session", cookies={"node_id": node_id})


def test_vanished_node_of_another_owner_comes_back_on_its_engine(cluster: Cluster, engine2: str) -> None:
    c = httpx.Client(base_url=cluster.b1.url, timeout=60)
    c.post("/get_cookie")
    node_id = c.cookies["node_id"]
    assert c.post("/upload_file", files={"file": ("keep.txt", b"on engine 2")}).status_code == 200
    d2 = docker.DockerClient(base_url=engine2, version="1.41")
    d2.containers.get(node_id).remove(force=True)
    via_a = httpx.Client(base_url=cluster.a1.url, timeout=60, cookies={"node_id": node_id})
    r = via_a.post("/close_session")  # nothing left to stop; the session (its workspace) stays
    assert r.status_code == 200 and r.json() == f"Close session: {node_id}"
    # the next call through a replica of the other manager_id: its owner makes a new container
    r = via_a.post("/download_file", json={"file_path": "keep.txt"})
    assert r.status_code == 200 and r.content == b"on engine 2"
    assert len(d2.containers.list(filters={"label": f"toolserver-manager.session_id={node_id}"})) == 1
    d2.close()
    assert via_a.post("/release_session").json() == f"Release session: {node_id}"
