"""The XAgent-compatible session API and proxy, end to end on the real engine and Redis."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import docker
import httpx
import pytest
import redis

from testing.harness import PrivateRedis
from testing.hosts import PrivateEngine
from tests.conftest import project_containers, wait_for

JSON = {"content-type": "application/json"}


def new_session(url: str) -> tuple[httpx.Client, str]:
    c = httpx.Client(base_url=url, timeout=60)
    r = c.post("/get_cookie")
    assert r.status_code == 200, r.text
    return c, r.cookies["node_id"]


def rss_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_full_lifecycle(start_manager, docker_client: docker.DockerClient, redis_client: redis.Redis,
                        prefix: str, manager_id: str, tmp_path: Path) -> None:
    m = start_manager()
    c = httpx.Client(base_url=m.url, timeout=60)
    r = c.post("/get_cookie")
    assert r.status_code == 200
    assert r.json() == {"message": "add cookie", "version": "0.3.0"}
    assert r.headers.get_list("server") == ["ToolServerManager/0.3.0"]
    set_cookie = r.headers["set-cookie"]
    node_id = r.cookies["node_id"]
    assert len(node_id) == 64 and "Path=/" in set_cookie
    container = docker_client.containers.get(node_id)  # the cookie is the full container id
    assert container.labels["toolserver-manager.manager_id"] == manager_id
    # on its manager_id's node network, no host port published
    assert not container.attrs["HostConfig"]["PortBindings"]
    assert list(container.attrs["NetworkSettings"]["Networks"]) == [f"tsm-{manager_id}-open"]
    rec = redis_client.hgetall(f"{prefix}:node:{node_id}")
    assert rec[b"status"] == b"running" and rec[b"manager_id"] == manager_id.encode()

    # a proxied tool call runs for real in the node
    r = c.post("/execute_tool", json={"tool_name": "shell_command_executor",
                                      "arguments": {"command": "echo $((6*7))"}})
    assert r.status_code == 200 and "42" in r.text, r.text
    tools = c.post("/get_available_tools").json()
    assert tools.get("available_tools")

    # upload and byte-identical download of a large file, streamed
    blob = os.urandom(20 * 1024 * 1024)
    r = c.post("/upload_file", files={"file": ("big.bin", blob, "application/octet-stream")})
    assert r.status_code == 200, r.text
    r = c.post("/download_file", json={"file_path": "big.bin"})
    assert r.status_code == 200
    assert hashlib.sha256(r.content).hexdigest() == hashlib.sha256(blob).hexdigest()

    # query strings are kept (XAgent dropped them) and the node's statuses pass through
    assert c.get("/?probe=1").json() == {"message": "Hello World"}
    assert c.post("/execute_tool", json={"tool_name": "NoSuchTool", "arguments": {}}).status_code == 404

    # close stops it; a proxied call restarts the same node with the same workspace
    assert c.post("/close_session").json() == f"Close session: {node_id}"
    container.reload()
    assert container.status == "exited"
    assert redis_client.hget(f"{prefix}:node:{node_id}", "status") == b"exited"
    r = c.post("/download_file", json={"file_path": "big.bin"})
    assert r.status_code == 200 and len(r.content) == len(blob)
    assert c.cookies["node_id"] == node_id

    # reconnect restarts and waits for it
    assert c.post("/reconnect_session").json() == f"Reconnect session: {node_id}"
    assert c.post("/").json() == {"message": "Hello World"}

    # release removes container and record; afterwards the id is invalid everywhere
    assert c.post("/release_session").json() == f"Release session: {node_id}"
    assert not project_containers(docker_client, manager_id)
    assert not redis_client.exists(f"{prefix}:node:{node_id}")
    r = c.post("/execute_tool", json={})
    assert r.status_code == 403 and r.json() == {"detail": f"invalid node_id: {node_id}"}
    for route, verb in (("/reconnect_session", "Reconnect"), ("/close_session", "Close"),
                        ("/release_session", "Release")):
        r = c.post(route)
        assert r.status_code == 200 and r.json() == f"invalid node_id: {node_id}", (route, verb)


def test_missing_and_unknown_cookies(start_manager) -> None:
    m = start_manager()
    r = httpx.post(m.url + "/execute_tool", json={})
    assert r.status_code == 403 and r.json() == {"detail": "invalid node_id: None"}
    bogus = "0" * 64
    r = httpx.post(m.url + "/get_available_tools", headers={"cookie": f"node_id={bogus}"})
    assert r.status_code == 403 and r.json() == {"detail": f"invalid node_id: {bogus}"}
    r = httpx.post(m.url + "/close_session")
    assert r.status_code == 200 and r.json() == "invalid node_id: None"
    r = httpx.post(m.url + "/release_session", headers={"cookie": "node_id=x' OR 1=1"})
    assert r.status_code == 200 and r.json().startswith("invalid node_id:")


def test_not_running_without_autorestart(start_manager, docker_client: docker.DockerClient) -> None:
    m = start_manager(node={"restart_stopped": False})
    c, node_id = new_session(m.url)
    c.post("/close_session")
    r = c.post("/get_available_tools")
    assert r.status_code == 503 and r.json() == {"detail": f"node is not running: {node_id}"}
    c.post("/release_session")


def test_node_not_responding(start_manager, docker_client: docker.DockerClient) -> None:
    m = start_manager(proxy={"path_timeouts": {"/execute_tool": 1.0}})
    c, _node_id = new_session(m.url)
    # the node takes longer than the path's timeout to answer: a gateway timeout (XAgent's client
    # takes 504 for a tool error and goes on; a 503 would end its whole run)
    r = c.post("/execute_tool", json={"tool_name": "shell_command_executor", "arguments": {"command": "sleep 3"}})
    assert r.status_code == 504 and r.json() == {"detail": "the node did not answer within 1.0 s"}
    assert c.post("/get_available_tools").status_code == 200
    c.post("/release_session")


def test_creation_timeout_leaves_nothing(start_manager, docker_client: docker.DockerClient,
                                         redis_client: redis.Redis, prefix: str, manager_id: str) -> None:
    m = start_manager(node={"creation_wait_seconds": 2,
                            "creation_kwargs": {"command": ["sleep", "infinity"]}})
    r = httpx.post(m.url + "/get_cookie", timeout=30)
    assert r.status_code == 503 and r.json() == {"detail": "Node creation timeout!"}
    assert "node_id" not in r.cookies
    assert not project_containers(docker_client, manager_id)
    assert not list(redis_client.scan_iter(f"{prefix}:node:*"))
    assert redis_client.scard(f"{prefix}:mgr:{manager_id}:nodes") == 0


def test_vanished_container_comes_back_on_its_workspace(start_manager, docker_client: docker.DockerClient,
                                                       redis_client: redis.Redis, prefix: str) -> None:
    m = start_manager(builtin_monitor=False)  # no checker: the routes themselves must cope
    c, node_id = new_session(m.url)
    assert c.post("/upload_file", files={"file": ("keep.txt", b"still here", "text/plain")}).status_code == 200
    docker_client.containers.get(node_id).remove(force=True)
    r = c.post("/close_session")  # nothing left to stop: the session stays
    assert r.status_code == 200 and r.json() == f"Close session: {node_id}"
    r = c.post("/download_file", json={"file_path": "keep.txt"})
    assert r.status_code == 200 and r.content == b"still here"
    assert c.cookies["node_id"] == node_id
    # its workspace gone too: only then is the session over
    docker_client.containers.get(node_id).remove(force=True)
    vol = docker_client.volumes.get(f"tsm-session-{node_id}")
    image = vol.attrs["Labels"].get("toolserver-manager.image_file", "")
    vol.remove(force=True)
    if image:
        from shared.engines.docker import loopdisk

        loopdisk.destroy(image)
    r = c.post("/get_available_tools")
    assert r.status_code == 403 and r.json() == {"detail": f"invalid node_id: {node_id}"}
    assert not redis_client.exists(f"{prefix}:node:{node_id}")


def test_bad_input_gets_clear_4xx(start_manager) -> None:
    m = start_manager()
    with httpx.Client(base_url=m.url) as c:
        r = c.get("/no/such/path")
        assert r.status_code == 404 and "detail" in r.json()
        r = c.delete("/get_cookie")
        assert r.status_code == 405 and "detail" in r.json()
        r = c.post("/alive")
        assert r.status_code == 405
        r = c.get("/alive", headers={"x-big": "a" * 70000})
        assert r.status_code == 431, r.text  # the README's answer to a head over proxy.max_header_bytes
        r = c.post("/get_cookie", content=b"x" * (2 << 20))
        assert r.status_code == 400 and "takes no request body" in r.json()["detail"]
        r = c.post("/close_session", headers={"cookie": "node_id=\"garb;age\";;==;node_id"})
        assert r.status_code == 200 and r.json().startswith("invalid node_id")


def test_large_bodies_are_streamed_not_buffered(start_manager) -> None:
    m = start_manager()
    c, _node_id = new_session(m.url)
    assert m.proc is not None
    size = 100 * 1024 * 1024
    chunk = os.urandom(1024 * 1024)

    def body():  # type: ignore[no-untyped-def]
        for _ in range(size // len(chunk)):
            yield chunk

    before = rss_hwm(m.proc.pid)
    boundary = "tsmboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"huge.bin\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def multipart():  # type: ignore[no-untyped-def]
        yield head
        yield from body()
        yield tail

    r = c.post("/upload_file", content=multipart(),
               headers={"content-type": f"multipart/form-data; boundary={boundary}",
                        "content-length": str(len(head) + size + len(tail))})
    assert r.status_code == 200, r.text
    got = 0
    digest = hashlib.sha256()
    with c.stream("POST", "/download_file", json={"file_path": "huge.bin"}) as resp:
        assert resp.status_code == 200
        for part in resp.iter_bytes():
            got += len(part)
            digest.update(part)
    assert got == size
    assert digest.hexdigest() == hashlib.sha256(chunk * (size // len(chunk))).hexdigest()
    grown = rss_hwm(m.proc.pid) - before
    assert grown < 40 * 1024 * 1024, f"manager peak memory grew by {grown >> 20} MiB for a 100 MiB body"
    c.post("/release_session")


def test_ready_names_failed_dependency_and_recovers(private_redis: PrivateRedis, start_manager) -> None:  # type: ignore[no-untyped-def]
    # a Redis of the test's own goes down, never the machine's or the project's
    m = start_manager(redis={"url": private_redis.url})
    assert httpx.get(m.url + "/ready").status_code == 200
    private_redis.kill()
    try:
        r = httpx.get(m.url + "/ready", timeout=10)
        assert r.status_code == 503 and "redis" in r.json()["detail"] and r.json()["engine"] == "ok"
        assert httpx.get(m.url + "/alive").status_code == 200
        r = httpx.post(m.url + "/get_cookie", timeout=30)
        assert r.status_code == 503 and "redis" in r.json()["detail"]
    finally:
        private_redis.start()
    wait_for(lambda: httpx.get(m.url + "/ready").status_code == 200, what="ready after Redis returns")
    c, _node_id = new_session(m.url)
    assert c.post("/").status_code == 200
    c.post("/release_session")


def test_an_engine_started_for_the_first_time_serves_sessions(private_engine: PrivateEngine, start_manager) -> None:  # type: ignore[no-untyped-def]
    """The machine of a new user: a dockerd whose first start left the Gateway key out of its default
    bridge's IPAM (the private engine's data root is new at every run). Nothing may depend on it."""
    bridge = private_engine.first_bridge  # as it first started (a test may have restarted it since)
    assert all("Gateway" not in c for c in bridge["IPAM"]["Config"]), bridge["IPAM"]  # the case, as on a fresh box
    assert private_engine.bridge_address("bridge").count(".") == 3  # what tests read instead
    m = start_manager(**private_engine.manager_overrides())
    c, _node_id = new_session(m.url)
    r = c.post("/execute_tool", json={"tool_name": "shell_command_executor", "arguments": {"command": "echo ok"}})
    assert r.status_code == 200 and "ok" in r.text, r.text
    assert c.post("/release_session").status_code == 200


def test_engine_restart_recovers(private_engine: PrivateEngine, start_manager) -> None:  # type: ignore[no-untyped-def]
    # the run's private engine is stopped and started, never the machine's
    m = start_manager(**private_engine.manager_overrides())
    c, _node_id = new_session(m.url)
    private_engine.stop_engine()
    try:
        r = httpx.get(m.url + "/ready", timeout=10)
        assert r.status_code == 503 and "docker engine" in r.json()["detail"] and r.json()["redis"] == "ok"
        r = httpx.post(m.url + "/get_cookie", timeout=30)
        assert r.status_code == 503
    finally:
        private_engine.start_engine()
    wait_for(lambda: httpx.get(m.url + "/ready").status_code == 200, what="ready after dockerd returns")
    # live-restore kept the node running; its published port answers again
    wait_for(lambda: c.post("/").status_code == 200, timeout=30, what="proxied call after dockerd restart")
    c.post("/release_session")
    # dockerd (20.10) forgets to drop the mount count of a volume whose container it restored with
    # live-restore, so the workspace cannot be removed until the engine restarts once more
    private_engine.stop_engine()
    private_engine.start_engine()


@pytest.mark.parametrize("status,ready", [(500, False), (404, True)])
def test_readiness_is_the_managers_probe_of_health_path(start_manager, status: int, ready: bool) -> None:
    # the node runs and answers "/" either way; only node.health_path decides when it is ready
    # (XAgent's health_check switch is accepted and ignored: shared/config.py says why)
    # a short wait only where it must run out: at load 8 a node that does answer took over 3 s (full run f3)
    m = start_manager(node={"health_path": f"/diag?status={status}", "creation_wait_seconds": 30 if ready else 3})
    c = httpx.Client(base_url=m.url, timeout=30)
    r = c.post("/get_cookie")
    if not ready:
        assert r.status_code == 503 and r.json() == {"detail": "Node creation timeout!"}
        return
    assert r.status_code == 200 and c.post("/").json() == {"message": "Hello World"}
    c.post("/release_session")

