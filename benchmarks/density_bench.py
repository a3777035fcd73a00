"""Density: N sessions (default 200) on one host through one manager replica: created, answering,
idled into the pause tier, resumed, stopped and archived; what each idle session costs the host
in each tier; and the checker's pass with N real sessions plus 1,000 more records.

1. create    N sessions, ``--concurrency`` at a time: ``POST /get_cookie`` then a first tool call
             (``POST /execute_tool``); each timed, errors counted by status and message.
2. answering one tool call on every session (the same concurrency).
3. paused    the checker pauses them (``tiers.pause_after_seconds``); the wait is timed.
4. checker   1,000 archived session records (no container: a host's history) are written with the
             store, then for ``--checker-seconds`` the checker's own pass histogram
             (``toolserver_checker_cycle_duration_seconds`` from ``/metrics``) is read every 50 ms:
             each pass that ended alone between two readings took what the sum rose by, so
             p50/p99/max are of the passes themselves (the bucket bounds are printed too).
5. resumed   one tool call on each paused session, one at a time.
6. stopped   ``POST /close_session`` on each.
7. archived  the replica restarts with ``tiers.archive_after_seconds: 1`` (a config change is a
             rolling restart: replicas are stateless); the checker archives them (container removed,
             workspace kept).

Memory per session and tier: the host's used memory (MemTotal - MemAvailable) over its value
before the first session, divided by N (other work on the machine moves it too), and the nodes'
own cgroup memory (``memory.usage_in_bytes``). Beside it what the host holds for the sessions:
loop devices attached, ports on the node network's bridge, the replica's descriptors and RSS.

The replica runs the project's default node settings with the benchmark's image, a Redis of its
own, no per-client quota, and ``cluster.max_nodes_per_manager`` N + 10 (the default cap is what
the engine's memory holds at the 1 GiB node limit: about 24 here). Everything is removed at the
end by the run's label (containers, workspaces, loop devices, the network), even on failure.

    .venv/bin/python -m benchmarks.density_bench [--n 200] [--concurrency 8] [--records 1000]
        [--pause-after 10] [--checker-seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import http.cookiejar
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from benchmarks._support import remove_containers_retry
from benchmarks.common import (
    LABEL,
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
    start_private_redis,
    summarize,
    write_json,
)
from shared.config import DockerConfig
from shared.keys import Keys
from testing.harness import ManagerProc

TOOL_BODY = json.dumps({"tool_name": "FileSystemEnv_print_filesys_struture", "arguments": {}}).encode()
TIMEOUT_S = 300.0
MIB = 1 << 20
CYCLE_METRIC = "toolserver_checker_cycle_duration_seconds"
GOAL_CHECKER_P99_S = 1.0


class _NoCookies(http.cookiejar.DefaultCookiePolicy):
    def set_ok(self, cookie: Any, request: Any) -> bool:
        return False  # every session's cookie is sent explicitly


def client() -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=TIMEOUT_S, cookies=http.cookiejar.CookieJar(policy=_NoCookies()),
                             limits=httpx.Limits(max_connections=64, max_keepalive_connections=64))


class Tally:
    """Latencies of one phase and its failures, by what failed (first message kept)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.errors: dict[str, int] = {}
        self.examples: dict[str, str] = {}

    def fail(self, what: str, detail: str = "") -> None:
        self.errors[what] = self.errors.get(what, 0) + 1
        self.examples.setdefault(what, detail[:300])

    @property
    def n_errors(self) -> int:
        return sum(self.errors.values())


async def gather_limited(n: int, limit: int, fn: Callable[[int], Awaitable[None]]) -> None:
    sem = asyncio.Semaphore(limit)

    async def one(i: int) -> None:
        async with sem:
            await fn(i)
    await asyncio.gather(*(one(i) for i in range(n)))


async def tool(http: httpx.AsyncClient, url: str, node_id: str, out: Tally) -> bool:
    t0 = time.perf_counter()
    try:
        r = await http.post(url + "/execute_tool", content=TOOL_BODY,
                            headers={"content-type": "application/json", "cookie": f"node_id={node_id}"})
    except httpx.HTTPError as exc:
        out.fail(f"execute_tool {type(exc).__name__}", str(exc))
        return False
    if r.status_code != 200:
        out.fail(f"execute_tool {r.status_code}", r.text)
        return False
    out.seconds.append(time.perf_counter() - t0)
    return True


async def create_all(url: str, n: int, limit: int) -> tuple[list[str], Tally]:
    ids: list[str] = []
    out = Tally()
    async with client() as http:
        async def one(_: int) -> None:
            t0 = time.perf_counter()
            try:
                r = await http.post(url + "/get_cookie")
            except httpx.HTTPError as exc:
                out.fail(f"get_cookie {type(exc).__name__}", str(exc))
                return
            node_id = r.cookies.get("node_id") if r.status_code == 200 else None
            if not node_id:
                out.fail(f"get_cookie {r.status_code}", r.text)
                return
            ids.append(node_id)
            if await tool(http, url, node_id, Tally()):
                out.seconds.append(time.perf_counter() - t0)
            else:
                out.fail("first tool call")
        await gather_limited(n, limit, one)
    return ids, out


async def call_all(url: str, ids: list[str], limit: int, path: str = "") -> Tally:
    out = Tally()
    async with client() as http:
        async def one(i: int) -> None:
            if not path:
                await tool(http, url, ids[i], out)
                return
            t0 = time.perf_counter()
            r = await http.post(url + path, headers={"cookie": f"node_id={ids[i]}"})
            if r.status_code != 200:
                out.fail(f"{path} {r.status_code}", r.text)
            else:
                out.seconds.append(time.perf_counter() - t0)
        await gather_limited(len(ids), limit, one)
    return out


async def write_archived_records(redis_url: str, prefix: str, mid: str, n: int) -> float:
    """n archived session records (no container, a workspace name) written with the store."""
    from shared.models import NodeRecord, NodeStatus
    from shared.store import Store, connect

    redis = connect(redis_url)
    store = Store(redis, Keys(prefix))
    now = time.time()
    t0 = time.perf_counter()
    ids = [os.urandom(32).hex() for _ in range(n)]
    sem = asyncio.Semaphore(32)

    async def put(nid: str) -> None:
        rec = NodeRecord(id=nid, short_id=nid[:12], manager_id=mid, status=NodeStatus.ARCHIVED, role="node",
                         created_at=now, updated_at=now, last_request_at=now, archived_at=now,
                         workspace=f"ws-{nid}", replica_id="bench-synthetic", image=NODE_IMAGE)
        async with sem:
            await store.put_node(rec)
    try:
        await asyncio.gather(*(put(i) for i in ids))
        await redis.sadd(Keys(prefix).archived(mid), *ids)
    finally:
        await redis.aclose()
    return time.perf_counter() - t0


def cycle_histogram(url: str) -> dict[str, float]:
    """The checker's pass histogram from /metrics: cumulative counts by bucket bound, _count, _sum."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        if family.name != CYCLE_METRIC:
            continue
        for s in family.samples:
            key = {"_bucket": f"le={s.labels.get('le')}", "_count": "count", "_sum": "sum"}.get(
                s.name[len(CYCLE_METRIC):])
            if key:
                out[key] = out.get(key, 0.0) + s.value
    return out


def histogram_window(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """Passes between two readings: count, mean, and the bucket bound holding p50 and p99."""
    count = after.get("count", 0) - before.get("count", 0)
    total = after.get("sum", 0) - before.get("sum", 0)
    bounds = sorted((float(k[3:]), after[k] - before.get(k, 0)) for k in after if k.startswith("le="))

    def quantile(q: float) -> float:
        for bound, cum in bounds:
            if count and cum >= q * count:
                return bound
        return float("nan")
    return {"passes": int(count), "mean_s": total / count if count else float("nan"),
            "p50_bucket_s": quantile(0.5), "p99_bucket_s": quantile(0.99)}


def pass_durations(url: str, seconds: float, every: float = 0.05) -> tuple[list[float], int]:
    """Each checker pass's own duration over a window: /metrics read every few tens of ms, and a
    pass whose count rose by one between two readings took what the histogram's sum rose by (the
    exact figure, not a bucket bound). Also how many passes ended together between two readings
    (not split: too quick to tell apart)."""
    got: list[float] = []
    merged = 0
    prev = cycle_histogram(url)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(every)
        cur = cycle_histogram(url)
        n = cur.get("count", 0) - prev.get("count", 0)
        if n == 1:
            got.append(cur.get("sum", 0) - prev.get("sum", 0))
        elif n > 1:
            merged += int(n)
        prev = cur
    return got, merged


def host_used() -> int:
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, value = line.split(":", 1)
        info[key] = int(value.split()[0]) * 1024
    return info["MemTotal"] - info["MemAvailable"]


def cgroup_memory(cid: str) -> int:
    """A container's memory usage from its cgroup (v1 cgroupfs, v1 systemd, v2); 0 when not found."""
    for path in (f"/sys/fs/cgroup/memory/docker/{cid}/memory.usage_in_bytes",
                 f"/sys/fs/cgroup/memory/system.slice/docker-{cid}.scope/memory.usage_in_bytes",
                 f"/sys/fs/cgroup/system.slice/docker-{cid}.scope/memory.current"):
        try:
            return int(Path(path).read_text())
        except (OSError, ValueError):
            continue
    return 0


class Host:
    """What the host holds for this run's sessions."""

    def __init__(self, docker: Any, mid: str) -> None:
        self.docker, self.mid = docker, mid

    def containers(self, status: str | None = None) -> list[Any]:
        filters: dict[str, Any] = {"label": f"{LABEL}={self.mid}"}
        if status:
            filters["status"] = status
        return list(self.docker.containers.list(all=True, filters=filters, sparse=True))

    def nodes_memory(self) -> int:
        return sum(cgroup_memory(c.id) for c in self.containers())

    def loop_devices(self) -> int:
        files = {(v.attrs.get("Labels") or {}).get("toolserver-manager.image_file", "")
                 for v in self.docker.volumes.list(filters={"label": f"{LABEL}={self.mid}"})} - {""}
        out = subprocess.run(["losetup", "--list", "--noheadings", "--output", "BACK-FILE"], capture_output=True,
                             text=True, check=False).stdout
        return sum(1 for line in out.splitlines() if line.strip() in files)

    def bridge_ports(self) -> int:
        nets = self.docker.networks.list(filters={"label": f"{LABEL}={self.mid}"})
        total = 0
        for net in nets:
            bridge = (net.attrs.get("Options") or {}).get("com.docker.network.bridge.name") or f"br-{net.id[:12]}"
            with_ports = Path(f"/sys/class/net/{bridge}/brif")
            total += len(list(with_ports.iterdir())) if with_ports.exists() else 0
        return total


def process_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def process_rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def wait_status(r: Any, keys: Keys, ids: list[str], status: str, timeout: float) -> float:
    """Seconds until every record has this status."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    while True:
        pipe = r.pipeline(transaction=False)
        for i in ids:
            pipe.hget(keys.node(i), "status")
        left = sum(1 for s in pipe.execute() if (s or b"").decode() != status)
        if not left:
            return time.monotonic() - t0
        if time.monotonic() > deadline:
            raise RuntimeError(f"{left} of {len(ids)} sessions not {status} after {timeout:.0f}s")
        time.sleep(0.25)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.density_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200, help="sessions (default 200)")
    p.add_argument("--concurrency", type=int, default=8, help="creations and calls at once (default 8)")
    p.add_argument("--records", type=int, default=1000, help="archived records beside them (default 1000)")
    p.add_argument("--pause-after", type=float, default=10.0, help="tiers.pause_after_seconds (default 10)")
    p.add_argument("--checker-seconds", type=float, default=20.0, help="checker window (default 20)")
    args = p.parse_args(argv)
    print(f"$ {command_line()}", flush=True)
    load0 = os.getloadavg()
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="tsm-bench-density-"))
    redis_proc, url = start_private_redis(tmp)
    docker, r = docker_client(), redis_client(url)
    prefix, mid = bench_id("density"), bench_id("density")
    keys = Keys(prefix)
    host = Host(docker, mid)
    engine = {"docker": {"creation_kwargs": {**DockerConfig().creation_kwargs, "image": NODE_IMAGE}}}
    node = {"creation_wait_seconds": 120,
            "idle_grace_seconds": 0, "idling_close_minutes": None}
    tiers = {"pause_after_seconds": args.pause_after, "archive_after_seconds": None}

    def config(**tier_over: Any) -> dict[str, Any]:
        return base_config(prefix, mid, node={**node, "tiers": {**tiers, **tier_over}}, engine=engine, redis={"url": url},
                           quota={"per_client": 0}, cluster={"max_nodes_per_manager": args.n + 10},
                           checker={"stuck_creation_seconds": 600})

    m = ManagerProc(config(), tmp, "density")
    procs = [m]
    phases: dict[str, Tally] = {}
    waits: dict[str, float] = {}
    memory: dict[str, dict[str, float]] = {}
    resources: dict[str, dict[str, int]] = {}
    checker: dict[str, Any] = {}
    ids: list[str] = []

    def snapshot(name: str, proc: ManagerProc) -> None:
        time.sleep(3)  # the engine's and kernel's books settle
        used = host_used() - base_used
        cg = host.nodes_memory()
        memory[name] = {"host_used_mib": used / MIB, "host_mib_per_session": used / MIB / max(1, len(ids)),
                        "cgroups_mib": cg / MIB, "cgroups_mib_per_session": cg / MIB / max(1, len(ids))}
        resources[name] = {"containers": len(host.containers()), "running": len(host.containers("running")),
                           "loop_devices": host.loop_devices(), "bridge_ports": host.bridge_ports(),
                           "manager_fds": process_fds(proc.pid), "manager_rss_mib": process_rss(proc.pid) // MIB}
        print(f"  {name}: {memory[name]} {resources[name]}", file=sys.stderr, flush=True)

    failed = True
    base_used = host_used()
    try:
        m.start(timeout=60)
        t0 = time.monotonic()
        ids, phases["create + first tool call"] = asyncio.run(create_all(m.url, args.n, args.concurrency))
        waits["create all"] = time.monotonic() - t0
        print(f"  created {len(ids)} in {waits['create all']:.0f}s; errors {phases['create + first tool call'].errors}",
              file=sys.stderr, flush=True)
        phases["answering: a tool call each"] = asyncio.run(call_all(m.url, ids, args.concurrency))
        snapshot("running", m)
        waits["all paused"] = wait_status(r, keys, ids, "paused", args.pause_after + 300)
        snapshot("paused", m)

        waits["records written"] = asyncio.run(write_archived_records(url, prefix, mid, args.records))
        time.sleep(2)  # the next passes see them
        before = cycle_histogram(m.url)
        each, merged = pass_durations(m.url, args.checker_seconds)
        checker = histogram_window(before, cycle_histogram(m.url))
        if each:
            q = summarize(each)
            checker.update(timed=q["n"], merged=merged, p50_s=q["p50_ms"] / 1000, p99_s=q["p99_ms"] / 1000,
                           max_s=q["max_ms"] / 1000)
        checker["records"] = int(r.scard(keys.manager_nodes(mid)))
        print(f"  checker: {checker}", file=sys.stderr, flush=True)

        phases["resume from paused: a tool call each"] = asyncio.run(call_all(m.url, ids, 1))
        phases["close_session each"] = asyncio.run(call_all(m.url, ids, args.concurrency, "/close_session"))
        waits["all stopped"] = wait_status(r, keys, ids, "exited", 300)
        snapshot("stopped", m)
        m.stop()
        m = ManagerProc(config(archive_after_seconds=1), tmp, "density-archive")
        procs.append(m)
        m.start(timeout=60)
        waits["all archived"] = wait_status(r, keys, ids, "archived", 600)
        snapshot("archived", m)
        failed = False
    finally:
        for proc in procs:
            proc.stop()
        if failed:
            for proc in procs:
                sys.stderr.write(f"\n----- log of {proc.log_path.name} -----\n{proc.logs()[-6000:]}\n")
        t_clean = time.monotonic()
        removed = remove_containers_retry(mid, timeout=600)
        waits["cleanup"] = time.monotonic() - t_clean
        delete_keys(r, prefix)
        r.close()
        docker.close()
        redis_proc.terminate()
        redis_proc.wait()
        if not failed:
            shutil.rmtree(tmp, ignore_errors=True)

    print()
    print(f"{args.n} sessions on one host, {args.concurrency} at a time; pause after {args.pause_after:g} s idle")
    rows = []
    for name, t in phases.items():
        s = summarize(t.seconds)
        rows.append([name, s["n"], fmt(s["p50_ms"]), fmt(s["p99_ms"]), fmt(s["max_ms"]),
                     f"{t.n_errors} {json.dumps(t.errors)}" if t.n_errors else "0"])
    print(markdown_table(["phase", "ok", "p50 ms", "p99 ms", "max ms", "errors"], rows))
    print()
    print(markdown_table(["wait", "seconds"], [[k, fmt(v)] for k, v in waits.items()]))
    print()
    mrows = []
    for tier, mem in memory.items():
        res = resources[tier]
        mrows.append([tier, fmt(mem["host_mib_per_session"], 2), fmt(mem["cgroups_mib_per_session"], 2),
                      fmt(mem["host_used_mib"]), res["containers"], res["running"], res["loop_devices"],
                      res["bridge_ports"], res["manager_fds"], res["manager_rss_mib"]])
    print(markdown_table(["tier", "host MiB/session", "cgroup MiB/session", "host used MiB (over before)",
                          "containers", "running", "loop devices", "bridge ports", "manager fds",
                          "manager RSS MiB"], mrows))
    print()
    if checker:
        print(f"checker passes over {args.checker_seconds:g} s with {len(ids)} real sessions and {args.records} "
              f"archived records ({checker['records']} records of this manager_id): {checker['passes']} passes, "
              f"mean {checker['mean_s'] * 1000:.1f} ms, p50 ≤ {checker['p50_bucket_s']:g} s, "
              f"p99 ≤ {checker['p99_bucket_s']:g} s (histogram bucket bounds)")
        if "p99_s" in checker:
            print(f"each pass timed ({checker['timed']} passes, {checker['merged']} too close to split): "
                  f"p50 {checker['p50_s'] * 1000:.1f} ms, p99 {checker['p99_s'] * 1000:.1f} ms, "
                  f"max {checker['max_s'] * 1000:.1f} ms")
        p99 = checker.get("p99_s", checker["p99_bucket_s"])
        print(f"goal: checker pass p99 {p99 * 1000:.1f} ms ≤ {GOAL_CHECKER_P99_S * 1000:g} ms: "
              f"{'PASS' if p99 <= GOAL_CHECKER_P99_S else 'FAIL'}")
    errors = sum(t.n_errors for t in phases.values())
    print(f"errors: {errors} ({'PASS' if errors == 0 and len(ids) == args.n else 'FAIL'}: goal 0); "
          f"cleanup removed {removed} containers in {waits['cleanup']:.0f}s")
    print(load_line(load0))
    path = write_json("density_bench", {
        "params": vars(args), "loadavg_at_start": load0, "seconds": time.monotonic() - started,
        "phases": {k: {**summarize(v.seconds), "errors": v.errors, "examples": v.examples} for k, v in phases.items()},
        "waits_s": waits, "memory": memory, "resources": resources, "checker": checker})
    print(f"raw numbers: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
