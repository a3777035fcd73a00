"""Two hosts (network namespaces, each with its own dockerd and manager, manager_id = host),
one Redis, HAProxy in front: the session lifecycle through the balancer, then each fault a
host can have, asserted as the client sees it and as the records and engines show it."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from testing.harness import HAProxy
from testing.hosts import Hosts
from tests.conftest import ADMIN_TOKEN, INTERNAL_TOKEN, NODE_IMAGE, wait_for

ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}


class Cluster:
    def __init__(self, hosts: Hosts, lb: HAProxy) -> None:
        self.hosts = hosts
        self.lb = lb
        self.h1, self.h2 = hosts.hosts

    def admin(self, path: str, host: int = 0) -> httpx.Response:
        m = self.hosts.hosts[host].manager
        assert m is not None
        return httpx.get(m.url + path, headers=ADMIN, timeout=10)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.lb.url, timeout=60)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("hosts")
    hosts = Hosts(tmp, NODE_IMAGE, internal_token=INTERNAL_TOKEN, admin_token=ADMIN_TOKEN).start()
    lb = None
    try:
        lb = HAProxy([(h.name, h.addr, h.manager.port) for h in hosts.hosts if h.manager], tmp)
        c = Cluster(hosts, lb)
        wait_for(lambda: len(c.admin("/admin/replicas").json()["replicas"]) == 2, what="both hosts registered")
        sys.stderr.write(f"\nhosts set-up: {hosts.timings} {[h.timings for h in hosts.hosts]}\n")
        yield c
    except BaseException:
        sys.stderr.write(hosts.logs())
        raise
    finally:
        if lb is not None:
            lb.stop()
        hosts.close()


def _on(c: Cluster, host_index: int) -> tuple[httpx.Client, str]:
    """A session whose node lives on the given host (sessions are placed by whoever answers)."""
    h = c.hosts.hosts[host_index]
    assert h.manager is not None
    cl = httpx.Client(base_url=h.manager.url, timeout=60)
    r = cl.post("/get_cookie")
    assert r.status_code == 200, r.text
    node_id = r.cookies["node_id"]
    lb = c.client()
    lb.cookies.set("node_id", node_id)
    cl.close()
    return lb, node_id


def test_lifecycle_through_the_balancer(cluster: Cluster) -> None:
    c = cluster.client()
    seen: set[str] = set()
    owners: set[str] = set()
    cookies = []
    for _ in range(2):  # round-robin (or spread placement): one session per host
        r = c.post("/get_cookie")
        assert r.status_code == 200, r.text
        seen.add(r.headers["x-tsm-replica"])
        cookies.append(r.cookies["node_id"])
        c.cookies.clear()
    for node_id in cookies:
        c.cookies.set("node_id", node_id)
        for _ in range(3):
            r = c.post("/get_available_tools")
            assert r.status_code == 200, r.text
            seen.add(r.headers["x-tsm-replica"])
        rec = cluster.admin(f"/admin/nodes/{node_id}").json()
        owners.add(rec["record"]["manager_id"])
        assert rec["record"]["host"] in (cluster.h1.addr, cluster.h2.addr)
        blob = os.urandom(200_000)
        assert c.post("/upload_file", files={"file": ("f.bin", blob)}).status_code == 200
        assert c.post("/close_session").json() == f"Close session: {node_id}"
        assert c.post("/download_file", json={"file_path": "f.bin"}).content == blob  # restarted, same files
        assert c.post("/reconnect_session").json() == f"Reconnect session: {node_id}"
        assert c.post("/release_session").json() == f"Release session: {node_id}"
        r = c.post("/")
        assert r.status_code == 403 and r.json()["detail"] == f"invalid node_id: {node_id}"
        c.cookies.clear()
    assert seen == {f"{h.name}-r1" for h in cluster.hosts.hosts}, seen
    assert owners == {h.name for h in cluster.hosts.hosts}, owners
    for h in cluster.hosts.hosts:
        assert h.docker("ps", "-aq", "--filter", "label=toolserver-manager.manager_id").stdout.split() == []
