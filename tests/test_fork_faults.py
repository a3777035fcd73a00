"""Forks under faults, on the real engine and Redis: a replica killed mid-fork, a source released
during one, a full workspace."""

from __future__ import annotations

import glob
import os
import subprocess
import threading
import time
from typing import Any

import docker
import httpx
import pytest
import redis

from tests.conftest import wait_for
from tests.test_fork import WS, session, shell
from tests.test_snapshots import SEEDS, no_seed_left, seeds  # noqa: F401  (an autouse fixture)

IMAGES = "/var/lib/toolserver-manager/workspaces"
BIG = f"head -c 200M /dev/urandom > {WS}/big.bin && sha256sum {WS}/big.bin | cut -c1-64"
# A dead replica's half-made workspace is collected once older than the checker's stuck-creation
# age, max(stuck_creation_seconds, node.creation_wait_seconds + 5): 25 s with the tests' 20 s wait,
# by a pass of every 30th (STORAGE_GC_CYCLES), 15 s apart at 0.5 s. With a 15 s wait (still three
# times a node's start at load 50) and 0.25 s passes it is 20 s and 7.5 s apart: each test that
# waits for it is about 15 s shorter.
STORAGE_GC = {"stuck_creation_seconds": 5, "interval_seconds": 0.25}
NODE_WAIT = {"creation_wait_seconds": 15}




def fork_in_thread(url: str, node_id: str, count: int) -> tuple[threading.Thread, dict[str, Any]]:
    """POST /fork_session in a thread; its answer (or the error) lands in the dict."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["resp"] = session(url, node_id).post("/fork_session", json={"count": count})
        except httpx.HTTPError as exc:
            out["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    return t, out


def names(docker_client: docker.DockerClient, manager_id: str) -> set[str]:
    return {n.lstrip("/") for c in docker_client.api.containers(
        all=True, filters={"label": f"toolserver-manager.manager_id={manager_id}"}) for n in c["Names"]}


def volumes(docker_client: docker.DockerClient, manager_id: str) -> set[str]:
    raw = docker_client.api.volumes(filters={"label": f"toolserver-manager.manager_id={manager_id}"})
    return {v["Name"] for v in (raw or {}).get("Volumes") or []}


@pytest.mark.parametrize("when", ["copying", "creating"])
def test_replica_killed_mid_fork_leaves_nothing(start_manager, docker_client: docker.DockerClient,
                                                 redis_client: redis.Redis, prefix: str, manager_id: str,
                                                 when: str) -> None:
    over = {"checker": STORAGE_GC, "node": NODE_WAIT}
    m1 = start_manager("m1", **over)
    src = httpx.Client(base_url=m1.url, timeout=120)
    assert src.post("/get_cookie").status_code == 200
    src_id = src.cookies["node_id"]
    digest = shell(src, BIG)
    before = seeds(prefix)
    t, _ = fork_in_thread(m1.url, src_id, 3)
    if when == "copying":  # the source's workspace is frozen right now, its copy half made
        wait_for(lambda: {s for s in seeds(prefix) - before if s.endswith(".part")}, timeout=60, interval=0.005,
                 what="the fork's copy to begin")
    else:  # the copies' records, containers and workspaces are being made
        wait_for(lambda: [m for m in redis_client.smembers(f"{prefix}:mgr:{manager_id}:nodes")
                          if not m.startswith(b"pending:") and m.decode() != src_id], timeout=60,
                 interval=0.005, what="the copies' records")
    m1.kill()
    t.join()
    # the copies the dead replica had begun (none when it died copying: only quota slots)
    copies = {x.decode() for x in redis_client.smembers(f"{prefix}:mgr:{manager_id}:nodes")} - {src_id}
    copies = {c for c in copies if not c.startswith("pending:")}
    assert when == "copying" or copies

    m2 = start_manager("m2", **over)

    def settled() -> bool:
        members = {x.decode() for x in redis_client.smembers(f"{prefix}:mgr:{manager_id}:nodes")}
        return (members == {src_id} and names(docker_client, manager_id) == {src_id}
                and volumes(docker_client, manager_id) == {f"tsm-session-{src_id}"}
                and not (seeds(prefix) - before)
                and not any(os.path.exists(f"{IMAGES}/tsm-session-{c}.img") for c in copies)
                and not any(redis_client.exists(f"{prefix}:node:{c}") for c in copies))

    wait_for(settled, timeout=90, interval=0.5, what="the half-made fork to be removed")
    # the source was thawed (its writes go on) and its files are whole
    c = session(m2.url, src_id)
    assert shell(c, f"echo after > {WS}/after.txt && cat {WS}/after.txt", timeout=30) == "after"
    assert shell(c, f"sha256sum {WS}/big.bin | cut -c1-64") == digest


def test_source_released_during_a_fork(start_manager, docker_client: docker.DockerClient, prefix: str,
                                      manager_id: str) -> None:
    m = start_manager()
    src = httpx.Client(base_url=m.url, timeout=120)
    assert src.post("/get_cookie").status_code == 200
    src_id = src.cookies["node_id"]
    digest = shell(src, BIG)
    earlier: set[str] = set()  # copies of forks whose copy was over before it was seen
    for _attempt in range(5):
        t0 = time.time()
        t, out = fork_in_thread(m.url, src_id, 2)

        def copying() -> bool:  # this fork's copy of the workspace is being written
            return any(n.endswith(".part") and os.stat(os.path.join(SEEDS, n)).st_mtime >= t0  # noqa: B023
                       for n in seeds(prefix))

        # on a file system with reflinks the copy takes some 60 ms: a poll that does not get the CPU
        # in that time misses it, and that fork is over before the release; then another fork
        seen = wait_for(lambda: copying() or not t.is_alive(), timeout=60, interval=0.005,  # noqa: B023
                        what="the fork's copy to begin") and t.is_alive()
        if seen:
            break
        t.join()
        assert out["resp"].status_code == 200, out["resp"].text
        earlier |= set(out["resp"].json()["sessions"])
    assert seen, "five forks, and not one copy seen while it was being written"
    assert src.post("/release_session").json() == f"Release session: {src_id}"
    t.join()
    resp = out["resp"]
    assert resp.status_code == 200, resp.text  # the copy was whole before the release went on
    copies = resp.json()["sessions"]
    for cid in copies:
        assert shell(session(m.url, cid), f"sha256sum {WS}/big.bin | cut -c1-64") == digest
    assert names(docker_client, manager_id) == set(copies) | earlier
    assert not glob.glob(f"{IMAGES}/tsm-session-{src_id}.img")


def test_a_full_workspace_still_forks(start_manager) -> None:
    m = start_manager(node={"disk": {"workspace_bytes": 64 << 20}})
    src = httpx.Client(base_url=m.url, timeout=120)
    assert src.post("/get_cookie").status_code == 200
    full = shell(src, f"head -c 100M /dev/urandom > {WS}/fill 2>&1; df --output=avail {WS} | tail -1; "
                      f"sha256sum {WS}/fill | cut -c1-64")
    avail, digest = full.split()[-2:]
    assert int(avail) < 1024, full  # no room left
    r = src.post("/fork_session", json={"count": 1})
    assert r.status_code == 200, r.text
    (cid,) = r.json()["sessions"]
    assert shell(session(m.url, cid), f"sha256sum {WS}/fill | cut -c1-64") == digest


POOL_SETUP = (f"cd {WS} && head -c 32M /dev/urandom > data.bin && printf 'hello\\n' > text.txt && "
              "mkdir -p a/b && echo leaf > a/b/leaf.txt && ln -s text.txt link.txt && sync && echo ok")
SUMS = f"cd {WS} && find . -type f -print0 | sort -z | xargs -0 sha256sum"


def leftovers(session_id: str) -> list[str]:
    """What of a session's workspace is left on the host: its image (whole, half cloned, device
    link) and loop devices backed by any of them."""
    files = glob.glob(f"{IMAGES}/tsm-session-{session_id}.img*")
    loops = subprocess.run(["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"], capture_output=True,
                           text=True, timeout=60).stdout
    return files + [line for line in loops.splitlines() if f"tsm-session-{session_id}.img" in line]


@pytest.mark.parametrize("when", ["claimed", "cloning"])
def test_replica_killed_while_handing_copies_to_pool_nodes(start_manager, docker_client: docker.DockerClient,
                                                           redis_client: redis.Redis, prefix: str,
                                                           manager_id: str, when: str) -> None:
    """A fork whose copies go to running pooled nodes, its replica killed -9 while they are being
    handed over (claimed, or the clone of the source's image being made and mounted in them): a
    second replica's checker leaves every claimed node a whole copy of the source's client or
    removed with everything it held, and the pool refills with clean nodes."""
    over: dict[str, Any] = {"checker": STORAGE_GC, "node": NODE_WAIT, "pool": {"size": 3, "max_size": 3, "max_age_seconds": 3600}}
    pool_key = f"{prefix}:mgr:{manager_id}:pool"
    m1 = start_manager("m1", **over)
    src = httpx.Client(base_url=m1.url, timeout=120)
    assert src.post("/get_cookie").status_code == 200
    src_id = src.cookies["node_id"]
    assert shell(src, POOL_SETUP).endswith("ok")
    sums = shell(src, SUMS)
    client = redis_client.hget(f"{prefix}:node:{src_id}", "client")
    wait_for(lambda: redis_client.llen(pool_key) == 3, timeout=180, what="the pool filled")
    pooled = {x.decode() for x in redis_client.lrange(pool_key, 0, -1)}
    before = seeds(prefix)

    def claimed() -> set[str]:
        return {i for i in pooled if redis_client.hget(f"{prefix}:node:{i}", "role") == b"claiming"}

    def cloning() -> set[str]:  # a pooled node's image has a clone beside it, not yet in its place
        return {i for i in pooled if os.path.exists(f"{IMAGES}/tsm-session-{i}.img.part")}

    t, out = fork_in_thread(m1.url, src_id, 3)
    wait_for(claimed if when == "claimed" else cloning, timeout=60, interval=0.003,
             what=f"the hand-off to pooled nodes ({when})")
    m1.kill()
    t.join()
    assert "resp" not in out or out["resp"].status_code >= 500, out  # it died before answering
    taken = {i for i in pooled if redis_client.hget(f"{prefix}:node:{i}", "role") != b"pooled"}
    assert taken, "no pooled node was claimed"

    m2 = start_manager("m2", **over)

    def gone(i: str) -> bool:
        return (not redis_client.exists(f"{prefix}:node:{i}") and i not in names(docker_client, manager_id)
                and f"tsm-session-{i}" not in volumes(docker_client, manager_id) and not leftovers(i))

    def whole(i: str) -> bool:  # a session of the source's client holding the source's files
        rec = redis_client.hgetall(f"{prefix}:node:{i}")
        return rec.get(b"role") == b"node" and rec.get(b"client") == client and \
            shell(session(m2.url, i), SUMS) == sums

    def members() -> set[str]:
        return {x.decode() for x in redis_client.smembers(f"{prefix}:mgr:{manager_id}:nodes")}

    def unsettled() -> list[Any]:  # what is still wrong (empty: all settled)
        return ([(i, redis_client.hget(f"{prefix}:node:{i}", "role"), leftovers(i)) for i in taken
                 if not (gone(i) or whole(i))]
                + [("pool", redis_client.llen(pool_key))] * (redis_client.llen(pool_key) != 3)
                + [m for m in members() if m.startswith("pending:")] + sorted(seeds(prefix) - before))

    try:
        wait_for(lambda: not unsettled(), timeout=120, interval=0.5,
                 what="the claimed pooled nodes finished or removed")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {unsettled()}") from None
    # the pool holds clean nodes again: none of them has a copy's files in its workspace
    for i in (x.decode() for x in redis_client.lrange(pool_key, 0, -1)):
        cid = redis_client.hget(f"{prefix}:node:{i}", "container_id").decode()
        listing = docker_client.containers.get(cid).exec_run(["ls", "-A", WS]).output.decode()
        assert not {"data.bin", "text.txt", "a", "link.txt"} & set(listing.split()), (i, listing)
    # the client counts exactly the sessions it has
    live = [i for i in members() if redis_client.hget(f"{prefix}:node:{i}", "client") == client
            and redis_client.hget(f"{prefix}:node:{i}", "role") == b"node"]
    assert int(redis_client.hget(f"{prefix}:client_count", client) or 0) == len(live), live
    # the source was thawed and still works, its files whole
    c = session(m2.url, src_id)
    assert shell(c, f"echo after > {WS}/after.txt && cat {WS}/after.txt", timeout=30) == "after"
    assert shell(c, f"rm {WS}/after.txt && " + SUMS) == sums
