"""Operations on real parts: admin API and tokens, quotas under concurrency, hardened
node defaults, and the warm pool (atomic claims, refill, recycling, undelivered claims)."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import time

import docker
import httpx
import redis

from shared.config import XAGENT_POST_PATHS
from testing import redis_env
from tests.conftest import ADMIN_TOKEN, project_containers, wait_for

ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}


def session(url: str, **kw) -> httpx.Client:  # type: ignore[no-untyped-def]
    c = httpx.Client(base_url=url, timeout=60, **kw)
    r = c.post("/get_cookie")
    assert r.status_code == 200, r.text
    return c


def test_admin_api(start_manager, manager_id: str, docker_client: docker.DockerClient) -> None:
    m = start_manager()
    a, b = session(m.url), session(m.url)
    a_id, b_id = a.cookies["node_id"], b.cookies["node_id"]
    a.post("/close_session")
    with httpx.Client(base_url=m.url, headers=ADMIN, timeout=30) as adm:
        page = adm.get("/admin/nodes", params={"manager_id": manager_id}).json()
        assert page["total"] == 2 and {n["id"] for n in page["nodes"]} == {a_id, b_id}
        assert [n["id"] for n in adm.get("/admin/nodes", params={"status": "exited"}).json()["nodes"]] == [a_id]
        assert len(adm.get("/admin/nodes", params={"manager_id": manager_id, "limit": 1}).json()["nodes"]) == 1
        assert adm.get("/admin/nodes", params={"manager_id": manager_id, "min_idle_seconds": 3600}).json()[
            "total"] == 0
        detail = adm.get(f"/admin/nodes/{b_id}").json()
        assert detail["record"]["id"] == b_id and detail["container"]["status"] == "running"
        assert detail["stats"]["memory_bytes"] > 0
        assert adm.get("/admin/replicas").json()["replicas"][0]["replica_id"] == m.replica_id
        assert any(x["manager_id"] == manager_id for x in adm.get("/admin/leases").json()["leases"])
        cfg = adm.get("/admin/config").json()
        assert cfg["admin"]["token"] == "***" and cfg["cluster"]["internal_token"] == "***"
        assert ADMIN_TOKEN not in adm.get("/admin/config").text
        # bad input: clear 400s, nothing changed
        assert adm.get("/admin/nodes", params={"limit": "many"}).status_code == 400
        assert adm.get("/admin/nodes", params={"status": "sleepy"}).status_code == 400
        assert adm.post("/admin/nodes/release", content=b"{").status_code == 400
        assert adm.get("/admin/nodes").json()["total"] >= 2
        res = adm.post("/admin/nodes/release", json={"node_ids": [a_id, b_id, "0" * 64]}).json()["results"]
        assert res[a_id] == "released" and res[b_id] == "released" and "invalid" in res["0" * 64]
    assert not project_containers(docker_client, manager_id)
    # drain: this manager_id takes no new sessions (and no other has room)
    httpx.post(m.url + f"/admin/managers/{manager_id}/drain", headers=ADMIN)
    r = httpx.post(m.url + "/get_cookie", timeout=30)
    assert r.status_code == 503 and "draining" in r.json()["detail"]
    httpx.delete(m.url + f"/admin/managers/{manager_id}/drain", headers=ADMIN)
    session(m.url).post("/release_session")


def test_admin_restart_and_delete_one_node(start_manager, manager_id: str, docker_client: docker.DockerClient,
                                           redis_client: redis.Redis, prefix: str) -> None:
    m = start_manager()
    c = session(m.url)
    node_id = c.cookies["node_id"]
    with httpx.Client(base_url=m.url, headers=ADMIN, timeout=60) as adm:
        assert c.post("/close_session").status_code == 200
        stopped_at = docker_client.containers.get(node_id).attrs["State"]["FinishedAt"]
        # a look at a stopped node's files is refused and never starts it
        r = adm.get(f"/admin/nodes/{node_id}/files")
        assert r.status_code == 503 and r.json() == {"detail": f"node is not running: {node_id}"}, r.text
        assert docker_client.containers.get(node_id).status == "exited"
        # restart: the stopped node runs again and answers once the call returns
        r = adm.post(f"/admin/nodes/{node_id}/restart")
        assert r.status_code == 200 and r.json() == {"results": {node_id: "restart"}}, r.text
        node = docker_client.containers.get(node_id)
        assert node.status == "running" and node.attrs["State"]["StartedAt"] > stopped_at
        assert adm.get(f"/admin/nodes/{node_id}").json()["record"]["status"] == "running"
        assert c.post("/get_available_tools").status_code == 200
        r = adm.post(f"/admin/nodes/{node_id}/reboot")
        assert r.status_code == 404 and "unknown action 'reboot'" in r.json()["detail"]
        # DELETE: the session goes with its container, workspace and record
        r = adm.delete(f"/admin/nodes/{node_id}")
        assert r.status_code == 200 and r.json() == {"results": {node_id: "released"}}, r.text
        assert not project_containers(docker_client, manager_id)
        assert not docker_client.volumes.list(filters={"label": f"toolserver-manager.session_id={node_id}"})
        assert not redis_client.exists(f"{prefix}:node:{node_id}")
        assert c.post("/get_available_tools").status_code == 403
        assert adm.get(f"/admin/nodes/{node_id}").status_code == 404


def test_api_keys_exempt_only_the_console_and_admin_routes_themselves(start_manager) -> None:
    # /uix is a node path here: it must want the key like every proxied path, whatever its first letters
    m = start_manager(client_auth={"api_keys": ["k-one"]},
                      redirect_to_node_path={"post": [*XAGENT_POST_PATHS, "/uix"], "get": ["/"]})
    for path in ("/uix", "/get_available_tools"):
        r = httpx.post(m.url + path, timeout=30)
        assert r.status_code == 401 and r.json() == {"detail": "missing or invalid API key"}, (path, r.text)
    # the console and the admin API keep their own tokens: no API key asked there
    assert httpx.get(m.console_url + "/ui/", timeout=30).status_code == 200
    assert httpx.get(m.url + "/admin/nodes", headers=ADMIN, timeout=30).status_code == 200
    c = httpx.Client(base_url=m.url, timeout=60, headers={"X-API-Key": "k-one"})
    assert c.post("/get_cookie").status_code == 200
    assert c.post("/uix").status_code == 404  # with the key it reaches the node, which has no such route
    c.post("/release_session")


def test_admin_tokens(start_manager) -> None:
    m = start_manager()
    r = httpx.get(m.url + "/admin/nodes")
    assert r.status_code == 401 and "missing admin token" in r.json()["detail"]
    r = httpx.get(m.url + "/admin/nodes", headers={"authorization": "Bearer wrong"})
    assert r.status_code == 403 and r.json() == {"detail": "invalid admin token"}
    r = httpx.delete(m.url + f"/admin/nodes/{'0' * 64}", headers={"authorization": "Bearer wrong"})
    assert r.status_code == 403
    off = start_manager(name="off", admin={"token": ""})
    r = httpx.get(off.url + "/admin/nodes", headers=ADMIN)
    assert r.status_code == 404 and "disabled" in r.json()["detail"]


def test_quota_under_concurrency(start_manager, manager_id: str, docker_client: docker.DockerClient,
                                 redis_client: redis.Redis, prefix: str) -> None:
    m = start_manager(cluster={"max_nodes_total": 10}, node={"creation_wait_seconds": 60})

    def create(_: int) -> httpx.Response:
        return httpx.post(m.url + "/get_cookie", timeout=120)

    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        results = list(pool.map(create, range(50)))
    codes = sorted(r.status_code for r in results)
    assert codes.count(200) == 10 and codes.count(429) == 40, codes
    assert all("quota exceeded: the cluster already has 10 nodes" in r.json()["detail"]
               for r in results if r.status_code == 429)
    assert len(project_containers(docker_client, manager_id)) == 10
    assert redis_client.scard(f"{prefix}:mgr:{manager_id}:nodes") == 10
    for r in results:
        if r.status_code == 200:
            httpx.post(m.url + "/release_session", cookies=r.cookies)
    # released sessions free their slots
    assert httpx.post(m.url + "/get_cookie", timeout=60).status_code == 200


def test_per_client_quota(start_manager) -> None:
    m = start_manager(quota={"client_header": "X-API-Key", "per_client": 1})
    a = session(m.url, headers={"X-API-Key": "alice"})
    r = httpx.post(m.url + "/get_cookie", headers={"X-API-Key": "alice"}, timeout=60)
    # the client is named by a hash of its header's value (often a key), never the value
    assert r.status_code == 429 and "client hdr:" in r.json()["detail"] and "alice" not in r.text
    b = session(m.url, headers={"X-API-Key": "bob"})
    a.post("/release_session")
    assert httpx.post(m.url + "/get_cookie", headers={"X-API-Key": "alice"}, timeout=60).status_code == 200
    b.post("/release_session")


REDIS_PROBE = r"""
import socket, struct, sys
port, hosts = int(sys.argv[1]), ["127.0.0.1"]
for line in open("/proc/net/route").read().splitlines()[1:]:  # the default route's gateway: the host
    f = line.split()
    if f[1] == "00000000":
        hosts.append(socket.inet_ntoa(struct.pack("<L", int(f[2], 16))))
print("PROBE ", end="")
for host in dict.fromkeys(hosts + sys.argv[2:]):
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect((host, port))
        print(host, "REACHED")
    except OSError as e:
        print(host, "refused", e)
    finally:
        s.close()
"""


def host_ipv4_addresses() -> list[str]:
    out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=True).stdout
    return [line.split()[3].split("/")[0] for line in out.splitlines()]


def test_hardened_node_defaults(start_manager, docker_client: docker.DockerClient, redis_client: redis.Redis) -> None:
    # no capability at all: then a node runs as a user of its own (the reference node refuses root
    # without the capabilities it needs to give its tools another uid than its server's)
    m = start_manager(node={"read_only_root": True, "creation_kwargs": {
        "cap_drop": ["ALL"], "security_opt": ["no-new-privileges"], "pids_limit": 128, "mem_limit": "256m",
        "nano_cpus": 500_000_000, "user": "1000:1000"}})
    c = session(m.url)
    node = docker_client.containers.get(c.cookies["node_id"])
    hc = node.attrs["HostConfig"]
    assert hc["Privileged"] is False
    assert hc["CapDrop"] == ["ALL"] and "no-new-privileges" in hc["SecurityOpt"]
    assert hc["PidsLimit"] == 128 and hc["Memory"] == 256 * 1024 * 1024 and hc["NanoCpus"] == 500_000_000
    assert hc["ReadonlyRootfs"] is True
    assert not hc["PortBindings"]  # reached on its node network, nothing published
    assert hc["NetworkMode"] != "host"
    # the workspace is writable, the root is not
    code, out = node.exec_run(["sh", "-c", "touch /app/workspace/ok && touch /etc/nope"])
    assert code != 0 and b"Read-only file system" in out
    assert node.exec_run(["test", "-f", "/app/workspace/ok"]).exit_code == 0
    # the manager's Redis listens on the host's loopback only, and the node cannot reach it: not at
    # its own 127.0.0.1 (which would be the host's were it on the host's network), nor at any of the
    # host's addresses (its gateway, read from inside the node, and every address of the host)
    assert redis_client.config_get("bind")["bind"].split() == ["127.0.0.1"]
    code, out = node.exec_run(["python3", "-c", REDIS_PROBE, str(redis_env.PORT), *host_ipv4_addresses()])
    assert code == 0, out
    seen = dict(line.split(" ", 1) for line in out.decode().split("PROBE ", 1)[1].splitlines())
    assert "127.0.0.1" in seen and len(seen) >= 3, seen  # loopback, the gateway, the host's own
    assert all(what.startswith("refused") for what in seen.values()), seen
    c.post("/release_session")


def test_warm_pool(start_manager, manager_id: str, redis_client: redis.Redis, prefix: str,
                   docker_client: docker.DockerClient) -> None:
    opts = {"pool": {"size": 3, "max_age_seconds": 3600}, "checker": {"interval_seconds": 0.3}}
    a = start_manager(name="a", **opts)
    b = start_manager(name="b", **opts)
    pool_key = f"{prefix}:mgr:{manager_id}:pool"
    wait_for(lambda: redis_client.llen(pool_key) == 3, timeout=30, what="pool filled")
    pooled = {x.decode() for x in redis_client.lrange(pool_key, 0, -1)}
    # six concurrent sessions over two replicas: the three pooled nodes go out once each
    with concurrent.futures.ThreadPoolExecutor(6) as ex:
        rs = list(ex.map(lambda i: httpx.post((a.url, b.url)[i % 2] + "/get_cookie", timeout=60), range(6)))
    ids = [r.cookies["node_id"] for r in rs]
    assert all(r.status_code == 200 for r in rs) and len(set(ids)) == 6
    assert pooled <= set(ids)
    for i in pooled:
        assert redis_client.hget(f"{prefix}:node:{i}", "role") == b"node"
    hits = sum(float(line.split()[-1]) for u in (a.url, b.url) for line in httpx.get(u + "/metrics").text.splitlines()
               if line.startswith('toolserver_pool_claims_total{result="hit"}'))
    assert hits == 3
    wait_for(lambda: redis_client.llen(pool_key) == 3, timeout=30, what="pool refilled")
    with httpx.Client(base_url=a.url, cookies=rs[0].cookies) as c:
        assert c.post("/get_available_tools").status_code == 200
    for r in rs:
        httpx.post(a.url + "/release_session", cookies=r.cookies)


def test_pooled_nodes_get_the_warm_up_request_before_a_client_can_claim_them(
        start_manager, manager_id: str, redis_client: redis.Redis, prefix: str) -> None:
    # a warm-up with a visible effect (a file in the workspace) stands for the default's first-call
    # work: a claimed node must already have it, and the warm-up leaves no trace in the session's record
    body = json.dumps({"tool_name": "FileSystemEnv_write_to_file",
                       "arguments": {"filepath": "warmed.txt", "content": "yes"}})
    m = start_manager(pool={"size": 2, "warm_up_path": "/execute_tool", "warm_up_body": body},
                      checker={"interval_seconds": 0.3})
    pool_key = f"{prefix}:mgr:{manager_id}:pool"
    wait_for(lambda: redis_client.llen(pool_key) == 2, timeout=60, what="pool filled")
    with httpx.Client(base_url=m.url, timeout=60) as c:
        r = c.post("/get_cookie")
        assert r.status_code == 200, r.text
        node_id = r.cookies["node_id"]
        assert redis_client.hget(f"{prefix}:node:{node_id}", "role") == b"node"
        t = c.post("/execute_tool", json={"tool_name": "FileSystemEnv_read_from_file",
                                          "arguments": {"filepath": "warmed.txt"}})
        assert t.status_code == 200 and "yes" in t.text, t.text
        c.post("/release_session")
    assert m.logs().count("pool_warmed node_id=") >= 2


def test_pool_recycles_old_and_undelivered(start_manager, manager_id: str, redis_client: redis.Redis,
                                           prefix: str, docker_client: docker.DockerClient) -> None:
    # the age runs from when a node answered; 8 s covers the second node's creation under load (3-7 s in CI),
    # so the pool of 2 is whole at some moment
    start_manager(pool={"size": 2, "max_age_seconds": 8, "claim_timeout_seconds": 1},
                  checker={"interval_seconds": 0.3})
    pool_key = f"{prefix}:mgr:{manager_id}:pool"
    wait_for(lambda: redis_client.llen(pool_key) == 2, timeout=30, what="pool filled")
    first = {x.decode() for x in redis_client.lrange(pool_key, 0, -1)}
    # a replica that claims and dies before answering: simulated with the same atomic claim
    claimed = redis_client.lpop(pool_key).decode()
    redis_client.hset(f"{prefix}:node:{claimed}", mapping={"role": "claiming", "claimed_at": time.time()})
    wait_for(lambda: not redis_client.exists(f"{prefix}:node:{claimed}"), timeout=15,
             what="undelivered claim released")
    wait_for(lambda: all(not redis_client.exists(f"{prefix}:node:{i}") for i in first), timeout=30,
             what="pooled nodes past their age recycled")
    wait_for(lambda: redis_client.llen(pool_key) == 2, timeout=30, what="pool refilled with fresh nodes")
    assert not first & {x.decode() for x in redis_client.lrange(pool_key, 0, -1)}
    live = {c.id for c in project_containers(docker_client, manager_id)}
    assert claimed not in live and not first & live
