"""`scripts/firewall.sh install|show|remove` for real, in network namespaces of the test's own:
a "host" with a node bridge (named as the backend names them) and a node behind it, and a
private network beyond the host. The machine's own tables are never touched."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.conftest import ROOT

CHAINS = ("TSM-INPUT", "TSM-FORWARD", "TSM-ALLOW", "TSM-DNS")
PROBE = r"""
import errno, socket, sys
s = socket.socket()
s.settimeout(3)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    print("connected")
except socket.timeout:
    print("timeout")
except OSError as exc:
    print(errno.errorcode.get(exc.errno, type(exc).__name__))
"""
LISTEN = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(16)
print("listening", flush=True)
while True:
    s.accept()[0].close()
"""
PORT = 8765


def sh(*cmd: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["ip", "netns", "exec", ns, *cmd] if ns else list(cmd)
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=60)


@dataclass
class Net:
    host: str  # the namespace with the bridge and the firewall: what the script runs in
    node: str  # a node behind the bridge
    private: str  # something on a private range beyond the host

    def iptables(self, *args: str) -> str:
        return sh("iptables", *args, ns=self.host).stdout

    def firewall(self, command: str) -> subprocess.CompletedProcess[str]:
        return sh("bash", str(ROOT / "scripts" / "firewall.sh"), command, ns=self.host, check=False)

    def probe(self, address: str) -> str:
        return sh("python3", "-c", PROBE, address, str(PORT), ns=self.node).stdout.strip()


@pytest.fixture
def net() -> Iterator[Net]:
    tag = uuid.uuid4().hex[:6]
    n = Net(f"tsmfw-h-{tag}", f"tsmfw-n-{tag}", f"tsmfw-p-{tag}")
    listeners: list[subprocess.Popen[str]] = []
    try:
        for ns in (n.host, n.node, n.private):
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "set", "lo", "up", ns=ns)
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=n.host)
        bridge = f"tsmo{tag}"  # a node bridge with egress open, as the backend names them
        sh("ip", "link", "add", bridge, "type", "bridge", ns=n.host)
        sh("ip", "addr", "add", "10.201.0.1/24", "dev", bridge, ns=n.host)
        sh("ip", "link", "set", bridge, "up", ns=n.host)
        for peer, ns, addr, gw, attach in (("n", n.node, "10.201.0.2/24", "10.201.0.1", bridge),
                                           ("p", n.private, "10.202.0.2/24", "10.202.0.1", None)):
            outer, inner = f"fw{peer}h{tag}", f"fw{peer}c{tag}"
            sh("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
            sh("ip", "link", "set", outer, "netns", n.host)
            sh("ip", "link", "set", inner, "netns", ns)
            if attach:
                sh("ip", "link", "set", outer, "master", attach, ns=n.host)
            else:
                sh("ip", "addr", "add", "10.202.0.1/24", "dev", outer, ns=n.host)
            sh("ip", "link", "set", outer, "up", ns=n.host)
            sh("ip", "addr", "add", addr, "dev", inner, ns=ns)
            sh("ip", "link", "set", inner, "up", ns=ns)
            sh("ip", "route", "add", "default", "via", gw, ns=ns)
        for ns in (n.host, n.private):  # a service on the host, one on the private network
            p = subprocess.Popen(["ip", "netns", "exec", ns, "python3", "-c", LISTEN, str(PORT)],
                                 stdout=subprocess.PIPE, text=True)
            listeners.append(p)
            assert p.stdout is not None and p.stdout.readline().strip() == "listening"
        yield n
    finally:
        for p in listeners:
            p.kill()
            p.wait()
        for ns in (n.host, n.node, n.private):
            sh("ip", "netns", "del", ns, check=False)


def test_firewall_script_installs_shows_and_removes_exactly_its_rules(net: Net) -> None:
    # the namespace's own rules, which the script must leave as they are
    net.iptables("-N", "USER-CHAIN")
    net.iptables("-A", "INPUT", "-p", "tcp", "--dport", "2222", "-j", "ACCEPT")
    net.iptables("-A", "FORWARD", "-j", "USER-CHAIN")
    before = net.iptables("-S")
    # without the rules a node reaches the host and a private network beyond it
    assert net.probe("10.201.0.1") == "connected"
    assert net.probe("10.202.0.2") == "connected"

    r = net.firewall("install")
    assert r.returncode == 0, r.stderr
    installed = net.iptables("-S")
    for chain in CHAINS:
        assert f"-N {chain}\n" in installed
    # no DOCKER-USER here (an engine without iptables): the forward chain hangs off FORWARD
    assert "-A INPUT -j TSM-INPUT" in installed and "-A FORWARD -j TSM-FORWARD" in installed
    # the egress resolver's openings are looked at before TSM-INPUT refuses what nodes open to the host
    assert installed.index("-A INPUT -j TSM-DNS") < installed.index("-A INPUT -j TSM-INPUT")
    assert set(before.splitlines()) <= set(installed.splitlines())
    # refused at once: a reset, not a timeout
    assert net.probe("10.201.0.1") == "ECONNREFUSED"
    assert net.probe("10.202.0.2") == "ECONNREFUSED"

    assert net.firewall("install").returncode == 0
    assert net.iptables("-S") == installed  # idempotent: nothing added twice
    shown = net.firewall("show")
    assert shown.returncode == 0 and shown.stdout == "".join(net.iptables("-S", c) for c in CHAINS)

    r = net.firewall("remove")
    assert r.returncode == 0, r.stderr
    assert net.iptables("-S") == before  # exactly what install added is gone, nothing else
    assert net.probe("10.201.0.1") == "connected"
    assert net.firewall("frobnicate").returncode == 2
