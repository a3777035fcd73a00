"""Checker: lease takeover after SIGKILL of the holder, and the reconcile cycle at 10,000 records.

(a) takeover: three replicas of one manager_id (real processes, ``checker.lease_ttl_seconds``
    5 by default, interval 1 s). Each trial reads the holder from ``<prefix>:mgr:<mid>:lease``
    (``replica_id:token``), notes the lease's remaining TTL, SIGKILLs the holder, starts a
    replacement replica (in the background) and polls the key every 5 ms until a different
    holder appears. Takeover time is from the kill to that moment; "wait for expiry" is the
    TTL that was left at the kill, "acquire lag" the rest (the contenders retry every
    min(1 s, TTL/3)). Goal (design): takeover within about one TTL.

(b) cycle: ~50 real nodes made through ``POST /get_cookie`` on one replica of a manager_id
    (its built-in checker off), plus 10,000 synthetic node records of the same manager_id written
    with ``Store.put_node`` (status running, ready, active now, ids of 64 hex chars). A
    ``checker.service.Checker`` is built in this process as ``checker.main`` builds one, takes the
    lease, and ``await checker.cycle()`` is timed directly (the lease is renewed between cycles,
    untimed). Two cases:

    steady   the engine listing is the real one (one Docker call, ~50 containers) with a
             synthetic running container appended for each synthetic record, so the plan sees
             every record matched and has nothing to do: the steady state of a large fleet.
             Not included: the engine building and the SDK parsing a 10,000-container JSON list.
    forget   the real listing only: the plan forgets the 10,000 records without a container and
             deletes them in one fenced script (records re-inserted, untimed, before each cycle).

    Redis round trips per cycle are counted on the client (each command sent alone, each
    script call, each pipeline execute = one), with the commands inside pipelines beside them.
    Goal: a steady cycle under 100 ms.

    .venv/bin/python -m benchmarks.checker_bench [--trials 10] [--records 10000] [--containers 50]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import httpx

from benchmarks._support import RoundTrips, lease_holder, remove_containers_retry
from benchmarks.common import (
    base_config,
    bench_id,
    command_line,
    delete_keys,
    docker_client,
    fmt,
    load_line,
    markdown_table,
    percentile,
    redis_client,
    summarize,
    verdict,
    write_json,
)
from testing.harness import ManagerProc

P = ParamSpec("P")
R = TypeVar("R")

GOAL_CYCLE_MS = 100.0


# --- (a) takeover ---------------------------------------------------------------------------------
def takeover(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    prefix, mid = bench_id("lease"), bench_id("lease")
    r = redis_client()
    cfg = base_config(prefix, mid, checker={"lease_ttl_seconds": args.ttl, "interval_seconds": 1.0})
    procs: dict[str, ManagerProc] = {}
    trials: list[dict[str, Any]] = []
    seq = 0
    failed = True

    def new_replica() -> ManagerProc:
        nonlocal seq
        seq += 1
        m = ManagerProc(cfg, tmp, f"r{seq}")
        procs[str(m.cfg["replica_id"])] = m
        return m

    def wait_holder(timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            holder, _ = lease_holder(r, prefix, mid)
            proc = procs[holder].proc if holder in procs else None
            if holder is not None and proc is not None and proc.poll() is None:
                return holder
            time.sleep(0.05)
        raise RuntimeError(f"no live replica holds the lease after {timeout}s")

    try:
        for _ in range(3):
            new_replica().start()
        wait_holder(args.ttl * 3)
        for i in range(args.trials):
            wait_holder(args.ttl * 3)
            time.sleep(random.uniform(0.0, args.ttl / 3))  # kill at a random point of the renewal period
            holder, pttl = lease_holder(r, prefix, mid)
            if holder is None:  # a live holder renews within the TTL: a lapse here is the bug to report
                raise RuntimeError(f"trial {i + 1}: the lease lapsed while its holder was alive")
            victim = procs[holder]
            t0 = time.monotonic()
            os.kill(victim.pid, signal.SIGKILL)
            replacement = new_replica()
            starter = threading.Thread(target=replacement.start, daemon=True)
            starter.start()
            new = None
            deadline = t0 + args.ttl * 4
            while time.monotonic() < deadline:
                h, _ = lease_holder(r, prefix, mid)
                if h is not None and h != holder:
                    new = h
                    break
                time.sleep(0.005)
            elapsed = time.monotonic() - t0
            assert victim.proc is not None  # it was started: it held the lease
            victim.proc.wait()
            victim.stop()
            starter.join(30)
            if new is None:
                raise RuntimeError(f"trial {i + 1}: no new holder within {args.ttl * 4}s")
            trials.append({"trial": i + 1, "killed": holder, "new_holder": new, "ttl_left_ms": pttl,
                           "takeover_s": elapsed, "acquire_lag_s": elapsed - pttl / 1000.0,
                           "new_is_replacement": new == replacement.cfg["replica_id"]})
            print(f"  trial {i + 1:2d}: killed {holder}, TTL left {pttl / 1000:.2f} s, "
                  f"{new} took over after {elapsed:.2f} s", file=sys.stderr, flush=True)
        failed = False
    finally:
        for m in procs.values():
            if failed and m.proc is not None:
                sys.stderr.write(f"----- log of {m.cfg['replica_id']} -----\n{m.logs()[-3000:]}\n")
            m.stop()
        remove_containers_retry(mid)  # the replicas made the manager_id's node network at start
        deleted = delete_keys(r, prefix)
        r.close()
    return {"prefix": prefix, "manager_id": mid, "ttl_s": args.ttl, "trials": trials, "keys_deleted": deleted}


# --- (b) reconcile cycle --------------------------------------------------------------------------
def hex64() -> str:
    return os.urandom(32).hex()


async def cycle_bench(args: argparse.Namespace, prefix: str, mid: str, node_ids: list[str]) -> dict[str, Any]:
    from checker import reconcile
    from checker.service import Checker
    from nodeops.context import NodeOps
    from shared.config import config_from_dict
    from shared.engines import open_backend
    from shared.engines.base import NodeInfo
    from shared.keys import Keys
    from shared.models import NodeRecord, NodeStatus, ReplicaInfo
    from shared.store import Store, connect

    cfg = config_from_dict(base_config(prefix, mid, builtin_monitor=False, replica_id=f"{mid}-inproc"))
    redis = connect(cfg.redis.url, cfg.redis.socket_timeout_seconds)
    store = Store(redis, Keys(prefix), cfg.events.stream_maxlen)
    backend = open_backend(cfg)
    checker = Checker(NodeOps(cfg=cfg, store=store, backend=backend, http=httpx.AsyncClient(trust_env=False),
                              replica=ReplicaInfo(replica_id=cfg.replica_id, manager_id=mid, url="",
                                                  version="bench", started_at=time.time())))
    rt = RoundTrips(redis)

    synthetic_ids = [hex64() for _ in range(args.records)]
    synth_port = {nid: 20000 + i % 40000 for i, nid in enumerate(synthetic_ids)}

    async def insert_synthetic() -> float:
        t0 = time.perf_counter()
        now = time.time()
        sem = asyncio.Semaphore(64)

        async def put(nid: str) -> None:
            rec = NodeRecord(id=nid, short_id=nid[:12], manager_id=mid, status=NodeStatus.RUNNING,
                             health="healthy", host="127.0.0.1", port=synth_port[nid], created_at=now,
                             ready_at=now, updated_at=now, last_request_at=now, replica_id="bench-synthetic",
                             role="node", image="toolserver-node:latest")
            async with sem:
                await store.put_node(rec)

        await asyncio.gather(*(put(n) for n in synthetic_ids))
        return time.perf_counter() - t0

    fake_containers = [NodeInfo(id=nid, owner=mid, role="node", status=NodeStatus.RUNNING, health="none",
                                created=time.time(), host="127.0.0.1", port=synth_port[nid])
                       for nid in synthetic_ids]
    real_list = backend.nodes
    phases: dict[str, float] = {}
    engine_real: list[int] = []

    def timed(name: str, fn: Callable[P, Awaitable[R]]) -> Callable[P, Coroutine[Any, Any, R]]:
        async def wrapper(*a: P.args, **kw: P.kwargs) -> R:
            t0 = time.perf_counter()
            try:
                return await fn(*a, **kw)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - t0
        return wrapper

    def timed_sync(name: str, fn: Callable[P, R]) -> Callable[P, R]:
        def wrapper(*a: P.args, **kw: P.kwargs) -> R:
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - t0
        return wrapper

    async def list_with_synthetic(owner: str, role: str | None = None) -> list[Any]:
        got = await real_list(owner, role)
        engine_real.append(len(got))
        return got + fake_containers

    async def list_real(owner: str, role: str | None = None) -> list[Any]:
        got = await real_list(owner, role)
        engine_real.append(len(got))
        return got

    orig_plan = reconcile.plan
    reconcile.plan = timed_sync("plan (pure)", orig_plan)
    store.manager_node_ids = timed("SMEMBERS node index", store.manager_node_ids)  # type: ignore[method-assign]
    store.get_nodes = timed("HGETALL records (pipeline)", store.get_nodes)  # type: ignore[method-assign]
    store.idle_since = timed("ZRANGEBYSCORE idle", store.idle_since)  # type: ignore[method-assign]
    store.fenced = timed("fenced write (script)", store.fenced)  # type: ignore[method-assign]
    store.live_replicas = timed("replica registry (gauges)", store.live_replicas)  # type: ignore[method-assign]

    out: dict[str, Any] = {"synthetic_records": args.records, "real_nodes": len(node_ids)}
    try:
        if not await checker.lease.acquire():
            raise RuntimeError("could not acquire the checker lease (another holder?)")
        ins = await insert_synthetic()
        out["insert_s"] = ins
        print(f"  {args.records} synthetic records written in {ins:.2f} s", file=sys.stderr, flush=True)

        cases: dict[str, dict[str, Any]] = {}

        async def run_case(name: str, iterations: int, listing: Any, before: Any = None) -> None:
            backend.nodes = timed("engine list (1 Docker call)", listing)  # type: ignore[method-assign]
            samples, trips, cmds, per_phase, plans = [], [], [], [], []
            for i in range(iterations + 1):  # the first one is an untimed warm-up (script load, caches)
                if before is not None:
                    await before()
                if not await checker.lease.renew() and not await checker.lease.acquire():
                    raise RuntimeError("lost the checker lease and could not take it back")
                rt.reset()
                phases.clear()
                t0 = time.perf_counter()
                p = await checker.cycle()
                elapsed = time.perf_counter() - t0
                if i == 0:
                    continue
                samples.append(elapsed)
                trips.append(rt.calls)
                cmds.append(rt.commands)
                per_phase.append(dict(phases))
                plans.append({"updates": len(p.updates), "forget": len(p.forget), "adopt": len(p.adopt),
                              "remove": len(p.remove), "idle_stop": len(p.idle_stop)})
                print(f"  {name} cycle {i}: {elapsed * 1000:.1f} ms, {rt.calls} round trips "
                      f"({rt.commands} commands), plan {plans[-1]}", file=sys.stderr, flush=True)
            cases[name] = {"samples_s": samples, "round_trips": trips, "commands": cmds, "phases": per_phase,
                           "plans": plans, **summarize(samples)}

        async def reinsert_if_forgotten() -> None:
            if await store.redis.scard(store.keys.manager_nodes(mid)) < args.records:
                await insert_synthetic()

        await run_case("steady", args.cycles, list_with_synthetic, reinsert_if_forgotten)
        if args.forget_cycles > 0:
            await run_case("forget", args.forget_cycles, list_real, reinsert_if_forgotten)
        out["cases"] = cases
        out["engine_listing_real_containers"] = engine_real[-1] if engine_real else 0
    finally:
        reconcile.plan = orig_plan
        await checker.lease.release()
        await backend.close()
        await redis.aclose()
    return out


def cycle(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    prefix, mid = bench_id("cyc"), bench_id("cyc")
    client, r = docker_client(), redis_client()  # fails early when the engine or image is missing
    cfg = base_config(prefix, mid, builtin_monitor=False)
    m = ManagerProc(cfg, tmp, "cycle")
    node_ids: list[str] = []
    failed = True
    try:
        m.start()
        t0 = time.monotonic()

        async def create_all() -> None:
            sem = asyncio.Semaphore(4)
            async with httpx.AsyncClient(base_url=m.url, timeout=60) as http:
                async def one() -> None:
                    async with sem:
                        resp = await http.post("/get_cookie")
                        if resp.status_code != 200:
                            raise RuntimeError(f"/get_cookie answered {resp.status_code}: {resp.text[:200]}")
                        node_ids.append(resp.cookies["node_id"])
                await asyncio.gather(*(one() for _ in range(args.containers)))

        asyncio.run(create_all())
        print(f"  {len(node_ids)} real nodes created in {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)
        out = asyncio.run(cycle_bench(args, prefix, mid, node_ids))
        failed = False
    finally:
        if failed:
            sys.stderr.write(f"----- manager log -----\n{m.logs()[-4000:]}\n")
        m.stop()
        client.close()
        removed = remove_containers_retry(mid)
        deleted = delete_keys(r, prefix)
        r.close()
    out.update({"prefix": prefix, "manager_id": mid, "containers_removed": removed, "keys_deleted": deleted})
    return out


# --- report ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.checker_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=10, help="takeover trials (default 10; 0 skips)")
    p.add_argument("--ttl", type=float, default=5.0, help="checker.lease_ttl_seconds (default 5)")
    p.add_argument("--records", type=int, default=10_000, help="synthetic node records (default 10000)")
    p.add_argument("--containers", type=int, default=50, help="real nodes (default 50; 0 skips part b)")
    p.add_argument("--cycles", type=int, default=10, help="timed steady cycles (default 10)")
    p.add_argument("--forget-cycles", type=int, default=2, help="timed forget cycles (default 2)")
    args = p.parse_args(argv)
    print(f"$ {command_line()}", flush=True)
    load0 = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="tsm-bench-checker-"))
    result: dict[str, Any] = {"params": vars(args)}
    started = time.monotonic()
    if args.trials > 0:
        result["takeover"] = takeover(args, tmp)
    if args.containers > 0 or args.records > 0:
        result["cycle"] = cycle(args, tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    result["elapsed_s"] = time.monotonic() - started
    result["loadavg_at_start"] = load0

    if "takeover" in result:
        tr = result["takeover"]["trials"]
        take = [t["takeover_s"] for t in tr]
        left = [t["ttl_left_ms"] / 1000 for t in tr]
        lag = [t["acquire_lag_s"] for t in tr]
        rows = [[name, len(v), f"{min(v):.2f}", f"{percentile(v, 50):.2f}", f"{max(v):.2f}",
                 f"{percentile(v, 50) / args.ttl:.2f}"] for name, v in
                (("takeover after SIGKILL", take), ("  of which: TTL left at the kill", left),
                 ("  of which: acquire lag after expiry", lag))]
        print(f"\n(a) lease takeover, 3 replicas, lease TTL {args.ttl:g} s, renew every TTL/3, "
              f"contenders retry every {min(1.0, args.ttl / 3):g} s\n")
        print(markdown_table(["case", "trials", "min s", "median s", "max s", "median / TTL"], rows))
        ok = max(take) <= args.ttl * 1.25
        result["takeover"]["goal_met"] = ok
        print(f"\ngoal: takeover within about one TTL ({args.ttl:g} s; max ≤ 1.25 × TTL): {verdict(ok)} "
              f"(max {max(take):.2f} s = {max(take) / args.ttl:.2f} × TTL)")

    if "cycle" in result and "cases" in result["cycle"]:
        cy = result["cycle"]
        rows = []
        for name, c in cy["cases"].items():
            fenced = percentile([ph.get("fenced write (script)", 0.0) * 1000 for ph in c["phases"]], 50)
            rows.append([name, f"{cy['synthetic_records']:,} + {cy['real_nodes']}", c["n"], fmt(c["p50_ms"]),
                         fmt(c["max_ms"]), f"{percentile(c['round_trips'], 50):.0f}",
                         f"{percentile(c['commands'], 50):,.0f}", fmt(fenced), f"{1000 / c['p50_ms']:.1f}"])
        print(f"\n(b) Checker.cycle() in process, {cy['engine_listing_real_containers']} real containers "
              f"in the engine listing\n")
        print(markdown_table(["case", "records", "cycles", "p50 ms", "max ms", "Redis round trips",
                              "Redis commands", "fenced script ms", "cycles/s"], rows))
        steady = cy["cases"]["steady"]
        names = list(steady["phases"][0])
        prow = [[n, fmt(percentile([ph.get(n, 0.0) * 1000 for ph in steady["phases"]], 50))] for n in names]
        other = [s * 1000 - sum(ph.values()) * 1000 for s, ph in zip(steady["samples_s"], steady["phases"])]
        prow.append(["rest (ops, counts, metrics)", fmt(percentile(other, 50))])
        print("\nsteady cycle, where the time goes (median per phase)\n")
        print(markdown_table(["phase", "p50 ms"], prow))
        ok = steady["p50_ms"] < GOAL_CYCLE_MS
        cy["goal_met"] = ok
        print(f"\ngoal: steady cycle < {GOAL_CYCLE_MS:.0f} ms at {cy['synthetic_records']:,} records: {verdict(ok)} "
              f"(p50 {steady['p50_ms']:.1f} ms" + ("" if ok else f", {steady['p50_ms'] - GOAL_CYCLE_MS:+.1f} ms over")
              + ")")
        print(f"cleanup: {cy['containers_removed']} container(s) removed, {cy['keys_deleted']} key(s) deleted")
    path = write_json("checker_bench", result)
    print(load_line(load0))
    print(f"results: {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
