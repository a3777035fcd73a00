"""What a request with a cookie Redis does not know costs the store, and how the Redis pool
behaves under a burst of them (issue 22: 1,000 concurrent random cookies made 578 answers 503
``MaxConnectionsError`` with the fail-fast pool of 100).

    .venv/bin/python -m benchmarks.store_bench [--n 2000] [--burst 1000]

The manager runs on a private redis-server of its own (the shared one serves other work), so the
HGETALL count (the cookie lookup; nothing else a replica does in the background uses it) is
exactly the requests'. Prints two tables; JSON to benchmarks/results/store_bench.json.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks._support import one_manager
from benchmarks.common import command_line, markdown_table, redis_client, start_private_redis, summarize, write_json


def hgetalls(r: Any) -> int:
    return int((r.info("commandstats").get("cmdstat_hgetall") or {}).get("calls", 0))


def per_request(url: str, r: Any, n: int, cookie: Any) -> float:
    """HGETALLs per request over n sequential GET / with cookie() as the node_id."""
    before = hgetalls(r)
    with httpx.Client(base_url=url, timeout=30) as c:
        for _ in range(n):
            status = c.get("/", headers={"cookie": f"node_id={cookie()}"}).status_code
            assert status == 403, status
    return (hgetalls(r) - before) / n


async def burst(url: str, n: int) -> tuple[collections.Counter[int], list[float]]:
    """n concurrent GET / with fresh random ids, each on its own connection."""
    limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
        async def one() -> tuple[int, float]:
            t0 = time.perf_counter()
            r = await c.get("/", headers={"cookie": f"node_id={secrets.token_hex(32)}"})
            return r.status_code, time.perf_counter() - t0

        got = await asyncio.gather(*(one() for _ in range(n)))
    return collections.Counter(s for s, _ in got), [t for _, t in got]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="sequential requests per cookie kind")
    ap.add_argument("--burst", type=int, default=1000, help="concurrent requests per burst")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tsm-bench-store-"))
    redis_proc, url = start_private_redis(tmp)
    r = redis_client(url)
    rows: list[list[object]] = []
    pool_rows: list[list[object]] = []
    costs: dict[str, float] = {}
    bursts: list[dict[str, object]] = []
    try:
        with one_manager("store", redis={"url": url}) as run:
            fixed = secrets.token_hex(32)
            kinds = {"malformed (not 64 hex)": lambda: "not-a-session-id",
                     "unknown id, repeated": lambda: fixed,
                     "unknown id, fresh each time": lambda: secrets.token_hex(32)}
            for name, cookie in kinds.items():
                cost = per_request(run.m.url, r, args.n, cookie)
                rows.append([name, args.n, f"{cost:.3f}"])
                costs[name] = cost
        for pool in (100, 10):
            with one_manager("store", redis={"url": url, "max_connections": pool}) as run:
                for _ in range(2):
                    codes, times = asyncio.run(burst(run.m.url, args.burst))
                    s = summarize(times)
                    pool_rows.append([pool, args.burst, dict(sorted(codes.items())), f"{s['p50_ms']:.0f}",
                                      f"{s['p99_ms']:.0f}", f"{s['max_ms']:.0f}"])
                    bursts.append({"pool": pool, "n": args.burst, "codes": dict(codes), **s})
    finally:
        r.close()
        redis_proc.kill()
        redis_proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"`{command_line()}`\n")
    print(markdown_table(["cookie", "requests", "Redis HGETALL per request"], rows))
    print()
    print(markdown_table(["redis.max_connections", "concurrent", "answers", "p50 ms", "p99 ms", "max ms"],
                         pool_rows))
    write_json("store_bench", {"per_request": costs, "bursts": bursts})


if __name__ == "__main__":
    main()
