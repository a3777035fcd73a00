"""Two hosts (network namespaces, each with its own dockerd and manager, manager_id = host),
one Redis, HAProxy in front: the session lifecycle through the balancer, then each fault a
host can have, asserted as the client sees it and as the records and engines show it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from testing.harness import HAProxy
from testing.hosts import Hosts, sh, sweep_stale
from tests.conftest import ADMIN_TOKEN, INTERNAL_TOKEN, NODE_IMAGE, ROOT, wait_for

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
    # default placement (spread): _on makes a fault's sessions on the host it faults by itself
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


@pytest.fixture(scope="module")
def fault_table() -> Iterator[list[dict[str, Any]]]:
    """Rows of fault -> what the client saw -> time, printed at the end of the module."""
    rows: list[dict[str, Any]] = []
    yield rows
    sys.stderr.write("\n| fault | call | client saw | seconds |\n| --- | --- | --- | --- |\n")
    for r in rows:
        sys.stderr.write(f"| {r['fault']} | {r['call']} | {r['client saw']} | {r['seconds']:.3f} |\n")


def _on(c: Cluster, host_index: int) -> tuple[httpx.Client, str]:
    """A session whose node lives on the given host: made by that host's replica on its own engine
    (what placement does for a session it sends there), then used through the balancer."""
    h = c.hosts.hosts[host_index]
    assert h.manager is not None
    r = httpx.post(h.manager.url + "/internal/nodes", json={}, headers={"x-tsm-internal-token": INTERNAL_TOKEN},
                   timeout=60)
    assert r.status_code == 200, r.text
    node_id = r.json()["id"]
    assert r.json()["manager_id"] == h.name
    lb = c.client()
    lb.cookies.set("node_id", node_id)
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


def _cid(c: Cluster, node_id: str) -> str:
    """The container a session runs in now (a session's id is its own, not its container's)."""
    rows = c.admin("/admin/nodes?limit=1000").json()["nodes"]  # from Redis: no call to the owner
    (row,) = [r for r in rows if r["id"] == node_id]
    return str(row["container_id"])


def _containers(h: Any) -> dict[str, str]:
    """id -> state of the project's containers on a host's engine."""
    out = h.docker("ps", "-a", "--no-trunc", "--filter", "label=toolserver-manager.manager_id",
                   "--format", "{{.ID}} {{.State}}").stdout.split("\n")
    return dict(line.split(" ", 1) for line in out if line.strip())


def _consistent(c: Cluster) -> None:
    """Every record has its container in the state it says, and every container its record."""
    for h in c.hosts.hosts:
        rows = c.admin(f"/admin/nodes?manager_id={h.name}&limit=1000").json()["nodes"]
        # a session's container may be replaced or archived away: records are matched by container id
        recs = {r["container_id"]: r["status"] for r in rows if r["container_id"]}
        assert recs == _containers(h), f"{h.name}: records {recs} vs containers {_containers(h)}"
        for r in rows:
            assert r["container_id"] or r["status"] == "archived", r


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_calls_while_a_manager_is_down_are_carried_out_when_it_returns(cluster: Cluster, sig: int,
                                                                       fault_table: list[dict[str, Any]]) -> None:
    h2 = cluster.h2
    assert h2.manager is not None
    released, rid = _on(cluster, 1)
    closed, cid = _on(cluster, 1)
    kept, _kid = _on(cluster, 1)
    rcid, ccid = _cid(cluster, rid), _cid(cluster, cid)
    h2.manager.signal(sig)
    h2.manager.proc.wait(20)
    t0 = time.monotonic()
    r = released.post("/release_session")
    t_release = time.monotonic() - t0
    assert r.status_code == 200 and r.json() == f"Release session: {rid}", r.text
    t0 = time.monotonic()
    r = closed.post("/close_session")
    t_close = time.monotonic() - t0
    assert r.status_code == 200 and r.json() == f"Close session: {cid}", r.text
    # the session is gone for the client at once, and the closed one does not run on by itself
    r = released.post("/get_available_tools")
    assert r.status_code == 403 and r.json()["detail"] == f"invalid node_id: {rid}"
    assert released.post("/release_session").json() == f"invalid node_id: {rid}"
    r = closed.post("/get_available_tools")
    assert r.status_code == 503, r.text
    # a running node of the host keeps serving: its engine and network are fine
    t0 = time.monotonic()
    assert kept.post("/get_available_tools").status_code == 200
    t_kept = time.monotonic() - t0
    assert _containers(h2)[rcid] == "running"  # nothing happened yet: the owner is away
    h2.manager.start()
    wait_for(lambda: rcid not in _containers(h2) and _containers(h2).get(ccid) == "exited", timeout=20,
             what="the owner carrying out the release and the close")
    r = closed.post("/get_available_tools")  # a closed session comes back on its next call
    assert r.status_code == 200, r.text
    _consistent(cluster)
    name = signal.Signals(sig).name
    fault_table += [
        {"fault": f"manager {name}", "call": "release_session", "client saw": "200 Release session (recorded)",
         "seconds": t_release},
        {"fault": f"manager {name}", "call": "close_session", "client saw": "200 Close session (recorded)",
         "seconds": t_close},
        {"fault": f"manager {name}", "call": "tool call, running node", "client saw": "200", "seconds": t_kept},
    ]
    for cl in (released, closed, kept):
        cl.post("/release_session")


def _direct(c: Cluster, node_id: str, host_index: int = 0, timeout: float = 60) -> httpx.Client:
    """A client of one host's replica (timings of the manager itself, not of the balancer's health checks)."""
    m = c.hosts.hosts[host_index].manager
    assert m is not None
    cl = httpx.Client(base_url=m.url, timeout=timeout)
    cl.cookies.set("node_id", node_id)
    return cl


def _timed(fn: Any, *args: Any, **kw: Any) -> tuple[httpx.Response, float]:
    t0 = time.monotonic()
    r = fn(*args, **kw)
    return r, time.monotonic() - t0


def _metric(c: Cluster, name: str, manager_id: str) -> float | None:
    m = c.hosts.hosts[0].manager
    assert m is not None
    for line in httpx.get(m.url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(name + "{") and f'manager_id="{manager_id}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return None


def _circuit_rejected(c: Cluster) -> float:
    """Calls host1's replica refused at once because their host's circuit was open."""
    m = c.hosts.hosts[0].manager
    assert m is not None
    for line in httpx.get(m.url + "/metrics", timeout=5).text.splitlines():
        if line.startswith("toolserver_circuit_rejected_total "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("toolserver_circuit_rejected_total not exported")


def _unreachable_calls(c: Cluster, fault: str, victim: str, node_id: str,
                       rows: list[dict[str, Any]]) -> None:
    """The first tool call to a node of the lost host pays one connect timeout; every later one fails in
    milliseconds; each answer is a 503 naming the host's address, not a manager."""
    host = c.hosts.host(victim)
    cl = _direct(c, node_id, timeout=120)  # a hang ends here, not in the test's own timeout
    r, first = _timed(cl.post, "/get_available_tools")
    # a new connection times out (503); one kept alive from before stops being acknowledged (502)
    assert (r.status_code == 503 and r.json()["detail"].startswith(f"host {host.addr} is unreachable")) or \
        (r.status_code == 502 and r.json()["detail"].startswith(f"host {host.addr} stopped answering")), r.text
    # one connect timeout (2 s here: measured 2.03 s), or keep-alive idle + 3 s for a kept connection;
    # 20 s is 10x the measured figure and far below any timeout that would mean waiting on the lost host
    # (cluster.forward_timeout_seconds 60 s, the proxy's read timeout 600 s)
    assert first < 20, f"the first call to a lost host took {first:.1f} s"
    first_saw = f"{r.status_code} host {'unreachable' if r.status_code == 503 else 'stopped answering'}"
    later = []
    rejected = _circuit_rejected(c)
    for _ in range(5):
        r, t = _timed(cl.post, "/get_available_tools")
        assert r.status_code == 503 and host.addr in r.json()["detail"], r.text
        later.append(t)
    # each refused by the open circuit, without a connection tried; the bound is 10x and more what
    # they take (a dict lookup: milliseconds, in the fault table printed at the end)
    assert _circuit_rejected(c) == rejected + 5
    assert max(later) < 1.0, later
    rows += [{"fault": fault, "call": "first tool call", "client saw": first_saw, "seconds": first},
             {"fault": fault, "call": "later tool calls (max of 5)", "client saw": "503 host unreachable",
              "seconds": max(later)}]


def _in_flight(c: Cluster, node_id: str) -> tuple[threading.Thread, dict[str, Any]]:
    """A long tool call on its way when the fault strikes; its outcome and duration land in the dict."""
    out: dict[str, Any] = {}
    cl = _direct(c, node_id)

    def run() -> None:
        t0 = time.monotonic()
        try:
            out["response"] = cl.post("/execute_tool", json={"tool_name": "shell_command_executor", "arguments": {
                "command": "touch /tmp/started; sleep 40"}}, timeout=60)
        except httpx.HTTPError as exc:
            out["error"] = exc
        out["seconds"] = time.monotonic() - t0
        out["ended"] = time.monotonic()

    (row,) = [r for r in c.admin("/admin/nodes?limit=1000").json()["nodes"] if r["id"] == node_id]
    host, cid = c.hosts.host(row["manager_id"]), row["container_id"]
    t = threading.Thread(target=run)
    t.start()
    wait_for(lambda: host.docker("exec", cid, "test", "-f", "/tmp/started", check=False).returncode == 0,
             interval=0.05, what="the call running on the node")
    out["t0"] = time.monotonic()
    return t, out


def test_a_host_whose_link_is_cut(cluster: Cluster, fault_table: list[dict[str, Any]]) -> None:
    h2 = cluster.h2
    _, run_id = _on(cluster, 1)
    _, rel_id = _on(cluster, 1)
    _, cls_id = _on(cluster, 1)
    _, slow_id = _on(cluster, 1)
    rel_cid, cls_cid = _cid(cluster, rel_id), _cid(cluster, cls_id)
    thread, slow = _in_flight(cluster, slow_id)
    h2.link(False)
    slow["t0"] = fault_at = time.monotonic()
    fault = "link cut"
    _unreachable_calls(cluster, fault, h2.name, run_id, fault_table)
    # the request in flight ended with a clear error as soon as its host was known gone (or at the
    # latest when keep-alive gave up on it): it never hangs
    thread.join(90)
    assert not thread.is_alive(), "the request in flight to the cut host still hangs"
    r = slow["response"]
    assert r.status_code == 502 and h2.addr in r.json()["detail"], r.text
    # the README's bound is keep-alive idle + 3 s (8 s here; measured 2.1 to 8.0 s): 30 s leaves noise
    # room and stays below every timeout that would mean waiting on the lost host (forward 60 s, read 600 s)
    assert slow["ended"] - fault_at < 30, slow["ended"] - fault_at
    fault_table.append({"fault": fault, "call": "tool call in flight", "client saw": f"{r.status_code} "
                        f"{r.json()['detail'][:40]}...", "seconds": slow["ended"] - fault_at})
    # lifecycle calls are kept for the host and answered at once
    r, t = _timed(_direct(cluster, rel_id).post, "/release_session")
    assert r.status_code == 200 and r.json() == f"Release session: {rel_id}", r.text
    fault_table.append({"fault": fault, "call": "release_session", "client saw": "200 (recorded)", "seconds": t})
    r, t = _timed(_direct(cluster, cls_id).post, "/close_session")
    assert r.status_code == 200 and r.json() == f"Close session: {cls_id}", r.text
    fault_table.append({"fault": fault, "call": "close_session", "client saw": "200 (recorded)", "seconds": t})
    assert _direct(cluster, rel_id).post("/").status_code == 403
    # past the grace period the host is lost in every view and metric
    lost_after = cluster.hosts.manager_config(h2)["cluster"]["lost_after_seconds"]
    wait_for(lambda: {n["status"] for n in cluster.admin(f"/admin/nodes?manager_id={h2.name}").json()["nodes"]}
             == {"unreachable"}, timeout=lost_after + 10, what="the cut host's nodes shown unreachable")
    wait_for(lambda: _metric(cluster, "toolserver_manager_lost", h2.name) == 1, timeout=10,
             what="toolserver_manager_lost of the cut host")
    # through the balancer too, once its health checks stopped sending anything to the cut host
    lb = cluster.client()
    lb.cookies.set("node_id", run_id)
    r1 = f"{cluster.h1.name}-r1"
    wait_for(lambda: all(lb.post("/").headers.get("x-tsm-replica") == r1 for _ in range(3)), timeout=15,
             what="the balancer sending everything to host1")
    via_lb = []
    rejected = _circuit_rejected(cluster)
    for _ in range(5):
        r, t = _timed(lb.post, "/get_available_tools")
        assert r.status_code == 503 and r.json()["detail"].startswith(f"host {h2.addr} is unreachable"), r.text
        via_lb.append(t)
    assert _circuit_rejected(cluster) == rejected + 5 and max(via_lb) < 1.0, via_lb
    fault_table.append({"fault": fault, "call": "tool calls via HAProxy (max of 5)", "client saw": "503 host "
                        "unreachable", "seconds": max(via_lb)})
    h2.link(True)
    t1 = time.monotonic()
    # the first call after the host is back goes through (the circuit's probe saw it answer)
    wait_for(lambda: _direct(cluster, run_id).post("/get_available_tools").status_code == 200, timeout=10,
             interval=0.05, what="a call to the host once its link is back")
    fault_table.append({"fault": fault, "call": "first call after the link is back", "client saw": "200",
                        "seconds": time.monotonic() - t1})
    wait_for(lambda: rel_cid not in _containers(h2) and _containers(h2).get(cls_cid) == "exited", timeout=20,
             what="the host carrying out the release and close sent while it was cut off")
    wait_for(lambda: _metric(cluster, "toolserver_manager_lost", h2.name) == 0, timeout=10,
             what="the host no longer lost")
    _consistent(cluster)
    for nid in (run_id, cls_id, slow_id):
        _direct(cluster, nid).post("/release_session")


def test_a_host_that_crashes(cluster: Cluster, fault_table: list[dict[str, Any]]) -> None:
    h2 = cluster.h2
    _, a_id = _on(cluster, 1)
    cl_b, b_id = _on(cluster, 1)
    a_cid = _cid(cluster, a_id)
    assert cl_b.post("/upload_file", files={"file": ("keep.txt", b"kept")}).status_code == 200
    # host1's replica keeps a connection to the node alive: the first call after the crash is written
    # to a host that never acknowledges it, the hardest case for a proxy to notice
    assert _direct(cluster, b_id).post("/get_available_tools").status_code == 200
    cluster.hosts.crash(h2)
    fault = "host crash"
    _unreachable_calls(cluster, fault, h2.name, b_id, fault_table)
    r, t = _timed(_direct(cluster, a_id).post, "/release_session")
    assert r.status_code == 200 and r.json() == f"Release session: {a_id}", r.text
    fault_table.append({"fault": fault, "call": "release_session", "client saw": "200 (recorded)", "seconds": t})
    lost_after = cluster.hosts.manager_config(h2)["cluster"]["lost_after_seconds"]
    wait_for(lambda: cluster.admin(f"/admin/nodes/{b_id}").json()["record"]["status"] == "unreachable",
             timeout=lost_after + 10, what="the crashed host's node shown unreachable")
    assert "unreachable" in cluster.admin(f"/admin/nodes/{b_id}").json()["error"]
    # what only the owner can do is refused naming the lost host, not a manager
    r = _direct(cluster, b_id).post("/reconnect_session")
    assert r.status_code == 503 and r.json()["detail"].startswith(f"host {h2.addr} is unreachable"), r.text
    m1 = cluster.h1.manager
    assert m1 is not None
    cli = subprocess.run([sys.executable, "-m", "toolserver_manager.cli", "--url", m1.url, "--token", ADMIN_TOKEN,
                          "nodes", "--manager-id", h2.name], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert cli.returncode == 0 and b_id[:12] in cli.stdout and "unreachable" in cli.stdout, cli.stdout + cli.stderr
    wait_for(lambda: (_metric(cluster, "toolserver_nodes_unreachable", h2.name) or 0) >= 1, timeout=10,
             what="toolserver_nodes_unreachable of the crashed host")
    cluster.hosts.recover(h2)
    # the release sent meanwhile is carried out, the killed node is seen exited, and comes back on its next call
    wait_for(lambda: a_cid not in _containers(h2), timeout=20, what="the release carried out after the crash")
    r = wait_for(lambda: (lambda r: r if r.status_code == 200 else None)(
        _direct(cluster, b_id).post("/download_file", json={"file_path": "keep.txt"})), timeout=30,
        what="the crashed host's node back on its next call")
    assert r.content == b"kept"
    _consistent(cluster)
    _direct(cluster, b_id).post("/release_session")


def _unused_tag() -> str:
    """A tag no run here uses: a flip of this module's own once met a namespace of that name (full
    run f10, "File exists"), and another worker's hosts may be setting up under any tag."""
    taken = sh("ip", "netns", "list").stdout + sh("ip", "-o", "link", "show").stdout
    for _ in range(1000):
        tag = uuid.uuid4().hex[:4]
        if tag not in taken and not list(Path("/run").glob(f"tsmh-{tag}*")) \
                and not list(Path("/run/netns").glob(f"*-{tag}")):
            return tag
    raise AssertionError("no unused tag in 1,000 tries")


def test_leftovers_of_a_killed_run_are_swept_and_a_live_run_is_not(cluster: Cluster) -> None:
    """A run killed before its teardown leaves namespaces, a bridge and a forward rule; the next run
    removes them, never those of a run still going (this module's hosts)."""
    tag = _unused_tag()
    sh("ip", "netns", "add", f"host1-{tag}")
    marker = Path(f"/run/tsmh-{tag}.started")  # made by a run long gone (a young one may be setting up)
    marker.touch()
    os.utime(marker, (time.time() - 3600, time.time() - 3600))
    sh("ip", "link", "add", f"tsmhbr{tag}", "type", "bridge")
    sh("iptables", "-I", "FORWARD", "-i", f"tsmhbr{tag}", "-o", f"tsmhbr{tag}", "-j", "ACCEPT")
    try:
        assert sweep_stale() == [tag]
        assert f"host1-{tag}" not in sh("ip", "netns", "list").stdout
        assert sh("ip", "link", "show", f"tsmhbr{tag}", check=False).returncode != 0
        assert f"tsmhbr{tag}" not in sh("iptables", "-S", "FORWARD").stdout and not marker.exists()
        for h in cluster.hosts.hosts:  # the live run is untouched
            assert h.name in sh("ip", "netns", "list").stdout and h.engine_answers()
    finally:
        sh("ip", "netns", "del", f"host1-{tag}", check=False)
        sh("ip", "link", "del", f"tsmhbr{tag}", check=False)
        sh("iptables", "-D", "FORWARD", "-i", f"tsmhbr{tag}", "-o", f"tsmhbr{tag}", "-j", "ACCEPT", check=False)
