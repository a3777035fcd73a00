"""Isolation of nodes, end to end on the real engine: the per-node secret, the node network,
bounded disk. The network tests play the attacker from inside a node (its shell tool)."""

from __future__ import annotations

import json

import docker
import httpx
import redis

from tests.conftest import ADMIN_TOKEN, wait_for

SECRET_HEADER = "X-Node-Secret"


def new_session(url: str) -> tuple[httpx.Client, str]:
    c = httpx.Client(base_url=url, timeout=60)
    r = c.post("/get_cookie")
    assert r.status_code == 200, r.text
    return c, r.cookies["node_id"]


def node_secret(docker_client: docker.DockerClient, node_id: str) -> str:
    env = docker_client.api.inspect_container(node_id)["Config"]["Env"]
    return next(e.split("=", 1)[1] for e in env if e.startswith("NODE_SECRET="))


def direct_url(docker_client: docker.DockerClient, node_id: str) -> str:
    """Where the manager reaches the node, seen from this host: its address on its network."""
    data = docker_client.api.inspect_container(node_id)
    ports = data["NetworkSettings"]["Ports"].get("31942/tcp") or []
    if ports:
        return f"http://127.0.0.1:{ports[0]['HostPort']}"
    (net,) = data["NetworkSettings"]["Networks"].values()
    return f"http://{net['IPAddress']}:31942"


def test_node_refuses_requests_without_its_secret(start_manager, docker_client: docker.DockerClient) -> None:
    m = start_manager()
    c, node_id = new_session(m.url)
    secret = node_secret(docker_client, node_id)
    assert len(secret) >= 32
    base = direct_url(docker_client, node_id)
    body = {"tool_name": "shell_command_executor", "arguments": {"command": "echo pwned > /app/workspace/p"}}
    for headers in ({}, {SECRET_HEADER: "guess"}):
        assert httpx.post(base + "/execute_tool", json=body, headers=headers, timeout=10).status_code == 401
        assert httpx.get(base + "/", headers=headers, timeout=10).status_code == 401
    assert httpx.get(base + "/", headers={SECRET_HEADER: secret}, timeout=10).status_code == 200
    # the manager adds it, and replaces whatever a client sends in its place
    for headers in ({}, {SECRET_HEADER: "guess"}, {SECRET_HEADER.lower(): secret + "x"}):
        r = c.post("/execute_tool", headers=headers,
                   json={"tool_name": "shell_command_executor", "arguments": {"command": "echo ok"}})
        assert r.status_code == 200, r.text
    r = c.post("/read_file_that_does_not_exist", json={})  # not a proxied path: no secret to leak
    assert secret not in r.text
    c.post("/release_session")


def test_secret_is_never_shown(start_manager, docker_client: docker.DockerClient) -> None:
    m = start_manager()
    c, node_id = new_session(m.url)
    secret = node_secret(docker_client, node_id)
    assert c.post("/get_available_tools").status_code == 200
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    seen = []
    for path in ("/admin/nodes", f"/admin/nodes/{node_id}", "/admin/config", "/admin/replicas"):
        r = httpx.get(m.url + path, headers=admin, timeout=10)
        seen.append(r.text)
        assert r.status_code in (200, 404), (path, r.status_code)
    assert node_id in seen[0] and node_id in seen[1]
    from websockets.sync.client import connect

    with connect(m.url.replace("http", "ws") + "/ws/events?last_event_id=0",
                 additional_headers=admin) as ws:
        for _ in range(3):
            seen.append(ws.recv(timeout=10))
    c.post("/close_session")
    assert c.post("/reconnect_session").status_code == 200
    assert c.post("/get_available_tools").status_code == 200  # same secret after a restart
    c.post("/release_session")
    for text in seen + [m.logs()]:
        assert secret not in text
    assert json.loads(seen[1])["record"].get("secret") is None
