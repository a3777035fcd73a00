"""Egress enforced when the engine's network namespace is not the manager's (the chart's DaemonSet:
pods with the host's PID namespace, node.network.firewall_host_namespace). The private engine
(testing/hosts.py) runs its dockerd, bridges and nodes in a namespace of their own while the
manager runs here: the resolver and the proxy must listen on the bridge address there, and the
nft table and the iptables openings go there, never into the manager's namespace."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from shared.config import deep_merge
from shared.egress import nft
from testing.harness import report
from testing.hosts import PrivateEngine, sh
from testing.internet import Internet, internet, routed_to
from tests.conftest import ADMIN_TOKEN, wait_for
from tests.test_egress_enforce import assert_applied_within_a_second, probe, session
from tests.test_egress_tls import checked

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
def net(private_engine: PrivateEngine) -> Iterator[Internet]:
    # the engine's host reaches the internet through this machine, as a host through its router
    with internet(["allowed.test", "other.test"], shared=("a.shared.test", "b.shared.test")) as n, \
            routed_to(n, private_engine.bridge):
        yield n


def test_enforced_in_the_engines_namespace_from_a_manager_outside_it(private_engine: PrivateEngine, net: Internet,
                                                                      start_manager: Any) -> None:
    over = deep_merge(private_engine.manager_overrides(),
                      {"egress": {"enforce": True, "upstream_dns": [net.dns], "client_may_set": True}})
    assert over["node"]["network"]["firewall_host_namespace"] is True
    m = start_manager(**over)
    wait_for(lambda: "egress_resolver_serving" in m.logs(), timeout=60, what="the resolver serving")
    c = session(m.url, {"default": "deny", "allow": ["allowed.test", "a.shared.test"]})
    node_id = c.cookies["node_id"]
    ns = private_engine.engine_host.name
    # the table and the resolver's sockets are in the engine's namespace, none of them here
    there = sh("nft", "list", "tables", ns=ns).stdout.split()
    mine = [t for t in there if t.startswith(nft.TABLE_PREFIX)]
    assert len(mine) == 1, there
    assert mine[0] not in sh("nft", "list", "tables").stdout.split()
    listening = sh("ss", "-Hlnu", "sport", "=", ":53", ns=ns).stdout
    assert listening.strip(), listening
    shared = net.names["a.shared.test"]
    out = probe(c, ["dns", "allowed.test"], ["dns", "other.test"], ["http", "http://allowed.test/"],
                ["connect", net.names["other.test"], 80], ["http", "http://a.shared.test/"],
                ["http", f"http://{shared}/", "b.shared.test"], ["connect", net.spare, 443])
    assert out[0]["rcode"] == 0 and out[1]["rcode"] == 3, out  # NXDOMAIN from the resolver there
    assert out[2].get("status") == 200 and out[2]["body"]["addr"] == net.names["allowed.test"], out[2]
    assert out[3]["what"] == "ECONNREFUSED" and out[3]["ms"] < 100, out[3]
    # the proxy there reads the Host: the other name on the shared address is refused
    assert out[4].get("status") == 200 and out[4]["body"]["host"] == "a.shared.test", out[4]
    assert "error" in out[5] and "Connection reset" in out[5]["error"], out[5]
    assert out[6]["what"] == "ECONNREFUSED", out[6]
    table = sh("nft", "list", "set", "inet", mine[0], "learned", ns=ns).stdout
    assert net.names["allowed.test"] in table, table
    # 443 is checked in the kernel's queue there: its rule and its reader's socket in that namespace
    assert "NFQUEUE" in sh("iptables", "-t", "mangle", "-S", "TSM-EGRESSQ", ns=ns).stdout
    assert "egress_tlsqueue_bound" in m.logs()
    out = probe(c, ["tls", shared, 443, "a.shared.test", "a.shared.test"],
                ["tls", shared, 443, "b.shared.test", "b.shared.test"])
    assert '"host": "a.shared.test"' in out[0].get("body", ""), out
    assert "error" in out[1], out
    assert wait_for(lambda: checked(m.url)["refused"] >= 1 and checked(m.url), timeout=30,
                    what="the queue's verdicts counted")["allowed"] >= 1

    # a change is in force there within the feature's second, as on the manager's own host
    result: list[Any] = []
    t = threading.Thread(target=lambda: result.append(probe(c, ["wait_http", "http://other.test/", 30])[0]))
    t.start()
    time.sleep(1.0)  # lets the node's loop start; the figure below is measured from the change
    t0 = time.time()
    r = httpx.put(f"{m.url}/admin/nodes/{node_id}/egress", headers=ADMIN, timeout=10,
                  json={"default": "deny", "allow": ["allowed.test", "other.test"]})
    assert r.status_code == 200, r.text
    t.join()
    assert "at" in result[0], result
    report(f"egress (engine in another namespace): change in force in the node "
           f"{(result[0]['at'] - t0) * 1000:.0f} ms after the PUT")
    assert_applied_within_a_second(m.url)
    assert c.post("/release_session").status_code == 200
