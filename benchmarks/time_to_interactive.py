"""Time to interactive: from asking for a session to its first tool call answered, as a user
(XAgent's ToolServer client) feels it, through one manager replica on loopback.

One iteration is what XAgent's client does first: ``POST /get_cookie``, then ``POST /execute_tool``
with the session's cookie (``{"tool_name": ..., "arguments": {}}``), both on one new keep-alive
connection. The clock runs from opening it to receiving the second's answer (HTTP 200); the
session is released afterwards, in the background and untimed, so a release never delays the next
iteration. The timed requests go through a raw asyncio client (benchmarks/rawhttp.py, about
0.15 ms of CPU a request where httpx took 1 ms and more in a burst), so what is measured is the
manager and its nodes, not this process sharing their cores.

Arrival patterns (the ComputeSDK method), N iterations each:

sequential  one after another: the next starts when the previous answered.
staggered   one started every ``--stagger-ms``, whether or not the earlier ones answered.
burst       all N at once.

each with the pool off (every session a cold creation) and on (``pool.size: --pool-size``, the
pool full before each pattern starts). Then the first tool call on a session in each tier:

paused      the checker paused it (``tiers.pause_after_seconds: 1``)
stopped     ``POST /close_session``
archived    the checker removed its container, the workspace kept (``tiers.archive_after_seconds: 1``)

The managers use the project's default node settings (limits, node network, 1 GiB loop-mounted
workspaces) with the benchmark's image, a Redis of their own (other work restarting the shared
one would end a run half-way), no per-client quota (one client makes everything here) and a node
cap above what the run holds at once (the default, from the engine's memory at the 1 GiB node
limit, is about 24 on this machine).

    .venv/bin/python -m benchmarks.time_to_interactive [--n 100] [--pool-size 10] [--stagger-ms 200]
        [--resume-n N] [--patterns sequential,staggered,burst] [--cases off,pool,tiers] [--pool JSON]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.cookiejar
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from benchmarks import rawhttp
from benchmarks._support import remove_containers_retry
from benchmarks.common import (
    NODE_IMAGE,
    base_config,
    bench_id,
    command_line,
    cpu_seconds,
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
from shared.store.base import text
from testing.harness import ManagerProc

TOOL = "FileSystemEnv_print_filesys_struture"  # spawns nothing: the path, not the tool, sets the pace
TOOL_BODY = json.dumps({"tool_name": TOOL, "arguments": {}}).encode()
OFF = {"pause_after_seconds": None, "archive_after_seconds": None}
FAST_CHECKER = {"interval_seconds": 0.25, "lease_ttl_seconds": 3}
PATTERNS = ("sequential", "staggered", "burst")
TIERS = ("paused", "stopped", "archived")
TIMEOUT_S = 180.0


class _NoCookies(http.cookiejar.DefaultCookiePolicy):
    """Every session's cookie is sent explicitly: a shared jar would hand one iteration's cookie to
    the next's ``/get_cookie``."""

    def set_ok(self, cookie: Any, request: Any) -> bool:
        return False


@dataclass
class Samples:
    """One case's iterations: total, and its two parts, in seconds; failed ones by status."""

    total: list[float] = field(default_factory=list)
    create: list[float] = field(default_factory=list)
    tool: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


def client() -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=TIMEOUT_S, cookies=http.cookiejar.CookieJar(policy=_NoCookies()),
                             limits=httpx.Limits(max_connections=None, max_keepalive_connections=200))


async def tool_call(http: httpx.AsyncClient, url: str, node_id: str) -> httpx.Response:
    return await http.post(url + "/execute_tool", content=TOOL_BODY,
                           headers={"content-type": "application/json", "cookie": f"node_id={node_id}"})


async def iteration(url: str, out: Samples, release: Callable[[str], None]) -> None:
    """get_cookie, then the first tool call on the same keep-alive connection (as XAgent's client's
    session does); timed from opening the connection to the second answer. The client is raw
    asyncio (benchmarks/rawhttp.py): httpx cost 0.9-1.6 CPU s over a 100-way burst's 200 requests,
    taken from the manager and its nodes on the same cores."""
    u = urlsplit(url)
    conn = rawhttp.Connection(u.hostname or "127.0.0.1", u.port or 80, TIMEOUT_S)
    try:
        t0 = time.perf_counter()
        try:
            r = await conn.request("POST", "/get_cookie")
        except rawhttp.HTTPError as exc:
            out.error(f"get_cookie {type(exc.__cause__).__name__}")
            return
        t1 = time.perf_counter()
        node_id = r.cookie("node_id") if r.status == 200 else None
        if not node_id:
            out.error(f"get_cookie {r.status}")
            return
        try:
            t = await conn.request("POST", "/execute_tool", TOOL_BODY,
                                   {"content-type": "application/json", "cookie": f"node_id={node_id}"})
        except rawhttp.HTTPError as exc:
            out.error(f"execute_tool {type(exc.__cause__).__name__}")
            release(node_id)
            return
        t2 = time.perf_counter()
    finally:
        conn.close()
    release(node_id)
    if t.status != 200:
        out.error(f"execute_tool {t.status}")
        return
    out.total.append(t2 - t0)
    out.create.append(t1 - t0)
    out.tool.append(t2 - t1)


async def run_pattern(pattern: str, url: str, n: int, stagger_s: float, release: Callable[[str], None]) -> Samples:
    out = Samples()
    if pattern == "sequential":
        for _ in range(n):
            await iteration(url, out, release)
    elif pattern == "staggered":
        tasks = []
        for _ in range(n):
            tasks.append(asyncio.create_task(iteration(url, out, release)))
            await asyncio.sleep(stagger_s)
        await asyncio.gather(*tasks)
    else:
        await asyncio.gather(*(iteration(url, out, release) for _ in range(n)))
    return out


class Releaser:
    """Releases sessions in the background (untimed), a few at a time; waits for all at the end."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(4)
        self.failed = 0

    def __call__(self, url: str) -> Callable[[str], None]:
        def release(node_id: str) -> None:
            self.pool.submit(self._release, url, node_id)
        return release

    def _release(self, url: str, node_id: str) -> None:
        try:
            r = httpx.post(url + "/release_session", headers={"cookie": f"node_id={node_id}"}, timeout=TIMEOUT_S)
            if r.status_code != 200:
                self.failed += 1
        except httpx.HTTPError:
            self.failed += 1

    def drain(self) -> None:
        self.pool.shutdown(wait=True)
        self.pool = ThreadPoolExecutor(4)


def wait_for(what: str, ok: Callable[[], bool], timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not after {timeout:.0f}s")
        time.sleep(0.05)


async def sessions(url: str, n: int) -> list[str]:
    """n sessions made a few at a time (untimed preparation), each answering a tool call."""
    sem = asyncio.Semaphore(4)
    async with client() as http:
        async def one() -> str:
            async with sem:
                r = await http.post(url + "/get_cookie")
                if r.status_code != 200:
                    raise RuntimeError(f"/get_cookie answered {r.status_code}: {r.text[:300]}")
                node_id = r.cookies["node_id"]
                t = await tool_call(http, url, node_id)
                if t.status_code != 200:
                    raise RuntimeError(f"/execute_tool answered {t.status_code}: {t.text[:300]}")
                return node_id
        return list(await asyncio.gather(*(one() for _ in range(n))))


async def first_calls(url: str, ids: list[str]) -> Samples:
    """The first tool call on each session, one at a time."""
    out = Samples()
    async with client() as http:
        for node_id in ids:
            t0 = time.perf_counter()
            r = await tool_call(http, url, node_id)
            if r.status_code != 200:
                out.error(f"execute_tool {r.status_code}")
                continue
            out.total.append(time.perf_counter() - t0)
            out.tool.append(out.total[-1])
    return out


def _log_ms(logs: str, event: str, field: str) -> dict[str, float]:
    """node id (12) -> a milliseconds field of the manager's log lines of one event."""
    rx = re.compile(rf"{event} node_id=(\w+).*?{field}=([\d.]+)")
    return {m.group(1): float(m.group(2)) for m in rx.finditer(logs)}


def _metric(url: str, sample: str) -> float:
    """The sum of a replica's /metrics samples whose line starts with sample (0 when absent)."""
    text = httpx.get(url + "/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(sample))


def host_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy so far (all cores, /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def nodes_cpu(mid: str) -> dict[str, tuple[float, int, float]]:
    """The manager_id's containers: id -> (CPU seconds so far, throttled periods, throttled seconds) (cgroup v1)."""
    out: dict[str, tuple[float, int, float]] = {}
    for c in docker_client().containers.list(sparse=True, filters={"label": f"toolserver-manager.manager_id={mid}"}):
        with contextlib.suppress(OSError, ValueError):
            cpu = int(Path(f"/sys/fs/cgroup/cpuacct/docker/{c.id}/cpuacct.usage").read_text()) / 1e9
            stat = dict(line.split() for line in Path(f"/sys/fs/cgroup/cpu/docker/{c.id}/cpu.stat").read_text().splitlines())
            out[c.id] = (cpu, int(stat.get("nr_throttled", 0)), int(stat.get("throttled_time", 0)) / 1e9)
    return out


def dockerd_pid() -> int:
    with contextlib.suppress(OSError, ValueError):
        return int(Path("/var/run/docker.pid").read_text().strip())
    return 0


class CpuWindow:
    """Where the machine's CPU went over a window: the replica, this manager_id's nodes, the
    engine (dockerd), this benchmark (the client) and everything else (other work on the machine)."""

    def __init__(self, replica_pid: int, mid: str) -> None:
        self.replica_pid, self.mid = replica_pid, mid
        self.start = self._read()

    def _read(self) -> dict[str, float]:
        self.nodes = nodes_cpu(self.mid)
        return {"wall": time.monotonic(), "host": host_busy_seconds(), "replica": cpu_seconds([self.replica_pid]),
                "dockerd": cpu_seconds([dockerd_pid()]), "client": cpu_seconds([os.getpid()])}

    def end(self, sessions: int = 0) -> str:
        """The window's split, as a line (and per session when sessions > 0); nodes counted are
        those alive at both readings."""
        before = self.nodes
        a, b = self.start, self._read()
        d = {k: b[k] - a[k] for k in a}
        both = [(before[i], self.nodes[i]) for i in before.keys() & self.nodes.keys()]
        d["nodes"] = sum(y[0] - x[0] for x, y in both)
        d["throttled_periods"] = sum(y[1] - x[1] for x, y in both)
        d["throttled"] = sum(y[2] - x[2] for x, y in both)
        other = d["host"] - d["replica"] - d["nodes"] - d["dockerd"] - d["client"]
        cores = os.cpu_count() or 1
        return (f"CPU over the burst's {d['wall']:.1f} s ({cores} cores, {cores * d['wall']:.1f} CPU s): busy "
                f"{d['host']:.1f} s; the replica {d['replica']:.2f}, its nodes {d['nodes']:.2f} ({len(both)} alive "
                f"throughout; throttled "
                f"{int(d['throttled_periods'])} periods, {d['throttled']:.2f} s), dockerd {d['dockerd']:.2f}, "
                f"this client {d['client']:.2f}, the rest of the machine {other:.2f}"
                + (f"; CPU ms per session: replica {1000 * d['replica'] / sessions:.1f}, nodes "
                   f"{1000 * d['nodes'] / sessions:.1f}, dockerd {1000 * d['dockerd'] / sessions:.1f}, client "
                   f"{1000 * d['client'] / sessions:.1f}, rest {1000 * other / sessions:.1f}, all busy "
                   f"{1000 * d['host'] / sessions:.1f}" if sessions else ""))


def node_secret(container_id: str) -> str:
    env = docker_client().api.inspect_container(container_id)["Config"]["Env"]
    return next(e.split("=", 1)[1] for e in env if e.startswith("NODE_SECRET="))


async def trace_pool(m: ManagerProc, n: int, pooled: Callable[[], list[dict[str, str]]],
                     release: Callable[[str], None]) -> dict[str, list[float]]:
    """Where a claimed pool node's time to interactive goes, n sessions one after the other (the
    pool full before each): get_cookie (its claim and delivery from the manager's log lines), the
    first and a second tool call through the manager, and a first tool call straight to a pooled
    node (warmed, on a new connection: the node's own first answer, no manager)."""
    out: dict[str, list[float]] = {k: [] for k in (
        "total", "get_cookie", "claim", "deliver", "rest", "first", "second", "node alone")}
    ids: list[str] = []
    # one client made beforehand: each node is a new host, so each call is on a new connection
    async with client() as http, httpx.AsyncClient(timeout=TIMEOUT_S) as direct:
        for _ in range(n):
            for rec in pooled()[:1]:  # the node alone: the next pooled node's first answer, no manager
                headers = {"content-type": "application/json", "x-node-secret": node_secret(rec["container_id"])}
                t0 = time.perf_counter()
                d = await direct.post(f"http://{rec['host']}:{rec['port']}/execute_tool", content=TOOL_BODY,
                                      headers=headers)
                if d.status_code == 200:
                    out["node alone"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            r = await http.post(m.url + "/get_cookie")
            t1 = time.perf_counter()
            node_id = r.cookies.get("node_id") if r.status_code == 200 else None
            if not node_id:
                continue
            a = await tool_call(http, m.url, node_id)
            t2 = time.perf_counter()
            b = await tool_call(http, m.url, node_id)
            t3 = time.perf_counter()
            release(node_id)
            if a.status_code == b.status_code == 200:
                ids.append(node_id[:12])
                out["total"].append(t2 - t0)
                out["get_cookie"].append(t1 - t0)
                out["first"].append(t2 - t1)
                out["second"].append(t3 - t2)
    logs = m.logs()
    claimed, delivered = _log_ms(logs, "pool_claimed", "claim_ms"), _log_ms(logs, "pool_delivered", "deliver_ms")
    for i, short in enumerate(ids):
        claim_ms, deliver_ms = claimed.get(short), delivered.get(short)
        if claim_ms is None or deliver_ms is None:  # not from the pool (a cold creation): no claim to split
            continue
        out["claim"].append(claim_ms / 1000)
        out["deliver"].append(deliver_ms / 1000)
        out["rest"].append(out["get_cookie"][i] - (claim_ms + deliver_ms) / 1000)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.time_to_interactive", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100, help="iterations per pattern and case (default 100)")
    p.add_argument("--pool-size", type=int, default=10, help="pool.size of the pool-on case (default 10)")
    p.add_argument("--pool", default="{}", help="more pool settings for the pool-on case, JSON (default {})")
    p.add_argument("--stagger-ms", type=float, default=200.0, help="interval of the staggered pattern (default 200)")
    p.add_argument("--resume-n", type=int, default=0, help="sessions per tier (default: --n)")
    p.add_argument("--patterns", default=",".join(PATTERNS), help="which arrival patterns (default all)")
    p.add_argument("--cases", default="off,pool,tiers",
                   help="pool off, pool on, tier resumes, trace (a claimed node phase by phase; with pool), "
                        "demand (a burst, then the next one from the pool it sized) (default off,pool,tiers)")
    p.add_argument("--release-during-burst", action="store_true",
                   help="demand: release each of the next burst's sessions once answered, beside the burst "
                        "(default: all after it; a release is engine work no user's first call waits for)")
    args = p.parse_args(argv)
    patterns = [x for x in args.patterns.split(",") if x]
    cases = set(args.cases.split(","))
    resume_n = args.resume_n or args.n
    print(f"$ {command_line()}", flush=True)
    load0 = os.getloadavg()
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="tsm-bench-tti-"))
    redis_proc, url = start_private_redis(tmp)
    docker_client().close()  # fails early when the engine is down or the image missing
    r = redis_client(url)
    cap = args.n + args.pool_size + resume_n + 20
    engine = {"docker": {"creation_kwargs": {**DockerConfig().creation_kwargs, "image": NODE_IMAGE}}}
    node = {"creation_wait_seconds": 120,
            "idle_grace_seconds": 0, "idling_close_minutes": None}
    common = {"redis": {"url": url}, "checker": FAST_CHECKER, "quota": {"per_client": 0},
              "cluster": {"max_nodes_per_manager": cap}}
    made: list[tuple[str, str]] = []
    results: dict[str, Samples] = {}
    traced: dict[str, list[float]] = {}
    demand_note = ""
    releaser = Releaser()
    procs: list[ManagerProc] = []

    def manager(kind: str, tiers: dict[str, Any], **over: Any) -> tuple[ManagerProc, str, str]:
        prefix, mid = bench_id(f"tti-{kind}"), bench_id(f"tti-{kind}")
        made.append((prefix, mid))
        m = ManagerProc(base_config(prefix, mid, node={**node, "tiers": tiers}, engine=engine, **common, **over),
                        tmp, kind)
        procs.append(m)
        m.start(timeout=60)
        return m, prefix, mid

    def patterns_on(label: str, m: ManagerProc, before: Callable[[], None]) -> None:
        for pattern in patterns:
            before()
            s = asyncio.run(run_pattern(pattern, m.url, args.n, args.stagger_ms / 1000, releaser(m.url)))
            releaser.drain()
            results[f"{label}, {pattern}"] = s
            print(f"  {label}, {pattern}: {len(s.total)} answered, errors {s.errors or 0}", file=sys.stderr,
                  flush=True)

    failed = True
    try:
        if "off" in cases or "tiers" in cases:
            off, _, _ = manager("off", OFF)
            asyncio.run(run_pattern("sequential", off.url, 1, 0, releaser(off.url)))  # warm-up: network, image
            releaser.drain()
            if "off" in cases:
                patterns_on("pool off", off, lambda: None)
            if "tiers" in cases:
                ids = asyncio.run(sessions(off.url, resume_n))
                for node_id in ids:
                    rr = httpx.post(off.url + "/close_session", headers={"cookie": f"node_id={node_id}"},
                                    timeout=TIMEOUT_S)
                    if rr.status_code != 200:
                        raise RuntimeError(f"/close_session answered {rr.status_code}: {rr.text[:300]}")
                results["resume from stopped"] = asyncio.run(first_calls(off.url, ids))
            off.stop()
        if "pool" in cases:
            pool_cfg = {"size": args.pool_size, **json.loads(args.pool)}
            pm, prefix, mid = manager("pool", OFF, pool=pool_cfg)
            key = Keys(prefix).pool(mid)

            def full() -> None:
                wait_for("the pool filling", lambda: int(r.llen(key)) >= args.pool_size)
            patterns_on("pool on", pm, full)
            if "trace" in cases:
                def pooled() -> list[dict[str, str]]:
                    full()
                    def s(v: bytes | str) -> str:
                        return v.decode() if isinstance(v, bytes) else v
                    return [{s(k): s(v) for k, v in r.hgetall(Keys(prefix).node(s(i))).items()}
                            for i in r.lrange(key, 0, 0)]
                traced = asyncio.run(trace_pool(pm, args.n, pooled, releaser(pm.url)))
                releaser.drain()
            pm.stop()
        if "demand" in cases:
            # the pool sized by demand alone (size 0): a first burst finds it empty and is the demand
            # that sizes it (its largest burst, remembered); the next burst is measured
            dm, prefix, mid = manager("demand", OFF, pool={"size": 0, "max_size": args.n, **json.loads(args.pool)})
            key = Keys(prefix).pool(mid)
            wait_for("the checker's first pass of the pool",
                     lambda: "toolserver_pool_burst_peak{" in httpx.get(dm.url + "/metrics", timeout=30).text)
            results["pool by demand, first burst (cold)"] = asyncio.run(
                run_pattern("burst", dm.url, args.n, 0, releaser(dm.url)))
            releaser.drain()
            t_fill = time.monotonic()
            wait_for("the pool sized by the burst", lambda: int(r.llen(key)) >= args.n, timeout=1800)
            fill_seconds = time.monotonic() - t_fill
            gauges = {g: _metric(dm.url, f"toolserver_pool_{g}{{") for g in ("target_nodes", "burst_peak", "arrival_rate")}
            hits0, claims0 = (_metric(dm.url, 'toolserver_pool_claims_total{result="hit"'),
                              _metric(dm.url, "toolserver_pool_claims_total{"))
            assert dm.proc is not None
            cpu0, wall0, load_before = cpu_seconds([dm.proc.pid]), time.monotonic(), os.getloadavg()[0]
            window = CpuWindow(dm.proc.pid, mid)
            # the sessions are released once the burst is over (--release-during-burst: each as soon as
            # its call answered, engine work beside the burst's own)
            held: list[str] = []
            results["pool by demand, next burst"] = asyncio.run(
                run_pattern("burst", dm.url, args.n, 0, releaser(dm.url) if args.release_during_burst else held.append))
            cpu, wall = cpu_seconds([dm.proc.pid]) - cpu0, time.monotonic() - wall0
            cpu_note = window.end(args.n)
            for node_id in held:
                releaser(dm.url)(node_id)
            hits = _metric(dm.url, 'toolserver_pool_claims_total{result="hit"') - hits0
            claims = _metric(dm.url, "toolserver_pool_claims_total{") - claims0
            releaser.drain()
            demand_note = (f"pool by demand: filled to {args.n} in {fill_seconds:.0f} s after the first burst; "
                           f"before the next: target {gauges['target_nodes']:g}, burst peak {gauges['burst_peak']:g}, "
                           f"arrival rate {gauges['arrival_rate']:.2f}/s; the next burst: {hits:g} pool hits of "
                           f"{claims:g} claims, the replica used "
                           f"{cpu:.2f} CPU s in {wall:.1f} s ({cpu / max(wall, 1e-9):.0%} of a core; load "
                           f"{load_before:.1f} → {os.getloadavg()[0]:.1f}); {cpu_note}")
            print(f"  {demand_note}", file=sys.stderr, flush=True)
            dm.stop()
        if "tiers" in cases:
            for tier, tiers in (("paused", {**OFF, "pause_after_seconds": 1}),
                                ("archived", {**OFF, "archive_after_seconds": 1})):
                tm, prefix, _ = manager(tier, tiers)
                ids = asyncio.run(sessions(tm.url, resume_n))
                k = Keys(prefix)

                def all_in(k: Keys = k, tier: str = tier, ids: list[str] = ids) -> bool:
                    return all(text(r.hget(k.node(i), "status") or b"") == tier for i in ids)

                wait_for(f"sessions {tier}", all_in)
                results[f"resume from {tier}"] = asyncio.run(first_calls(tm.url, ids))
                tm.stop()
        failed = False
    finally:
        releaser.drain()
        for m in procs:
            m.stop()
        if failed:
            for m in procs:
                sys.stderr.write(f"\n----- log of {m.log_path.name} -----\n{m.logs()[-4000:]}\n")
        for prefix, mid in made:
            remove_containers_retry(mid)
            delete_keys(r, prefix)
        r.close()
        redis_proc.terminate()
        redis_proc.wait()
        if not failed:
            shutil.rmtree(tmp, ignore_errors=True)

    rows = []
    for case, s in results.items():
        t, c, u = summarize(s.total), summarize(s.create), summarize(s.tool)
        errors = sum(s.errors.values())
        rows.append([case, t["n"], fmt(t["p50_ms"]), fmt(t["p90_ms"]), fmt(t["p99_ms"]), fmt(t["max_ms"]),
                     fmt(c["p50_ms"]) if s.create else "-", fmt(u["p50_ms"]),
                     f"{errors} {json.dumps(s.errors)}" if errors else "0"])
    print()
    print(f"create → first tool call answered ({TOOL}); n per case: {args.n} (tiers: {resume_n}); "
          f"pool.size {args.pool_size}; staggered every {args.stagger_ms:g} ms")
    print(markdown_table(["case", "answered", "p50 ms", "p90 ms", "p99 ms", "max ms", "get_cookie p50 ms",
                          "tool call p50 ms", "errors"], rows))
    if demand_note:
        print(demand_note)
    if traced:
        names = {"total": "time to interactive (get_cookie + first tool call)",
                 "get_cookie": "get_cookie, from the client", "claim": "  claim in Redis (one script)",
                 "deliver": "  role and ready event (one round trip)",
                 "rest": "  the rest: HTTP, cookie, handler", "first": "first tool call through the manager",
                 "second": "second tool call through the manager",
                 "node alone": "node alone: first tool call on a warmed pooled node, new connection"}
        print()
        print("a claimed pool node, phase by phase (sequential, the pool full before each)")
        print(markdown_table(["phase", "n", "p50 ms", "p90 ms", "p99 ms", "max ms"],
                             [[names[k], summarize(v)["n"], *(fmt(summarize(v)[q]) for q in
                                                             ("p50_ms", "p90_ms", "p99_ms", "max_ms"))]
                              for k, v in traced.items() if v]))
    goals = []
    for pattern, p99_goal in (("sequential", 150.0), ("burst", 500.0), ("by demand, next burst", 500.0)):
        got = results.get(f"pool on, {pattern}") or results.get(f"pool {pattern}")
        if got and got.total:
            t = summarize(got.total)
            p50_ok = pattern != "sequential" or t["p50_ms"] <= 60.0
            goals.append(f"pool {'' if pattern.startswith('by') else 'on, '}{pattern}: p99 {t['p99_ms']:.1f} ms ≤ {p99_goal:g}"
                         + (f", p50 {t['p50_ms']:.1f} ms ≤ 60" if pattern == "sequential" else "")
                         + (" PASS" if p50_ok and t["p99_ms"] <= p99_goal and not got.errors else " FAIL"))
    for g in goals:
        print(f"goal: {g}")
    print(load_line(load0))
    path = write_json("time_to_interactive", {
        "params": vars(args), "loadavg_at_start": load0, "seconds": time.monotonic() - started,
        "cases": {k: {"total": summarize(v.total), "get_cookie": summarize(v.create), "tool": summarize(v.tool),
                      "errors": v.errors, "samples_ms": [x * 1000 for x in v.total]} for k, v in results.items()},
        "trace": {k: summarize(v) for k, v in traced.items() if v},
        "release_failures": releaser.failed})
    print(f"raw numbers: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
