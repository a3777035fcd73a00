"""Egress by name: what the enforced path costs a node next to open egress, in the same run.

Against a small internet in a network namespace (testing/internet.py), one manager with
egress.enforce and two sessions: "direct" (open egress, default allow: the kernel forwards,
nothing on the host touches the bytes) and "by name" (default deny, the one name allowed: a
connection to 80 goes through the host's Host-checking proxy in the manager; one to 443 has its
ClientHello's SNI checked in the agent's packet queue and is then forwarded by the kernel, or,
with ``--no-tls-queue`` (what was built before), goes through the proxy too). Inside each node:
a 100 MB download over HTTPS and the same over HTTP, and 1,000 small HTTPS requests, each on a
connection of its own; ``--rounds`` of both, in alternating order, so that a shared machine's drift in load
falls on both paths (medians compared). The manager's memory (its process's RSS: the proxy runs
in it) is sampled through every run. Then the time from a policy change (admin PUT) to its
rules in force, from the manager's own histogram.
Goal (issue 28): by-name throughput >= 0.7x direct; manager memory flat within 50 MB.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import (
    base_config,
    bench_id,
    command_line,
    fmt,
    load_line,
    markdown_table,
    write_json,
)
from testing.harness import ManagerProc, remove_project_objects
from testing.internet import internet

NODE_SCRIPT = r"""
import json, socket, ssl, sys, time, urllib.request
size, n = int(sys.argv[1]), int(sys.argv[2])
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE

def download(url):
    t0 = time.perf_counter()
    got = 0
    with urllib.request.urlopen(url, timeout=120, context=ctx) as r:
        head = time.perf_counter() - t0  # name resolved, connection made, the response's head read
        while True:
            b = r.read(1 << 20)
            if not b:
                break
            got += len(b)
    return got, time.perf_counter() - t0, head

got, dl, head = download(f"https://allowed.test/bytes/{size}")
got80, dl80, head80 = download(f"http://allowed.test/bytes/{size}")
t0 = time.perf_counter()
for _ in range(n):
    s = ctx.wrap_socket(socket.create_connection(("allowed.test", 443), 10), server_hostname="allowed.test")
    s.sendall(b"GET / HTTP/1.1\r\nHost: allowed.test\r\nConnection: close\r\n\r\n")
    while s.recv(65536):
        pass
    s.close()
small = time.perf_counter() - t0
print("BENCH" + json.dumps({"bytes": got, "download_s": dl, "head_s": head, "bytes80": got80, "download80_s": dl80,
                           "head80_s": head80, "requests": n, "requests_s": small}))
"""


def rss_mb(pid: int) -> float:
    """The manager process's own resident memory (not its children: an nft it forks would count
    its parent's pages again)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_s(pid: int) -> tuple[float, float]:
    """The manager process's user and system CPU seconds so far (all its threads: the proxy's too)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def in_node(c: httpx.Client, size: int, n: int) -> dict[str, Any]:
    cmd = f"python3 -c {shlex.quote(NODE_SCRIPT)} {size} {n}"
    r = c.post("/execute_tool", json={"tool_name": "shell_command_executor", "arguments": {"command": cmd}},
               timeout=900)
    assert r.status_code == 200, r.text
    display = r.json()["data"]["display"]
    assert "BENCH" in display, display
    return json.loads(display.split("BENCH", 1)[1].strip().splitlines()[0])  # type: ignore[no-any-return]


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


CASES = (("direct", {"default": "allow"}), ("by name", {"default": "deny", "allow": ["allowed.test"]}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=2,
                    help="rounds of both paths, their order alternating (a loaded machine's drift falls on both)")
    ap.add_argument("--changes", type=int, default=20)
    ap.add_argument("--no-tls-queue", action="store_true",
                    help="443 through the proxy as well (egress.tls_queue false: the path before the queue)")
    args = ap.parse_args()
    at_start = os.getloadavg()
    mid = bench_id("egress")
    tmp = Path(tempfile.mkdtemp(prefix="bench-egress-"))
    runs: dict[str, list[dict[str, Any]]] = {case: [] for case, _ in CASES}
    results: dict[str, Any] = {"runs": runs}
    with internet(["allowed.test", "other.test"]) as net:
        m = ManagerProc(base_config(mid, mid, egress={"enforce": True, "upstream_dns": [net.dns],
                                                      "client_may_set": True,
                                                      "tls_queue": not args.no_tls_queue}), tmp, "egress")
        clients: dict[str, httpx.Client] = {}
        try:
            m.start()
            admin = {"Authorization": f"Bearer {m.cfg['admin']['token']}"}
            # "direct": default allow, the kernel forwards and nothing on the host touches the bytes;
            # "by name": every connection to 80/443 goes through the manager's SNI/Host proxy
            for case, policy in CASES:
                c = clients[case] = httpx.Client(base_url=m.url, timeout=60)
                assert c.post("/get_cookie", json={"egress": policy}).status_code == 200
                in_node(c, 1 << 20, 10)  # warm-up: the node's interpreter, the first answers
            before = rss_mb(m.pid)
            peak = [before]
            for i in range(args.rounds):
                for case, _ in (CASES if i % 2 == 0 else CASES[::-1]):
                    done = threading.Event()

                    def sample(done: threading.Event = done) -> None:
                        while not done.wait(0.2):
                            peak.append(rss_mb(m.pid))

                    t = threading.Thread(target=sample)
                    t.start()
                    cpu0 = cpu_s(m.pid)
                    try:
                        res = in_node(clients[case], args.mb << 20, args.requests)
                    finally:
                        done.set()
                        t.join()
                    # where the manager's (the proxy's) time went: Python (user) or the kernel (system)
                    res["manager_user_s"], res["manager_sys_s"] = (b - a for a, b in zip(cpu0, cpu_s(m.pid), strict=True))
                    res["load_1m"] = os.getloadavg()[0]
                    runs[case].append(res)
            results["rss_before_mb"], results["rss_peak_mb"] = before, max(peak)
            node_id = clients["by name"].cookies["node_id"]
            for i in range(args.changes):
                allow = ["allowed.test"] + (["other.test"] if i % 2 == 0 else [])
                r = httpx.put(f"{m.url}/admin/nodes/{node_id}/egress", headers=admin,
                              json={"default": "deny", "allow": allow})
                assert r.status_code == 200, r.text
                time.sleep(0.2)  # one change at a time: each is timed alone
            text = httpx.get(f"{m.url}/metrics").text
            total = float(re.search(r"^toolserver_egress_policy_apply_seconds_sum (\S+)", text,
                                    re.M).group(1))  # type: ignore[union-attr]
            count = float(re.search(r"^toolserver_egress_policy_apply_seconds_count (\S+)", text,
                                    re.M).group(1))  # type: ignore[union-attr]
            results["policy_apply_mean_s"] = total / count if count else None
            results["policy_changes"] = count
        finally:
            for c in clients.values():
                with contextlib.suppress(httpx.HTTPError):
                    c.post("/release_session")
                c.close()
            m.stop()
            import docker

            remove_project_objects(docker.DockerClient(base_url="unix:///var/run/docker.sock", version="1.41"), mid)
    rows = []
    mbps = {case: [r["bytes"] / r["download_s"] / 1e6 for r in runs[case]] for case, _ in CASES}
    # on loopback 100 MB take under 0.1 s, so the download's set-up (the name resolved, the connection
    # made, the head read) weighs as much as its bytes: both are shown, and the bytes' rate after the head
    heads = {case: [r["head_s"] * 1000 for r in runs[case]] for case, _ in CASES}
    body = {case: [r["bytes"] / (r["download_s"] - r["head_s"]) / 1e6 for r in runs[case]] for case, _ in CASES}
    rps = {case: [r["requests"] / r["requests_s"] for r in runs[case]] for case, _ in CASES}
    mbps80 = {case: [r["bytes80"] / r["download80_s"] / 1e6 for r in runs[case]] for case, _ in CASES}
    for case, _ in CASES:
        rows.append([case, fmt(median(mbps[case])), " / ".join(fmt(x) for x in mbps[case]),
                     fmt(median(heads[case])), fmt(median(body[case])),
                     fmt(median(mbps80[case])), " / ".join(fmt(x) for x in mbps80[case]),
                     fmt(median(rps[case])), " / ".join(fmt(x) for x in rps[case])])
    ratio_dl = median(mbps["by name"]) / median(mbps["direct"])
    ratio_body = median(body["by name"]) / median(body["direct"])
    ratio_80 = median(mbps80["by name"]) / median(mbps80["direct"])
    ratio_rq = median(rps["by name"]) / median(rps["direct"])
    print(command_line())
    print(f"{args.mb} MB over HTTPS and over HTTP and {args.requests} HTTPS requests (a connection each) from "
          f"inside a node, {args.rounds} rounds of each path in alternating order; 443 by name "
          f"{'through the proxy (--no-tls-queue)' if args.no_tls_queue else 'checked in the queue'}; "
          f"{load_line(at_start)}")
    print(markdown_table(["egress", "HTTPS download MB/s (median)", "each round", "to the head ms (median)",
                          "after the head MB/s (median)", "HTTP download MB/s (median)", "each round",
                          "HTTPS req/s (median)", "each round"], rows))
    for case, _ in CASES:
        print(f"manager CPU through {case}: user " + " / ".join(fmt(r["manager_user_s"]) for r in runs[case])
              + " s, system " + " / ".join(fmt(r["manager_sys_s"]) for r in runs[case]) + " s (each round)")
    print(f"by name / direct: HTTPS download {ratio_dl:.2f}x (its bytes after the head {ratio_body:.2f}x), "
          f"HTTP download (the proxy) {ratio_80:.2f}x, requests "
          f"{ratio_rq:.2f}x (goal >= 0.7x); manager RSS "
          f"(the proxy's process) {results['rss_before_mb']:.1f} MB before, {results['rss_peak_mb']:.1f} MB peak; "
          f"policy change to rules in force: mean {results['policy_apply_mean_s'] * 1000:.0f} ms over "
          f"{results['policy_changes']:.0f} changes")
    results.update(ratio_download=ratio_dl, ratio_download_body=ratio_body, ratio_download_http=ratio_80,
                   ratio_requests=ratio_rq)
    write_json("egress_bench", {"args": vars(args), "results": results})


if __name__ == "__main__":
    main()
