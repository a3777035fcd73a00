"""Egress enforced by what resolved (egress.enforce), on the real engine against a small internet
in a network namespace (testing/internet.py), driven from inside a node through its shell tool."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shlex
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import docker
import httpx
import pytest

from shared.egress import nft
from shared.firewall import BRIDGE_PREFIXES
from testing.harness import bridge_gateway, report
from testing.internet import ALT_PORT, MANY, MANY_RECORDS, Internet, internet
from tests.conftest import ADMIN_TOKEN, wait_for
from tests.test_isolation import networks_of

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

# run inside the node: each step's outcome, as JSON after "PROBE"
NODE_PROBE = r"""
import errno, json, socket, struct, sys, time, urllib.request

def query(name, qtype):
    q = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
    return q + b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack("!HH", qtype, 1)

def dns(name, qtype=1):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5)
    s.sendto(query(name, qtype), ("127.0.0.11", 53))
    data = s.recv(4096)
    return {"rcode": data[3] & 0xF, "answers": struct.unpack("!H", data[6:8])[0], "tc": bool(data[2] & 2)}

def dns_tcp(name, qtype=1):
    q = query(name, qtype)
    s = socket.create_connection(("127.0.0.11", 53), 5)
    s.sendall(struct.pack("!H", len(q)) + q)
    data = b""
    while len(data) < 2 or len(data) < 2 + struct.unpack("!H", data[:2])[0]:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    data = data[2:]
    return {"rcode": data[3] & 0xF, "answers": struct.unpack("!H", data[6:8])[0], "tc": bool(data[2] & 2)}

def ipv6():
    try:
        addrs = open("/proc/net/if_inet6").read().split()
    except OSError:
        addrs = []
    out = {"addresses": addrs}
    try:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM); s.settimeout(5)
        s.connect(("2001:db8::5", 80)); out["connect"] = "connected"
    except OSError as exc:
        out["connect"] = errno.errorcode.get(exc.errno, type(exc).__name__) if exc.errno else type(exc).__name__
    return out

def connect(host, port):
    s = socket.socket(); s.settimeout(5)
    t0 = time.monotonic()
    try:
        s.connect((host, port)); what = "connected"
    except OSError as exc:
        what = errno.errorcode.get(exc.errno, type(exc).__name__) if exc.errno else type(exc).__name__
    finally:
        s.close()
    return {"what": what, "ms": (time.monotonic() - t0) * 1000}

def http(url, host=None):
    req = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return {"status": r.status, "body": json.loads(r.read())}
    except Exception as exc:
        return {"error": repr(exc)}

def wait_http(url, limit):
    deadline = time.time() + limit
    while time.time() < deadline:
        out = http(url)
        if "status" in out:
            return {"at": time.time(), **out}
        time.sleep(0.01)
    return {"error": "never reached"}

def wait_refused(host, port, limit):
    deadline = time.time() + limit
    while time.time() < deadline:
        out = connect(host, port)
        if out["what"] == "ECONNREFUSED":
            return {"at": time.time(), **out}
        time.sleep(0.01)
    return {"error": "still not refused"}

def drip(addr, port, host, limit):
    s = socket.create_connection((addr, port), 5)
    s.settimeout(limit)
    s.sendall(f"GET /drip/{limit} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
    got, how = 0, ""
    try:
        while True:
            data = s.recv(65536)
            if not data:
                how = "eof"
                break
            got += len(data)
    except OSError as exc:
        how = type(exc).__name__
    s.close()
    return {"died": time.time(), "how": how, "bytes": got}

def tls(addr, port, sni, host):
    import ssl
    ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
    s = socket.create_connection((addr, port), 5)
    try:
        t = ctx.wrap_socket(s, server_hostname=sni)
        t.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        data = b""
        while b"}" not in data:
            chunk = t.recv(4096)
            if not chunk:
                break
            data += chunk
        return {"body": data.decode(errors="replace")}
    except OSError as exc:
        return {"error": repr(exc)}
    finally:
        s.close()

def https_env(url):
    import os
    req = urllib.request.Request(url, headers={"Authorization": "Bearer " + os.environ.get("API_TOKEN", "")})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return {"status": r.status, "body": json.loads(r.read())}
    except Exception as exc:
        return {"error": repr(exc)}

def post_env(url, *names):
    import os
    body = json.dumps({n: os.environ.get(n, "") for n in names}).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return {"status": r.status, "body": json.loads(r.read())}
    except Exception as exc:
        return {"error": repr(exc)}

def post_expect(host, name):
    # as curl sends a large body: the head with Expect: 100-continue, the body only after a 100
    import os, ssl
    body = json.dumps({name: os.environ.get(name, "")}).encode()
    s = ssl.create_default_context().wrap_socket(socket.create_connection((host, 443), 30), server_hostname=host)
    s.settimeout(30)
    s.sendall(f"POST / HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n".encode())
    first = s.recv(4096)
    if not first.startswith(b"HTTP/1.1 100"):
        return {"error": first.decode(errors="replace")}
    s.sendall(body)
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    return {"body": json.loads(data.split(b"\r\n\r\n", 1)[1])}

def post_streamed(host, mode):
    # chunked: the BODY_TOKEN placeholder split across chunks (twice); length: 2 MiB, a placeholder
    # across the 1 MiB mark and one at the very end, sent with its Content-Length
    import hashlib, os, ssl
    ph = os.environ.get("BODY_TOKEN", "").encode()
    if mode == "chunked":
        parts = [b'{"a": "', ph[:7], ph[7:] + b'", "b": "' + ph[:-3], ph[-3:] + b'"}']
        body = b"".join(parts)
        wire, framing = [b"%x\r\n%s\r\n" % (len(p), p) for p in parts] + [b"0\r\n\r\n"], "Transfer-Encoding: chunked"
    else:
        at, size = (1 << 20) - 5, 1 << 21
        body = b"a" * at + ph + b" " + b"b" * (size - at - 2 * len(ph) - 1) + ph
        wire, framing = [body[i:i + 100000] for i in range(0, len(body), 100000)], f"Content-Length: {len(body)}"
    s = ssl.create_default_context().wrap_socket(socket.create_connection((host, 443), 30), server_hostname=host)
    s.settimeout(60)
    s.sendall(f"POST / HTTP/1.1\r\nHost: {host}\r\n{framing}\r\n\r\n".encode())
    for piece in wire:
        s.sendall(piece)
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    if b"\r\n\r\n" not in data:  # say what came back (once in a full run: nothing at all)
        raise RuntimeError(f"post_streamed {host} {mode}: no whole answer, got {data[:300]!r}")
    return {"sent": hashlib.sha256(body).hexdigest(), "length": len(body),
            "got": json.loads(data.split(b"\r\n\r\n", 1)[1])}

def two_requests(addr, first, second):
    s = socket.create_connection((addr, 80), 5)
    s.sendall(f"GET / HTTP/1.1\r\nHost: {first}\r\n\r\nGET / HTTP/1.1\r\nHost: {second}\r\n\r\n".encode())
    data = b""
    try:
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    except OSError as exc:
        data += repr(exc).encode()
    s.close()
    return {"data": data.decode(errors="replace")}

steps = json.loads(sys.argv[1])
out = [globals()[s[0]](*s[1:]) for s in steps]
print("PROBE" + json.dumps(out))
"""


def probe(c: httpx.Client, *steps: list[Any], script: str = NODE_PROBE) -> list[dict[str, Any]]:
    """Run steps inside the cookie's node (through a probe script printing PROBE and its outcomes)."""
    cmd = f"python3 -c {shlex.quote(script)} {shlex.quote(json.dumps(steps))}"
    r = c.post("/execute_tool", json={"tool_name": "shell_command_executor", "arguments": {"command": cmd}},
               timeout=120)
    assert r.status_code == 200, r.text
    display = r.json()["data"]["display"]
    assert "PROBE" in display, display
    return json.loads(display.split("PROBE", 1)[1].strip().splitlines()[0])  # type: ignore[no-any-return]


def session(url: str, policy: dict[str, Any]) -> httpx.Client:
    c = httpx.Client(base_url=url, timeout=60)
    r = c.post("/get_cookie", json={"egress": policy})
    assert r.status_code == 200, r.text
    return c


@pytest.fixture
def net() -> Any:
    with internet(["allowed.test", "other.test"], shared=("a.shared.test", "b.shared.test")) as n:
        yield n


def enforcing(start_manager: Any, net: Internet, **over: Any) -> Any:
    return start_manager(egress={"enforce": True, "upstream_dns": [net.dns], "client_may_set": True}, **over)


def test_only_what_an_allowed_name_resolved_to_is_reachable(start_manager, net: Internet, manager_id: str) -> None:
    m = enforcing(start_manager, net)
    c = session(m.url, {"default": "deny", "allow": ["allowed.test"]})
    allowed, other = net.names["allowed.test"], net.names["other.test"]
    out = probe(c, ["dns", "allowed.test"], ["dns", "other.test"],
                ["http", "http://allowed.test/"],
                ["connect", other, 80], ["connect", net.spare, 443], ["http", f"http://{other}/", "allowed.test"])
    assert out[0]["rcode"] == 0
    assert out[1]["rcode"] == 3  # NXDOMAIN: the name never left the host
    assert out[2]["status"] == 200 and out[2]["body"]["addr"] == allowed, out[2]
    # an address no allowed name resolved to: refused at once, a reset, never a hang
    assert out[3]["what"] == "ECONNREFUSED" and out[3]["ms"] < 100, out[3]
    # a resolver of its own reached directly (DNS over HTTPS): refused the same way
    assert out[4]["what"] == "ECONNREFUSED" and out[4]["ms"] < 100, out[4]
    # claiming an allowed name in Host does not open another address
    assert "error" in out[5], out[5]
    table = nft.run(f"list table inet {nft.table_name(bridge_of(m))}\n")
    assert allowed in table and other not in table
    c.post("/release_session")


def test_a_session_is_handed_out_with_its_policy_already_in_force(start_manager, net: Internet,
                                                                    docker_client: Any) -> None:
    """get_cookie answers once the node's address and policy are in the firewall: a first call made at
    once must not race the agent's sync (a connection refused in full run f1, at load 7)."""
    m = enforcing(start_manager, net)
    other = net.names["other.test"]
    table = f"list table inet {nft.table_name(bridge_of(m))}\n"
    for _ in range(3):
        c = session(m.url, {"default": "deny", "allow": [f"{other}/32"]})
        seen = nft.run(table)  # at once: nothing waited for between the answer and this read
        (net_of_node,) = networks_of(docker_client, c.cookies["node_id"]).values()
        ip = net_of_node["IPAddress"]
        assert f"{ip} . {other}" in seen, f"{ip}'s allowed range not in the firewall when get_cookie answered"
        c.post("/release_session")


def test_a_session_resumed_from_the_archive_calls_out_on_its_first_call(start_manager, net: Internet,
                                                                        redis_client: Any, prefix: str) -> None:
    """An archived session comes back in a new container, at a new address: the call that brings it
    back runs only once that address has the session's policy in the firewall."""
    m = enforcing(start_manager, net, node={"idle_grace_seconds": 0, "tiers": {"archive_after_seconds": 1.5}},
                  checker={"interval_seconds": 0.3})
    other = net.names["other.test"]
    c = session(m.url, {"default": "deny", "allow": [f"{other}/32"]})
    key = f"{prefix}:node:{c.cookies['node_id']}"
    for _ in range(2):
        wait_for(lambda: redis_client.hget(key, "status") == b"archived", timeout=30, what="the session archived")
        out = probe(c, ["connect", other, 80])  # the call that resumes it
        assert out[0]["what"] == "connected", out
    c.post("/release_session")


def test_the_copies_of_a_fork_call_out_where_their_source_may_on_their_first_call(start_manager,
                                                                                  net: Internet) -> None:
    """A fork's copies take their source's policy and are handed out with it in the firewall."""
    m = enforcing(start_manager, net)
    other = net.names["other.test"]
    src = session(m.url, {"default": "deny", "allow": [f"{other}/32"]})
    r = src.post("/fork_session", json={"count": 2})
    assert r.status_code == 200, r.text
    for cid in r.json()["sessions"]:
        copy = httpx.Client(base_url=m.url, timeout=60, cookies={"node_id": cid})
        out = probe(copy, ["connect", other, 80], ["connect", net.spare, 443])
        assert out[0]["what"] == "connected" and out[1]["what"] == "ECONNREFUSED", out
        copy.post("/release_session")
    src.post("/release_session")


def assert_applied_within_a_second(url: str) -> None:
    """The feature's bound (issue 28: a change applied on the session's host within 1 s), held
    to what the host did: its agent's histogram from the change's event to its rules in force
    (measured 20-40 ms). The time seen from inside the node, which adds the node's polling and a
    tool call's round trip (jitter on a busy machine, not the host's work), is reported instead."""
    def observed() -> tuple[float, float]:
        text = httpx.get(f"{url}/metrics", timeout=10).text
        try:
            return (_metric(text, "toolserver_egress_policy_apply_seconds_sum"),
                    _metric(text, "toolserver_egress_policy_apply_seconds_count"))
        except AssertionError:  # not exported until a first observation
            return 0.0, 0.0

    total, count = wait_for(lambda: observed() if observed()[1] >= 1 else None, timeout=30,
                            what="the policy change applied on the session's host")
    report(f"egress policy change applied on the session's host: mean {total / count * 1000:.0f} ms "
           f"over {count:.0f} changes (event to rules in force)")
    assert total / count < 1.0, (total, count)


def bridge_of(m: Any) -> str:
    mid = m.cfg["manager_id"]
    return BRIDGE_PREFIXES["open"] + hashlib.sha256(mid.encode()).hexdigest()[:10]


@contextlib.contextmanager
def listening(addr: str) -> Iterator[int]:
    """A host service on one of the host's addresses (what the platform set must keep nodes off)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, 0))
    s.listen(16)
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


def test_a_policy_change_is_in_force_within_a_second(start_manager, net: Internet) -> None:
    m = enforcing(start_manager, net)
    c = session(m.url, {"default": "deny", "allow": ["allowed.test"]})
    node_id = c.cookies["node_id"]
    assert "error" in probe(c, ["http", "http://other.test/"])[0]
    result: list[Any] = []
    # the node tries other.test every 10 ms while the admin opens it; the first success is timed
    t = threading.Thread(target=lambda: result.append(probe(c, ["wait_http", "http://other.test/", 20])[0]))
    t.start()
    time.sleep(1.0)  # lets the node's loop start; the figure below is measured from the change
    t0 = time.time()
    r = httpx.put(f"{m.url}/admin/nodes/{node_id}/egress", headers=ADMIN,
                  json={"default": "deny", "allow": ["allowed.test", "other.test"]})
    assert r.status_code == 200, r.text
    t.join()
    assert "at" in result[0], result
    took = result[0]["at"] - t0
    report(f"egress policy change in force in the node {took * 1000:.0f} ms after the PUT")
    assert_applied_within_a_second(m.url)
    # and taken away again: the learned address closes at once, not at its TTL
    r = httpx.put(f"{m.url}/admin/nodes/{node_id}/egress", headers=ADMIN,
                  json={"default": "deny", "allow": ["allowed.test"]})
    assert r.status_code == 200
    out = probe(c, ["connect", net.names["other.test"], 80], ["dns", "other.test"])
    assert out[0]["what"] == "ECONNREFUSED" and out[1]["rcode"] == 3, out
    c.post("/release_session")


def test_the_platform_deny_set_holds_against_a_rule_that_opens_everything(
        start_manager, net: Internet, manager_id: str, docker_client: docker.DockerClient) -> None:
    m = enforcing(start_manager, net)
    c = session(m.url, {"default": "deny", "allow": ["0.0.0.0/0"]})
    gw = bridge_gateway(docker_client, f"tsm-{manager_id}-open")
    with listening(gw) as on_gw, listening(net.host_ip) as on_host:
        out = probe(c, ["connect", net.names["other.test"], 80],  # the rule does open the outside
                    ["connect", gw, on_gw], ["connect", net.host_ip, on_host], ["connect", gw, 6380],
                    ["connect", "169.254.169.254", 80], ["dns", "allowed.test"])
    assert out[0]["what"] == "connected", out
    for o in out[1:5]:
        assert o["what"] in ("ECONNREFUSED", "EHOSTUNREACH", "ENETUNREACH") and o["ms"] < 100, out
    assert out[5]["rcode"] == 3  # a range rule opens addresses, not names: still only what a name rule allows
    c.post("/release_session")


def test_a_shared_address_opens_only_the_name_that_resolved(start_manager, net: Internet) -> None:
    m = enforcing(start_manager, net)
    c = session(m.url, {"default": "deny", "allow": ["a.shared.test"]})
    shared = net.names["a.shared.test"]
    assert shared == net.names["b.shared.test"]
    out = probe(c, ["http", "http://a.shared.test/"],
                ["http", f"http://{shared}/", "b.shared.test"],
                ["tls", shared, 443, "a.shared.test", "a.shared.test"],
                ["tls", shared, 443, "b.shared.test", "b.shared.test"],
                ["two_requests", shared, "a.shared.test", "b.shared.test"],
                ["dns", "b.shared.test"])
    assert out[0]["status"] == 200 and out[0]["body"]["host"] == "a.shared.test", out[0]
    # the other name on the same, now open, address: refused by the proxy (Host, then SNI)
    assert "error" in out[1] and "Connection reset" in out[1]["error"], out[1]
    assert '"host": "a.shared.test"' in out[2].get("body", ""), out[2]
    assert "error" in out[3], out[3]
    # a second request on a checked connection never reaches the server under another name
    assert '"host": "a.shared.test"' in out[4]["data"] and "b.shared.test" not in out[4]["data"], out[4]
    assert out[5]["rcode"] == 3
    c.post("/release_session")


def test_refusals_are_audited_as_events_rate_limited_and_counted(start_manager, net: Internet) -> None:
    from websockets.sync.client import connect

    m = start_manager(egress={"enforce": True, "upstream_dns": [net.dns], "audit_events_per_minute": 5})
    c = httpx.Client(base_url=m.url, timeout=60)
    assert c.post("/get_cookie").status_code == 200
    node_id = c.cookies["node_id"]
    r = httpx.put(f"{m.url}/admin/nodes/{node_id}/egress", headers=ADMIN,
                  json={"default": "deny", "allow": ["a.shared.test"]})
    assert r.status_code == 200
    # a loop of refusals: 20 names outside the policy, and one other name on the shared address
    out = probe(c, *[["dns", "other.test"] for _ in range(20)], ["http", "http://a.shared.test/"],
                ["http", f"http://{net.names['b.shared.test']}/", "b.shared.test"])
    assert all(o["rcode"] == 3 for o in out[:20]) and out[20]["status"] == 200 and "error" in out[21], out[20:]

    def refused_events() -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        with connect(m.url.replace("http", "ws") + "/ws/events?last_event_id=0", additional_headers=ADMIN) as ws:
            while True:
                try:
                    ev = json.loads(ws.recv(timeout=1))
                except TimeoutError:
                    return got
                if ev.get("event") == "egress_refused" and ev.get("node_id") == node_id:
                    got.append(ev)

    # the admin API's event stream has them, at most the allowance of the minute
    evs = refused_events()
    assert len(evs) == 5, evs
    assert evs[0]["detail"] == "where=dns name=other.test rule='default deny'", evs[0]
    metrics = httpx.get(f"{m.url}/metrics").text
    assert _metric(metrics, 'toolserver_egress_refused_total{where="dns"}') == 20
    assert _metric(metrics, 'toolserver_egress_refused_total{where="proxy"}') == 1
    assert _metric(metrics, "toolserver_egress_audit_events_dropped_total") == 16
    assert _metric(metrics, 'toolserver_egress_policy_changes_total{by="admin"}') == 1
    assert _metric(metrics, "toolserver_egress_policy_apply_seconds_count") == 1
    c.post("/release_session")


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no {name} in /metrics")


def test_a_change_made_on_one_host_is_in_force_on_the_sessions_host(start_manager, net: Internet,
                                                                     manager_id_b: str) -> None:
    # two manager_ids (two engines' scopes, as two hosts are) on this machine: the change goes to a
    # replica of A, the session is B's; B's agent follows the stream and applies it on its bridge
    egress = {"enforce": True, "upstream_dns": [net.dns], "client_may_set": True}
    a = start_manager(egress=egress)
    b = start_manager(name="b", mid=manager_id_b, egress=egress, cluster={"placement": "local"})
    c = session(b.url, {"default": "deny", "allow": ["allowed.test"]})
    node_id = c.cookies["node_id"]
    assert httpx.get(f"{a.url}/admin/nodes/{node_id}", headers=ADMIN).json()["record"]["manager_id"] == manager_id_b
    assert probe(c, ["dns", "other.test"])[0]["rcode"] == 3
    result: list[Any] = []
    t = threading.Thread(target=lambda: result.append(probe(c, ["wait_http", "http://other.test/", 20])[0]))
    t.start()
    time.sleep(1.0)  # lets the node's loop start; the figure below is measured from the change
    t0 = time.time()
    r = httpx.put(f"{a.url}/admin/nodes/{node_id}/egress", headers=ADMIN,
                  json={"default": "deny", "allow": ["allowed.test", "other.test"]})
    assert r.status_code == 200, r.text
    t.join()
    assert "at" in result[0], result
    took = result[0]["at"] - t0
    report(f"egress policy change made on another manager_id in force in the node {took * 1000:.0f} ms after the PUT")
    assert_applied_within_a_second(b.url)
    c.post("/release_session")


SECRET_VALUE = "sk-test-" + "7f3a9c21d4e8b6a5"  # what must never be seen inside the node or in any view
BODY_VALUE = "body-secret-" + "c0ffee42d00d"  # a secret bound to bodies as well
SEARCH = r"""
import base64, json, os, sys
needle = base64.b64decode(sys.argv[1])
hits = []
for pid in os.listdir("/proc"):
    if pid.isdigit():
        try:
            if needle in open(f"/proc/{pid}/environ", "rb").read():
                hits.append(f"/proc/{pid}/environ")
        except OSError:
            pass
for root in ("/tmp", "/app", "/etc", "/home", "/root", "/run"):
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            try:
                if os.path.getsize(p) < 50_000_000 and needle in open(p, "rb").read():
                    hits.append(p)
            except OSError:
                pass
print("PROBE" + json.dumps([{"hits": hits, "env": os.environ.get("API_TOKEN", "")}]))
"""


def secrets_egress(net: Internet, tmp_path: Any, **over: Any) -> dict[str, Any]:
    """egress config for secrets: a cluster CA made here, the test internet's CA upstream."""
    if not (tmp_path / "ca.key").exists():
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
                        "ca.pem", "-days", "2", "-subj", "/CN=cluster egress CA"], cwd=tmp_path, check=True,
                       capture_output=True)
        (tmp_path / "upstream-ca.pem").write_text(net.ca_pem)
        # the nodes' bundle is the host's CAs plus ca_cert_file: the test internet's CA stands in,
        # there, for the public CAs a real host's certificate chains to (other.test is reached untouched)
        (tmp_path / "node-cas.pem").write_text((tmp_path / "ca.pem").read_text() + net.ca_pem)
    return {"enforce": True, "upstream_dns": [net.dns], "secrets_key": "test-secrets-key",
            "secret_env": {"API_TOKEN": "apitoken", "BODY_TOKEN": "bodytoken"},
            "ca_cert_file": str(tmp_path / "node-cas.pem"), "ca_key_file": str(tmp_path / "ca.key"),
            "upstream_ca_file": str(tmp_path / "upstream-ca.pem"), "ca_bundle_dir": str(tmp_path / "bundle"), **over}


def test_a_secret_reaches_only_its_bound_host_and_never_the_node(start_manager, net: Internet, tmp_path: Any,
                                                                 redis_client: Any, prefix: str) -> None:
    import base64

    from websockets.sync.client import connect

    m = start_manager(egress=secrets_egress(net, tmp_path))
    r = httpx.put(f"{m.url}/admin/secrets/apitoken", headers=ADMIN,
                  json={"value": SECRET_VALUE, "hosts": ["allowed.test"]})
    assert r.status_code == 200 and SECRET_VALUE not in r.text, r.text
    r = httpx.put(f"{m.url}/admin/secrets/bodytoken", headers=ADMIN,
                  json={"value": BODY_VALUE, "hosts": ["allowed.test"], "body": True})
    assert r.status_code == 200 and r.json()["body"] is True and BODY_VALUE not in r.text, r.text
    bad = httpx.put(f"{m.url}/admin/secrets/apitoken", headers=ADMIN, json={"value": "x", "hosts": ["10.0.0.0/8"]})
    assert bad.status_code == 400
    bad = httpx.put(f"{m.url}/admin/secrets/apitoken", headers=ADMIN,
                    json={"value": "x", "hosts": ["allowed.test"], "body": "yes"})
    assert bad.status_code == 400
    c = httpx.Client(base_url=m.url, timeout=60)
    assert c.post("/get_cookie").status_code == 200
    node_id = c.cookies["node_id"]
    r = httpx.put(f"{m.url}/admin/nodes/{node_id}/egress", headers=ADMIN,
                  json={"default": "deny", "allow": ["allowed.test", "other.test"]})
    assert r.status_code == 200
    out = probe(c, ["https_env", "https://allowed.test/"], ["https_env", "https://other.test/"],
                ["post_env", "https://allowed.test/", "BODY_TOKEN", "API_TOKEN"],
                ["post_env", "https://other.test/", "BODY_TOKEN", "API_TOKEN"], ["dns", "unlisted.test"],
                ["post_expect", "allowed.test", "BODY_TOKEN"])
    # in a body: replaced for the secret bound to bodies (its Content-Length rewritten: the server
    # read exactly the new body), not for the one bound to headers only, nor at another host
    sent = out[2].get("body", {})
    assert json.loads(sent.get("body", "{}")) == {"BODY_TOKEN": BODY_VALUE, "API_TOKEN": "tsm-secret:apitoken"}, out[2]
    assert sent["length"] == len(sent["body"].encode()), sent
    # a client that waits for 100 Continue before its body gets it from the proxy, which then
    # reads the body to replace in it
    assert json.loads(out[5].get("body", {}).get("body", "{}")) == {"BODY_TOKEN": BODY_VALUE}, out[5]
    assert json.loads(out[3].get("body", {}).get("body", "{}")) == {
        "BODY_TOKEN": "tsm-secret:bodytoken", "API_TOKEN": "tsm-secret:apitoken"}, out[3]
    # the bound host got the value, over TLS the node verified against the cluster CA it trusts
    assert out[0].get("body", {}).get("authorization") == f"Bearer {SECRET_VALUE}", out[0]
    # another host gets the placeholder as the node sent it
    assert out[1].get("body", {}).get("authorization") == "Bearer tsm-secret:apitoken", out[1]
    # inside the node: no environment, no file holds the value
    for value in (SECRET_VALUE, BODY_VALUE):
        cmd = f"python3 -c {shlex.quote(SEARCH)} {base64.b64encode(value.encode()).decode()}"
        r = c.post("/execute_tool", json={"tool_name": "shell_command_executor", "arguments": {"command": cmd}},
                   timeout=120)
        found = json.loads(r.json()["data"]["display"].split("PROBE", 1)[1].strip().splitlines()[0])[0]
        assert found == {"hits": [], "env": "tsm-secret:apitoken"}, found
    # the use and the unbound attempt are events; no view, event, log or metric holds the value
    seen = []
    with connect(m.url.replace("http", "ws") + "/ws/events?last_event_id=0", additional_headers=ADMIN) as ws:
        while True:
            try:
                seen.append(ws.recv(timeout=1))
            except TimeoutError:
                break
    details = [json.loads(e).get("detail", "") for e in seen]
    assert "secret=used name=apitoken host=allowed.test" in details, details
    assert "secret=unbound name=apitoken host=other.test" in details, details
    assert "secret=used name=bodytoken host=allowed.test" in details, details
    assert "secret=unbound name=bodytoken host=other.test" in details, details
    for path in ("/admin/secrets", f"/admin/nodes/{node_id}", "/admin/config", "/admin/nodes"):
        seen.append(httpx.get(m.url + path, headers=ADMIN).text)
    seen += [httpx.get(m.url + "/metrics").text, m.logs()]
    seen += [str(v) for v in redis_client.hgetall(f"{prefix}:egress:secrets").values()]
    seen.append(console_egress_panel(m, node_id))
    assert any("apitoken" in s for s in seen)
    assert not [s[:200] for s in seen if SECRET_VALUE in s or BODY_VALUE in s]
    c.post("/release_session")


def test_a_secret_in_a_chunked_or_large_body_is_replaced_as_it_streams(start_manager, net: Internet,
                                                                        tmp_path: Any) -> None:
    # bodies the proxy cannot read whole (chunked, over 1 MiB) are streamed through a bounded
    # buffer: a placeholder split across two chunks, or across two reads at the 1 MiB mark, is
    # still replaced for the bound host; another host gets every byte as the node sent it
    m = start_manager(egress=secrets_egress(net, tmp_path, client_may_set=True))
    r = httpx.put(f"{m.url}/admin/secrets/bodytoken", headers=ADMIN,
                  json={"value": BODY_VALUE, "hosts": ["allowed.test"], "body": True})
    assert r.status_code == 200, r.text
    c = session(m.url, {"default": "deny", "allow": ["allowed.test", "other.test"]})
    out = probe(c, ["post_streamed", "allowed.test", "chunked"], ["post_streamed", "other.test", "chunked"],
                ["post_streamed", "allowed.test", "length"], ["post_streamed", "other.test", "length"])
    ph, value = b"tsm-secret:bodytoken", BODY_VALUE.encode()
    small = b'{"a": "%s", "b": "%s"}'
    assert out[0]["got"]["body"] == (small % (value, value)).decode() and out[0]["got"]["chunked"], out[0]
    assert out[1]["got"]["body"] == (small % (ph, ph)).decode(), out[1]
    at, size = (1 << 20) - 5, 1 << 21
    big = b"a" * at + value + b" " + b"b" * (size - at - 2 * len(ph) - 1) + value
    assert out[2]["got"]["sha256"] == hashlib.sha256(big).hexdigest(), out[2]
    assert out[2]["got"]["length"] == len(big) and out[2]["got"]["chunked"], out[2]  # re-framed: its length changed
    # unbound: the bytes and their framing as sent (Content-Length kept)
    assert out[3]["got"]["sha256"] == out[3]["sent"] and not out[3]["got"]["chunked"], out[3]
    assert out[3]["got"]["length"] == size, out[3]
    # recorded once the body's end went upstream, which may be after the node has its answer
    wait_for(lambda: "secret=unbound name=bodytoken host=other.test" in m.logs(), what="the unbound use logged")
    wait_for(lambda: m.logs().count("secret=used name=bodytoken host=allowed.test") >= 2, what="the uses logged")
    assert BODY_VALUE not in m.logs()
    c.post("/release_session")


def console_egress_panel(m: Any, node_id: str) -> str:
    """The console's session page as an admin sees it: its egress panel shows the policy, the
    refusal and the secret uses (names and hosts); the page's whole text is returned to search."""
    from playwright.sync_api import sync_playwright

    from tests.test_console import CHROMIUM, logged_in

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = logged_in(browser.new_context(), m.console_url)
            page.goto(m.console_url + f"/ui/#/session/{node_id}")
            page.wait_for_selector("#egress-policy:has-text('\"default\": \"deny\"')", timeout=60000)
            page.wait_for_selector("#egress-policy:has-text('other.test')", timeout=60000)
            page.wait_for_selector("#egress-denials:has-text('where=dns name=unlisted.test')", timeout=60000)
            page.wait_for_selector("#egress-secrets:has-text('secret=used name=apitoken host=allowed.test')",
                                   timeout=60000)
            page.wait_for_selector("#egress-secrets:has-text('secret=unbound name=bodytoken host=other.test')",
                                   timeout=60000)
            return str(page.content()) + page.inner_text("body")
        finally:
            browser.close()


def test_a_standby_replica_takes_the_resolver_over_when_its_holder_stops(start_manager, net: Internet) -> None:
    # two replicas of one manager_id (workers, or pods on one engine) share the bridge: one serves
    # the resolver and the proxy, the other stands by and binds them once they are free
    egress = {"enforce": True, "upstream_dns": [net.dns], "client_may_set": True}
    first = start_manager(egress=egress)
    wait_for(lambda: "egress_resolver_serving" in first.logs(), what="the first replica serving")
    second = start_manager(name="second", egress=egress)
    wait_for(lambda: "egress_resolver_standby" in second.logs(), what="the second replica standing by")
    c = session(second.url, {"default": "deny", "allow": ["allowed.test"]})
    assert probe(c, ["http", "http://allowed.test/"])[0].get("status") == 200
    first.stop()
    wait_for(lambda: "egress_resolver_serving" in second.logs(), what="the standby taking over")
    allowed = net.names["allowed.test"]
    out = probe(c, ["dns", "other.test"], ["http", "http://allowed.test/"],
                ["connect", net.names["other.test"], 80],
                # 443's queue is read by the replica that took over (an unread one resets everything)
                ["tls", allowed, 443, "allowed.test", "allowed.test"], ["tls", allowed, 443, "other.test", "other.test"])
    assert out[0]["rcode"] == 3 and out[1].get("status") == 200 and out[2]["what"] == "ECONNREFUSED", out
    assert '"host": "allowed.test"' in out[3].get("body", "") and "error" in out[4], out
    assert "egress_tlsqueue_bound" in second.logs()
    c.post("/release_session")


def test_a_standby_that_takes_over_from_a_killed_holder_knows_what_it_learned(start_manager, net: Internet) -> None:
    # the holder is killed (-9: nothing said, nothing cleaned): the standby reads from Redis what
    # it had learned, so a stream opened before the takeover is cut when its name is taken away,
    # and an address resolved before it is let on at the proxy for that name (not another one)
    egress = {"enforce": True, "upstream_dns": [net.dns], "client_may_set": True}
    first = start_manager(egress=egress)
    wait_for(lambda: "egress_resolver_serving" in first.logs(), what="the first replica serving")
    second = start_manager(name="second", egress=egress)
    wait_for(lambda: "egress_resolver_standby" in second.logs(), what="the second replica standing by")
    c = session(second.url, {"default": "deny", "allow": ["other.test", "a.shared.test"]})
    node_id = c.cookies["node_id"]
    other, shared = net.names["other.test"], net.names["a.shared.test"]
    out = probe(c, ["dns", "other.test"], ["dns", "a.shared.test"])
    assert out[0]["rcode"] == 0 and out[1]["rcode"] == 0, out
    result: list[Any] = []
    # on a port the proxy does not take: the firewall alone holds this stream, past the kill
    t = threading.Thread(target=lambda: result.append(probe(c, ["drip", other, ALT_PORT, "other.test", 60])[0]))
    t.start()
    wait_for(lambda: _streams(net, ALT_PORT) >= 1, timeout=60, what="the node's stream open")
    first.kill()
    wait_for(lambda: "egress_resolver_serving" in second.logs(), timeout=30, what="the standby taking over")
    t0 = time.time()
    r = httpx.put(f"{second.url}/admin/nodes/{node_id}/egress", headers=ADMIN,
                  json={"default": "deny", "allow": ["a.shared.test"]})
    assert r.status_code == 200, r.text
    t.join()
    out = result[0]
    report(f"egress: a stream opened before a takeover cut {(out['died'] - t0) * 1000:.0f} ms after the narrowing")
    # reset long before its own 60 s (5 s: 10x the 0.05-0.4 s measured for a cut)
    assert out["how"] == "ConnectionResetError" and out["bytes"] > 0 and 0 < out["died"] - t0 < 5.0, out
    # no new DNS query: the name asked for resolved to this address before the takeover
    out = probe(c, ["http", f"http://{shared}/", "a.shared.test"], ["http", f"http://{shared}/", "b.shared.test"],
                ["connect", other, ALT_PORT])
    assert out[0].get("status") == 200 and out[0]["body"]["host"] == "a.shared.test", out[0]
    assert "error" in out[1] and "Connection reset" in out[1]["error"], out[1]
    assert out[2]["what"] == "ECONNREFUSED", out[2]
    c.post("/release_session")


def _streams(net: Internet, port: int = 80) -> int:
    """Connections the test internet's servers hold open on a port."""
    out = subprocess.run(["ip", "netns", "exec", net.ns, "ss", "-Htn", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout
    return len([line for line in out.splitlines() if line.strip()])


@pytest.mark.parametrize("path", ["proxy", "forward"])
def test_narrowing_a_policy_cuts_connections_already_open(start_manager, net: Internet, path: str) -> None:
    # a download open while the policy is narrowed must not run on: through the host proxy (a
    # name's learned address on 80) and straight through the firewall (an allowed range)
    m = enforcing(start_manager, net)
    other = net.names["other.test"]
    if path == "proxy":
        c = session(m.url, {"default": "deny", "allow": ["other.test"]})
        assert probe(c, ["dns", "other.test"])[0]["rcode"] == 0
    else:
        c = session(m.url, {"default": "deny", "allow": [f"{other}/32"]})
    node_id = c.cookies["node_id"]
    result: list[Any] = []
    t = threading.Thread(target=lambda: result.append(probe(c, ["drip", other, 80, "other.test", 60])[0]))
    t.start()
    wait_for(lambda: _streams(net) >= 1, timeout=60, what="the node's stream open")
    t0 = time.time()
    r = httpx.put(f"{m.url}/admin/nodes/{node_id}/egress", headers=ADMIN, json={"default": "deny"})
    assert r.status_code == 200, r.text
    t.join()
    out = result[0]
    took = out["died"] - t0
    report(f"egress: an open connection ({path}) cut {took * 1000:.0f} ms after the policy narrowed")
    # reset, not a clean end (which a client would take for a whole download), long before the
    # stream's own 60 s: the host applied the change (and cut) within the feature's 1 s, and the
    # node saw it within 5 s (10x the 0.05-0.3 s measured: a busy machine's jitter is not a fault)
    assert out["how"] == "ConnectionResetError" and out["bytes"] > 0, out
    assert 0 < took < 5.0, out
    assert_applied_within_a_second(m.url)
    c.post("/release_session")


def test_dns_over_tcp_and_no_ipv6(start_manager, net: Internet) -> None:
    # a query over TCP is decided as one over UDP; an answer too big for UDP is fetched whole over
    # TCP upstream and every address in it opened; nodes have no IPv6, and AAAA answers carry none
    m = enforcing(start_manager, net)
    c = session(m.url, {"default": "deny", "allow": ["allowed.test", MANY]})
    out = probe(c, ["dns_tcp", "allowed.test"], ["dns_tcp", "other.test"], ["dns_tcp", MANY],
                ["dns", MANY], ["http", "http://allowed.test/"],
                ["dns", "allowed.test", 28], ["dns_tcp", "allowed.test", 28], ["dns", "other.test", 28], ["ipv6"])
    assert out[0]["rcode"] == 0 and out[0]["answers"] == 1, out[0]
    assert out[1]["rcode"] == 3, out[1]  # NXDOMAIN over TCP too
    assert out[2]["rcode"] == 0 and out[2]["answers"] == MANY_RECORDS and not out[2]["tc"], out[2]
    assert out[3]["rcode"] == 0 and out[3]["tc"], out[3]  # over UDP: truncated, the client retries on TCP
    assert out[4].get("status") == 200, out[4]
    table = nft.run(f"list set inet {nft.table_name(bridge_of(m))} learned\n")
    assert all(f"203.0.113.{i} " in table for i in range(1, MANY_RECORDS + 1)), table
    # the name is allowed and has AAAA records upstream: the node gets an empty answer, not a
    # dead IPv6 address to try first; an unlisted name is NXDOMAIN whatever its type
    assert out[5] == {"rcode": 0, "answers": 0, "tc": False}, out[5]
    assert out[6] == {"rcode": 0, "answers": 0, "tc": False}, out[6]
    assert out[7]["rcode"] == 3, out[7]
    assert out[8]["addresses"] == [] and out[8]["connect"] in ("ENETUNREACH", "EADDRNOTAVAIL", "EAFNOSUPPORT"), out[8]
    c.post("/release_session")


def test_the_secrets_key_rotates_old_sealed_secrets_stay_usable(start_manager, net: Internet, tmp_path: Any,
                                                                 redis_client: Any, prefix: str) -> None:
    old_key, new_key = "old-key-" + "5e1f", "new-key-" + "9a7b"
    a = start_manager(name="a", egress=secrets_egress(net, tmp_path, secrets_key=old_key))
    r = httpx.put(f"{a.url}/admin/secrets/apitoken", headers=ADMIN, json={"value": SECRET_VALUE, "hosts": ["allowed.test"]})
    assert r.status_code == 200, r.text
    sealed_old = redis_client.hget(f"{prefix}:egress:secrets", "apitoken")
    a.stop()
    # the new key in place, the old one still read: the secret sealed under it is used as before
    b = start_manager(name="b", egress=secrets_egress(net, tmp_path, secrets_key=new_key, secrets_old_keys=[old_key]))
    listed = httpx.get(f"{b.url}/admin/secrets", headers=ADMIN).json()["secrets"]
    assert [(s["name"], s["sealed_with"]) for s in listed] == [("apitoken", "old")], listed
    c = httpx.Client(base_url=b.url, timeout=60)
    assert c.post("/get_cookie").status_code == 200
    node_id = c.cookies["node_id"]
    r = httpx.put(f"{b.url}/admin/nodes/{node_id}/egress", headers=ADMIN, json={"default": "deny", "allow": ["allowed.test"]})
    assert r.status_code == 200
    out = probe(c, ["https_env", "https://allowed.test/"])
    assert out[0].get("body", {}).get("authorization") == f"Bearer {SECRET_VALUE}", out[0]
    # rotated: sealed again under the new key (a new sealed form), which alone opens it from now on
    r = httpx.post(f"{b.url}/admin/secrets/rotate", headers=ADMIN)
    assert r.status_code == 200 and r.json()["resealed"] == ["apitoken"], r.text
    assert httpx.post(f"{b.url}/admin/secrets/rotate", headers=ADMIN).json()["current"] == ["apitoken"]
    assert redis_client.hget(f"{prefix}:egress:secrets", "apitoken") != sealed_old
    config = httpx.get(f"{b.url}/admin/config", headers=ADMIN).text
    assert old_key not in config and new_key not in config, config
    b.stop()
    n = start_manager(name="n", egress=secrets_egress(net, tmp_path, secrets_key=new_key))
    listed = httpx.get(f"{n.url}/admin/secrets", headers=ADMIN).json()["secrets"]
    assert [(s["name"], s["sealed_with"]) for s in listed] == [("apitoken", "current")], listed
    c = httpx.Client(base_url=n.url, timeout=60, cookies={"node_id": node_id})
    wait_for(lambda: "egress_resolver_serving" in n.logs(), timeout=30, what="the new replica's resolver")
    out = probe(c, ["https_env", "https://allowed.test/"])
    assert out[0].get("body", {}).get("authorization") == f"Bearer {SECRET_VALUE}", out[0]
    c.post("/release_session")
