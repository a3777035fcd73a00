"""Session tiers: how long the first call takes to bring a session back from each tier, beside
a warm-pool claim and a cold creation, and what 20 paused nodes hold of the host's memory
against 20 running ones.

Four replicas run side by side on the same engine, each with its own manager_id and key prefix
(workspaces at the project's default bound, 1 GiB, so an archived session comes back on a
loop-mounted ext4 image as in production):

paused    ``tiers.pause_after_seconds: 1`` (the other tiers off): n sessions are made, the checker
          pauses them; then one proxied ``POST /`` per session is timed, each on a paused node.
stopped   all tiers off: n sessions, ``POST /close_session`` on each, then one timed ``POST /``
          each (the proxy restarts the node and waits for it).
archived  ``tiers.archive_after_seconds: 1``: the checker removes each idle session's container,
          then one timed ``POST /`` each (a new container on the same workspace).
pool      ``pool.size: 5``: ``POST /get_cookie`` timed while the pool list holds a ready node.
cold      ``POST /get_cookie`` on the all-tiers-off replica (no pool).
memory    20 sessions on the all-tiers-off replica: the host's used memory (MemTotal -
          MemAvailable) and the sum of the nodes' cgroup memory, 3 s after all run, then 3 s
          after all were paused by the engine (``docker pause``), against the same figures
          before the 20 were made.

    .venv/bin/python -m benchmarks.tiers_bench [--n 20] [--memory-nodes 20]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
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
    start_private_redis,
    summarize,
    write_json,
)
from testing.harness import ManagerProc

OFF = {"pause_after_seconds": None, "archive_after_seconds": None}
FAST_CHECKER = {"interval_seconds": 0.25, "lease_ttl_seconds": 3}


def session(url: str) -> str:
    with httpx.Client(base_url=url, timeout=120) as http:
        r = http.post("/get_cookie")
        if r.status_code != 200:
            raise RuntimeError(f"/get_cookie answered {r.status_code}: {r.text[:300]}")
        return r.cookies["node_id"]


def timed_call(url: str, node_id: str, path: str = "/") -> float:
    with httpx.Client(base_url=url, timeout=120, cookies={"node_id": node_id}) as http:
        t0 = time.perf_counter()
        r = http.post(path)
        elapsed = time.perf_counter() - t0
    if r.status_code != 200:
        raise RuntimeError(f"{path} answered {r.status_code}: {r.text[:300]}")
    return elapsed


def close_all(url: str, ids: list[str]) -> None:
    for i in ids:
        post(url, i, "/close_session")


def post(url: str, node_id: str, path: str) -> None:
    with httpx.Client(base_url=url, timeout=120, cookies={"node_id": node_id}) as http:
        r = http.post(path)
        if r.status_code != 200:
            raise RuntimeError(f"{path} answered {r.status_code}: {r.text[:300]}")


def wait_all(r: Any, prefix: str, ids: list[str], status: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while any((r.hget(f"{prefix}:node:{i}", "status") or b"").decode() != status for i in ids):
        if time.monotonic() > deadline:
            raise RuntimeError(f"sessions not all {status} after {timeout}s")
        time.sleep(0.05)


def host_used_bytes() -> int:
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, value = line.split(":", 1)
        info[key] = int(value.split()[0]) * 1024
    return info["MemTotal"] - info["MemAvailable"]


def nodes_memory(client: Any, ids: list[str]) -> int:
    """Sum of the nodes' cgroup memory usage, as the engine reports it."""
    return sum(int((client.api.stats(i, stream=False).get("memory_stats") or {}).get("usage") or 0) for i in ids)


def measure_resume(name: str, url: str, ids: list[str], prepare: Callable[[], None]) -> list[float]:
    prepare()
    out = [timed_call(url, i) for i in ids]
    print(f"  {name}: {len(out)} resumes timed", file=sys.stderr, flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tiers_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20, help="timed resumes / creations per case (default 20)")
    p.add_argument("--memory-nodes", type=int, default=20, help="nodes in the memory comparison (default 20)")
    args = p.parse_args(argv)
    print(f"$ {command_line()}", flush=True)
    load0 = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="tsm-bench-tiers-"))
    # a Redis of its own: other work restarting the shared one would end the run half-way
    redis_proc, redis_url = start_private_redis(tmp)
    client, r = docker_client(), redis_client(redis_url)
    private = {"url": redis_url}
    node = {"creation_wait_seconds": 90, "idle_grace_seconds": 0, "idling_close_minutes": None}
    ids = {k: (bench_id(k), bench_id(k)) for k in ("plain", "paused", "archived", "pool")}
    procs = {
        "plain": ManagerProc(base_config(*ids["plain"], node={**node, "tiers": OFF}, checker=FAST_CHECKER,
                                         redis=private), tmp, "plain"),
        "paused": ManagerProc(base_config(*ids["paused"], node={**node, "tiers": {**OFF, "pause_after_seconds": 1}},
                                          checker=FAST_CHECKER, redis=private), tmp, "paused"),
        "archived": ManagerProc(base_config(*ids["archived"], node={
            **node, "tiers": {**OFF, "archive_after_seconds": 1}}, checker=FAST_CHECKER, redis=private), tmp,
                                "archived"),
        "pool": ManagerProc(base_config(*ids["pool"], node={**node, "tiers": OFF}, pool={"size": 5},
                                        checker=FAST_CHECKER, redis=private), tmp, "pool"),
    }
    results: dict[str, list[float]] = {}
    memory: dict[str, int] = {}
    failed = True
    started = time.monotonic()
    try:
        for m in procs.values():
            m.start()
        plain, paused, archived, pool = (procs[k].url for k in ("plain", "paused", "archived", "pool"))
        session(plain)  # warm-up: image and network in place
        results["cold create"] = []
        cold_ids = []
        for _ in range(args.n):
            t0 = time.perf_counter()
            cold_ids.append(session(plain))
            results["cold create"].append(time.perf_counter() - t0)

        results["resume from stopped"] = measure_resume(
            "stopped", plain, cold_ids, lambda: close_all(plain, cold_ids))

        p_ids = [session(paused) for _ in range(args.n)]
        results["resume from paused"] = measure_resume(
            "paused", paused, p_ids, lambda: wait_all(r, ids["paused"][0], p_ids, "paused"))

        a_ids = [session(archived) for _ in range(args.n)]
        results["resume from archived"] = measure_resume(
            "archived", archived, a_ids, lambda: wait_all(r, ids["archived"][0], a_ids, "archived"))

        claims = []
        for _ in range(args.n):
            deadline = time.monotonic() + 120
            while pool_len(r, *ids["pool"]) < 1:
                if time.monotonic() > deadline:
                    raise RuntimeError("the pool did not refill")
                time.sleep(0.02)
            t0 = time.perf_counter()
            session(pool)
            claims.append(time.perf_counter() - t0)
        results["warm-pool claim"] = claims

        for i in cold_ids:  # back to an empty engine for the memory comparison
            post(plain, i, "/release_session")
        time.sleep(3)
        memory["host used, before"] = host_used_bytes()
        m_ids = [session(plain) for _ in range(args.memory_nodes)]
        time.sleep(3)
        memory["host used, running"] = host_used_bytes()
        memory["nodes' cgroups, running"] = nodes_memory(client, m_ids)
        for i in m_ids:
            client.api.pause(i)
        time.sleep(3)
        memory["host used, paused"] = host_used_bytes()
        memory["nodes' cgroups, paused"] = nodes_memory(client, m_ids)
        for i in m_ids:
            client.api.unpause(i)
        failed = False
    finally:
        for m in procs.values():
            m.stop()
        if failed:
            for name, m in procs.items():
                sys.stderr.write(f"\n----- log of {name} -----\n{m.logs()[-4000:]}\n")
        for prefix, mid in ids.values():
            remove_containers_retry(mid)
            delete_keys(r, prefix)
        client.close()
        redis_proc.terminate()
        redis_proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)

    rows = []
    for case in ("resume from paused", "resume from stopped", "resume from archived", "warm-pool claim",
                 "cold create"):
        s = summarize(results[case])
        rows.append([case, s["n"], fmt(s["p50_ms"]), fmt(s["p90_ms"]), fmt(s["p99_ms"]), fmt(s["max_ms"])])
    print(markdown_table(["case", "n", "p50 ms", "p90 ms", "p99 ms", "max ms"], rows))
    print()
    n = args.memory_nodes
    mib = 1 << 20
    print(markdown_table([f"{n} nodes", "host used MiB (over before)", "nodes' cgroups MiB"], [
        ["running", fmt((memory["host used, running"] - memory["host used, before"]) / mib),
         fmt(memory["nodes' cgroups, running"] / mib)],
        ["paused", fmt((memory["host used, paused"] - memory["host used, before"]) / mib),
         fmt(memory["nodes' cgroups, paused"] / mib)],
    ]))
    print(load_line(load0))
    path = write_json("tiers_bench", {"loadavg_at_start": load0, "seconds": time.monotonic() - started,
                                      "latency": {k: summarize(v) for k, v in results.items()},
                                      "memory_bytes": memory})
    print(f"raw numbers: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
