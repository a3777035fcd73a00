"""Warm pool: ``POST /get_cookie`` served from the pool against cold creation, and the refill rate
after a burst.

Two replicas run side by side on the same engine, each with its own manager_id and key prefix:
``cold`` (``pool.size: 0``) and ``pool`` (``pool.size: N``, default 10; the checker's defaults:
interval 1 s, up to 4 pooled creations at a time).

latency  ``cold``: n sequential ``POST /get_cookie`` on the cold replica. ``pool``: n sequential
         ``POST /get_cookie`` on the pool replica, each taken only while the pool list holds a
         ready node (otherwise wait, untimed, until it is full again); a sample counts as a hit
         when the node returned was in the pool list just before. Every session is released
         right after its sample, untimed. Goal: pool p50 under 25 ms.
burst    with the pool full, B (default 50) concurrent ``POST /get_cookie`` on the pool replica; the
         pool list length is sampled every 10 ms from the burst's start until it is full again.
         The sessions are held until then, and released afterwards.

    .venv/bin/python -m benchmarks.pool_bench [--size 10] [--n 40] [--burst 50]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks._support import pool_len, remove_containers_retry
from benchmarks.common import (
    base_config,
    bench_id,
    command_line,
    delete_keys,
    docker_client,
    fmt,
    load_line,
    markdown_table,
    redis_client,
    summarize,
    verdict,
    write_json,
)
from shared.store.base import text
from testing.harness import ManagerProc

GOAL_POOL_P50_MS = 25.0


def get_cookie(http: httpx.Client) -> tuple[float, str]:
    http.cookies.clear()
    t0 = time.perf_counter()
    resp = http.post("/get_cookie")
    elapsed = time.perf_counter() - t0
    if resp.status_code != 200:
        raise RuntimeError(f"/get_cookie answered {resp.status_code}: {resp.text[:300]}")
    return elapsed, resp.cookies["node_id"]


def release(http: httpx.Client, node_id: str) -> None:
    http.cookies.clear()
    r = http.post("/release_session", headers={"Cookie": f"node_id={node_id}"})
    if r.status_code != 200:
        raise RuntimeError(f"/release_session answered {r.status_code}: {r.text[:300]}")


def wait_full(r: Any, prefix: str, mid: str, size: int, timeout: float) -> float:
    t0 = time.monotonic()
    while pool_len(r, prefix, mid) < size:
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"pool not full after {timeout}s ({pool_len(r, prefix, mid)}/{size})")
        time.sleep(0.02)
    return time.monotonic() - t0


async def burst(url: str, n: int) -> list[tuple[float, float, int, str]]:
    """n concurrent get_cookie: (start offset, latency, status, node_id) each."""
    async with httpx.AsyncClient(base_url=url, timeout=120,
                                 limits=httpx.Limits(max_connections=n + 5)) as http:
        t0 = time.perf_counter()

        async def one() -> tuple[float, float, int, str]:
            s = time.perf_counter()
            resp = await http.post("/get_cookie")
            return s - t0, time.perf_counter() - s, resp.status_code, resp.cookies.get("node_id") or ""

        return await asyncio.gather(*(one() for _ in range(n)))


async def release_all(url: str, node_ids: list[str]) -> None:
    sem = asyncio.Semaphore(8)
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        async def one(nid: str) -> None:
            async with sem:
                await http.post("/release_session", headers={"Cookie": f"node_id={nid}"})
        await asyncio.gather(*(one(n) for n in node_ids))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pool_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=10, help="pool.size (default 10)")
    p.add_argument("--n", type=int, default=40, help="timed sessions per latency case (default 40)")
    p.add_argument("--cold-n", type=int, default=20, help="timed cold sessions (default 20)")
    p.add_argument("--burst", type=int, default=50, help="concurrent sessions in the burst (default 50; 0 skips)")
    args = p.parse_args(argv)
    print(f"$ {command_line()}", flush=True)
    load0 = os.getloadavg()

    tmp = Path(tempfile.mkdtemp(prefix="tsm-bench-pool-"))
    client, r = docker_client(), redis_client()
    client.close()
    p_cold, m_cold = bench_id("cold"), bench_id("cold")
    p_pool, m_pool = bench_id("pool"), bench_id("pool")
    node = {"creation_wait_seconds": 90}
    cold = ManagerProc(base_config(p_cold, m_cold, node=node), tmp, "cold")
    pool = ManagerProc(base_config(p_pool, m_pool, node=node, pool={"size": args.size}), tmp, "pool")
    cold_s: list[float] = []
    pool_s: list[float] = []
    hits = misses = 0
    refill_waits: list[float] = []
    burst_res: dict[str, Any] = {}
    failed = True
    started = time.monotonic()
    try:
        cold.start()
        pool.start()
        t_fill = wait_full(r, p_pool, m_pool, args.size, 120)
        print(f"  initial pool of {args.size} ready {t_fill:.1f} s after the replica answered",
              file=sys.stderr, flush=True)

        with httpx.Client(base_url=cold.url, timeout=120) as http:
            release(http, get_cookie(http)[1])  # warm-up
            for _ in range(args.cold_n):
                el, nid = get_cookie(http)
                cold_s.append(el)
                release(http, nid)
        print(f"  cold: {len(cold_s)} samples", file=sys.stderr, flush=True)

        with httpx.Client(base_url=pool.url, timeout=120) as http:
            wait_full(r, p_pool, m_pool, args.size, 120)
            while len(pool_s) < args.n:
                if pool_len(r, p_pool, m_pool) == 0:
                    refill_waits.append(wait_full(r, p_pool, m_pool, args.size, 120))
                before = {text(x) for x in r.lrange(f"{p_pool}:mgr:{m_pool}:pool", 0, -1)}
                el, nid = get_cookie(http)
                if nid in before:
                    hits += 1
                    pool_s.append(el)
                else:
                    misses += 1
                release(http, nid)
        print(f"  pool: {hits} hits, {misses} misses, {len(refill_waits)} refill waits",
              file=sys.stderr, flush=True)

        if args.burst > 0:
            wait_full(r, p_pool, m_pool, args.size, 120)
            timeline: list[tuple[float, int]] = []
            stop = threading.Event()
            t0 = time.perf_counter()

            def sample() -> None:
                while not stop.is_set():
                    timeline.append((time.perf_counter() - t0, pool_len(r, p_pool, m_pool)))
                    time.sleep(0.01)

            pooled_before = {text(x) for x in r.lrange(f"{p_pool}:mgr:{m_pool}:pool", 0, -1)}
            th = threading.Thread(target=sample, daemon=True)
            th.start()
            res = asyncio.run(burst(pool.url, args.burst))
            t_end = time.perf_counter() - t0
            full_at = None
            deadline = time.perf_counter() + 120
            while time.perf_counter() < deadline:
                if pool_len(r, p_pool, m_pool) >= args.size:
                    full_at = time.perf_counter() - t0
                    break
                time.sleep(0.01)
            stop.set()
            th.join()
            node_ids = [x[3] for x in res if x[3]]
            asyncio.run(release_all(pool.url, node_ids))
            lat = sorted(x[1] for x in res if x[2] == 200)
            hit_lat = [x[1] for x in res if x[2] == 200 and x[3] in pooled_before]
            miss_lat = [x[1] for x in res if x[2] == 200 and x[3] not in pooled_before]
            first_zero = next((t for t, n in timeline if n == 0), None)
            at_end = next((n for t, n in reversed(timeline) if t <= t_end), None)
            low = min(n for _, n in timeline)
            burst_res = {
                "n": args.burst, "ok": sum(1 for x in res if x[2] == 200),
                "errors": [x[2] for x in res if x[2] != 200], "burst_s": t_end, "full_at_s": full_at,
                "first_empty_at_s": first_zero, "pool_at_burst_end": at_end, "pool_min": low,
                "latency": summarize(lat), "hit_latency": summarize(hit_lat),
                "miss_latency": summarize(miss_lat),
                "timeline": [(round(t, 3), n) for t, n in timeline[::5]],
            }
            if full_at is not None:
                start = first_zero if first_zero is not None else 0.0
                burst_res["refill_window_s"] = full_at - start
                burst_res["refill_nodes_per_s"] = (args.size - low) / max(1e-9, full_at - start)
                burst_res["after_burst_s"] = full_at - t_end
        failed = False
    finally:
        for m in (cold, pool):
            if failed:
                sys.stderr.write(f"----- log of {m.cfg['replica_id']} -----\n{m.logs()[-4000:]}\n")
            m.stop()
        removed = remove_containers_retry(m_cold) + remove_containers_retry(m_pool)
        deleted = delete_keys(r, p_cold) + delete_keys(r, p_pool)
        r.close()
        if not failed:
            shutil.rmtree(tmp, ignore_errors=True)

    cs, ps = summarize(cold_s), summarize(pool_s)
    print(f"\n(a) POST /get_cookie, sequential, session released after each (pool.size {args.size})\n")
    print(markdown_table(["case", "n", "p50 ms", "p90 ms", "p99 ms", "max ms"], [
        ["cold creation", cs["n"], fmt(cs["p50_ms"]), fmt(cs["p90_ms"]), fmt(cs["p99_ms"]), fmt(cs["max_ms"])],
        ["from the warm pool", ps["n"], fmt(ps["p50_ms"]), fmt(ps["p90_ms"]), fmt(ps["p99_ms"]), fmt(ps["max_ms"])],
    ]))
    ok = ps["p50_ms"] < GOAL_POOL_P50_MS
    print(f"\ngoal: pool p50 < {GOAL_POOL_P50_MS:.0f} ms: {verdict(ok)} ({ps['p50_ms']:.1f} ms; cold "
          f"{cs['p50_ms']:.1f} ms, {cs['p50_ms'] / ps['p50_ms']:.0f}× slower); {hits} hits, {misses} misses")
    if burst_res:
        b = burst_res
        bl = b["latency"]
        print(f"\n(b) burst of {b['n']} concurrent POST /get_cookie on the pool replica (pool.size {args.size})\n")
        rows = [
            ["sessions ok / errors", f"{b['ok']} / {len(b['errors'])}"],
            ["get_cookie p50 / p99 / max ms, all", f"{fmt(bl['p50_ms'])} / {fmt(bl['p99_ms'])} / {fmt(bl['max_ms'])}"],
            *[[f"get_cookie p50 / max ms, {name} (n={h['n']})", f"{fmt(h['p50_ms'])} / {fmt(h['max_ms'])}"]
              for name, h in (("pool hits", b["hit_latency"]), ("cold misses", b["miss_latency"]))],
            ["burst duration (last answer) s", f"{b['burst_s']:.2f}"],
            ["pool first empty at s", fmt(b["first_empty_at_s"], 2) if b["first_empty_at_s"] is not None else "never"],
            ["pool minimum / at burst end", f"{b['pool_min']} / {b['pool_at_burst_end']}"],
            ["pool full again at s (from burst start)", fmt(b["full_at_s"], 2) if b["full_at_s"] else "no"],
        ]
        if b.get("full_at_s"):
            rows += [["refill: first empty → full s", f"{b['refill_window_s']:.2f}"],
                     ["refill rate nodes/s (over that window)", f"{b['refill_nodes_per_s']:.2f}"],
                     ["after the burst: last answer → full s", f"{b['after_burst_s']:.2f}"]]
        print(markdown_table(["burst", "value"], rows))
    print(f"\ncleanup: {removed} container(s) removed, {deleted} key(s) deleted")
    path = write_json("pool_bench", {"loadavg_at_start": load0,
        "params": {**vars(args), "cold_manager_id": m_cold, "pool_manager_id": m_pool},
        "cold": {**cs, "samples_ms": [v * 1000 for v in cold_s]},
        "pool": {**ps, "samples_ms": [v * 1000 for v in pool_s], "hits": hits, "misses": misses,
                 "refill_waits_s": refill_waits},
        "goal_pool_p50_ms": GOAL_POOL_P50_MS, "goal_met": ok, "burst": burst_res,
        "elapsed_s": time.monotonic() - started,
        "cleanup": {"containers_removed": removed, "keys_deleted": deleted},
    })
    print(load_line(load0))
    print(f"results: {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
