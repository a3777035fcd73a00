"""What isolation costs: cold creation and proxied requests per second, before and after, in one run.

before: ``node.network.isolated: false`` (default bridge, published port), ``node.disk``
        off (``workspace_bytes: 0``, writable root, the engine's log defaults)
after:  the defaults: the manager_id's node network (no published port, the manager goes to
        the node's address), the host firewall chains, a 1 GiB loop-mounted ext4 workspace,
        read-only root with a tmpfs /tmp, rotated logs

Both managers run at once; creation trials alternate between them so a drifting machine
hurts both alike (one untimed warm-up each). Proxied throughput: ``wrk`` on ``GET /`` (proxied
to the node) of one session per manager, one after the other.

    .venv/bin/python -m benchmarks.isolation_cost [--n 10] [--seconds 5] [--connections 16]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import (
    LABEL,
    NODE_IMAGE,
    base_config,
    bench_id,
    command_line,
    docker_client,
    fmt,
    load_line,
    markdown_table,
    remove_containers,
    start_private_redis,
    summarize,
    write_json,
)
from shared.engines.docker import loopdisk
from testing.harness import ManagerProc, stop_process

CASES: dict[str, dict[str, Any]] = {
    "before": {"node": {"network": {"isolated": False},
                        "disk": {"workspace_bytes": 0, "read_only_root": False, "log_bytes": 0}}},
    # the two halves apart, to see which costs what
    "network only": {"node": {"disk": {"workspace_bytes": 0, "read_only_root": False, "log_bytes": 0}}},
    "disk only": {"node": {"network": {"isolated": False}}},
    "after": {},
}


def create_trial(url: str) -> float:
    with httpx.Client(base_url=url, timeout=60) as c:
        t0 = time.perf_counter()
        r = c.post("/get_cookie")
        elapsed = time.perf_counter() - t0
        assert r.status_code == 200, r.text
        c.post("/release_session")
    return elapsed


def wrk(url: str, cookie: str, seconds: int, connections: int) -> float:
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "-H", f"Cookie: node_id={cookie}",
                          url + "/"], capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out:
        raise RuntimeError(f"wrk saw errors:\n{out}")
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if rate is None:  # a wrk whose output changed: say so rather than fail on None
        raise RuntimeError(f"no Requests/sec in wrk's output:\n{out}")
    return float(rate.group(1))


def cleanup(mid: str) -> None:
    client = docker_client()
    remove_containers(client, mid)
    for v in client.volumes.list(filters={"label": f"{LABEL}={mid}"}):
        image = (v.attrs.get("Labels") or {}).get("toolserver-manager.image_file", "")
        with contextlib.suppress(Exception):
            v.remove(force=True)
        if image:
            loopdisk.destroy(image)
    for n in client.networks.list(filters={"label": f"{LABEL}={mid}"}):
        with contextlib.suppress(Exception):
            n.remove()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--connections", type=int, default=16)
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    at_start = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="bench-iso-"))
    # a Redis of its own: the shared one is restarted by outage tests running beside
    redis_proc, redis_url = start_private_redis(tmp)
    managers: dict[str, ManagerProc] = {}
    ids: dict[str, tuple[str, str]] = {}
    results: dict[str, dict[str, Any]] = {}
    try:
        for case, over in CASES.items():
            mid = bench_id(f"iso-{case.replace(' ', '-')}")
            ids[case] = (mid, mid)
            managers[case] = ManagerProc(base_config(mid, mid, redis={"url": redis_url, "key_prefix": mid}, **over),
                                         tmp, case).start()
        times: dict[str, list[float]] = {case: [] for case in CASES}
        for m in managers.values():
            create_trial(m.url)  # warm-up, untimed
        for _ in range(args.n):
            for case, m in managers.items():
                times[case].append(create_trial(m.url))
        for case, m in managers.items():
            with httpx.Client(base_url=m.url, timeout=60) as c:
                assert c.post("/get_cookie").status_code == 200
                cookie = c.cookies["node_id"]
                wrk(m.url, cookie, 1, args.connections)  # warm-up
                rps = wrk(m.url, cookie, args.seconds, args.connections)
                c.post("/release_session")
            results[case] = {"create_s": summarize(times[case]), "rps": rps}
    finally:
        for m in managers.values():
            m.stop()
        for mid, _ in ids.values():
            cleanup(mid)
        stop_process(redis_proc)
        shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    for case, res in results.items():
        s = res["create_s"]
        rows.append([case, args.n, fmt(s["p50_ms"]), fmt(s["p90_ms"]), fmt(s["max_ms"]), fmt(res["rps"], 0)])
    print(command_line())
    print(f"image {NODE_IMAGE}; wrk -t2 -c{args.connections} -d{args.seconds}s GET / (proxied); {load_line(at_start)}")
    print(markdown_table(["case", "creations", "create p50 ms", "p90 ms", "max ms", "proxied req/s"], rows))
    write_json("isolation_cost", {"args": vars(args), "results": results})


if __name__ == "__main__":
    main()
