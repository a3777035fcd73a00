"""Quotas and credentials on a real replica (issue 22): quotas follow a client's identity however its
key arrives, one anonymous client cannot take a host, a session answers only to the key that made
it, and no API key is kept or shown in clear. Nodes are the light hostile node (they only answer)."""

from __future__ import annotations

from typing import Any

import httpx
import redis

from shared.keys import Keys
from testing.hostile_node import hostile_config
from tests.conftest import ADMIN_TOKEN, wait_for

KEY_A, KEY_B = "key-a-0123456789abcdef", "key-b-0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
TOOL = {"tool_name": "shell_command_executor", "arguments": {"command": "true"}}


def create(url: str, headers: dict[str, str] | None = None, cookies: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(url + "/get_cookie", headers=headers or {}, cookies=cookies or {}, timeout=60)


def test_the_quota_follows_the_key_however_it_arrives_and_no_key_is_kept_in_clear(
        start_manager: Any, redis_client: redis.Redis, prefix: str) -> None:
    m = start_manager(**hostile_config(client_auth={"api_keys": [KEY_A, KEY_B]}, quota={"per_client": 2}))
    for _ in range(2):  # as the cookie, which the quota did not see before
        r = create(m.url, cookies={"tsm_api_key": KEY_A})
        assert r.status_code == 200, r.text
    r = create(m.url, headers={"X-API-Key": KEY_A})
    assert r.status_code == 429 and "already has 2" in r.text, r.text
    assert KEY_A not in r.text  # the client is named by a hash
    assert create(m.url, headers={"X-API-Key": KEY_B}).status_code == 200  # another key: its own quota

    listed = httpx.get(m.url + "/admin/nodes", headers=ADMIN).json()["nodes"]
    assert len(listed) == 3 and all(n["client"].startswith("key:") for n in listed), listed
    assert len({n["client"] for n in listed}) == 2
    shown = httpx.get(m.url + "/admin/nodes", headers=ADMIN).text + httpx.get(m.url + "/admin/config",
                                                                              headers=ADMIN).text
    for key in (KEY_A, KEY_B):
        assert key not in shown
        for k in redis_client.scan_iter(match=f"{prefix}:*", count=1000):
            kind = redis_client.type(k)
            data = (redis_client.hgetall(k) if kind == b"hash" else redis_client.get(k) if kind == b"string"
                    else redis_client.smembers(k) if kind == b"set" else b"")
            assert key.encode() not in repr(data).encode() and key.encode() not in k, (k, data)


def test_a_session_answers_only_to_the_key_that_made_it(start_manager: Any) -> None:
    m = start_manager(**hostile_config(client_auth={"api_keys": [KEY_A, KEY_B]}))
    a = httpx.Client(base_url=m.url, headers={"X-API-Key": KEY_A}, timeout=60)
    assert a.post("/get_cookie").status_code == 200
    node_id = a.cookies["node_id"]
    assert a.post("/execute_tool", json=TOOL).status_code == 200
    # the same key as a cookie is the same client
    r = httpx.post(m.url + "/execute_tool", json=TOOL, cookies={"node_id": node_id, "tsm_api_key": KEY_A})
    assert r.status_code == 200, r.text
    other = httpx.Client(base_url=m.url, headers={"X-API-Key": KEY_B}, cookies={"node_id": node_id}, timeout=60)
    unknown = httpx.Client(base_url=m.url, headers={"X-API-Key": KEY_B}, cookies={"node_id": "0" * 64}, timeout=60)
    for c in (other, unknown):
        r = c.post("/execute_tool", json=TOOL)
        assert r.status_code == 403 and "invalid node_id" in r.json()["detail"], r.text
        for route in ("/close_session", "/release_session", "/reconnect_session"):
            r = c.post(route)  # XAgent's answer to an unknown session: 200 with this text
            assert r.status_code == 200 and "invalid node_id" in r.text, (route, r.text)
    assert a.post("/execute_tool", json=TOOL).status_code == 200  # untouched by the other key
    rec = httpx.get(f"{m.url}/admin/nodes/{node_id}", headers=ADMIN).json()["record"]
    assert rec["status"] == "running"


def test_one_anonymous_client_cannot_take_the_host(start_manager: Any) -> None:
    """Without keys a client is its address (X-Forwarded-For only from a trusted balancer); by
    default it may hold a quarter of the manager_id's cap."""
    m = start_manager(**hostile_config(quota={"per_client": None, "trusted_proxies": ["127.0.0.1/32"]},
                                       cluster={"max_nodes_per_manager": 8}))
    for _ in range(2):
        assert create(m.url).status_code == 200
    r = create(m.url)
    assert r.status_code == 429 and "addr:127.0.0.1 already has 2" in r.text, r.text
    # behind the trusted balancer (here: 127.0.0.1) each address is a client of its own
    for _ in range(2):
        assert create(m.url, headers={"X-Forwarded-For": "10.1.1.1"}).status_code == 200
    # a client can prepend to X-Forwarded-For, never append: the balancer's last entry counts
    r = create(m.url, headers={"X-Forwarded-For": "10.9.9.9, 10.1.1.1"})
    assert r.status_code == 429 and "addr:10.1.1.1" in r.text, r.text


def test_an_untrusted_client_cannot_name_another_address(start_manager: Any) -> None:
    """Without trusted_proxies, X-Forwarded-For is the client's word: a client that sends one is
    still its own address. uvicorn's proxy-headers middleware believed it from 127.0.0.1 (its
    default), so any local client could take a fresh quota with each header it made up."""
    m = start_manager(**hostile_config(quota={"per_client": 1}))
    assert create(m.url).status_code == 200
    for forwarded in ("10.1.1.1", "10.2.2.2, 10.3.3.3"):
        r = create(m.url, headers={"X-Forwarded-For": forwarded})
        assert r.status_code == 429 and "addr:127.0.0.1 already has 1" in r.text, r.text


def test_drain_refuses_what_is_not_a_manager_id(start_manager: Any, redis_client: redis.Redis, prefix: str,
                                                manager_id: str) -> None:
    m = start_manager()
    for value in ("a:b", "x" * 200, "bad id", "unknown-manager"):
        r = httpx.post(f"{m.url}/admin/managers/{value}/drain", headers=ADMIN)
        assert r.status_code == 400 and "manager_id" in r.json()["detail"], (value, r.text)
    assert redis_client.smembers(f"{prefix}:draining") == set()  # nothing was recorded
    r = httpx.post(f"{m.url}/admin/managers/{manager_id}/drain", headers=ADMIN)
    assert r.status_code == 200 and r.json()["draining"] is True, r.text
    assert redis_client.smembers(f"{prefix}:draining") == {manager_id.encode()}


def test_the_warm_pool_keeps_the_client_quota(start_manager: Any, redis_client: redis.Redis, prefix: str,
                                              manager_id: str) -> None:
    """A ready pooled node is handed out within the client's quota only (the pool skipped it before)."""
    m = start_manager(**hostile_config(quota={"per_client": 1}, pool={"size": 2}))
    pool_key = Keys(prefix).pool(manager_id)
    wait_for(lambda: redis_client.llen(pool_key) >= 2, timeout=60, what="the pool filled")
    assert create(m.url).status_code == 200
    wait_for(lambda: redis_client.llen(pool_key) >= 1, timeout=60, what="a pooled node ready")
    r = create(m.url)
    assert r.status_code == 429 and "already has 1" in r.text, r.text
    assert redis_client.llen(pool_key) >= 1  # still there for another client


def test_a_keyed_session_is_reached_through_its_owners_replica(manager_id_b: str, start_manager: Any,
                                                                manager_id: str) -> None:
    """Through the owner (proxy_through_owner) the key goes to the owner's replica, which checks it and
    the session's binding, and drops it before the node (it dropped it too early: 401 there)."""
    keys = {"client_auth": {"api_keys": [KEY_A, KEY_B]}}
    a = start_manager(name="a", cluster={"placement": "local"}, **hostile_config(**keys))
    b = start_manager(name="b", mid=manager_id_b, cluster={"proxy_through_owner": {manager_id: True}},
                      **hostile_config(**keys))
    r = create(a.url, headers={"X-API-Key": KEY_A})
    assert r.status_code == 200, r.text
    node_id = r.cookies["node_id"]
    via_b = httpx.Client(base_url=b.url, cookies={"node_id": node_id}, timeout=60)
    r = via_b.get("/", headers={"X-API-Key": KEY_A, "x-hostile-echo": "1"})
    assert r.status_code == 200, r.text
    seen = r.json()["headers"]
    assert "x-api-key" not in seen and KEY_A not in r.text, seen
    r = via_b.get("/", headers={"X-API-Key": KEY_B})
    assert r.status_code == 403 and "invalid node_id" in r.json()["detail"], r.text


HARDENED = {"cap_drop": ["ALL"], "cap_add": ["CHOWN", "DAC_OVERRIDE", "FOWNER", "SETGID", "SETUID", "KILL"],
            "security_opt": ["no-new-privileges"]}  # the project's default creation_kwargs


def test_a_tool_cannot_reach_its_nodes_server(start_manager: Any, docker_client: Any) -> None:
    """With the default creation_kwargs a session's tools run as another uid than its node's server:
    the server's environment (the node secret) and the server itself are out of a tool's reach."""
    m = start_manager(node={"creation_kwargs": HARDENED})
    c = httpx.Client(base_url=m.url, timeout=60)
    assert c.post("/get_cookie").status_code == 200
    container = docker_client.containers.get(c.cookies["node_id"])
    top = container.top(ps_args="-o pid,uid,args")["Processes"]
    server = [p for p in top if p[2] == "python3 -m app"]
    assert server and server[0][1] == "1001", top
    script = ("for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline | grep -qx 'python3 -m app ' && s=${p#/proc/}; done; "
              "echo server=$s; cat /proc/$s/environ /proc/1/environ; kill -0 $s && echo signalled; echo; id -u")
    r = c.post("/execute_tool", json={"tool_name": "shell_command_executor",
                                      "arguments": {"command": script, "kill": True}})
    assert r.status_code == 200, r.text
    out = r.json()["data"]["display"]
    assert "server=" in out and "server=\n" not in out, out  # the tool found the server's pid
    assert "NODE_SECRET" not in out and "signalled" not in out and out.count("Permission denied") == 2, out
    assert "Operation not permitted" in out and "\n1000\n" in out, out
    c.post("/release_session")
