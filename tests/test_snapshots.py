"""Snapshots on the real engine and Redis: saved at one instant, immutable, started from, bounded."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator

import docker
import httpx
import pytest
import redis

from tests.conftest import ADMIN_TOKEN, project_containers, wait_for
from tests.test_fork import WS, shell

SEEDS = "/var/lib/toolserver-manager/workspaces/seeds"


def tag(prefix: str) -> str:
    """The hash of a key prefix that the manager puts in its saved copies' names."""
    return hashlib.sha256(prefix.encode()).hexdigest()[:8]


def seeds(prefix: str) -> set[str]:
    """The saved copies (forks' and snapshots', whole or half made) of the cluster of this key
    prefix: other runs on this machine have their own, never touched here."""
    mine = (f"snap-{tag(prefix)}-", f"fork-{tag(prefix)}-")
    return {n for n in os.listdir(SEEDS) if n.startswith(mine)} if os.path.isdir(SEEDS) else set()


def remove_seeds(prefix: str) -> None:
    for name in seeds(prefix):
        path = os.path.join(SEEDS, name)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)


@pytest.fixture(autouse=True)
def no_seed_left(prefix: str) -> Iterator[None]:
    """A failed test's saved copies are removed with it (their records go with its key prefix)."""
    yield
    remove_seeds(prefix)


def test_snapshot_saved_started_from_listed_and_deleted(start_manager, docker_client: docker.DockerClient,
                                                        redis_client: redis.Redis, prefix: str,
                                                        manager_id: str) -> None:
    m = start_manager(fork={"snapshots_per_client": 2})
    src = httpx.Client(base_url=m.url, timeout=120)
    assert src.post("/get_cookie").status_code == 200
    shell(src, f"cd {WS} && echo v1 > state.txt && head -c 5M /dev/urandom > data.bin && ln -s state.txt s")
    sums = shell(src, f"cd {WS} && sha256sum state.txt data.bin && readlink s")
    before = seeds(prefix)
    r = src.post("/snapshot_session", json={"name": "base-1"})
    assert r.status_code == 200, r.text
    snap = r.json()
    assert snap["name"] == "base-1" and snap["bytes"] >= 5 << 20 and "seed" not in snap
    assert snap["source"] == src.cookies["node_id"] and snap["manager_id"] == manager_id
    assert len(seeds(prefix) - before) == 1
    shell(src, f"echo v2 > {WS}/state.txt")  # after the snapshot: not in it
    events = [json.loads(f[b"e"]) for _, f in redis_client.xrange(f"{prefix}:events")]
    assert [(e["node_id"], e["detail"]) for e in events if e["type"] == "snapshotted"] == [(snap["source"], "base-1")]

    # immutable: the name is taken; bad names and bodies change nothing
    assert src.post("/snapshot_session", json={"name": "base-1"}).status_code == 409
    assert src.post("/snapshot_session", json={"name": "../x"}).status_code == 400
    assert src.post("/snapshot_session", json={}).status_code == 400
    assert len(seeds(prefix) - before) == 1

    # a new session from it has its files as they were; XAgent's empty body still makes an empty one
    new = httpx.Client(base_url=m.url, timeout=120)
    r = new.post("/get_cookie", json={"snapshot": "base-1"})
    assert r.status_code == 200 and r.json()["message"] == "add cookie", r.text
    assert shell(new, f"cd {WS} && sha256sum state.txt data.bin && readlink s") == sums
    assert shell(new, f"cat {WS}/state.txt") == "v1"
    plain = httpx.Client(base_url=m.url, timeout=120)
    assert plain.post("/get_cookie").status_code == 200
    assert "state.txt" not in shell(plain, f"ls -a {WS}")
    n = len(project_containers(docker_client, manager_id))
    assert httpx.post(m.url + "/get_cookie", json={"snapshot": "nope"}).status_code == 404
    assert len(project_containers(docker_client, manager_id)) == n

    listed = src.get("/snapshots").json()["snapshots"]
    assert [s["name"] for s in listed] == ["base-1"]
    admin = httpx.get(m.url + "/admin/snapshots", headers={"authorization": f"Bearer {ADMIN_TOKEN}"}).json()
    assert [s["name"] for s in admin["snapshots"]] == ["base-1"]

    # a client keeps at most fork.snapshots_per_client: past it, nothing is copied
    assert src.post("/snapshot_session", json={"name": "base-2"}).status_code == 200
    r = src.post("/snapshot_session", json={"name": "base-3"})
    assert r.status_code == 429 and "snapshots" in r.json()["detail"], r.text
    assert len(seeds(prefix) - before) == 2

    # deleted: its bytes go, the session made from it keeps its own
    assert src.request("DELETE", "/snapshots/base-1").status_code == 200
    assert src.request("DELETE", "/snapshots/base-1").status_code == 404
    assert [s["name"] for s in src.get("/snapshots").json()["snapshots"]] == ["base-2"]
    assert len(seeds(prefix) - before) == 1
    assert shell(new, f"cat {WS}/state.txt") == "v1"
    assert src.request("DELETE", "/snapshots/base-2").status_code == 200
    assert seeds(prefix) == before


def test_snapshot_bytes_bounded_per_host(start_manager, prefix: str) -> None:
    m = start_manager(fork={"snapshot_bytes": 8 << 20})
    src = httpx.Client(base_url=m.url, timeout=120)
    assert src.post("/get_cookie").status_code == 200
    shell(src, f"head -c 6M /dev/urandom > {WS}/a.bin")
    before = seeds(prefix)
    assert src.post("/snapshot_session", json={"name": "one"}).status_code == 200
    r = src.post("/snapshot_session", json={"name": "two"})  # 2 x 6 MB > 8 MB
    assert r.status_code == 429 and "fork.snapshot_bytes" in r.json()["detail"], r.text
    assert len(seeds(prefix) - before) == 1
    assert src.request("DELETE", "/snapshots/one").status_code == 200
    assert src.post("/snapshot_session", json={"name": "two"}).status_code == 200
    assert src.request("DELETE", "/snapshots/two").status_code == 200
    assert seeds(prefix) == before


def test_bytes_no_snapshot_names_are_collected(start_manager, prefix: str) -> None:
    """What a replica that died between a snapshot's copy and its record left: collected by the
    checker; a snapshot's own bytes, and another cluster's (key prefix), are kept."""
    # stray bytes are collected by a pass of every 30th (STORAGE_GC_CYCLES): 6 s apart at 0.2 s,
    # not 15 s at the tests' 0.5 s
    m = start_manager(checker={"stuck_creation_seconds": 1, "interval_seconds": 0.2})
    src = httpx.Client(base_url=m.url, timeout=120)
    assert src.post("/get_cookie").status_code == 200
    shell(src, f"echo kept > {WS}/k.txt")
    assert src.post("/snapshot_session", json={"name": "kept"}).status_code == 200
    stray = os.path.join(SEEDS, f"snap-{tag(prefix)}-{uuid.uuid4().hex}.img")
    other = os.path.join(SEEDS, f"snap-{tag(prefix + '-another')}-{uuid.uuid4().hex}.img")
    try:
        for path in (stray, other):
            with open(path, "wb") as f:
                f.truncate(1 << 20)
            os.utime(path, (time.time() - 3600, time.time() - 3600))
        kept = seeds(prefix) - {os.path.basename(stray)}
        assert len(kept) == 1  # the snapshot's own bytes
        wait_for(lambda: not os.path.exists(stray), timeout=60, what="the stray snapshot bytes collected")
        assert kept <= seeds(prefix) and os.path.exists(other)  # the snapshot's and the other cluster's stay
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(other)
    new = httpx.Client(base_url=m.url, timeout=120)
    assert new.post("/get_cookie", json={"snapshot": "kept"}).status_code == 200
    assert shell(new, f"cat {WS}/k.txt") == "kept"


def test_snapshot_names_are_each_clients_own(start_manager, docker_client: docker.DockerClient,
                                             prefix: str, manager_id: str) -> None:
    """Two clients may each keep "base"; one never sees, starts from or deletes the other's; an
    admin sees both and names whose to delete."""
    m = start_manager(quota={"client_header": "X-Client"})

    def session(who: str) -> httpx.Client:
        return httpx.Client(base_url=m.url, timeout=120, headers={"X-Client": who})

    a, b, c = session("alice"), session("bob"), session("carol")
    for who, s in (("alice", a), ("bob", b)):
        assert s.post("/get_cookie").status_code == 200
        shell(s, f"echo {who} > {WS}/owner.txt")
        r = s.post("/snapshot_session", json={"name": "base"})
        assert r.status_code == 200, r.text  # the same name, another client: not taken
    assert a.post("/snapshot_session", json={"name": "base"}).status_code == 409  # one's own is
    assert [s["name"] for s in a.get("/snapshots").json()["snapshots"]] == ["base"]
    assert [s["name"] for s in b.get("/snapshots").json()["snapshots"]] == ["base"]
    assert c.get("/snapshots").json()["snapshots"] == []

    # each starts from its own "base"; a client with none reaches neither, and nothing is made
    for who in ("alice", "bob"):
        new = session(who)
        assert new.post("/get_cookie", json={"snapshot": "base"}).status_code == 200
        assert shell(new, f"cat {WS}/owner.txt") == who
    n = len(project_containers(docker_client, manager_id))
    assert c.post("/get_cookie", json={"snapshot": "base"}).status_code == 404
    assert c.request("DELETE", "/snapshots/base").status_code == 404
    assert len(project_containers(docker_client, manager_id)) == n

    # an admin sees both, and says whose when deleting a name two clients keep
    admin = httpx.Client(base_url=m.url, timeout=120, headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
    listed = admin.get("/admin/snapshots").json()["snapshots"]
    assert sorted(s["name"] for s in listed) == ["base", "base"] and len({s["client"] for s in listed}) == 2
    r = admin.request("DELETE", "/admin/snapshots/base")
    assert r.status_code == 409 and "?client=" in r.json()["detail"], r.text
    assert len(admin.get("/admin/snapshots").json()["snapshots"]) == 2
    alices = next(s["client"] for s in listed if s["source"] == a.cookies["node_id"])
    r = admin.request("DELETE", "/admin/snapshots/base", params={"client": alices})
    assert r.status_code == 200 and r.json()["client"] == alices, r.text
    assert a.get("/snapshots").json()["snapshots"] == []

    # alice's deleted, bob's is whole; alice's "base" is free again, bob deletes only his own
    new = session("bob")
    assert new.post("/get_cookie", json={"snapshot": "base"}).status_code == 200
    assert shell(new, f"cat {WS}/owner.txt") == "bob"
    assert session("alice").post("/get_cookie", json={"snapshot": "base"}).status_code == 404
    assert b.request("DELETE", "/snapshots/base").status_code == 200
    assert admin.get("/admin/snapshots").json()["snapshots"] == []
