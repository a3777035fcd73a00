"""A small "internet" for egress tests, in a network namespace of its own.

One namespace behind a veth pair, routed from the host like the outside world (198.51.x.0/28,
documentation addresses, routed nowhere else), holding several addresses: a DNS server (UDP and
TCP) that answers for a few names (two of them on one address; an AAAA record for each, as the
world has IPv6; ``MANY`` with more A records than a UDP answer holds), and on each address an
HTTP server on 80 (and ``ALT_PORT``) that answers with the Host it was asked for and the address it was reached at
(``/drip/N``: a stream for N seconds; POST: the body as it arrived), and the same over
HTTPS on 443 with a certificate for every name from a test CA (``Internet.ca_pem``); the one
address without a name stands for a resolver reached directly, as DNS over HTTPS would be. Run as
``python -m testing.internet SPEC_JSON`` inside the namespace; ``Internet`` makes and removes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import socketserver
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TypedDict

MANY = "many.test"  # a name with more A records than a UDP answer holds (TCP needed)
MANY_RECORDS = 40
ALT_PORT = 8080  # HTTP as on 80, on a port that is not redirected to the egress proxy


@dataclass
class Internet:
    """Addresses and names of one small internet (see the module's docstring)."""

    ns: str
    host_ip: str  # the host's end of the link
    dns: str  # the DNS server's address (port 53)
    names: dict[str, str]  # name -> address
    spare: str  # an address with servers but no name: reached only directly
    proc: subprocess.Popen[bytes] | None = None
    veth: str = ""
    addrs: list[str] = field(default_factory=list)
    ca_pem: str = ""  # the test CA that signed every HTTPS server's certificate


def _certificates(folder: Path, names: list[str]) -> None:
    """A test CA, and a certificate it signed for every name (one for all servers)."""
    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=toolserver-manager test CA")
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=test")
    (folder / "san.ext").write_text("subjectAltName=" + ",".join(f"DNS:{n}" for n in names) + "\n")
    ssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "san.ext")


@contextlib.contextmanager
def internet(names: list[str], shared: tuple[str, str] | None = None) -> Iterator[Internet]:
    """Make the namespace, its addresses and servers: each name its own address, ``shared``'s two
    names one address; yield it; remove everything."""
    tag = uuid.uuid4().hex[:6]
    ns, veth_h, veth_n = f"tsmt-{tag}", f"tsmv{tag}h", f"tsmv{tag}n"
    third = int(tag[:2], 16) % 200 + 1
    base = f"198.51.{third}"
    host_ip = f"{base}.1"
    addrs = [f"{base}.{i}" for i in range(2, 2 + len(names) + 3)]
    dns, spare, *rest = addrs
    table = {n: rest[i] for i, n in enumerate(names)}
    if shared:
        table[shared[0]] = table[shared[1]] = rest[len(names)]
    net = Internet(ns=ns, host_ip=host_ip, dns=dns, names=table, spare=spare, veth=veth_h, addrs=addrs)

    def sh(*cmd: str) -> None:
        subprocess.run(cmd, check=True, capture_output=True)

    tmp = tempfile.TemporaryDirectory(prefix="tsm-internet-")
    _certificates(Path(tmp.name), list(table))
    net.ca_pem = (Path(tmp.name) / "ca.pem").read_text()
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "link", "add", veth_h, "type", "veth", "peer", "name", veth_n)
        sh("ip", "link", "set", veth_n, "netns", ns)
        sh("ip", "addr", "add", f"{host_ip}/28", "dev", veth_h)
        sh("ip", "link", "set", veth_h, "up")
        for a in addrs:
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{a}/28", "dev", veth_n)
        sh("ip", "netns", "exec", ns, "ip", "link", "set", veth_n, "up")
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        sh("ip", "netns", "exec", ns, "ip", "route", "add", "default", "via", host_ip)
        spec = json.dumps(Spec(dns=dns, names=table, http=addrs, certs=tmp.name))
        net.proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "testing.internet", spec],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while not _up(dns):
            if time.monotonic() > deadline or net.proc.poll() is not None:
                raise RuntimeError("the test internet's servers did not come up")
            time.sleep(0.05)
        yield net
    finally:
        if net.proc is not None:
            net.proc.kill()
            net.proc.wait()
        subprocess.run(["ip", "link", "del", veth_h], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        tmp.cleanup()


def _up(addr: str) -> bool:
    try:
        socket.create_connection((addr, 80), 0.5).close()
        return True
    except OSError:
        return False


class Spec(TypedDict):
    """What the namespace's server process is told (as JSON on its command line)."""

    dns: str  # the resolver's address
    names: dict[str, str]  # name -> address
    http: list[str]  # addresses the echo servers listen on (80 and 443)
    certs: str  # the directory of server.pem and server.key


def _serve(spec: Spec) -> None:
    from dnslib import AAAA, QTYPE, RCODE, RR, A, DNSRecord

    names = spec["names"]

    def answer(data: bytes, udp: bool) -> bytes | None:
        try:
            req = DNSRecord.parse(data)
        except Exception:
            return None
        reply = req.reply()
        name = str(req.q.qname).rstrip(".").lower()
        if name == MANY:  # more A records than a 512-byte UDP answer holds
            if req.q.qtype == QTYPE.A:
                for i in range(1, MANY_RECORDS + 1):
                    reply.add_answer(RR(name, QTYPE.A, rdata=A(f"203.0.113.{i}"), ttl=60))
        elif name in names:
            if req.q.qtype == QTYPE.A:
                reply.add_answer(RR(name, QTYPE.A, rdata=A(names[name]), ttl=60))
            elif req.q.qtype == QTYPE.AAAA:  # the world has IPv6; nodes do not
                reply.add_answer(RR(name, QTYPE.AAAA, rdata=AAAA("2001:db8::" + names[name].split(".")[-1]), ttl=60))
        else:
            reply.header.rcode = RCODE.NXDOMAIN
        packed = bytes(reply.pack())
        if udp and len(packed) > 512:
            reply.rr = []
            reply.header.tc = 1
            packed = bytes(reply.pack())
        return packed

    def dns_loop() -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((spec["dns"], 53))
        while True:
            data, peer = s.recvfrom(4096)
            out = answer(data, udp=True)
            if out is not None:
                s.sendto(out, peer)

    class DnsTcp(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            size = self.rfile.read(2)
            if len(size) == 2:
                out = answer(self.rfile.read(struct.unpack("!H", size)[0]), udp=False)
                if out is not None:
                    self.wfile.write(struct.pack("!H", len(out)) + out)

    class DnsTcpServer(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True

    dns_tcp = DnsTcpServer((spec["dns"], 53), DnsTcp)
    threading.Thread(target=dns_tcp.serve_forever, daemon=True).start()

    class Echo(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.startswith("/bytes/"):  # a download of that many bytes, for benchmarks
                left = int(self.path.split("/")[2])
                self.send_response(200)
                self.send_header("content-length", str(left))
                self.end_headers()
                block = b"\0" * (1 << 16)
                while left > 0:
                    self.wfile.write(block[:left])
                    left -= len(block)
                return
            if self.path.startswith("/drip/"):  # a long-lived stream: 100 bytes every 50 ms for N s
                self.send_response(200)
                self.end_headers()
                until = time.monotonic() + float(self.path.split("/")[2])
                with contextlib.suppress(OSError):
                    while time.monotonic() < until:
                        self.wfile.write(b"x" * 100)
                        self.wfile.flush()
                        time.sleep(0.05)
                return
            # every server here is a Server (below), whose name is the address it is bound to
            assert isinstance(self.server, ThreadingHTTPServer)
            body = json.dumps({"host": self.headers.get("host", ""), "addr": self.server.server_name,
                               "path": self.path, "authorization": self.headers.get("authorization", "")}).encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:  # the body as it arrived, for the secrets-in-bodies tests
            chunked = self.headers.get("transfer-encoding", "").lower() == "chunked"
            if chunked:
                parts = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        break
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()
                got = b"".join(parts)
            else:
                got = self.rfile.read(int(self.headers.get("content-length", "0")))
            # a large body is told by its digest, not sent back
            body = json.dumps({"host": self.headers.get("host", ""), "length": len(got), "chunked": chunked,
                               "body": got.decode(errors="replace") if len(got) <= 65536 else "",
                               "sha256": hashlib.sha256(got).hexdigest()}).encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    class Server(ThreadingHTTPServer):
        def server_bind(self) -> None:
            # HTTPServer's own looks its name up first, and there is no DNS in here
            socketserver.TCPServer.server_bind(self)
            self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(f"{spec['certs']}/server.pem", f"{spec['certs']}/server.key")

    threading.Thread(target=dns_loop, daemon=True).start()
    for addr in spec["http"]:
        # 8080: plain HTTP on a port the egress proxy does not take (the firewall alone decides)
        for port in (80, ALT_PORT):
            srv = Server((addr, port), Echo)
            threading.Thread(target=srv.serve_forever, daemon=True).start()
        secure = Server((addr, 443), Echo)
        secure.socket = tls.wrap_socket(secure.socket, server_side=True, do_handshake_on_connect=False)
        threading.Thread(target=secure.serve_forever, daemon=True).start()
    threading.Event().wait()


if __name__ == "__main__":
    _serve(json.loads(sys.argv[1]))


@contextlib.contextmanager
def routed_to(net: Internet, bridge: str) -> Iterator[None]:
    """Let hosts behind a bridge of this machine (testing/hosts.py) reach the internet through the
    root namespace, both ways (dockerd's FORWARD policy drops what no rule accepts); the two rules
    go when the block ends."""
    rules = [["FORWARD", "-i", bridge, "-o", net.veth, "-j", "ACCEPT"],
             ["FORWARD", "-i", net.veth, "-o", bridge, "-j", "ACCEPT"]]
    added = []
    try:
        for rule in rules:
            subprocess.run(["iptables", "-w", "5", "-I", *rule], check=True, capture_output=True)
            added.append(rule)
        yield
    finally:
        for rule in added:
            subprocess.run(["iptables", "-w", "5", "-D", *rule], capture_output=True)
