"""What the edge's bounds hold a replica to (issue 22): connections held before refusing, and the
memory an open proxied WebSocket costs at its bound.

connections   One replica with the default caps. Idle connections (no byte sent) are opened from
              --addresses loopback addresses (127.0.0.2, ...; each under the per-address cap) until
              --open are open; each that the replica answers 503 at once counts as refused. A
              kept-alive connection opened before keeps answering /alive; the number held is the
              replica's cap (proxy.max_client_connections, lowered at start to what `ulimit -n`
              allows).
websocket     One replica whose nodes are hostile (testing/hostile_node.py), default WebSocket
              bounds (4 MiB messages, one frame queued, 30 s send timeout, 8 sockets per session).
              --sockets sockets of one session whose client reads nothing; the node sends each
              --frames frames of the message limit. RSS of the replica before, at the peak, and
              once it is steady (the node stopped sending, nothing closed yet), per socket.

    .venv/bin/python -m benchmarks.edge_bounds [--open 9000] [--addresses 10] [--sockets 8] [--frames 16]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import selectors
import socket
import sys
import time
import urllib.parse
from pathlib import Path
from typing import TypedDict

import httpx

from benchmarks._support import one_manager
from benchmarks.common import command_line, load_line, markdown_table, process_tree, write_json
from testing.hostile_node import hostile_config, raw_websocket, stats


def rss_bytes(pid: int) -> int:
    """Resident memory of a process and its children."""
    total = 0
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


class Held(TypedDict):
    """What a replica held before refusing (connections())."""

    opened: int
    held: int
    refused_503: int
    alive_during: int
    nofile_soft_hard: list[int]
    rss_mib_at_cap: float


def connections(n_open: int, addresses: int) -> Held:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with one_manager("edge") as run:
        m = run.m
        keep = httpx.Client(base_url=m.url, timeout=10)
        assert keep.get("/alive").status_code == 200
        socks: list[socket.socket] = []
        refused = 0
        try:
            for i in range(n_open):
                s = socket.socket()
                s.bind((f"127.0.0.{2 + i % addresses}", 0))
                s.connect(("127.0.0.1", m.port))
                socks.append(s)
            time.sleep(1.0)  # refusals are written as each connection opens: give the last ones a moment
            with selectors.DefaultSelector() as sel:
                for s in socks:
                    sel.register(s, selectors.EVENT_READ, s)  # the socket as its key's data, to read from
                for key, _ in sel.select(2.0):
                    sock: socket.socket = key.data
                    data = sock.recv(4096)
                    refused += data.startswith(b"HTTP/1.1 503")
            alive = keep.get("/alive").status_code
        finally:
            for s in socks:
                s.close()
        rss = rss_bytes(m.pid)
    return {"opened": n_open, "held": n_open - refused, "refused_503": refused, "alive_during": alive,
            "nofile_soft_hard": [soft, hard], "rss_mib_at_cap": round(rss / 2**20, 1)}


def websockets(n_sockets: int, frames: int) -> dict[str, object]:
    limit = 4 << 20
    with one_manager("edgews", **hostile_config()) as run:
        m = run.m
        c = httpx.Client(base_url=m.url, timeout=60)
        assert c.post("/get_cookie").status_code == 200
        before = rss_bytes(m.pid)
        spec = urllib.parse.quote(json.dumps({"ws_frames": frames, "ws_frame_bytes": limit}))
        socks = [raw_websocket(m.port, f"/ws/echo?hostile={spec}", c.cookies["node_id"]) for _ in range(n_sockets)]
        peak, last, steady_since = before, -1, time.monotonic()
        deadline = time.monotonic() + 20  # well inside the 30 s send timeout: nothing is closed yet
        while time.monotonic() < deadline:
            peak = max(peak, rss_bytes(m.pid))
            sent = stats(c)["ws_sent"]
            if sent != last:
                last, steady_since = sent, time.monotonic()
            elif time.monotonic() - steady_since > 2:
                break
            time.sleep(0.1)
        steady = rss_bytes(m.pid)
        for s in socks:
            s.close()
    mib = 2**20
    return {"sockets": n_sockets, "message_limit_mib": limit / mib, "node_sent_mib": round(last / mib, 1),
            "rss_before_mib": round(before / mib, 1), "rss_peak_mib": round(peak / mib, 1),
            "rss_steady_mib": round(steady / mib, 1),
            "per_socket_steady_mib": round((steady - before) / n_sockets / mib, 1),
            "per_socket_peak_mib": round((peak - before) / n_sockets / mib, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.edge_bounds", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--open", type=int, default=9000, help="idle connections to open (default 9000)")
    p.add_argument("--addresses", type=int, default=10, help="loopback source addresses (default 10)")
    p.add_argument("--sockets", type=int, default=8, help="WebSockets that read nothing (default 8)")
    p.add_argument("--frames", type=int, default=16, help="frames the node sends each (default 16)")
    args = p.parse_args(argv)
    print(f"$ {command_line()}", flush=True)
    load0 = os.getloadavg()
    conn = connections(args.open, args.addresses)
    ws = websockets(args.sockets, args.frames)
    print("\nconnections a replica holds before refusing (default caps)\n")
    print(markdown_table(["opened", "held", "answered 503", "/alive meanwhile", "nofile soft/hard", "RSS MiB"],
                         [[conn["opened"], conn["held"], conn["refused_503"], conn["alive_during"],
                           "/".join(map(str, conn["nofile_soft_hard"])), conn["rss_mib_at_cap"]]]))
    print("\nmemory of open proxied WebSockets whose client reads nothing (default bounds)\n")
    print(markdown_table(["sockets", "message limit MiB", "node sent MiB", "RSS before", "RSS peak", "RSS steady",
                          "MiB/socket steady", "MiB/socket peak"],
                         [[ws["sockets"], ws["message_limit_mib"], ws["node_sent_mib"], ws["rss_before_mib"],
                           ws["rss_peak_mib"], ws["rss_steady_mib"], ws["per_socket_steady_mib"],
                           ws["per_socket_peak_mib"]]]))
    path = write_json("edge_bounds", {"loadavg_at_start": load0, "params": vars(args), "connections": conn,
                                      "websockets": ws})
    print(load_line(load0))
    print(f"results: {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
