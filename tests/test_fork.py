"""Forks on the real engine and Redis: exact copies at one instant, isolated, the source answering."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import docker
import httpx
import redis

from testing.harness import report
from tests.conftest import project_containers

WS = "/app/workspace"
# every entry with its type and link target, then every regular file's checksum: equal listings
# mean equal trees
MANIFEST = (f"cd {WS} && find . -path ./during -prune -o -printf '%y %m %s %p -> %l\\n' | sort && "
            "find . -path ./during -prune -o -type f -print0 | sort -z | xargs -0 sha256sum")
SETUP = (f"cd {WS} && printf 'hello\\nworld\\n' > text.txt && head -c 1048573 /dev/urandom > blob.bin && "
         "head -c 200M /dev/urandom > big.bin && mkdir -p deep/$(seq -s / 1 40) && "
         "echo bottom > deep/$(seq -s / 1 40)/leaf.txt && ln -s text.txt link.txt && "
         "ln -s deep/1/2/3 dir-link && mkdir during && chmod 640 text.txt && echo ok")


def shell(c: httpx.Client, command: str, timeout: float = 120) -> str:
    r = c.post("/execute_tool", json={"tool_name": "shell_command_executor", "arguments": {"command": command}},
               timeout=timeout)
    assert r.status_code == 200, r.text
    body = r.json()
    out = str((body.get("data") or {}).get("display", body))
    return out.strip().removeprefix("stdout:").strip()


def session(url: str, node_id: str) -> httpx.Client:
    return httpx.Client(base_url=url, cookies={"node_id": node_id}, timeout=120)


def test_fork_copies_exactly_and_isolated_while_the_source_answers(
        start_manager, docker_client: docker.DockerClient, redis_client: redis.Redis, prefix: str,
        manager_id: str, tmp_path: Path) -> None:
    m = start_manager()
    src = httpx.Client(base_url=m.url, timeout=120)
    assert src.post("/get_cookie").status_code == 200
    src_id = src.cookies["node_id"]
    assert shell(src, SETUP).strip().endswith("ok")
    before = shell(src, MANIFEST)
    assert "big.bin" in before and "leaf.txt" in before and "link.txt -> text.txt" in before

    # the source is written to (a file per call, numbered) during the whole fork request: every call
    # must be answered, and each copy must hold the files of one instant
    stop = threading.Event()
    lat: list[float] = []
    errors: list[str] = []

    def writer() -> None:
        c = session(m.url, src_id)
        n = 0
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                # written aside then renamed, as careful code does: a fork's instant may fall between
                # a file's creation and its write (an empty file in the copy, which is no fault of
                # the fork), never inside a rename
                out = shell(c, f"echo {n} > {WS}/during/.{n} && mv {WS}/during/.{n} {WS}/during/{n} && echo written",
                            timeout=60)
                if "written" not in out:
                    errors.append(out)
            except AssertionError as exc:
                errors.append(str(exc))
            lat.append(time.monotonic() - t0)
            n += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        time.sleep(0.3)  # a few writes before the fork: not a pass/fail condition
        r = src.post("/fork_session", json={"count": 4})
    finally:
        stop.set()
        t.join()
    assert r.status_code == 200, r.text
    result = r.json()
    copies = result["sessions"]
    assert len(copies) == 4 and len(set(copies)) == 4 and src_id not in copies
    assert not errors, errors[:3]
    report(f"fork of 200 MB into 4: {result['seconds']:.2f} s, source writes held {result['stall_seconds']:.3f} s, "
           f"slowest source call during it {max(lat):.3f} s over {len(lat)} calls")

    written = int(shell(src, f"ls {WS}/during | wc -l"))
    instant = None
    for cid in copies:
        c = session(m.url, cid)
        assert shell(c, MANIFEST) == before
        # the files written during the request: one instant's, the same in every copy, each whole
        during = shell(c, f"cd {WS}/during && for f in $(ls | sort -n); do printf '%s=%s ' $f $(cat $f); done")
        if instant is None:
            instant = during
        assert during == instant
        pairs = [p.split("=") for p in during.split() if "=" in p]
        assert all(a == b for a, b in pairs), during
        assert [int(a) for a, _ in pairs] == list(range(len(pairs))) and len(pairs) <= written

    # each copy is a session of its own: container, secret, address, same client
    recs = [redis_client.hgetall(f"{prefix}:node:{i}") for i in [src_id, *copies]]
    assert all(r[b"status"] == b"running" for r in recs)
    assert len({r[b"container_id"] for r in recs}) == 5 and len({r[b"host"] for r in recs}) == 5
    envs = [docker_client.api.inspect_container(r[b"container_id"].decode())["Config"]["Env"] for r in recs]
    assert len({next(e for e in env if e.startswith("NODE_SECRET=")) for env in envs}) == 5
    assert len({r.get(b"client", b"") for r in recs}) == 1

    # a write in one copy is in no other copy, nor in the source
    first = session(m.url, copies[0])
    shell(first, f"echo mine > {WS}/mine.txt && echo changed >> {WS}/text.txt")
    for cid in [src_id, *copies[1:]]:
        out = shell(session(m.url, cid), f"ls {WS}/mine.txt 2>&1; cat {WS}/text.txt")
        assert "No such file" in out and "changed" not in out, out

    names = {n.lstrip("/") for c in docker_client.api.containers(
        all=True, filters={"label": f"toolserver-manager.manager_id={manager_id}"}) for n in c["Names"]}
    assert names == {src_id, *copies}  # each session's container is named after it
    # a "forked" event on each copy, naming its source
    events = [json.loads(fields[b"e"]) for _, fields in redis_client.xrange(f"{prefix}:events")]
    assert {e["node_id"]: e["detail"] for e in events if e["type"] == "forked"} == {c: src_id for c in copies}
    metrics = httpx.get(m.url + "/metrics").text
    assert 'toolserver_fork_duration_seconds_count{outcome="ok"} 1.0' in metrics
    assert 'toolserver_fork_source_stall_seconds_count{op="fork"} 1.0' in metrics


def test_fork_past_a_quota_makes_nothing(start_manager, docker_client: docker.DockerClient,
                                         redis_client: redis.Redis, prefix: str, manager_id: str) -> None:
    m = start_manager(quota={"per_client": 3})
    src = httpx.Client(base_url=m.url, timeout=120)
    assert src.post("/get_cookie").status_code == 200
    shell(src, f"echo kept > {WS}/a.txt")
    r = src.post("/fork_session", json={"count": 3})  # 1 + 3 > 3
    assert r.status_code == 429, r.text
    assert "quota" in r.json()["detail"]
    assert len(project_containers(docker_client, manager_id)) == 1
    assert redis_client.scard(f"{prefix}:mgr:{manager_id}:nodes") == 1
    assert sum(int(v) for v in redis_client.hvals(f"{prefix}:client_count")) == 1

    # bad requests change nothing either
    assert src.post("/fork_session", json={"count": 0}).status_code == 400
    assert src.post("/fork_session", json={"copies": 2}).status_code == 400
    assert httpx.post(m.url + "/fork_session", json={"count": 1}).status_code == 404

    r = src.post("/fork_session", json={"count": 2})  # 1 + 2 = 3: allowed
    assert r.status_code == 200, r.text
    for cid in r.json()["sessions"]:
        assert shell(session(m.url, cid), f"cat {WS}/a.txt").strip() == "kept"
    assert len(project_containers(docker_client, manager_id)) == 3
