"""Sessions on the real engine: the tiers an idle session goes through (paused, stopped,
archived) and back on its next call with its files, work in progress that keeps a node
running, a container removed behind our back, creations of a killed replica, and sessions
of every tier rebuilt after Redis lost everything. Thresholds are seconds, so each test is."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid

import docker
import httpx
import redis

from shared.engines.docker import loopdisk
from testing.harness import PrivateRedis
from tests.conftest import ADMIN_TOKEN, NODE_IMAGE, project_containers, wait_for
from tests.test_websocket import open_ws, recv_json, ws_url

SESSION = "toolserver-manager.session_id"
FAST = {"checker": {"interval_seconds": 0.3, "lease_ttl_seconds": 3}}
ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}


def tiers(pause: float | None, stop: float | None, archive: float | None,
          delete: float | None = None) -> dict:  # type: ignore[type-arg]
    return {"node": {"idle_grace_seconds": 0, "idling_close_minutes": None if stop is None else stop / 60,
                     "tiers": {"pause_after_seconds": pause, "archive_after_seconds": archive,
                               "delete_after_seconds": delete}}, **FAST}


def checker_passes(r: redis.Redis, prefix: str) -> int:
    """Passes the checkers of this test's manager_ids have made (every lease holder's)."""
    return sum(int(v) for key in r.scan_iter(f"{prefix}:mgr:*:checker_stats")
               for k, v in r.hgetall(key).items() if k.startswith(b"cycles:"))


def outlast(r: redis.Redis, prefix: str, seconds: float) -> None:
    """Let `seconds` pass, then two more checker passes: each threshold below it has had its chance."""
    until = time.monotonic() + seconds
    wait_for(lambda: time.monotonic() >= until, timeout=seconds + 5, interval=0.05, what=f"{seconds} s")
    after = checker_passes(r, prefix)
    wait_for(lambda: checker_passes(r, prefix) >= after + 2, what="two checker passes after it")


def new_session(url: str) -> tuple[httpx.Client, str]:
    c = httpx.Client(base_url=url, timeout=60)
    r = c.post("/get_cookie")
    assert r.status_code == 200, r.text
    return c, r.cookies["node_id"]


def write(c: httpx.Client, name: str, data: bytes) -> None:
    r = c.post("/upload_file", files={"file": (name, data, "application/octet-stream")})
    assert r.status_code == 200, r.text


def read(c: httpx.Client, name: str) -> bytes:
    r = c.post("/download_file", json={"file_path": name})
    assert r.status_code == 200, r.text
    return r.content


def status(r: redis.Redis, prefix: str, node_id: str) -> str:
    return (r.hget(f"{prefix}:node:{node_id}", "status") or b"").decode()


def containers_of(client: docker.DockerClient, node_id: str) -> list:  # type: ignore[type-arg]
    return client.containers.list(all=True, sparse=True, filters={"label": f"{SESSION}={node_id}"})


def events_of(r: redis.Redis, prefix: str, node_id: str) -> list[tuple[str, str]]:
    out = []
    for _, fields in r.xrange(f"{prefix}:events"):
        ev = json.loads(fields[b"e"])
        if ev["node_id"] == node_id:
            out.append((ev["type"], ev["detail"]))
    return out


def test_each_tier_is_entered_when_idle_and_left_by_the_next_call(start_manager, docker_client: docker.DockerClient,
                                                                  redis_client: redis.Redis, prefix: str) -> None:
    m = start_manager(**tiers(pause=1.5, stop=3.0, archive=4.5))
    c, node_id = new_session(m.url)
    write(c, "notes.txt", b"written before")
    first_container = docker_client.containers.get(node_id).id
    for tier, state in (("paused", "paused"), ("exited", "exited"), ("archived", None)):
        wait_for(lambda: status(redis_client, prefix, node_id) == tier,  # noqa: B023  (called here)
                 timeout=20, interval=0.05, what=tier)
        if state is None:
            assert not containers_of(docker_client, node_id)  # the container is gone, its workspace is not
            assert docker_client.volumes.get(f"tsm-session-{node_id}")
        else:
            assert docker_client.containers.get(node_id).status == state
        row = next(n for n in httpx.get(m.url + "/admin/nodes", headers=ADMIN).json()["nodes"] if n["id"] == node_id)
        assert row["tier"] == {"exited": "stopped"}.get(tier, tier)
        assert read(c, "notes.txt") == b"written before"  # the call resumes it, transparently
        assert status(redis_client, prefix, node_id) == "running"
        assert c.cookies["node_id"] == node_id
    assert docker_client.containers.get(node_id).id != first_container  # a new container, same session
    kinds = [k for k, _ in events_of(redis_client, prefix, node_id)]
    for kind in ("paused", "idle_stopped", "archived"):
        assert kind in kinds, kinds
    assert {d for k, d in events_of(redis_client, prefix, node_id) if k == "resumed"} == {"paused", "stopped",
                                                                                         "archived"}
    metrics = httpx.get(m.url + "/metrics").text
    for tier in ("paused", "stopped", "archived"):
        assert f'toolserver_session_tier_transitions_total{{manager_id="{m.cfg["manager_id"]}",tier="{tier}"}}' \
            in metrics
        assert f'toolserver_session_resume_duration_seconds_count{{tier="{tier}"}} 1.0' in metrics
    image = docker_client.volumes.get(f"tsm-session-{node_id}").attrs["Labels"]["toolserver-manager.image_file"]
    c.post("/release_session")  # leaves nothing: container, volume, loop device, image, record
    assert not containers_of(docker_client, node_id)
    assert not docker_client.volumes.list(filters={"label": f"{SESSION}={node_id}"})
    assert not os.path.exists(image) and not loopdisk.device_of(image)
    assert not redis_client.exists(f"{prefix}:node:{node_id}")


def test_the_deleted_tier_removes_a_session_for_good(start_manager, docker_client: docker.DockerClient,
                                                     redis_client: redis.Redis, prefix: str) -> None:
    m = start_manager(**tiers(pause=None, stop=None, archive=1.0, delete=3.0))
    c, node_id = new_session(m.url)
    write(c, "notes.txt", b"kept until retention")
    image = docker_client.volumes.get(f"tsm-session-{node_id}").attrs["Labels"]["toolserver-manager.image_file"]
    wait_for(lambda: status(redis_client, prefix, node_id) == "archived", timeout=20, interval=0.05, what="archived")
    wait_for(lambda: not redis_client.exists(f"{prefix}:node:{node_id}"), timeout=20, interval=0.05,
             what="the record removed at node.tiers.delete_after_seconds")
    # nothing of it is left: container, workspace volume, its file system image and loop device
    assert not containers_of(docker_client, node_id)
    assert not docker_client.volumes.list(filters={"label": f"{SESSION}={node_id}"})
    assert not os.path.exists(image) and not loopdisk.device_of(image)
    assert events_of(redis_client, prefix, node_id)[-2:] == [("archived", "idle"), ("expired", "retention")]
    metrics = httpx.get(m.url + "/metrics").text
    assert f'toolserver_session_tier_transitions_total{{manager_id="{m.cfg["manager_id"]}",tier="deleted"}} 1.0' \
        in metrics
    # the cookie names nothing any more: XAgent's answers for an unknown node
    r = c.post("/get_available_tools")
    assert r.status_code == 403 and r.json()["detail"] == f"invalid node_id: {node_id}", r.text
    assert c.post("/release_session").json() == f"invalid node_id: {node_id}"
    admin = httpx.get(m.url + "/admin/nodes", headers=ADMIN).json()["nodes"]
    assert node_id not in {n["id"] for n in admin}


def test_work_in_progress_keeps_a_node_running(start_manager, redis_client: redis.Redis, prefix: str) -> None:
    m = start_manager(**tiers(pause=2.0, stop=3.0, archive=4.0))
    c, node_id = new_session(m.url)
    seen: set[str] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.add(status(redis_client, prefix, node_id))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        # one tool call longer than every threshold
        r = c.post("/execute_tool", json={"tool_name": "shell_command_executor",
                                          "arguments": {"command": "sleep 6; echo finished"}}, timeout=30)
        assert r.status_code == 200 and "finished" in r.text, r.text
        # an open shell, silent for longer than every threshold
        with open_ws(ws_url(m.url, "/ws/shell"), node_id) as ws:
            outlast(redis_client, prefix, 4.0)  # past the last threshold (archive)
            ws.send(json.dumps({"command": "echo alive", "timeout": 10}))
            assert recv_json(ws) == {"type": "stdout", "line": "alive"}
        # a session's event stream, watched for longer than the pause threshold
        with open_ws(ws_url(m.url, "/ws/events"), node_id) as ws:
            assert recv_json(ws)["success"] is True
            outlast(redis_client, prefix, 2.0)  # past the pause threshold
    finally:
        done.set()
        watcher.join()
    assert seen == {"running"}, f"the node left running under work in progress: {seen}"
    # idle from the moment the last work ended
    wait_for(lambda: status(redis_client, prefix, node_id) == "paused", timeout=10, what="paused once idle")
    c.post("/release_session")


def test_removed_container_comes_back_once_from_two_replicas(start_manager, docker_client: docker.DockerClient,
                                                              redis_client: redis.Redis, prefix: str) -> None:
    a = start_manager(name="a", **FAST)
    b = start_manager(name="b", builtin_monitor=False)
    c, node_id = new_session(a.url)
    write(c, "keep.bin", b"x" * 1000)
    docker_client.containers.get(node_id).remove(force=True)
    wait_for(lambda: status(redis_client, prefix, node_id) == "archived", timeout=10, what="archived by the checker")
    results: list[bytes] = []

    def call(url: str) -> None:
        with httpx.Client(base_url=url, timeout=60, cookies={"node_id": node_id}) as cc:
            results.append(read(cc, "keep.bin"))

    threads = [threading.Thread(target=call, args=(u,)) for u in (a.url, b.url, a.url, b.url)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [b"x" * 1000] * 4
    # every call has answered, so any duplicate exists by now; two checker passes would have seen it
    after = checker_passes(redis_client, prefix)
    wait_for(lambda: checker_passes(redis_client, prefix) >= after + 2, what="two checker passes")
    assert len(containers_of(docker_client, node_id)) == 1
    assert "duplicate_container_removed" not in a.logs()
    c.post("/release_session")


def test_resume_faults_are_named_and_keep_the_session(start_manager, docker_client: docker.DockerClient,
                                                      redis_client: redis.Redis, prefix: str, manager_id: str) -> None:
    a = start_manager(name="a", **FAST)
    # a replica of the same manager_id whose engine does not answer
    down = start_manager(name="down", builtin_monitor=False, docker_host="unix:///nonexistent/docker.sock")
    c, node_id = new_session(a.url)
    write(c, "keep.txt", b"kept")
    docker_client.containers.get(node_id).remove(force=True)
    wait_for(lambda: status(redis_client, prefix, node_id) == "archived", timeout=10, what="archived")
    r = httpx.post(down.url + "/get_available_tools", cookies={"node_id": node_id}, timeout=30)
    assert r.status_code == 503 and "docker engine is unavailable" in r.json()["detail"], r.text
    assert status(redis_client, prefix, node_id) == "archived"
    # its workspace cannot be mounted any more: a clear error, and the session stays archived
    vol = docker_client.volumes.get(f"tsm-session-{node_id}")
    image = vol.attrs["Labels"]["toolserver-manager.image_file"]
    loopdisk.destroy(image)
    r = c.post("/get_available_tools")
    assert r.status_code == 503, r.text
    assert r.json()["detail"].startswith(f"the workspace of session {node_id} cannot be mounted"), r.text
    assert status(redis_client, prefix, node_id) == "archived"
    assert not containers_of(docker_client, node_id)
    assert docker_client.volumes.get(f"tsm-session-{node_id}")
    assert c.post("/release_session").json() == f"Release session: {node_id}"
    assert not docker_client.volumes.list(filters={"label": f"{SESSION}={node_id}"})
    assert not redis_client.exists(f"{prefix}:node:{node_id}")


def test_creation_of_a_killed_replica_leaves_nothing(start_manager, docker_client: docker.DockerClient,
                                                     redis_client: redis.Redis, prefix: str, manager_id: str) -> None:
    # nodes that never answer: the creation is in flight for as long as we like
    slow = {"node": {"creation_wait_seconds": 30, "creation_kwargs": {"image": NODE_IMAGE,
                                                                      "command": ["sleep", "infinity"]}}}
    survivor = start_manager(name="survivor", **slow, **FAST)
    doomed = start_manager(name="doomed", builtin_monitor=False, **slow)
    try:
        httpx.post(doomed.url + "/get_cookie", timeout=1.0)
    except httpx.ReadTimeout:
        pass
    wait_for(lambda: project_containers(docker_client, manager_id), what="the container in creation")
    doomed.kill()
    # its heartbeat expires after cluster.replica_ttl_seconds (2 s); the stuck-creation deadline
    # (35 s) is far off: the dead replica's creation is removed, never adopted, and for that reason
    wait_for(lambda: not project_containers(docker_client, manager_id), timeout=30, what="its container removed")
    wait_for(lambda: redis_client.scard(f"{prefix}:mgr:{manager_id}:nodes") == 0, timeout=30,
             what="its record and reservation gone")
    assert "reason=stuck_in_creation" not in survivor.logs()
    assert not list(redis_client.scan_iter(f"{prefix}:node:*"))
    assert not docker_client.volumes.list(filters={"label": f"toolserver-manager.manager_id={manager_id}"})
    assert "checker_adopt" not in survivor.logs()


def test_redis_flush_brings_back_sessions_of_every_tier(private_redis: PrivateRedis, start_manager,  # type: ignore[no-untyped-def]
                                                        docker_client: docker.DockerClient, manager_id: str) -> None:
    url = private_redis.url  # a Redis of its own: flushing it touches nobody's data
    r = redis.Redis.from_url(url)
    prefix = f"flush-{uuid.uuid4().hex[:6]}"
    m = start_manager(redis={"url": url, "key_prefix": prefix}, **FAST)
    sessions = {}
    for tier in ("running", "paused", "exited", "archived"):
        c, node_id = new_session(m.url)
        write(c, "tier.txt", tier.encode())
        sessions[tier] = (c, node_id)
    docker_client.containers.get(sessions["paused"][1]).pause()
    sessions["exited"][0].post("/close_session")
    docker_client.containers.get(sessions["archived"][1]).remove(force=True)
    for tier, (_, node_id) in sessions.items():
        wait_for(lambda: status(r, prefix, node_id) == tier,  # noqa: B023  (called here)
                 timeout=10, what=f"{tier} before the flush")
    try:
        r.flushdb()
        for tier, (_, node_id) in sessions.items():
            wait_for(lambda: status(r, prefix, node_id) == tier, timeout=20,  # noqa: B023  (called here)
                     what=f"the {tier} session rebuilt from the engine")
        for tier, (c, node_id) in sessions.items():
            assert read(c, "tier.txt") == tier.encode(), tier
            assert status(r, prefix, node_id) == "running"
        for c, _ in sessions.values():
            assert c.post("/release_session").status_code == 200
    finally:
        r.flushdb()
        r.close()
