"""443 of deny-by-default sessions checked in the kernel's packet queue (egress.tls_queue,
shared/egress/tlsqueue.py), on the real engine against the small internet (testing/internet.py):
the SNI decides as the proxy's check did, and an allowed connection is forwarded by the kernel."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest

from testing.harness import report
from testing.internet import Internet, internet
from tests.conftest import ADMIN_TOKEN, wait_for
from tests.test_egress_enforce import enforcing, session
from tests.test_egress_enforce import probe as enforce_probe

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

# run inside the node (its python): each step's outcome, as JSON after "PROBE"
TLS_PROBE = r"""
import json, socket, ssl, sys, time

def _ctx():
    ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
    return ctx

def tls_split(addr, sni, cuts):
    # the ClientHello in len(cuts) + 1 writes with TCP_NODELAY (one segment each), then HTTP over it
    inb, outb = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = _ctx().wrap_bio(inb, outb, server_hostname=sni)
    s = socket.create_connection((addr, 443), 5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.settimeout(15)
    sent = 0.0
    try:
        try:
            obj.do_handshake()
        except ssl.SSLWantReadError:
            pass
        hello = outb.read()
        for i, (a, b) in enumerate(zip([0, *cuts], [*cuts, len(hello)])):
            if i:
                time.sleep(0.05)  # the part before has left as a segment of its own
            s.sendall(hello[a:b]); sent = time.monotonic()
        while True:
            try:
                obj.do_handshake(); break
            except ssl.SSLWantReadError:
                data = s.recv(65536)
                if not data:
                    raise ConnectionError("closed")
                inb.write(data)
            s.sendall(outb.read())
        obj.write(f"GET / HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n".encode())
        s.sendall(outb.read())
        body = b""
        while b"}" not in body:
            try:
                body += obj.read(65536)
            except ssl.SSLWantReadError:
                data = s.recv(65536)
                if not data:
                    break
                inb.write(data)
        return {"hello": len(hello), "body": body.decode(errors="replace")}
    except OSError as exc:
        return {"error": type(exc).__name__, "ms": (time.monotonic() - sent) * 1000 if sent else -1}
    finally:
        s.close()

def tls_drip(addr, sni, limit):
    # TLS over memory buffers on a plain socket: a reset is then ConnectionResetError, as the
    # kernel said it, not whatever the TLS layer makes of a ragged end
    inb, outb = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = _ctx().wrap_bio(inb, outb, server_hostname=sni)
    s = socket.create_connection((addr, 443), 5)
    s.settimeout(limit)
    got, how = 0, ""
    try:
        while True:
            try:
                obj.do_handshake(); break
            except ssl.SSLWantReadError:
                s.sendall(outb.read())
                data = s.recv(65536)
                if not data:
                    raise ConnectionError("closed in the handshake")
                inb.write(data)
        obj.write(f"GET /drip/{limit} HTTP/1.1\r\nHost: {sni}\r\n\r\n".encode())
        s.sendall(outb.read())
        while True:
            data = s.recv(65536)
            if not data:
                how = "eof"
                break
            inb.write(data)
            try:
                while True:
                    got += len(obj.read(65536))
            except ssl.SSLWantReadError:
                pass
    except ssl.SSLZeroReturnError:
        how = "eof"
    except OSError as exc:
        how = type(exc).__name__
    s.close()
    return {"died": time.time(), "how": how, "bytes": got}

def dns(name):
    try:
        return {"addrs": sorted({a[4][0] for a in socket.getaddrinfo(name, 443, socket.AF_INET)})}
    except OSError as exc:
        return {"error": repr(exc)}

steps = json.loads(sys.argv[1])
print("PROBE" + json.dumps([globals()[s[0]](*s[1:]) for s in steps]))
"""

# run on the host in the node's network namespace (root there: a raw socket, TCP_REPAIR): a real
# connection to addr:443 whose ClientHello is sent as crafted segments, in an order or with
# contents no socket would send, or a SYN made by hand (modes syn, syndata); then whether the server
# answered ("answered"), took the SYN ("syn-ack") or the node's end was reset ("reset"). argv: addr,
# the SNI, the SNI of the contradicting copy, mode
RAW_PROBE = r"""
import json, socket, ssl, struct, sys, time
addr, sni, other, mode = sys.argv[1:5]
TCP_REPAIR, TCP_REPAIR_QUEUE, TCP_QUEUE_SEQ = 19, 20, 21

def hello(name):
    ctx = ssl.create_default_context(); inb, outb = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inb, outb, server_hostname=name)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outb.read()

def csum(data):
    data += b"\0" * (len(data) % 2)
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF

raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)

def send(sport, seq, ack, flags, payload):
    head = struct.pack("!HHIIBBHHH", sport, 443, seq, ack, 5 << 4, flags, 1024, 0, 0)
    pseudo = socket.inet_aton(src) + socket.inet_aton(addr) + struct.pack("!BBH", 0, 6, len(head) + len(payload))
    head = head[:16] + struct.pack("!H", csum(pseudo + head + payload)) + head[18:]
    raw.sendto(head + payload, (addr, 0))

if mode in ("syn", "syndata"):
    # a SYN made by hand, empty or carrying a ClientHello (TCP Fast Open's data, which a server
    # with it on reads before the handshake ends); the port held by a socket that never connects
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.connect((addr, 443)); src = u.getsockname()[0]
    holder = socket.socket(); holder.bind((src, 0)); sport = holder.getsockname()[1]
    send(sport, 0x10203040, 0, 0x02, hello(sni) if mode == "syndata" else b"")
else:
    s = socket.create_connection((addr, 443), 5)
    src, sport = s.getsockname()
    s.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
    s.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, 2); snd = s.getsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ) & 0xFFFFFFFF
    s.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, 1); rcv = s.getsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ) & 0xFFFFFFFF
    s.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 0)

def segment(offset, payload):
    send(sport, (snd + offset) & 0xFFFFFFFF, rcv, 0x18, payload)
    time.sleep(0.05)

h = hello(sni)
bad = h.replace(sni.encode(), other.encode())
cut = h.index(sni.encode()) + len(sni) + 8  # the first part holds the SNI
if mode == "inorder":
    segment(0, h[:cut]); segment(cut, h[cut:])
elif mode == "reorder":
    segment(cut, h[cut:]); segment(0, h[:cut])
elif mode == "contradict":  # the allowed name first, then the same bytes naming another
    segment(0, h[:cut]); segment(0, bad[:cut]); segment(cut, h[cut:])
# the node's own socket drops the server's answer (it acknowledges bytes that socket never sent):
# the raw socket sees every TCP packet that comes in, the answer or a reset
out, deadline = "nothing", time.monotonic() + 10
raw.settimeout(1)
while out == "nothing" and time.monotonic() < deadline:
    try:
        pkt = raw.recv(65536)
    except socket.timeout:
        continue
    ihl = (pkt[0] & 15) * 4
    p_sport, p_dport = struct.unpack_from("!HH", pkt, ihl)
    if (p_sport, p_dport) != (443, sport):
        continue
    flags, doff = pkt[ihl + 13], (pkt[ihl + 12] >> 4) * 4
    if flags & 0x04:
        out = "reset"
    elif flags & 0x12 == 0x12 and mode in ("syn", "syndata"):
        out = "syn-ack"  # the server took the SYN (the other modes' was their connection's own)
    elif pkt[ihl + doff:ihl + doff + 1] == b"\x16":
        out = "answered"
print("RAW" + json.dumps({"outcome": out}))
"""


def probe(c: httpx.Client, *steps: list[Any]) -> list[dict[str, Any]]:
    """Run TLS_PROBE's steps inside the cookie's node; their outcomes."""
    return enforce_probe(c, *steps, script=TLS_PROBE)


def raw_probe(docker_client: docker.DockerClient, node_id: str, *args: str) -> str:
    """RAW_PROBE in the node's network namespace; its outcome."""
    pid = docker_client.api.inspect_container(node_id)["State"]["Pid"]
    out = subprocess.run(["nsenter", "--target", str(pid), "--net", sys.executable, "-c", RAW_PROBE, *args],
                         capture_output=True, text=True, timeout=60)
    assert "RAW" in out.stdout, (out.stdout, out.stderr)
    return str(json.loads(out.stdout.split("RAW", 1)[1])["outcome"])


def checked(url: str) -> dict[str, float]:
    """The agent's count of ClientHellos checked in the queue, by verdict."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out = {"allowed": 0.0, "refused": 0.0}
    for line in text.splitlines():
        if line.startswith("toolserver_egress_tls_checked_total{"):
            out[line.split('verdict="', 1)[1].split('"', 1)[0]] = float(line.rsplit(" ", 1)[1])
    return out


def host_streams(addr: str) -> int:
    """TCP connections the host itself holds to addr:443 (the proxy's upstream ends; a connection
    the kernel forwards has none)."""
    out = subprocess.run(["ss", "-Htn", "state", "established", "dst", f"{addr}:443"],
                         capture_output=True, text=True, check=True).stdout
    return len([line for line in out.splitlines() if line.strip()])


@pytest.fixture
def net() -> Any:
    with internet(["allowed.test", "other.test"], shared=("a.shared.test", "b.shared.test")) as n:
        yield n


def test_sni_is_checked_in_the_queue_and_the_connection_forwarded_by_the_kernel(start_manager, net: Internet) -> None:
    m = enforcing(start_manager, net)
    c = session(m.url, {"default": "deny", "allow": ["allowed.test", "a.shared.test"]})
    shared, allowed = net.names["a.shared.test"], net.names["allowed.test"]
    out = probe(c, ["dns", "allowed.test"], ["dns", "a.shared.test"],
                ["tls_split", allowed, "allowed.test", []],
                ["tls_split", allowed, "allowed.test", [40]],  # split inside the record
                ["tls_split", shared, "b.shared.test", []],  # the other name on a shared address
                ["tls_split", shared, "b.shared.test", [40]],
                ["tls_split", shared, "allowed.test", []],  # an allowed name that did not resolve there
                ["tls_split", shared, "a.shared.test", [10, 200]])
    assert out[0]["addrs"] == [allowed] and out[1]["addrs"] == [shared], out
    for o in (out[2], out[3], out[7]):
        assert '"host": ' in o.get("body", ""), out
    for o in (out[4], out[5], out[6]):
        # a reset, not a hang (a held ClientHello is refused at 10 s): 0.1-45 ms measured, held to 1 s
        assert o.get("error") == "ConnectionResetError" and 0 <= o["ms"] < 1000, out
    report("egress tls queue: refusals seen by the node after its last ClientHello byte: "
           + ", ".join(f"{o['ms']:.1f} ms" for o in (out[4], out[5], out[6])))
    seen = wait_for(lambda: (v := checked(m.url))["refused"] >= 3 and v, timeout=30, what="the refusals counted")
    assert seen["allowed"] >= 3, seen
    # a download from an allowed name: no end of it on the host (the proxy's upstream would be one)
    result: list[Any] = []
    t = threading.Thread(target=lambda: result.append(probe(c, ["tls_drip", allowed, "allowed.test", 6])[0]))
    t.start()
    try:
        wait_for(lambda: checked(m.url)["allowed"] >= seen["allowed"] + 1, timeout=30, what="the drip checked")
        time.sleep(0.5)  # the stream is open (it runs 6 s)
        assert host_streams(allowed) == 0
    finally:
        t.join()
    assert result[0]["how"] == "eof" and result[0]["bytes"] > 0, result
    c.post("/release_session")


@pytest.mark.parametrize("mode,outcome", [("inorder", "answered"), ("reorder", "reset"), ("contradict", "reset"),
                                          ("syn", "syn-ack"), ("syndata", "reset")])
def test_crafted_segments_are_refused_unless_in_order_and_consistent(start_manager, net: Internet,
                                                                    docker_client: docker.DockerClient,
                                                                    mode: str, outcome: str) -> None:
    # in order (the control: the crafting itself works), out of order, or a retransmission whose
    # bytes name another host than the first copy's (the agent and the server could read two names);
    # a SYN carrying the ClientHello (TCP Fast Open), refused even for an allowed name, against an
    # empty SYN (the control)
    m = enforcing(start_manager, net)
    c = session(m.url, {"default": "deny", "allow": ["a.shared.test"]})
    shared = net.names["a.shared.test"]
    assert probe(c, ["dns", "a.shared.test"])[0]["addrs"] == [shared]
    assert raw_probe(docker_client, c.cookies["node_id"], shared, "a.shared.test", "b.shared.test", mode) == outcome
    c.post("/release_session")


def test_narrowing_cuts_a_connection_the_kernel_forwards(start_manager, net: Internet) -> None:
    # both names of a shared address resolved: taking one away leaves the address open for the
    # other, so only the connection's own entry, named after its SNI, can cut it
    m = enforcing(start_manager, net)
    c = session(m.url, {"default": "deny", "allow": ["a.shared.test", "b.shared.test"]})
    shared = net.names["a.shared.test"]
    out = probe(c, ["dns", "a.shared.test"], ["dns", "b.shared.test"])
    assert out[0]["addrs"] == out[1]["addrs"] == [shared], out
    before = checked(m.url)["allowed"]
    result: list[Any] = []
    t = threading.Thread(target=lambda: result.append(probe(c, ["tls_drip", shared, "a.shared.test", 60])[0]))
    t.start()
    wait_for(lambda: checked(m.url)["allowed"] > before, timeout=60, what="the node's stream checked")
    time.sleep(0.5)  # bytes flowing
    t0 = time.time()
    r = httpx.put(f"{m.url}/admin/nodes/{c.cookies['node_id']}/egress", headers=ADMIN,
                  json={"default": "deny", "allow": ["b.shared.test"]})
    assert r.status_code == 200, r.text
    t.join()
    out = result[0]
    took = out["died"] - t0
    report(f"egress tls queue: a kernel-forwarded connection cut {took * 1000:.0f} ms after the policy narrowed")
    # a reset (not a clean end) within 5 s (10x the 0.05-0.5 s measured), long before its own 60 s
    assert out["how"] == "ConnectionResetError" and out["bytes"] > 0, out
    assert 0 < took < 5.0, out
    # and a new connection for the name taken away is refused while the other name's still works
    out = probe(c, ["tls_split", shared, "a.shared.test", []], ["tls_split", shared, "b.shared.test", []])
    assert out[0].get("error") == "ConnectionResetError" and '"host": ' in out[1].get("body", ""), out
    c.post("/release_session")


def test_thousands_of_connections_are_looked_up_and_marked_at_once() -> None:
    # the agent asks about every connection it let on at each sync (thousands after a burst of
    # requests, closed ones in TIME_WAIT for 2 minutes): sent all at once they overflowed the
    # netlink socket (ENOBUFS), the sync failed, and policy changes waited for the next one
    from shared.egress.conntrack import Conntrack

    ct = Conntrack()
    try:
        made_up = [(f"10.250.{i // 250}.{i % 250 + 1}", 40000 + i % 20000, "198.51.100.250", 443) for i in range(5000)]
        assert ct.alive(made_up) == set()
        assert ct.set_mark(made_up, 0x08000000, 0x04000000) == 0
    finally:
        ct.close()


QUEUE_RULES = r"""
import json, subprocess
from shared import firewall as f
def mangle():
    return [line for line in subprocess.run(["iptables", "-t", "mangle", "-S"], capture_output=True, text=True,
                                            check=True).stdout.splitlines() if "TSM-" in line]
f.sync_queue("tsmoq1", 1234, 0x02000000)
f.sync_queue("tsmoq1", 1234, 0x02000000)  # again: nothing added twice
f.sync_queue("tsmoq2", 4321, 0x02000000)
once = mangle()
f.sync_queue("tsmoq1", None, 0x02000000)
without = mangle()
f.remove()
print("QUEUE" + json.dumps({"once": once, "without": without, "removed": mangle()}))
"""


def test_the_queue_rules_are_kept_exact_and_removed_with_the_rest() -> None:
    # in a network namespace of its own (unshare): the machine's tables are not touched
    out = subprocess.run(["unshare", "--net", sys.executable, "-c", QUEUE_RULES], capture_output=True, text=True,
                         timeout=60, cwd=str(Path(__file__).resolve().parents[1]))
    assert "QUEUE" in out.stdout, (out.stdout, out.stderr)
    got = json.loads(out.stdout.split("QUEUE", 1)[1])
    rule = "-j NFQUEUE --queue-num {} --queue-bypass"
    assert sorted(got["once"]) == sorted([
        "-N TSM-EGRESSQ", "-A FORWARD -j TSM-EGRESSQ",
        "-A TSM-EGRESSQ -i tsmoq1 -m mark --mark 0x2000000/0x2000000 " + rule.format(1234),
        "-A TSM-EGRESSQ -i tsmoq2 -m mark --mark 0x2000000/0x2000000 " + rule.format(4321)]), got
    assert not any("tsmoq1" in line for line in got["without"]) and any("tsmoq2" in line for line in got["without"])
    assert got["removed"] == [], got  # firewall.remove takes the chain and its jump away too
