"""Cluster: many sessions through HAProxy over three replicas on two Docker engines, against one
replica; then proxy throughput of a session forwarded through its owner.

Parts (all on 127.0.0.1): the main engine and a second one (``scripts/second-engine.sh``, started
if it is not running and stopped at the end only then); replicas ``a1``, ``a2`` (manager_id
``bench-a-…``, main engine) and ``b1`` (``bench-b-…``, second engine), one Redis key prefix, one
``cluster.internal_token``, ``cluster.proxy_through_owner: {bench-b-…: true}``; HAProxy round-robin
in front of the three (health check ``GET /alive``).

sessions   S sessions (default 200), C at a time (default 20). Each session: ``POST /get_cookie``
           (timed: creation latency), ``POST /get_available_tools`` with the cookie (a proxied
           tool call, timed), ``POST /release_session``. Any non-200 answer or exception counts as
           an error of its step. Run twice, in this order: through HAProxy (sessions placed on the
           replica that takes the request, so about 2/3 on engine A and 1/3 on engine B; tool calls
           land on any replica and are forwarded through b1 for B's nodes), then the same kind of
           run against ``a1`` directly (one replica, one engine) with 100 sessions by default
           (``--single-sessions``: 200 takes the whole benchmark past 3 minutes on 2 CPUs). At the end, containers labelled with
           either manager_id on either engine, node records and index members must all be 0.
throughput wrk -t2 -c16 -d5s --latency (after a 1 s warm-up), ``POST /`` with the cookie of a session
           owned by ``bench-a`` (node on engine A) or ``bench-b`` (node on engine B):
             node direct           the A node at its network address, with its X-Node-Secret
             a1 → own node         a1 proxies straight to its node
             b1 → own node         the owner of the B node, straight to it
             a1 → b1 → node        a1 forwards through the owner b1 (proxy_through_owner)
             LB → A node           HAProxy over the three; every replica proxies straight to the node
             LB → B node           HAProxy; 2/3 of the requests land on a1/a2 and go through b1

    .venv/bin/python -m benchmarks.cluster_bench [--sessions 200] [--single-sessions 100] [--concurrency 20]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import docker
import httpx

from benchmarks._support import (
    count_containers,
    engine2_start,
    engine2_stop,
    manager_members,
    node_direct,
    node_records,
    remove_containers_retry,
    run_wrk,
    wrk_script,
)
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
    write_json,
)
from testing.harness import HAProxy, ManagerProc

REPLICA_HEADER = "x-tsm-replica"


async def session_run(url: str, n: int, conc: int, tool_path: str) -> dict[str, Any]:
    sem = asyncio.Semaphore(conc)
    create: list[float] = []
    tool: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    created_on: collections.Counter[str] = collections.Counter()
    tool_on: collections.Counter[str] = collections.Counter()
    examples: dict[str, str] = {}
    async with httpx.AsyncClient(base_url=url, timeout=180, limits=httpx.Limits(max_connections=conc + 5)) as http:
        async def one() -> None:
            async with sem:
                step = "create"
                try:
                    t0 = time.perf_counter()
                    r = await http.post("/get_cookie")
                    if r.status_code != 200:
                        errors[f"create {r.status_code}"] += 1
                        examples.setdefault(f"create {r.status_code}", r.text[:200])
                        return
                    create.append(time.perf_counter() - t0)
                    created_on[r.headers.get(REPLICA_HEADER, "?")] += 1
                    node_id = r.cookies["node_id"]
                    cookie = {"Cookie": f"node_id={node_id}"}
                    step = "tool"
                    t0 = time.perf_counter()
                    r = await http.post(tool_path, headers=cookie)
                    if r.status_code == 200:
                        tool.append(time.perf_counter() - t0)
                        # a forwarded answer carries the owner's header, then the forwarder's
                        hops = [h.strip() for h in r.headers.get(REPLICA_HEADER, "?").split(",")]
                        tool_on[hops[-1] + (f" via {hops[0]}" if len(hops) > 1 else "")] += 1
                    else:
                        errors[f"tool {r.status_code}"] += 1
                        examples.setdefault(f"tool {r.status_code}", r.text[:200])
                    step = "release"
                    r = await http.post("/release_session", headers=cookie)
                    if r.status_code != 200 or r.json() != f"Release session: {node_id}":
                        errors[f"release {r.status_code}"] += 1
                        examples.setdefault(f"release {r.status_code}", r.text[:200])
                except (httpx.HTTPError, KeyError, ValueError) as exc:
                    errors[f"{step} {type(exc).__name__}"] += 1
                    examples.setdefault(f"{step} {type(exc).__name__}", repr(exc)[:200])

        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        wall = time.perf_counter() - t0
    return {"n": n, "concurrency": conc, "wall_s": wall, "create": summarize(create), "tool": summarize(tool),
            "errors": dict(errors), "error_examples": examples, "created_on": dict(created_on),
            "tool_on": dict(tool_on), "create_samples_ms": [x * 1000 for x in create]}


def wait_replicas(url: str, token: str, n: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    got = 0
    while time.monotonic() < deadline:
        r = httpx.get(url + "/admin/replicas", headers={"authorization": f"Bearer {token}"}, timeout=5)
        got = len(r.json()["replicas"])
        if got >= n:
            return
        time.sleep(0.1)
    raise RuntimeError(f"only {got} of {n} replicas registered")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cluster_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=200, help="sessions through the balancer (default 200)")
    p.add_argument("--single-sessions", type=int, default=100,
                   help="sessions against one replica (default 100, to stay under 3 minutes; 0 skips)")
    p.add_argument("--concurrency", type=int, default=20, help="sessions at a time (default 20)")
    p.add_argument("--tool-path", default="/get_available_tools", help="the proxied call of each session")
    p.add_argument("--duration", type=int, default=5, help="seconds per wrk run (default 5; 0 skips)")
    p.add_argument("--connections", type=int, default=16, help="wrk connections (default 16)")
    p.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    p.add_argument("--wrk-path", default="/", help="path wrk posts to (default /)")
    args = p.parse_args(argv)
    single_n = args.single_sessions
    print(f"$ {command_line()}", flush=True)
    load0 = os.getloadavg()

    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="tsm-bench-cluster-"))
    client, r = docker_client(), redis_client()
    engine2, we_started = engine2_start()
    print(f"  second engine {engine2} ({'started by us' if we_started else 'already running'})",
          file=sys.stderr, flush=True)
    client2 = docker.DockerClient(base_url=engine2, version="1.41", timeout=60)
    prefix, mid_a, mid_b = bench_id("cl"), bench_id("a"), bench_id("b")
    internal, admin = uuid.uuid4().hex, uuid.uuid4().hex
    common = {"cluster": {"internal_token": internal, "heartbeat_seconds": 0.5, "replica_ttl_seconds": 2,
                          "proxy_through_owner": {mid_b: True}},
              "admin": {"token": admin}, "node": {"creation_wait_seconds": 120}}
    a1 = ManagerProc(base_config(prefix, mid_a, **common), tmp, "a1")
    a2 = ManagerProc(base_config(prefix, mid_a, **common), tmp, "a2")
    b1 = ManagerProc(base_config(prefix, mid_b, docker_host=engine2, **common), tmp, "b1")
    replicas = [a1, a2, b1]
    lb: HAProxy | None = None
    runs: dict[str, dict[str, Any]] = {}
    wrk_rows: list[dict[str, Any]] = []
    final: dict[str, int] = {}
    failed = True
    held: list[tuple[ManagerProc, str]] = []
    try:
        for m in replicas:
            m.start()
        lb = HAProxy([(str(m.cfg["replica_id"]), m.port) for m in replicas], tmp)
        wait_replicas(a1.url, admin, 3)

        # warm-up: one session on each engine, untimed
        for m in (a1, b1):
            w = httpx.post(m.url + "/get_cookie", timeout=60)
            httpx.post(m.url + "/release_session", headers={"Cookie": f"node_id={w.cookies['node_id']}"}, timeout=60)

        runs["cluster"] = asyncio.run(session_run(lb.url, args.sessions, args.concurrency, args.tool_path))
        print(f"  through HAProxy: {runs['cluster']['wall_s']:.1f} s, errors {runs['cluster']['errors']}",
              file=sys.stderr, flush=True)
        if single_n > 0:
            runs["single"] = asyncio.run(session_run(a1.url, single_n, args.concurrency, args.tool_path))
            print(f"  one replica: {runs['single']['wall_s']:.1f} s, errors {runs['single']['errors']}",
                  file=sys.stderr, flush=True)

        if args.duration > 0:
            sa = httpx.post(a1.url + "/get_cookie", timeout=60).cookies["node_id"]
            held.append((a1, sa))
            sb = httpx.post(b1.url + "/get_cookie", timeout=60).cookies["node_id"]
            held.append((b1, sb))
            host, port, secret = node_direct(client, sa)  # at its network address, with its secret
            scripts = {"A": wrk_script(tmp / "a.lua", sa), "B": wrk_script(tmp / "b.lua", sb),
                       "direct": wrk_script(tmp / "direct.lua", sa, secret=secret)}
            cases = [("node direct", "A", f"http://{host}:{port}", "direct"),
                     ("a1 → own node", "A", a1.url, "A"), ("b1 → own node", "B", b1.url, "B"),
                     ("a1 → b1 → node (through owner)", "B", a1.url, "B"),
                     ("LB → A node", "A", lb.url, "A"), ("LB → B node (2/3 through owner)", "B", lb.url, "B")]
            for name, owner, base, script in cases:
                url = base + args.wrk_path
                check = httpx.post(url, headers={"Cookie": f"node_id={sa if owner == 'A' else sb}",
                                                 **({"X-Node-Secret": secret} if script == "direct" else {})}, timeout=10)
                if check.status_code != 200:
                    raise RuntimeError(f"{name}: {url} answered {check.status_code}: {check.text[:200]}")
                run_wrk(url, scripts[script], 1, args.connections, args.threads)
                res = run_wrk(url, scripts[script], args.duration, args.connections, args.threads)
                wrk_rows.append({"case": name, "owner": owner, **res})
                print(f"  {name:<34} {res['rps']:8.0f} req/s  p50 {res['p50_us'] / 1000:6.2f} ms  "
                      f"p99 {res['p99_us'] / 1000:6.2f} ms  errors {res['errors'] + res['non_2xx']}",
                      file=sys.stderr, flush=True)
            for m, nid in held:
                httpx.post(m.url + "/release_session", headers={"Cookie": f"node_id={nid}"}, timeout=60)
            held.clear()

        # the end state: nothing left anywhere
        final = {"containers_a": count_containers(client, mid_a), "containers_b": count_containers(client2, mid_b),
                 "containers_a_on_engine2": count_containers(client2, mid_a),
                 "containers_b_on_engine1": count_containers(client, mid_b),
                 "node_records": node_records(r, prefix), "index_a": manager_members(r, prefix, mid_a),
                 "index_b": manager_members(r, prefix, mid_b)}
        failed = False
    finally:
        for m, nid in held:
            try:
                httpx.post(m.url + "/release_session", headers={"Cookie": f"node_id={nid}"}, timeout=60)
            except httpx.HTTPError:
                pass
        if lb is not None:
            lb.stop()
        for m in replicas:
            if failed:
                sys.stderr.write(f"----- log of {m.cfg['replica_id']} -----\n{m.logs()[-3000:]}\n")
            m.stop()
        client.close()
        client2.close()
        removed = remove_containers_retry(mid_a) + remove_containers_retry(mid_b, base_url=engine2)
        removed += remove_containers_retry(mid_b) + remove_containers_retry(mid_a, base_url=engine2)
        deleted = delete_keys(r, prefix)
        r.close()
        if we_started:
            engine2_stop()
        if not failed:
            shutil.rmtree(tmp, ignore_errors=True)

    rows = []
    for name, label, nrep in (("cluster", "HAProxy → a1, a2, b1 (2 engines)", 3), ("single", "a1 directly (1 engine)", 1)):
        if name not in runs:
            continue
        x = runs[name]
        c, t = x["create"], x["tool"]
        rows.append([label, nrep, x["n"], x["concurrency"], sum(x["errors"].values()), fmt(c["p50_ms"]),
                     fmt(c["p99_ms"]), fmt(t["p50_ms"]), fmt(t["p99_ms"]), f"{x['n'] / x['wall_s']:.1f}"])
    print(f"\n(a) sessions: get_cookie (timed) + POST {args.tool_path} (timed) + release_session\n")
    print(markdown_table(["case", "replicas", "sessions", "conc", "errors", "create p50 ms", "create p99 ms",
                          "tool p50 ms", "tool p99 ms", "sessions/s"], rows))
    for name, x in runs.items():
        if x["errors"]:
            print(f"  {name} errors: {x['errors']} e.g. {x['error_examples']}")
    if "cluster" in runs:
        print(f"  through HAProxy, sessions created by: {runs['cluster']['created_on']}; "
              f"tool calls served by: {runs['cluster']['tool_on']}")
    if "cluster" in runs and "single" in runs:
        c, s = runs["cluster"]["create"], runs["single"]["create"]
        print(f"  creation p50 cluster/single: {c['p50_ms'] / s['p50_ms']:.2f}×, p99 {c['p99_ms'] / s['p99_ms']:.2f}×")
    zero = bool(final) and all(v == 0 for v in final.values())
    print(f"\nend state: containers {mid_a} on engine A = {final.get('containers_a')}, {mid_b} on engine B = "
          f"{final.get('containers_b')} (cross: {final.get('containers_a_on_engine2')}, "
          f"{final.get('containers_b_on_engine1')}), node records = {final.get('node_records')}, index members = "
          f"{final.get('index_a')} + {final.get('index_b')}: {'all 0 — PASS' if zero else 'NOT all 0 — FAIL'}")

    if wrk_rows:
        direct = next((row for row in wrk_rows if row["case"] == "node direct"), None)
        trows = []
        for row in wrk_rows:
            added = "-" if direct is None or row is direct else f"{(row['p50_us'] - direct['p50_us']) / 1000:+.2f}"
            trows.append([row["case"], row["owner"], fmt(row["rps"], 0), f"{row['p50_us'] / 1000:.2f}",
                          f"{row['p99_us'] / 1000:.2f}", added, row["errors"] + row["non_2xx"]])
        print(f"\n(b) proxy throughput: wrk -t{args.threads} -c{args.connections} -d{args.duration}s --latency, "
              f"POST {args.wrk_path} with the session cookie\n")
        print(markdown_table(["path", "node owner", "req/s", "p50 ms", "p99 ms", "added p50 ms vs direct",
                              "errors"], trows))
    print(f"\ncleanup: {removed} container(s) removed, {deleted} key(s) deleted; second engine "
          f"{'stopped' if we_started else 'left running (it was running before)'}")
    path = write_json("cluster_bench", {"loadavg_at_start": load0,
        "params": {**vars(args), "single_sessions": single_n, "manager_ids": [mid_a, mid_b], "key_prefix": prefix,
                   "engine2": engine2, "engine2_started_here": we_started},
        "runs": runs, "wrk": wrk_rows, "end_state": final, "end_state_zero": zero,
        "elapsed_s": time.monotonic() - started, "cleanup": {"containers_removed": removed, "keys_deleted": deleted},
    })
    print(load_line(load0))
    print(f"results: {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    return 0 if zero else 1


if __name__ == "__main__":
    sys.exit(main())
