"""A snapshot made on one host starts a session on another: its bytes go through the replicas
(the multi-host fixture: two engines, each with its own manager, one Redis)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from testing.harness import report
from testing.hosts import Hosts
from tests.conftest import ADMIN_TOKEN, INTERNAL_TOKEN, NODE_IMAGE, wait_for
from tests.test_fork import WS, shell
from tests.test_snapshots import remove_seeds

ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
FILES = (f"cd {WS} && head -c 100M /dev/urandom > data.bin && echo text > t.txt && ln -s t.txt link && "
         "mkdir -p a/b/c && echo deep > a/b/c/d.txt && sha256sum data.bin t.txt a/b/c/d.txt && readlink link")


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    # a key prefix of its own: its saved copies' names say so, and only they are removed after
    prefix = f"tsmtest-{uuid.uuid4().hex[:8]}"
    h = Hosts(tmp_path_factory.mktemp("fork-hosts"), NODE_IMAGE, internal_token=INTERNAL_TOKEN, admin_token=ADMIN_TOKEN,
              manager_overrides={"node": {"disk": {"workspace_bytes": 1 << 30}},
                                 "redis": {"key_prefix": prefix}}).start()
    try:
        yield h
    finally:
        h.close()
        remove_seeds(prefix)


def drain(h: Hosts, name: str, on: bool) -> None:
    m = h.hosts[0].manager
    assert m is not None
    r = httpx.request("POST" if on else "DELETE", f"{m.url}/admin/managers/{name}/drain", headers=ADMIN, timeout=10)
    assert r.status_code == 200, r.text


def test_a_snapshot_starts_a_session_on_another_host(hosts: Hosts) -> None:
    h1, h2 = hosts.hosts
    assert h1.manager is not None and h2.manager is not None
    wait_for(lambda: len(httpx.get(h1.manager.url + "/admin/replicas", headers=ADMIN).json()["replicas"]) == 2,
             what="both hosts registered")
    drain(hosts, h2.name, True)  # the source on host 1
    src = httpx.Client(base_url=h1.manager.url, timeout=120)
    r = src.post("/get_cookie")
    assert r.status_code == 200, r.text
    rec = httpx.get(f"{h1.manager.url}/admin/nodes/{src.cookies['node_id']}", headers=ADMIN).json()["record"]
    assert rec["manager_id"] == h1.name
    sums = shell(src, FILES)
    r = src.post("/snapshot_session", json={"name": "far"})  # the source runs: frozen in its node's namespace
    assert r.status_code == 200, r.text
    snap = r.json()
    assert snap["manager_id"] == h1.name
    drain(hosts, h2.name, False)
    drain(hosts, h1.name, True)  # a new session goes to host 2, the snapshot stays on host 1

    new = httpx.Client(base_url=h2.manager.url, timeout=300)
    t0 = time.monotonic()
    r = new.post("/get_cookie", json={"snapshot": "far"})
    elapsed = time.monotonic() - t0
    assert r.status_code == 200, r.text
    rec = httpx.get(f"{h2.manager.url}/admin/nodes/{new.cookies['node_id']}", headers=ADMIN).json()["record"]
    assert rec["manager_id"] == h2.name
    assert shell(new, f"cd {WS} && sha256sum data.bin t.txt a/b/c/d.txt && readlink link") == sums
    assert "snapshot_fetched name=far from=" + h1.name in h2.manager.logs()
    report(f"start from a snapshot on another host (1 GiB workspace, {snap['bytes'] >> 20} MiB written): "
           f"{elapsed:.2f} s")
    drain(hosts, h1.name, False)
    assert src.request("DELETE", "/snapshots/far").status_code == 200
