"""A burst of cold ``POST /get_cookie`` with the creation queue on and (all but) off.

N clients ask for a session at the same instant, no warm pool, one manager replica. Case
``queue``: ``creation.concurrency`` creations at a time, the rest waiting their turn (the
default). Case ``all at once``: ``creation.concurrency`` = N, every creation started at once, as
before the queue existed. Reported: each client's wait (request to answer), 503s, and from the
manager's per-creation phases (its ``node_ready`` log lines) how long a creation itself took once
it ran (its phases but the queue's), so the table shows what running fewer at once does to each.

    .venv/bin/python -m benchmarks.create_burst [--n 16] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import (
    NODE_IMAGE,
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
    write_json,
)
from benchmarks.create_latency import manager_phases
from shared.config import DockerConfig
from testing.harness import ManagerProc


def burst(url: str, n: int) -> tuple[list[float], int, list[str]]:
    """n get_cookie at once: each one's seconds (200s only), the count of 503s, the session ids."""
    def one(_: int) -> tuple[float, httpx.Response]:
        t0 = time.perf_counter()
        r = httpx.post(url + "/get_cookie", timeout=300)
        return time.perf_counter() - t0, r

    with concurrent.futures.ThreadPoolExecutor(n) as ex:
        results = list(ex.map(one, range(n)))
    ok = [(t, r) for t, r in results if r.status_code == 200]
    refused = sum(1 for _, r in results if r.status_code == 503)
    return [t for t, _ in ok], refused, [r.cookies["node_id"] for _, r in ok]


def run_case(name: str, concurrency: int, n: int, tmp: Path) -> dict[str, Any]:
    prefix, mid = bench_id("burst"), bench_id("burst")
    engine = {"docker": {"creation_kwargs": {**DockerConfig().creation_kwargs, "image": NODE_IMAGE}}}
    cfg = base_config(prefix, mid, engine=engine, creation={"concurrency": concurrency, "queue_size": n},
                      node={"creation_wait_seconds": 120}, quota={"per_client": 0})
    manager = ManagerProc(cfg, tmp, name.replace(" ", "-"))
    client, r = docker_client(), redis_client()
    try:
        manager.start()
        httpx.post(manager.url + "/release_session", cookies={"node_id": _warm(manager.url)}, timeout=120)
        waits, refused, ids = burst(manager.url, n)
        for node_id in ids:
            httpx.post(manager.url + "/release_session", cookies={"node_id": node_id}, timeout=120)
    finally:
        manager.stop()
        log = manager.logs()
        remove_containers(client, mid)
        delete_keys(r, prefix)
        client.close()
        r.close()
    phases = manager_phases(log, len(waits))
    own = [sum(v for k, v in p.items() if k != "queue") for p in phases]
    return {"case": name, "concurrency": concurrency, "waits": waits, "refused": refused, "own": own,
            "phases": phases}


def _warm(url: str) -> str:
    """One untimed session first (image layers, the node network)."""
    r = httpx.post(url + "/get_cookie", timeout=120)
    r.raise_for_status()
    return r.cookies["node_id"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.create_burst", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=16, help="clients in the burst (default 16)")
    p.add_argument("--concurrency", type=int, default=4, help="creation.concurrency of the queue case (default 4)")
    args = p.parse_args(argv)
    print(f"$ {command_line()}", flush=True)
    load0 = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="tsm-bench-burst-"))
    cases = [run_case("queue", args.concurrency, args.n, tmp), run_case("all at once", args.n, args.n, tmp)]
    shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    for c in cases:
        w, o = summarize(c["waits"]), summarize(c["own"])
        rows.append([c["case"], c["concurrency"], w["n"], c["refused"], fmt(w["p50_ms"]), fmt(w["p90_ms"]),
                     fmt(w["max_ms"]), fmt(o["p50_ms"]), fmt(o["max_ms"])])
    print()
    print(markdown_table(["case", "concurrency", "ok", "503", "client wait p50 ms", "p90 ms", "max ms",
                          "creation itself p50 ms", "max ms"], rows))
    print(load_line(load0))
    path = write_json("create_burst", {"params": {"n": args.n, "concurrency": args.concurrency},
                                       "cases": cases, "loadavg_at_start": load0})
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
