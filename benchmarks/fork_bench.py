"""Forks and snapshots: how long a fork holds its source, how long until all copies answer, what
a snapshot costs, and a session started from a snapshot against a cold one.

One replica on a private Redis, workspaces at the project's default bound (1 GiB, loop-mounted
ext4), a source session holding 200 MB of written data (random, so nothing compresses or dedups):

stall       --forks forks of one copy each while a writer calls the source without pause (one
            file written per tool call): the seconds the manager held the source's writes (its
            own figure, the fsfreeze window) and the slowest tool call the writer saw meanwhile.
10 copies   one fork of --copies copies: from the request until every copy has answered a tool
            call (the fork answers once all are ready; each is then called once, in parallel).
snapshot    --n snapshots of the source, each timed (request to answer), then deleted.
start       --n sessions from a snapshot against --n cold ones, alternated, each timed from
            POST /get_cookie until its first tool call answered (time to interactive).
floor       --copies bare containers of the node image (no workspace, no limits, no manager)
            created and started at once, until each answers GET /: what that many container
            boots cost on this machine at least, whatever a fork copies (--no-floor skips it).

    .venv/bin/python -m benchmarks.fork_bench [--forks 10] [--copies 10] [--n 5] [--image-dir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import (
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
    start_private_redis,
    summarize,
    write_json,
)
from benchmarks.create_latency import wait_http
from testing.harness import ManagerProc

WS = "/app/workspace"
IMAGE_DIR = "/var/lib/toolserver-manager/workspaces"


def tool(http: httpx.Client, command: str) -> str:
    r = http.post("/execute_tool", json={"tool_name": "shell_command_executor", "arguments": {"command": command}})
    if r.status_code != 200:
        raise RuntimeError(f"tool call answered {r.status_code}: {r.text[:300]}")
    return str(r.json()["data"]["display"])


def client(url: str, node_id: str | None = None) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=300, cookies={"node_id": node_id} if node_id else None)


PHASE = "toolserver_node_create_phase_duration_seconds_sum"


def phase_sums(url: str) -> dict[str, float]:
    """Seconds every creation so far spent in each phase (queue, workspace, create, start, probe ...)."""
    out: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=60).text.splitlines():
        if line.startswith(PHASE + "{"):
            name = line.split('phase="', 1)[1].split('"', 1)[0]
            out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def release(url: str, ids: list[str]) -> None:
    for i in ids:
        with client(url, i) as c:
            c.post("/release_session")


def interactive(url: str, body: dict[str, Any] | None) -> tuple[float, str]:
    """Seconds from POST /get_cookie to the first tool call answered; the session id."""
    with client(url) as c:
        t0 = time.perf_counter()
        r = c.post("/get_cookie", json=body) if body else c.post("/get_cookie")
        if r.status_code != 200:
            raise RuntimeError(f"/get_cookie answered {r.status_code}: {r.text[:300]}")
        c.cookies.set("node_id", r.cookies["node_id"])
        tool(c, "true")
        return time.perf_counter() - t0, r.cookies["node_id"]


def bare_floor(docker: Any, n: int, mid: str) -> float:
    """Seconds from creating n bare node containers at once until every one answered GET /."""
    t0 = time.perf_counter()

    def one(_: int) -> None:
        c = docker.containers.create(NODE_IMAGE, init=True, ports={f"{NODE_PORT}/tcp": ("127.0.0.1", None)},
                                     labels={LABEL: mid, ROLE_LABEL: "bench"},
                                     environment={"NODE_SECRET": BENCH_NODE_SECRET})
        c.start()
        c.reload()
        port = int(c.attrs["NetworkSettings"]["Ports"][f"{NODE_PORT}/tcp"][0]["HostPort"])
        wait_http("127.0.0.1", port, t0, f"floor container {c.short_id}")

    with ThreadPoolExecutor(n) as pool:
        list(pool.map(one, range(n)))
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fork_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--forks", type=int, default=10, help="forks timed for the stall (default 10)")
    p.add_argument("--copies", type=int, default=10, help="copies of the one big fork (default 10)")
    p.add_argument("--n", type=int, default=5, help="snapshots, and starts of each kind (default 5)")
    p.add_argument("--image-dir", default=IMAGE_DIR,
                   help=f"node.disk.image_dir: where workspace images go (default {IMAGE_DIR}); one on a file "
                        "system with reflinks (XFS, btrfs) makes copies metadata operations")
    p.add_argument("--concurrency", type=int, default=0,
                   help="creation.concurrency: creations at once (default: the project's, 4)")
    p.add_argument("--pool", type=int, default=0,
                   help="a warm pool of this many nodes (pool.size), full before the big fork and before each "
                        "start: the fork's copies and the sessions from a snapshot are handed to pooled nodes, and "
                        "the plain starts are pool claims")
    p.add_argument("--no-floor", action="store_true", help="skip the bare containers' floor")
    args = p.parse_args(argv)
    seeds_dir = os.path.join(args.image_dir, "seeds")
    print(f"$ {command_line()}", flush=True)
    load0 = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="tsm-bench-fork-"))
    redis_proc, redis_url = start_private_redis(tmp)
    docker, r = docker_client(), redis_client(redis_url)
    prefix, mid = bench_id("fork"), bench_id("fork")
    m = ManagerProc(base_config(prefix, mid, redis={"url": redis_url}, quota={"per_client": 0},
                                node={"creation_wait_seconds": 120, "idling_close_minutes": None,
                                      "disk": {"image_dir": args.image_dir},
                                      "tiers": {"pause_after_seconds": None, "archive_after_seconds": None}},
                                fork={"max_count": max(16, args.copies)},
                                pool={"size": args.pool, "max_size": args.pool, "max_age_seconds": 3600},
                                checker={"interval_seconds": 0.3},
                                **({"creation": {"concurrency": args.concurrency}} if args.concurrency else {})),
                    tmp, "fork")
    # the manager names its saved copies with its key prefix's hash: only those are the run's to remove
    tag = hashlib.sha256(prefix.encode()).hexdigest()[:8]
    out: dict[str, Any] = {}
    failed = True
    try:
        m.start()
        url = m.url
        interactive(url, None)  # warm-up: image, network
        with client(url) as src:
            assert src.post("/get_cookie").status_code == 200
            src_id = src.cookies["node_id"]
            src.cookies.set("node_id", src_id)
            tool(src, f"head -c 200M /dev/urandom > {WS}/data.bin && mkdir -p {WS}/w && sync")
            print("  source ready (200 MB written)", file=sys.stderr, flush=True)

            stalls, worst, fork_s = [], [], []
            for _ in range(args.forks):
                stop = threading.Event()
                lat: list[float] = []

                def writer(stop: threading.Event = stop, lat: list[float] = lat) -> None:
                    with client(url, src_id) as w:
                        n = 0
                        while not stop.is_set():
                            t0 = time.perf_counter()
                            tool(w, f"echo {n} > {WS}/w/{n}")
                            lat.append(time.perf_counter() - t0)
                            n += 1

                t = threading.Thread(target=writer)
                t.start()
                time.sleep(0.3)
                try:
                    t0 = time.perf_counter()
                    resp = src.post("/fork_session", json={"count": 1})
                    fork_s.append(time.perf_counter() - t0)
                finally:
                    stop.set()
                    t.join()
                if resp.status_code != 200:
                    raise RuntimeError(f"fork answered {resp.status_code}: {resp.text[:300]}")
                stalls.append(resp.json()["stall_seconds"])
                worst.append(max(lat))
                release(url, resp.json()["sessions"])
            out["stall"] = {"held": summarize(stalls), "slowest_call": summarize(worst), "fork_1": summarize(fork_s)}
            print("  stall measured", file=sys.stderr, flush=True)

            pool_key = f"{prefix}:mgr:{mid}:pool"

            def pool_full() -> None:
                # the refills' boots are over: what is timed next does not share the CPUs with them
                deadline = time.monotonic() + 600
                while r.llen(pool_key) < args.pool:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"the pool did not fill ({r.llen(pool_key)} of {args.pool})")
                    time.sleep(0.2)
                time.sleep(5)

            if args.pool:  # the copies go to pooled nodes: a full pool first
                pool_full()
            before = phase_sums(url)
            t0 = time.perf_counter()
            resp = src.post("/fork_session", json={"count": args.copies})
            if resp.status_code != 200:
                raise RuntimeError(f"fork answered {resp.status_code}: {resp.text[:300]}")
            copies = resp.json()["sessions"]
            answered = time.perf_counter() - t0

            def call(i: str) -> None:
                with client(url, i) as c:
                    tool(c, "true")

            with ThreadPoolExecutor(len(copies)) as pool:
                list(pool.map(call, copies))
            after = phase_sums(url)
            out["copies"] = {"n": len(copies), "fork_answered_s": answered,
                             "all_answered_s": time.perf_counter() - t0,
                             "stall_s": resp.json()["stall_seconds"], "from_pool": resp.json().get("from_pool", 0),
                             # where a copy's creation spent its time, on average over the copies
                             "phases_mean_s": {k: (after.get(k, 0.0) - before.get(k, 0.0)) / len(copies)
                                               for k in after}}
            release(url, copies)
            print("  copies measured", file=sys.stderr, flush=True)

            snaps = []
            for i in range(args.n):
                t0 = time.perf_counter()
                resp = src.post("/snapshot_session", json={"name": f"bench-{i}"})
                snaps.append(time.perf_counter() - t0)
                if resp.status_code != 200:
                    raise RuntimeError(f"snapshot answered {resp.status_code}: {resp.text[:300]}")
            out["snapshot"] = summarize(snaps)
            for i in range(1, args.n):
                src.delete(f"/snapshots/bench-{i}")

            cold, warm, made = [], [], []
            for _ in range(args.n):  # with a pool, "cold" is a claim, each from a full pool
                if args.pool:
                    pool_full()
                s, node = interactive(url, None)
                cold.append(s)
                made.append(node)
                if args.pool:
                    pool_full()
                s, node = interactive(url, {"snapshot": "bench-0"})
                warm.append(s)
                made.append(node)
            release(url, made)
            src.delete("/snapshots/bench-0")
            out["start"] = {"cold": summarize(cold), "snapshot": summarize(warm)}
        if not args.no_floor:
            out["floor_s"] = bare_floor(docker, args.copies, mid)
            remove_containers(docker, mid)
            print("  floor measured", file=sys.stderr, flush=True)
        failed = False
    finally:
        m.stop()
        if failed:
            sys.stderr.write(f"\n----- log -----\n{m.logs()[-4000:]}\n")
        remove_containers(docker, mid)
        delete_keys(r, prefix)
        redis_proc.terminate()
        redis_proc.wait()
        for name in os.listdir(seeds_dir) if os.path.isdir(seeds_dir) else []:
            if name.startswith((f"snap-{tag}-", f"fork-{tag}-")):
                path = os.path.join(seeds_dir, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
        shutil.rmtree(tmp, ignore_errors=True)

    st, cp, sn = out["stall"], out["copies"], out["snapshot"]
    sa = out.get("start")
    ratio = sa["snapshot"]["p50_ms"] / sa["cold"]["p50_ms"] if sa else 0.0
    rows = [
        ("source writes held (fsfreeze), 200 MB in 1 GiB", args.forks, fmt(st["held"]["p50_ms"]),
         fmt(st["held"]["max_ms"]), "goal <= 1000 ms"),
        ("slowest source tool call during a fork", args.forks, fmt(st["slowest_call"]["p50_ms"]),
         fmt(st["slowest_call"]["max_ms"]), ""),
        ("fork into 1 (request to answer)", args.forks, fmt(st["fork_1"]["p50_ms"]), fmt(st["fork_1"]["max_ms"]), ""),
        (f"fork into {cp['n']}: until all answered a tool call", 1, fmt(cp["all_answered_s"] * 1000),
         fmt(cp["all_answered_s"] * 1000), f"goal <= 2000 ms; {cp['from_pool']} from the pool"),
        ("snapshot (request to answer)", args.n, fmt(sn["p50_ms"]), fmt(sn["max_ms"]), ""),
    ]
    if sa:
        plain = "pool claim (no snapshot)" if args.pool else "cold create"
        rows += [(f"{plain} to first tool answer", args.n, fmt(sa["cold"]["p50_ms"]), fmt(sa["cold"]["max_ms"]), ""),
                 ("start from snapshot to first tool answer" + (" (a pooled node given it)" if args.pool else ""),
                  args.n, fmt(sa["snapshot"]["p50_ms"]), fmt(sa["snapshot"]["max_ms"]),
                  f"{ratio:.2f}x a {plain}" + ("" if args.pool else " (goal <= 1.2x)"))]
    if "floor_s" in out:
        rows.insert(4, (f"floor: {cp['n']} bare containers created at once, until all answered", 1,
                        fmt(out["floor_s"] * 1000), fmt(out["floor_s"] * 1000), "no workspace, no manager"))
    print(markdown_table(("case", "n", "p50 ms", "max ms", "note"), rows))
    ph = cp["phases_mean_s"]
    whose = ("the pool's refills meanwhile (the copies were handed to pooled nodes: no creation of their own), "
             "per copy" if cp["from_pool"] else "each copy's creation")
    print(f"\nfork into {cp['n']}: where {whose} went (mean ms per copy; the source's copy "
          f"held writes {cp['stall_s'] * 1000:.0f} ms, the fork answered at {cp['fork_answered_s'] * 1000:.0f} ms)")
    print(markdown_table(("phase", "mean ms"), [(k, fmt(v * 1000)) for k, v in ph.items() if v > 0.0005]))
    print(f"image_dir {args.image_dir}, creation.concurrency {args.concurrency or 'default'}, pool {args.pool}; "
          f"{load_line(load0)}")
    written = write_json("fork_bench", {"results": out, "snapshot_over_cold_p50": ratio, "image_dir": args.image_dir})
    print(f"json: {written}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
