"""Egress across hosts: the multi-host fixture's engines each run in a network namespace of their
own (testing/hosts.py), so the resolver, the nft sets and the proxy of a session on the second
host run there, in its namespace, and a policy change made through the first host's replica
reaches them through the event stream."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from shared.egress import nft
from testing.harness import report
from testing.hosts import Hosts, sh
from testing.internet import Internet, internet, routed_to
from tests.conftest import ADMIN_TOKEN, INTERNAL_TOKEN, NODE_IMAGE, wait_for
from tests.test_egress_enforce import assert_applied_within_a_second, probe

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Hosts, Internet]]:
    with internet(["allowed.test", "other.test"], shared=("a.shared.test", "b.shared.test")) as net:
        egress = {"enforce": True, "upstream_dns": [net.dns], "client_may_set": True}
        hosts = Hosts(tmp_path_factory.mktemp("egress-hosts"), NODE_IMAGE, internal_token=INTERNAL_TOKEN,
                      admin_token=ADMIN_TOKEN, manager_overrides={"egress": egress,
                                                                  "cluster": {"placement": "local"}})
        try:
            # the hosts reach the internet through this machine's root namespace, as a LAN's hosts
            # reach the world through their router
            with routed_to(net, hosts.bridge):
                hosts.start()
                yield hosts, net
        finally:
            hosts.close()


def test_a_change_made_on_one_host_is_in_force_on_a_session_of_the_other(world: tuple[Hosts, Internet]) -> None:
    hosts, net = world
    h1, h2 = hosts.hosts
    assert h1.manager is not None and h2.manager is not None
    wait_for(lambda: "egress_resolver_serving" in h2.manager.logs(), timeout=60, what="host2's resolver serving")
    c = httpx.Client(base_url=h2.manager.url, timeout=60)
    r = c.post("/get_cookie", json={"egress": {"default": "deny", "allow": ["allowed.test"]}})
    assert r.status_code == 200, r.text
    node_id = c.cookies["node_id"]
    rec = httpx.get(f"{h1.manager.url}/admin/nodes/{node_id}", headers=ADMIN, timeout=10).json()["record"]
    assert rec["manager_id"] == h2.name
    # enforcement for host2's engine lives in host2's namespace (its bridge, its table), not here
    tables = sh("nft", "list", "tables", ns=h2.name).stdout
    assert nft.TABLE_PREFIX in tables, tables
    here = sh("nft", "list", "tables").stdout.split()
    assert not [t for t in tables.split() if t.startswith(nft.TABLE_PREFIX) and t in here], (tables, here)
    allowed = net.names["allowed.test"]
    out = probe(c, ["http", "http://allowed.test/"], ["dns", "other.test"],
                ["connect", net.names["other.test"], 80],
                ["tls", allowed, 443, "allowed.test", "allowed.test"], ["tls", allowed, 443, "other.test", "other.test"])
    assert out[0].get("status") == 200 and out[0]["body"]["addr"] == allowed, out
    assert out[1]["rcode"] == 3, out  # NXDOMAIN, from host2's resolver
    assert out[2]["what"] == "ECONNREFUSED" and out[2]["ms"] < 100, out
    # 443 checked in host2's own queue (its namespace, its agent)
    assert '"host": "allowed.test"' in out[3].get("body", "") and "error" in out[4], out
    assert "egress_tlsqueue_bound" in h2.manager.logs()

    result: list[Any] = []
    # the node tries other.test every 10 ms while an admin opens it through host1's replica
    t = threading.Thread(target=lambda: result.append(probe(c, ["wait_http", "http://other.test/", 30])[0]))
    t.start()
    time.sleep(1.0)  # lets the node's loop start; the figure below is measured from the change
    t0 = time.time()
    r = httpx.put(f"{h1.manager.url}/admin/nodes/{node_id}/egress", headers=ADMIN, timeout=10,
                  json={"default": "deny", "allow": ["allowed.test", "other.test"]})
    assert r.status_code == 200, r.text
    t.join()
    assert "at" in result[0], result
    took = result[0]["at"] - t0
    report(f"egress policy change made on host1 in force in host2's node {took * 1000:.0f} ms after the PUT")
    assert_applied_within_a_second(h2.manager.url)  # the feature's bound, on host2 (see there)
    assert result[0]["body"]["addr"] == net.names["other.test"]

    # and narrowed again from host1: host2 closes the address at once
    r = httpx.put(f"{h1.manager.url}/admin/nodes/{node_id}/egress", headers=ADMIN, timeout=10,
                  json={"default": "deny", "allow": ["allowed.test"]})
    assert r.status_code == 200, r.text
    out = probe(c, ["wait_refused", net.names["other.test"], 80, 30], ["dns", "other.test"])
    assert out[0]["what"] == "ECONNREFUSED" and out[0]["ms"] < 100 and out[1]["rcode"] == 3, out
    assert c.post("/release_session").status_code == 200
