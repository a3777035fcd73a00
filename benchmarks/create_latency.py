"""Cold ``POST /get_cookie`` latency against the raw Docker floor, measured in the same run.

floor:   Docker SDK ``containers.create`` + ``start`` of the node image (port 31942 published on
         127.0.0.1, ``init=True``), inspect for the host port, then ``GET /`` every 10 ms until
         the first HTTP 200.
manager: ``POST /get_cookie`` on a manager replica (no warm pool) with the same image and creation
         kwargs, from the request to the response (the manager returns once the node answers).

Trials alternate floor/manager so a drifting machine hurts both alike; each container is
removed (and each session released) after its trial, outside the timed part. One untimed
warm-up trial of each goes first. Goal: manager p50 within 1.15x the floor p50.

    .venv/bin/python -m benchmarks.create_latency [--n 20]
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import docker
import httpx

from benchmarks.common import (
    BENCH_NODE_HEADERS,
    BENCH_NODE_SECRET,
    LABEL,
    NODE_IMAGE,
    NODE_PORT,
    ROLE_LABEL,
    base_config,
    bench_id,
    command_line,
    delete_keys,
    docker_client,
    fmt,
    load_line,
    markdown_table,
    redis_client,
    remove_containers,
    summarize,
    verdict,
    write_json,
)
from testing.harness import ManagerProc

GOAL_RATIO = 1.15
POLL_S = 0.010
READY_TIMEOUT_S = 30.0


def http_ok(port: int) -> bool:
    """One ``GET /`` on a fresh connection; True on HTTP 200."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1.0)
    try:
        conn.request("GET", "/", headers=BENCH_NODE_HEADERS)
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def floor_trial(client: docker.DockerClient, floor_mid: str) -> float:
    """Seconds from create to the node's first 200; the container is removed afterwards."""
    t0 = time.perf_counter()
    c = client.containers.create(NODE_IMAGE, init=True, ports={f"{NODE_PORT}/tcp": ("127.0.0.1", None)},
                                 labels={LABEL: floor_mid, ROLE_LABEL: "bench"},
                                 environment={"NODE_SECRET": BENCH_NODE_SECRET})
    try:
        c.start()
        c.reload()
        port = int(c.attrs["NetworkSettings"]["Ports"][f"{NODE_PORT}/tcp"][0]["HostPort"])
        deadline = t0 + READY_TIMEOUT_S
        while not http_ok(port):
            if time.perf_counter() > deadline:
                raise RuntimeError(f"floor container {c.short_id} did not answer within {READY_TIMEOUT_S}s")
            time.sleep(POLL_S)
        return time.perf_counter() - t0
    finally:
        c.remove(force=True, v=True)


def manager_trial(http: httpx.Client) -> float:
    """Seconds of one cold ``POST /get_cookie``; the session is released afterwards."""
    http.cookies.clear()
    t0 = time.perf_counter()
    resp = http.post("/get_cookie")
    elapsed = time.perf_counter() - t0
    if resp.status_code != 200 or "node_id" not in resp.cookies:
        raise RuntimeError(f"/get_cookie answered {resp.status_code}: {resp.text[:300]}")
    node_id = resp.cookies["node_id"]
    http.cookies.clear()
    rel = http.post("/release_session", headers={"Cookie": f"node_id={node_id}"})
    if rel.status_code != 200:
        raise RuntimeError(f"/release_session answered {rel.status_code}: {rel.text[:300]}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.create_latency", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20, help="timed sessions per case (default 20)")
    p.add_argument("--max-seconds", type=float, default=170.0,
                   help="stop starting new trials after this long (default 170)")
    args = p.parse_args(argv)

    print(f"$ {command_line()}", flush=True)
    load0 = os.getloadavg()
    prefix, mid, floor_mid = bench_id("lat"), bench_id("lat"), bench_id("floor")
    tmp = Path(tempfile.mkdtemp(prefix="tsm-bench-lat-"))
    client, r = docker_client(), redis_client()
    manager = ManagerProc(base_config(prefix, mid), tmp, "latency")
    floor: list[float] = []
    mgr: list[float] = []
    failed = True
    started = time.monotonic()
    try:
        manager.start()
        with httpx.Client(base_url=manager.url, timeout=READY_TIMEOUT_S + 10) as http:
            floor_trial(client, floor_mid)  # warm-up: image layers and engine caches
            manager_trial(http)
            for i in range(args.n):
                if time.monotonic() - started > args.max_seconds:
                    print(f"time budget of {args.max_seconds:.0f}s reached after {i} trials", file=sys.stderr)
                    break
                floor.append(floor_trial(client, floor_mid))
                mgr.append(manager_trial(http))
        failed = False
    finally:
        manager.stop()
        leftovers = remove_containers(client, mid) + remove_containers(client, floor_mid)
        deleted = delete_keys(r, prefix)
        if failed:
            sys.stderr.write(f"----- manager log ({manager.log_path}) -----\n{manager.logs()[-6000:]}\n")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        client.close()
        r.close()

    fs, ms = summarize(floor), summarize(mgr)
    ratio = ms["p50_ms"] / fs["p50_ms"]
    rows: list[list[Any]] = [
        ["floor: SDK create+start → first 200", fs["n"], fmt(fs["p50_ms"]), fmt(fs["p90_ms"]),
         fmt(fs["p99_ms"]), "1.00"],
        ["manager: POST /get_cookie (cold)", ms["n"], fmt(ms["p50_ms"]), fmt(ms["p90_ms"]),
         fmt(ms["p99_ms"]), f"{ratio:.2f}"],
    ]
    print()
    print(markdown_table(["case", "n", "p50 ms", "p90 ms", "p99 ms", "ratio to floor p50"], rows))
    ok = ratio <= GOAL_RATIO
    print(f"\ngoal: manager p50 ≤ {GOAL_RATIO:.2f}× floor p50: {verdict(ok)} "
          f"({ms['p50_ms']:.1f} ms vs {fs['p50_ms']:.1f} ms, {ratio:.2f}×; "
          f"{ms['p50_ms'] - fs['p50_ms']:+.1f} ms)")
    print(load_line(load0))
    if leftovers:
        print(f"note: removed {leftovers} leftover container(s) at cleanup", file=sys.stderr)
    path = write_json("create_latency", {
        "params": {"n": args.n, "poll_interval_s": POLL_S, "image": NODE_IMAGE, "manager_id": mid,
                   "key_prefix": prefix},
        "floor": {**fs, "samples_ms": [v * 1000 for v in floor]},
        "manager": {**ms, "samples_ms": [v * 1000 for v in mgr]},
        "ratio_p50": ratio, "goal_ratio": GOAL_RATIO, "goal_met": ok,
        "cleanup": {"containers_removed": leftovers, "keys_deleted": deleted}, "loadavg_at_start": load0,
    })
    print(f"results: {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
